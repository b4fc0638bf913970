"""Orbax checkpoints of the train state, and the workdir's config guard.

WORKDIR/checkpoints/<step>/state holds {'step', 'params' (trainable leaves),
'opt_state'}. Frozen leaves are not saved: they are rebuilt deterministically
from the config (config.seed or config.model.hf_path) at start. WORKDIR may
be a local folder or a gs:// URL (mtjax.paths): orbax gets the URL as it is.

Atomicity is orbax's: on a local disk a step is written to
'<step>.orbax-checkpoint-tmp*' and renamed when complete; on an object store
(gs://) it is written in place and finalized by writing
'<step>/commit_success.txt' last. CheckpointManager lists only finalized
steps, so a save killed half-way is never restored. Such leftovers are
reported (never deleted) by `incomplete_checkpoints`. A finalized checkpoint
whose files were damaged later (truncated, zeroed, missing) fails
tensorstore's read checks: `restore_latest` names it, moves it aside and uses
the previous one.

A full disk while saving (ENOSPC / EDQUOT, from orbax's own writes or
tensorstore's) ends the run with `NoSpaceError`, which names the workdir, the
finalized checkpoints that remain and what to do; the unfinished step is left
unfinalized, so the next run restores the last good one.
"""
import datetime
import errno
import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint.checkpoint_managers import save_decision_policy as save_policy

from mtjax import distributed, paths

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
  return ocp.CheckpointManager(paths.join(paths.absolute(workdir),
                                          "checkpoints"),
                               options=options, item_names=("state",))


class NoSpaceError(OSError):
  """The device holding the workdir filled up (or its quota ran out) while
  the run wrote a checkpoint or its metrics."""


def no_space_error(mngr: ocp.CheckpointManager, e: BaseException,
                   doing: str = "saving a checkpoint") -> NoSpaceError:
  """The clear error for a write of the run that failed on a full device (or
  quota): names the workdir, the checkpoints that remain and the fix."""
  folder = os.fspath(mngr.directory)
  workdir = os.path.dirname(folder.rstrip("/"))
  good = finalized_steps(folder)
  partial = incomplete_checkpoints(workdir)
  kept = (f"the finalized checkpoints {good} are intact and the next run "
          f"resumes from step {good[-1]}" if good else
          "no checkpoint was finalized yet")
  leftovers = (f"; the unfinished {partial} can be deleted" if partial else "")
  reason = paths.no_space_reason(e)
  msg = (f"no space left on the device holding the workdir {workdir} while "
         f"{doing} ({type(e).__name__}: {reason}); {kept}. Free space there "
         f"(older runs{leftovers}) or lower --config.keep_checkpoints, then "
         "run the same command again; or use a --workdir on a filesystem "
         "with room (copy the checkpoints/ folder there to keep the "
         "progress).")
  code = errno.EDQUOT if reason == os.strerror(errno.EDQUOT) else errno.ENOSPC
  return NoSpaceError(code, msg)


def save(mngr: ocp.CheckpointManager, step: int, state: dict,
         force: bool = False) -> bool:
  """Saves if the interval says so (or force); returns whether it saved.

  Raises NoSpaceError when this save, or the previous (asynchronous) one
  whose error surfaces here, ran out of space."""
  try:
    return mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state)), force=force)
  except Exception as e:
    if paths.is_no_space(e):
      raise no_space_error(mngr, e) from e
    raise


def finish(mngr: ocp.CheckpointManager) -> None:
  """Waits for the last asynchronous save and closes the manager; a full
  device raises NoSpaceError as in `save`."""
  try:
    mngr.wait_until_finished()
  except Exception as e:
    if paths.is_no_space(e):
      raise no_space_error(mngr, e) from e
    raise
  mngr.close()


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
  src = paths.join(folder, str(step))
  dst, n = src + ".damaged", 1
  while paths.exists(dst):
    dst, n = f"{src}.damaged.{n}", n + 1
  if jax.process_index() == 0:
    paths.move(src, dst)
  distributed.sync(f"checkpoint_move_aside_{step}")
  mngr.reload()
  return dst


def finalized_steps(folder: str) -> list:
  """Sorted steps of the finalized checkpoints in a checkpoints folder."""
  if not paths.isdir(folder):
    return []
  return sorted(int(n) for n in paths.listdir(folder) if n.isdigit() and
                ocp.path.step.is_path_finalized(paths.join(folder, n)))


def incomplete_checkpoints(workdir: str) -> list:
  """Names of unfinished checkpoint folders left by an interrupted save:
  orbax's tmp folders (local disks) and step folders without their commit
  file (object stores, where orbax writes in place)."""
  folder = paths.join(workdir, "checkpoints")
  if not paths.isdir(folder):
    return []
  names = paths.listdir(folder)
  return sorted(n for n in names if TMP_MARKER in n or (
      n.isdigit() and not ocp.path.step.is_path_finalized(
          paths.join(folder, n))))


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
  path = paths.join(workdir, "config.json")
  current = config_to_dict(config)
  if paths.exists(path):
    saved = paths.read_json(path)
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
      paths.move(path, paths.join(workdir, f"config.{stamp}.json"))
      logging.warning("overwrite_config: %d changed keys; old config kept as "
                      "config.%s.json", len(diffs), stamp)
  if is_writer:
    paths.makedirs(workdir)
    paths.write_json(path, current, indent=2, sort_keys=True)
