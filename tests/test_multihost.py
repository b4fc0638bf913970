"""Multi-process training through launch/local.py (gloo over localhost).

One 2-process x 4-device run of configs/multihost_tiny.py is SIGKILLed (all its
processes at once, like a lost machine) after step KILL_AT, restarted with the
same command, and must resume from its last orbax checkpoint. Its loss curve,
final state and evaluation results must match a 1-process x 8-device run of
the same config (whose batches do not depend on the process count:
data.shard_by='rows'). A SIGTERM to another 2 x 4 run makes every process
save the step JAX's preemption sync manager agrees on and exit 0; resumed,
it ends like the 1 x 8 run.

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
KILL_AT = 7         # by this step's log line checkpoint 3 is committed: the
                    # save at step 6 waits for the previous save to finish.
# f32, same global batches, same mesh: only the order of the cross-device sums
# differs (gloo between the processes vs. in-process), so a few ulps per step,
# grown by 12 Adam updates.
LOSS_TOL = 1e-5     # relative
PARAM_TOL = 1e-5    # absolute; params are O(1)
TIMEOUT_S = 600


def _launch(workdir, num_processes, devices_per_process, watch_step=None):
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
  proc.seen_kill_step = threading.Event()

  def read():
    for line in proc.stdout:
      proc.lines.append(line)
      if line.startswith(f"[0] step {watch_step or KILL_AT}/"):
        proc.seen_kill_step.set()
  proc.reader = threading.Thread(target=read, daemon=True)
  proc.reader.start()
  return proc


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


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("multihost")
  one, two = root / "one_process", root / "two_processes"
  t0 = time.monotonic()
  ref = _launch(one, 1, 8)
  first = _launch(two, 2, 4)
  if not first.seen_kill_step.wait(TIMEOUT_S):
    _kill_all(first)
    _kill_all(ref)
    pytest.fail("2-process run never logged step %d:\n%s"
                % (KILL_AT, "".join(first.lines)[-5000:]))
  _kill_all(first)
  killed_code = first.returncode
  first.reader.join(timeout=10)
  killed = dict(lines=_metric_lines(two), checkpoints=_checkpoints(two),
                output="".join(first.lines))
  ref_out = _finish(ref)
  assert ref.returncode == 0, ref_out[-5000:]
  resumed = _launch(two, 2, 4)
  resumed_out = _finish(resumed)
  assert resumed.returncode == 0, resumed_out[-5000:]
  print(f"\n[multihost] 3 launches took {time.monotonic() - t0:.0f}s")
  return dict(one=one, two=two, killed=killed, killed_code=killed_code,
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
  assert runs["killed_code"] == -signal.SIGKILL
  assert max(logged) < STEPS and STEPS not in killed["checkpoints"], killed
  assert CHECKPOINT_EVERY in killed["checkpoints"]
  resumed_from = max(s for s in killed["checkpoints"] if s <= max(logged))
  assert f"resumed from step {resumed_from}" in runs["resumed_out"], (
      runs["resumed_out"][-3000:])
  assert 0 < resumed_from < STEPS
  # Steps after the checkpoint ran twice, before and after the kill, on the
  # same topology: their metrics must agree exactly.
  lines = _metric_lines(runs["two"])
  before = {r["step"]: r for r in lines[:len(killed["lines"])]}
  after = {r["step"]: r for r in lines[len(killed["lines"]):]}
  assert [r["step"] for r in lines[len(killed["lines"]):]] == list(
      range(resumed_from + 1, STEPS + 1))
  twice = [s for s in before if s in after]
  assert twice, (before.keys(), after.keys())
  for s in twice:
    assert before[s] == after[s], (s, before[s], after[s])
  print(f"\n[multihost] killed after step {max(logged)}, resumed from "
        f"checkpoint {resumed_from}; steps {twice} re-ran with identical "
        "metrics")
  assert _checkpoints(runs["two"])[-1] == STEPS


PREEMPT_AT = 4      # between the periodic checkpoints 3 and 6


def test_sigterm_on_two_processes_saves_one_step_and_resumes(runs, tmp_path):
  """SIGTERM (a Spot/queued TPU reclaim, a SLURM time limit) reaches every
  process; JAX's preemption sync manager agrees on one step, every process
  saves it and exits 0, and the resumed run ends where the 1 x 8 one does."""
  workdir = tmp_path / "preempted"
  proc = _launch(workdir, 2, 4, watch_step=PREEMPT_AT)
  if not proc.seen_kill_step.wait(TIMEOUT_S):
    _kill_all(proc)
    pytest.fail("never logged step %d:\n%s" % (PREEMPT_AT,
                                              "".join(proc.lines)[-5000:]))
  proc.send_signal(signal.SIGTERM)        # the launcher forwards it to both
  out = _finish(proc)
  assert proc.returncode == 0, out[-5000:]
  line = next(x for x in out.splitlines() if "preempted (SIGTERM)" in x)
  saved = int(line.split("checkpoint of step ")[1].split()[0])
  assert PREEMPT_AT <= saved < STEPS, line
  assert saved in _checkpoints(workdir), _checkpoints(workdir)
  assert not (workdir / "results.json").exists()
  resumed = _launch(workdir, 2, 4)
  resumed_out = _finish(resumed)
  assert resumed.returncode == 0, resumed_out[-5000:]
  assert f"resumed from step {saved}" in resumed_out, resumed_out[-3000:]
  ref = _state(runs["one"], STEPS)
  got = _state(workdir, STEPS)
  dp = _max_abs_diff(ref["params"], got["params"])
  print(f"\n[multihost] SIGTERM after step {PREEMPT_AT}: saved step {saved}, "
        f"resumed; final params vs 1x8 max abs diff {dp:.3g}")
  assert dp <= PARAM_TOL
