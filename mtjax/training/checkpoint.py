"""Orbax checkpoints of the train state, and the workdir's config guard.

WORKDIR/checkpoints/<step>/state holds {'step', 'params' (trainable leaves),
'opt_state'}. Frozen leaves are not saved: they are rebuilt deterministically
from the config (config.seed or config.model.hf_path) at start.

Atomicity is orbax's: a step is written to '<step>.orbax-checkpoint-tmp-*'
and renamed when complete, and CheckpointManager lists only finalized steps,
so a save killed half-way is never restored. Such leftovers are reported
(never deleted) by `incomplete_checkpoints`. A finalized checkpoint whose
files were damaged later (truncated, zeroed, missing) fails tensorstore's
read checks: `restore_latest` names it, moves it aside and uses the previous
one.
"""
import datetime
import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint.checkpoint_managers import save_decision_policy as save_policy

from mtjax import distributed

TMP_MARKER = ".orbax-checkpoint-tmp"

Config = Any  # an ml_collections.ConfigDict


def manager(workdir: str, save_every: int, keep: int,
            async_save: bool = True) -> ocp.CheckpointManager:
  """CheckpointManager saving every `save_every` steps and keeping the last `keep`."""
  # Orbax's default policy also saves the first step; keep saves periodic
  # and forced ones: the final step and the preemption step, which the fit
  # loop decides (distributed.PreemptionNotice).
  policy = save_policy.FixedIntervalPolicy(save_every)
  options = ocp.CheckpointManagerOptions(
      save_decision_policy=policy, max_to_keep=keep, create=True,
      enable_async_checkpointing=async_save, cleanup_tmp_directories=False)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir),
                                            "checkpoints"),
                               options=options, item_names=("state",))


def save(mngr: ocp.CheckpointManager, step: int, state: dict,
         force: bool = False) -> bool:
  """Saves if the interval says so (or force); returns whether it saved."""
  return mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state)), force=force)


def restore_latest(mngr: ocp.CheckpointManager, state: dict) -> tuple:
  """(state, step) from the latest checkpoint that restores, or (state, 0).

  `state` is the freshly initialised state: its shapes, dtypes and shardings
  are the restore target, so arrays land directly where the train step
  expects them (under any mesh, whatever mesh saved them).

  A finalized checkpoint that fails to restore (a truncated or zeroed array
  file, a missing file: tensorstore's checks fail) is named in the log and
  moved aside to '<step>.damaged' (kept, never deleted), and the previous
  one is tried; training then redoes the steps since that one.
  """
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      restored = mngr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target)))
    except Exception as e:  # noqa: BLE001 (any read failure: damaged)
      aside = move_aside(mngr, step)
      logging.error("checkpoint %d cannot be restored (%s: %s); moved to %s, "
                    "trying the previous one", step, type(e).__name__,
                    str(e).splitlines()[0][:300], aside)
      print(f"damaged checkpoint {step} ({type(e).__name__}) moved to "
            f"{aside}; trying the previous one", flush=True)
      continue
    return restored["state"], step
  return state, 0


def move_aside(mngr: ocp.CheckpointManager, step: int) -> str:
  """Renames checkpoint `step` to '<step>.damaged[.<n>]' (process 0; every
  process waits), and makes the manager forget it."""
  folder = os.fspath(mngr.directory)
  src = os.path.join(folder, str(step))
  dst, n = src + ".damaged", 1
  while os.path.exists(dst):
    dst, n = f"{src}.damaged.{n}", n + 1
  if jax.process_index() == 0:
    os.rename(src, dst)
  distributed.sync(f"checkpoint_move_aside_{step}")
  mngr.reload()
  return dst


def incomplete_checkpoints(workdir: str) -> list:
  """Names of unfinished (tmp) checkpoint folders left by an interrupted save."""
  folder = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(folder):
    return []
  return sorted(n for n in os.listdir(folder) if TMP_MARKER in n)


# ------------------------------------------------------------ config guard

def config_to_dict(config: Config) -> dict:
  """JSON-safe plain dict of an ml_collections config."""
  return json.loads(config.to_json_best_effort(sort_keys=True))


def _flat(d, prefix=""):
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flat(v, key + "."))
    else:
      out[key] = v
  return out


# Keys that may change between a run and its resumption.
RESUMABLE_KEYS = ("overwrite_config",)


def config_differences(saved: dict, current: dict) -> list:
  """[(key, saved value, current value)] for keys that differ."""
  a, b = _flat(saved), _flat(current)
  keys = sorted(set(a) | set(b))
  missing = "<absent>"
  return [(k, a.get(k, missing), b.get(k, missing)) for k in keys
          if a.get(k, missing) != b.get(k, missing)
          and not k.startswith(RESUMABLE_KEYS)]


def check_workdir_config(workdir: str, config: Config,
                         is_writer: bool = True) -> None:
  """Writes WORKDIR/config.json, or refuses a workdir holding another config.

  With config.overwrite_config=True the old file is kept as
  config.<timestamp>.json and the new one written; training then resumes from
  the workdir's latest checkpoint.
  """
  path = os.path.join(workdir, "config.json")
  current = config_to_dict(config)
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    diffs = config_differences(saved, current)
    if not diffs:
      return
    if not config.get("overwrite_config", False):
      lines = "\n".join(f"  {k}: saved {a!r}, now {b!r}" for k, a, b in diffs)
      raise ValueError(
          f"{workdir} holds a run with a different config ({path}):\n{lines}\n"
          "Use a new --workdir, or pass --config.overwrite_config=True to "
          "continue this workdir with the new config (the old config.json is "
          "kept as config.<time>.json).")
    if is_writer:
      stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
      os.replace(path, os.path.join(workdir, f"config.{stamp}.json"))
      logging.warning("overwrite_config: %d changed keys; old config kept as "
                      "config.%s.json", len(diffs), stamp)
  if is_writer:
    os.makedirs(workdir, exist_ok=True)
    with open(path, "w") as f:
      json.dump(current, f, indent=2, sort_keys=True)
