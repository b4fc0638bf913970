"""Faults while a checkpoint is written, with real processes and real files.

- SIGKILL while orbax is writing a checkpoint: the run is killed the moment
  orbax's temporary folder of a step appears (a save in progress); resuming
  ignores that partial step, restores the previous one, and ends equal to
  the uninterrupted run (compared as tests/test_resume.py does).
- No space left on the device while saving: the run's workdir is on a real
  tmpfs too small for its third checkpoint (mounted in a private mount
  namespace, `unshare`); the run stops with an error naming the workdir and
  the fix, and the earlier checkpoints restore, equal to the uninterrupted
  run's. Without root, `unshare --user --map-root-user --mount` mounts the
  same tmpfs; the test is skipped only where neither may mount. (RLIMIT_FSIZE
  gives EFBIG and SIGXFSZ, not ENOSPC; /dev/full cannot hold orbax's folders.)

Damaged checkpoints and SIGTERM/preemption: tests/test_resume.py.
"""
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mtjax.training import checkpoint
from job_env import job_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, EVERY = 12, 3
# One task and no evaluation: the faults are in training and checkpoints.
TINY = [
    "--config.model.d_model=32", "--config.model.d_kv=8",
    "--config.model.num_heads=2", "--config.model.d_ff=64",
    "--config.model.num_layers=1", "--config.model.num_decoder_layers=1",
    "--config.batch_size=8", f"--config.num_train_steps={STEPS}",
    f"--config.checkpoint_every={EVERY}", "--config.keep_checkpoints=20",
    "--config.log_every=1", "--config.data.mixture=parity",
    "--config.eval.groups=()",
]


def _cmd(workdir):
  return [sys.executable, "-m", "mtjax.main",
          "--config=configs/quickstart.py", f"--workdir={workdir}"] + TINY


def _env():
  return job_env()


def _raw_state(workdir, step):
  """The saved state of a step, restored without a target."""
  mngr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"),
                               item_names=("state",))
  state = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore()))["state"]
  mngr.close()
  return state


def _restore(workdir, step):
  return {k: np.asarray(v)
          for k, v in _raw_state(workdir, step)["params"].items()}


def _assert_same_params(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_allclose(b[k], a[k], atol=1e-6, err_msg=k)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """The reference: the same run without a fault (every checkpoint kept)."""
  full = str(tmp_path_factory.mktemp("full"))
  subprocess.run(_cmd(full), cwd=REPO, env=_env(), check=True,
                 capture_output=True)
  return full


# ------------------------------------------------- SIGKILL inside a save

def _step_of(name):
  return int(name.split(".")[0])


def _kill_inside_a_save(workdir, log, min_step):
  """Runs the job and SIGKILLs it as soon as orbax's temporary folder of a
  step >= min_step exists. Returns that step if its unfinished folder is
  still there after the kill (the kill landed inside the save), else None
  (the save finished first, or the run ended without one)."""
  folder = os.path.join(workdir, "checkpoints")
  with open(log, "w") as out:
    proc = subprocess.Popen(_cmd(workdir), cwd=REPO, env=_env(), stdout=out,
                            stderr=subprocess.STDOUT)
  seen = None
  while proc.poll() is None and seen is None:
    names = os.listdir(folder) if os.path.isdir(folder) else []
    seen = next((n for n in names if checkpoint.TMP_MARKER in n
                 and _step_of(n) >= min_step), None)
    if seen:
      proc.send_signal(signal.SIGKILL)
    else:
      time.sleep(0.002)
  proc.wait()
  if seen is None or proc.returncode != -signal.SIGKILL:
    return None
  left = checkpoint.incomplete_checkpoints(workdir)
  return _step_of(seen) if seen in left else None


def test_sigkill_during_a_save_then_resume_equals_uninterrupted(
    uninterrupted, tmp_path):
  # The window is a save in flight (tens of ms): if a kill misses it (the
  # save finalized between the poll and the kill), a fresh run is killed
  # again; each run offers three saves after the first checkpoint.
  for attempt in range(4):
    workdir = str(tmp_path / f"run{attempt}")
    cut = _kill_inside_a_save(workdir, str(tmp_path / f"log{attempt}"),
                              min_step=2 * EVERY)
    if cut is not None:
      break
  else:
    pytest.fail("4 runs ended or saved before a SIGKILL landed inside a "
                "checkpoint save")
  before = checkpoint.finalized_steps(os.path.join(workdir, "checkpoints"))
  assert before and max(before) == cut - EVERY, (before, cut)
  out = subprocess.run(_cmd(workdir), cwd=REPO, env=_env(), check=True,
                       capture_output=True, text=True).stdout
  assert f"ignoring incomplete checkpoint {cut}{checkpoint.TMP_MARKER}" in out
  assert f"resumed from step {cut - EVERY}" in out
  # The partial step was written again, whole, by the resumed run.
  steps = checkpoint.finalized_steps(os.path.join(workdir, "checkpoints"))
  assert steps == list(range(EVERY, STEPS + 1, EVERY)), steps
  _assert_same_params(_restore(uninterrupted, STEPS),
                      _restore(workdir, STEPS))
  _assert_same_params(_restore(uninterrupted, cut), _restore(workdir, cut))


# ------------------------------------------------------- a full device

def _unshare_prefix():
  """The `unshare` command line that may mount a tmpfs in a private mount
  namespace (as root; otherwise in a user namespace), or None."""
  for prefix in (["unshare", "--mount"],
                 ["unshare", "--user", "--map-root-user", "--mount"]):
    try:
      probe = subprocess.run(
          prefix + ["sh", "-c", "mount -t tmpfs -o size=64k none /mnt"],
          capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
      continue
    if probe.returncode == 0:
      return prefix
  return None


def _disk_bytes(folder):
  """Bytes a folder takes on tmpfs (files rounded up to 4 KiB pages)."""
  total = 0
  for root, _, files in os.walk(folder):
    for f in files:
      total += -(-os.path.getsize(os.path.join(root, f)) // 4096) * 4096
  return total


def test_no_space_while_saving_names_the_workdir_and_keeps_checkpoints(
    uninterrupted, tmp_path):
  prefix = _unshare_prefix()
  if prefix is None:
    pytest.skip("cannot mount a tmpfs here (needs root or unprivileged user "
                "namespaces for `unshare --mount`)")
  ckpts = os.path.join(uninterrupted, "checkpoints")
  one = max(_disk_bytes(os.path.join(ckpts, str(s))) for s in (3, 6))
  # Room for two checkpoints and half of a third, plus config, metrics and
  # TensorBoard events (a few KiB): the save of step 9 fills the disk.
  size = 2 * one + one // 2 + 64 * 1024
  disk, copy = tmp_path / "disk", tmp_path / "copy"
  disk.mkdir()
  workdir = str(disk / "run")
  cmd = " ".join(f"'{c}'" for c in _cmd(workdir))
  script = (f"mount -t tmpfs -o size={size} mtjax-full '{disk}' || exit 90\n"
            f"{cmd}\nrc=$?\ncp -a '{workdir}' '{copy}'\nexit $rc\n")
  proc = subprocess.run(prefix + ["sh", "-c", script], cwd=REPO, env=_env(),
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode not in (0, 90), proc.stderr[-3000:]
  err = proc.stderr
  assert "NoSpaceError" in err, err[-3000:]
  message = err[err.index("NoSpaceError"):]
  assert f"no space left on the device holding the workdir {workdir}" \
      in message
  assert "Free space there" in message and "--workdir" in message
  assert "the next run resumes from step 6" in message
  # Nothing was lost: checkpoints 3 and 6 restore, equal to the reference's;
  # the unfinished step 9 is listed as incomplete and never restored.
  kept = str(copy)
  assert checkpoint.finalized_steps(os.path.join(kept, "checkpoints")) == \
      [3, 6]
  assert [_step_of(n) for n in checkpoint.incomplete_checkpoints(kept)] == [9]
  for step in (3, 6):
    _assert_same_params(_restore(uninterrupted, step), _restore(kept, step))
  # What the next run does: restore_latest picks step 6.
  fresh = jax.tree.map(jnp.zeros_like, _raw_state(kept, 6))
  mngr = checkpoint.manager(kept, EVERY, 20, async_save=False)
  state, step = checkpoint.restore_latest(mngr, fresh)
  mngr.close()
  assert step == 6
  _assert_same_params(_restore(uninterrupted, 6),
                      {k: np.asarray(v) for k, v in state["params"].items()})
