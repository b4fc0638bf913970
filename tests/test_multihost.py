"""Multi-process training through launch/local.py (gloo over localhost).

A 2-process x 4-device run of configs/multihost_tiny.py (12 steps, a
checkpoint every 3) is interrupted twice, and must end like a 1-process x
8-device run of the same config (whose batches do not depend on the process
count: data.shard_by='rows'): same loss curve, final state and evaluation
results.
  1. SIGKILL of all its processes at once (a lost machine), as soon as
     checkpoint 3 is committed (from step 4 on). Restarted with the same
     command, it resumes from its last orbax checkpoint, and the steps it
     runs again log identical metrics.
  2. That resumed run gets a SIGTERM (a Spot/queued TPU reclaim, a SLURM
     time limit) from step 4 on: every process saves the step JAX's
     preemption sync manager agrees on and exits 0. A third start resumes
     from that step and finishes.
One chain of three 2 x 4 launches tests both interruptions (each launch
costs its processes' start-up and compilation; the 1 x 8 run goes alongside
the first).

The measured differences print with
  python -m pytest -q -s tests/test_multihost.py
"""
import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "multihost_tiny.py"
STEPS = 12          # configs/multihost_tiny.py: num_train_steps
CHECKPOINT_EVERY = 3
# SIGKILL at the first log line from step KILL_AT on at which checkpoint
# CHECKPOINT_EVERY is committed (orbax renames its tmp folder to '3' last):
# by step 7's line at the latest, since the save at step 6 waits for it.
KILL_AT = CHECKPOINT_EVERY + 1
# SIGTERM to the resumed run at its first log line from this step on
# (between the periodic checkpoints 3 and 6). The step the processes agree on
# comes up to ~1 s later (JAX's SIGTERM notifier polls each second): 1 to 3
# steps later measured, well before STEPS.
PREEMPT_AT = 4
# f32, same global batches, same mesh: only the order of the cross-device sums
# differs (gloo between the processes vs. in-process), so a few ulps per step,
# grown by 12 Adam updates.
LOSS_TOL = 1e-5     # relative
PARAM_TOL = 1e-5    # absolute; params are O(1)
TIMEOUT_S = 600


def _launch(workdir, num_processes, devices_per_process, stop_when=None):
  """Starts launch/local.py; `proc.stop` is set (and `proc.stop_step` holds
  the step) at process 0's first 'step N/' line with stop_when(N) true."""
  command = [sys.executable, str(REPO / "launch" / "local.py"),
             f"--num_processes={num_processes}",
             f"--devices_per_process={devices_per_process}", "--",
             sys.executable, "-m", "mtjax.main", f"--config={CONFIG}",
             f"--workdir={workdir}", "--verbosity=-1"]
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True,
                          start_new_session=True)
  proc.lines = []
  proc.stop = threading.Event()
  proc.stop_step = None

  def read():
    for line in proc.stdout:
      proc.lines.append(line)
      if (stop_when and not proc.stop.is_set()
          and line.startswith("[0] step ")):
        step = int(line.split()[2].split("/")[0])
        if stop_when(step):
          proc.stop_step = step
          proc.stop.set()
  proc.reader = threading.Thread(target=read, daemon=True)
  proc.reader.start()
  return proc


def _wait_for_stop(proc, what, *others):
  """Waits for proc.stop; on a timeout or an early exit kills proc and
  `others` and fails with the end of proc's output."""
  deadline = time.monotonic() + TIMEOUT_S
  while not proc.stop.wait(1):
    if proc.poll() is not None or time.monotonic() > deadline:
      proc.reader.join(timeout=10)
      for p in (proc, *others):
        _kill_all(p)
      pytest.fail(f"never reached {what}:\n" + "".join(proc.lines)[-5000:])


def _finish(proc, timeout=TIMEOUT_S):
  try:
    proc.wait(timeout=timeout)
  except subprocess.TimeoutExpired:
    _kill_all(proc)
    raise
  proc.reader.join(timeout=10)
  return "".join(proc.lines)


def _children(pid):
  kids = []
  for entry in pathlib.Path("/proc").iterdir():
    if not entry.name.isdigit():
      continue
    try:
      stat = (entry / "stat").read_text()
    except OSError:
      continue
    if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
      kids.append(int(entry.name))
  return kids


def _alive(pid):
  try:
    state = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1]
  except OSError:
    return False
  return state.split()[0] != "Z"


def _kill_all(proc):
  """SIGKILL the launcher's process group and each worker's (own) group."""
  workers = _children(proc.pid)
  for pid in workers:
    try:
      os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
  try:
    os.killpg(proc.pid, signal.SIGKILL)
  except ProcessLookupError:
    pass
  proc.wait(timeout=30)
  deadline = time.monotonic() + 30
  while any(_alive(p) for p in workers) and time.monotonic() < deadline:
    time.sleep(0.1)
  assert not any(_alive(p) for p in workers), "workers survived SIGKILL"


def _metric_lines(workdir):
  with open(workdir / "metrics.jsonl") as f:
    return [json.loads(line) for line in f]


def _curve(lines):
  """{step: loss}; after a resume the later line of a step wins."""
  return {r["step"]: r["train/loss"] for r in lines}


def _checkpoints(workdir):
  folder = workdir / "checkpoints"
  return sorted(int(n) for n in os.listdir(folder) if n.isdigit())


def _state(workdir, step):
  """The saved train state at `step` as numpy arrays (any saving topology)."""
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  path = workdir / "checkpoints" / str(step) / "state"
  ckptr = ocp.PyTreeCheckpointer()
  tree = ckptr.metadata(path).item_metadata.tree
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  return ckptr.restore(path, restore_args=args)


def _max_abs_diff(a, b):
  import jax  # pylint: disable=g-import-not-at-top
  leaves_a, tree_a = jax.tree.flatten(a)
  leaves_b, tree_b = jax.tree.flatten(b)
  assert tree_a == tree_b
  return max(float(np.max(np.abs(np.asarray(x, np.float64) - y)))
             for x, y in zip(leaves_a, leaves_b))


def _committed(workdir, step):
  return (workdir / "checkpoints" / str(step)).is_dir()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("multihost")
  one, two = root / "one_process", root / "two_processes"
  t0 = time.monotonic()
  ref = _launch(one, 1, 8)
  # 1. SIGKILL once checkpoint CHECKPOINT_EVERY is committed.
  first = _launch(two, 2, 4, stop_when=lambda step: step >= KILL_AT and
                  _committed(two, CHECKPOINT_EVERY))
  _wait_for_stop(first, f"step {KILL_AT} with checkpoint {CHECKPOINT_EVERY} "
                 "committed", ref)
  _kill_all(first)
  times = [time.monotonic() - t0]
  first.reader.join(timeout=10)
  killed = dict(lines=_metric_lines(two), checkpoints=_checkpoints(two),
                code=first.returncode, at=first.stop_step,
                output="".join(first.lines))
  # 2. The same command resumes; SIGTERM from step PREEMPT_AT on.
  second = _launch(two, 2, 4, stop_when=lambda step: step >= PREEMPT_AT)
  _wait_for_stop(second, f"step {PREEMPT_AT}", ref)
  second.send_signal(signal.SIGTERM)     # the launcher forwards it to both
  preempted = dict(out=_finish(second), at=second.stop_step)
  times.append(time.monotonic() - t0)
  preempted.update(code=second.returncode, lines=_metric_lines(two),
                   checkpoints=_checkpoints(two),
                   results=(two / "results.json").exists())
  ref_out = _finish(ref)
  assert ref.returncode == 0, ref_out[-5000:]
  times.append(time.monotonic() - t0)
  # 3. Resumes from the preemption checkpoint and finishes.
  third = _launch(two, 2, 4)
  resumed_out = _finish(third)
  assert third.returncode == 0, resumed_out[-5000:]
  times.append(time.monotonic() - t0)
  print("\n[multihost] 4 launches took {3:.0f}s: 2x4 SIGKILLed at {0:.0f}s, "
        "resumed + SIGTERMed, out at {1:.0f}s; 1x8 (alongside) done at "
        "{2:.0f}s; 2x4 resumed, done at {3:.0f}s".format(*times))
  return dict(one=one, two=two, killed=killed, preempted=preempted,
              resumed_out=resumed_out, ref_out=ref_out)


def test_two_processes_reproduce_one_process(runs):
  ref = _curve(_metric_lines(runs["one"]))
  got = _curve(_metric_lines(runs["two"]))
  assert sorted(ref) == sorted(got) == list(range(1, STEPS + 1))
  rel = max(abs(got[s] - ref[s]) / abs(ref[s]) for s in ref)
  state_ref = _state(runs["one"], STEPS)
  state_two = _state(runs["two"], STEPS)
  assert int(state_ref["step"]) == int(state_two["step"]) == STEPS
  dp = _max_abs_diff(state_ref["params"], state_two["params"])
  do = _max_abs_diff(state_ref["opt_state"], state_two["opt_state"])
  first_move = _max_abs_diff(state_ref["params"],
                             _state(runs["one"], CHECKPOINT_EVERY)["params"])
  print(f"\n[multihost] 2x4 vs 1x8 devices, {STEPS} steps f32: loss max rel "
        f"diff {rel:.3g}; final params max abs diff {dp:.3g} (they moved "
        f"{first_move:.3g} since step {CHECKPOINT_EVERY}); opt_state max abs "
        f"diff {do:.3g}")
  assert rel <= LOSS_TOL, (ref, got)
  assert dp <= PARAM_TOL and first_move > 100 * PARAM_TOL
  assert do <= PARAM_TOL


def test_evaluation_is_the_same_on_two_processes(runs):
  """Every process scores the same rows; process 0 writes results.json."""
  with open(runs["one"] / "results.json") as f:
    ref = json.load(f)
  with open(runs["two"] / "results.json") as f:
    got = json.load(f)
  assert {"copy", "compare"} <= set(ref), ref
  assert got == ref, (got, ref)


def test_sigkilled_run_resumes_where_it_stopped(runs):
  killed = runs["killed"]
  logged = [r["step"] for r in killed["lines"]]
  # Only process 0 writes metrics.jsonl: one line per step.
  assert logged == list(range(1, len(logged) + 1)), logged
  # Killed mid-run: the launcher died by SIGKILL before the last step.
  assert killed["code"] == -signal.SIGKILL
  assert max(logged) < STEPS and STEPS not in killed["checkpoints"], killed
  assert CHECKPOINT_EVERY in killed["checkpoints"]
  resumed_from = max(s for s in killed["checkpoints"] if s <= max(logged))
  preempted = runs["preempted"]
  assert f"resumed from step {resumed_from}" in preempted["out"], (
      preempted["out"][-3000:])
  assert 0 < resumed_from < STEPS
  # Steps after the checkpoint ran twice, before and after the kill, on the
  # same topology: their metrics must agree exactly. (The resumed run logs
  # up to its SIGTERM step, the third launch the rest.)
  lines = _metric_lines(runs["two"])
  before = {r["step"]: r for r in lines[:len(killed["lines"])]}
  after = {r["step"]: r for r in lines[len(killed["lines"]):]}
  assert [r["step"] for r in lines[len(killed["lines"]):]] == list(
      range(resumed_from + 1, STEPS + 1))
  twice = [s for s in before if s in after]
  assert twice, (before.keys(), after.keys())
  for s in twice:
    assert before[s] == after[s], (s, before[s], after[s])
  print(f"\n[multihost] killed after step {max(logged)} (checkpoint "
        f"{CHECKPOINT_EVERY} committed by step {killed['at']}'s line), "
        f"resumed from checkpoint {resumed_from}; steps {twice} re-ran with "
        "identical metrics")
  assert _checkpoints(runs["two"])[-1] == STEPS


def test_sigterm_on_two_processes_saves_one_step_and_resumes(runs):
  """SIGTERM (a Spot/queued TPU reclaim, a SLURM time limit) reaches every
  process; JAX's preemption sync manager agrees on one step, every process
  saves it and exits 0, and the resumed run ends where the 1 x 8 one does."""
  pre = runs["preempted"]
  out = pre["out"]
  assert pre["code"] == 0, out[-5000:]
  line = next(x for x in out.splitlines() if "preempted (SIGTERM)" in x)
  saved = int(line.split("checkpoint of step ")[1].split()[0])
  assert PREEMPT_AT <= pre["at"] <= saved < STEPS, (pre["at"], line)
  assert saved in pre["checkpoints"], pre["checkpoints"]
  assert saved not in runs["killed"]["checkpoints"]   # this run saved it
  # Nothing after the agreed step ran, and nothing was evaluated.
  assert pre["lines"][-1]["step"] == saved, pre["lines"][-1]
  assert not pre["results"]
  resumed_out = runs["resumed_out"]
  assert f"resumed from step {saved}" in resumed_out, resumed_out[-3000:]
  ref = _state(runs["one"], STEPS)
  got = _state(runs["two"], STEPS)
  dp = _max_abs_diff(ref["params"], got["params"])
  print(f"\n[multihost] SIGTERM after step {pre['at']}: saved step {saved}, "
        f"resumed; final params vs 1x8 max abs diff {dp:.3g}")
  assert dp <= PARAM_TOL
