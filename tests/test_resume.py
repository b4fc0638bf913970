"""Exact resume after SIGKILL, and interrupted saves never restored as valid."""
import json
import os
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mtjax import distributed
from mtjax.training import checkpoint
from job_env import job_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, EVERY = 12, 3
TINY = [
    "--config.model.d_model=32", "--config.model.d_kv=8",
    "--config.model.num_heads=2", "--config.model.d_ff=64",
    "--config.model.num_layers=1", "--config.model.num_decoder_layers=1",
    "--config.batch_size=8", f"--config.num_train_steps={STEPS}",
    f"--config.checkpoint_every={EVERY}", "--config.keep_checkpoints=20",
    "--config.log_every=1", "--config.eval.groups=('parity',)",
    "--config.eval.max_examples=4",
]


def _cmd(workdir):
  return [sys.executable, "-m", "mtjax.main",
          "--config=configs/quickstart.py", f"--workdir={workdir}"] + TINY


def _env():
  env = job_env()
  return env


def _losses(workdir):
  """{step: loss}; for a step logged twice (killed, then resumed) the last."""
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      out[row["step"]] = row["train/loss"]
  return out


def _final_params(workdir):
  mngr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"),
                               item_names=("state",))
  step = mngr.latest_step()
  state = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore()))["state"]
  return step, {k: np.asarray(v) for k, v in state["params"].items()}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """The reference: the same run without interruption."""
  full = str(tmp_path_factory.mktemp("full"))
  subprocess.run(_cmd(full), cwd=REPO, env=_env(), check=True,
                 capture_output=True)
  return full


def _run_until(workdir, step, sig):
  """Starts the run and sends `sig` once it logged `step`: (code, stdout)."""
  proc = subprocess.Popen(_cmd(workdir), cwd=REPO, env=_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                          text=True)
  out = []
  for line in proc.stdout:
    out.append(line)
    if line.startswith(f"step {step}/"):
      proc.send_signal(sig)
      break
  out.extend(proc.stdout)
  proc.wait()
  return proc.returncode, "".join(out)


def _same_as_uninterrupted(full, resumed, start):
  step_a, params_a = _final_params(full)
  step_b, params_b = _final_params(resumed)
  assert step_a == step_b == STEPS
  assert params_a.keys() == params_b.keys()
  for k in params_a:
    np.testing.assert_allclose(params_b[k], params_a[k], atol=1e-6, err_msg=k)
  la, lb = _losses(full), _losses(resumed)
  assert sorted(la) == sorted(lb) == list(range(1, STEPS + 1))
  assert [lb[s] for s in range(start + 1, STEPS + 1)] == \
      [la[s] for s in range(start + 1, STEPS + 1)]
  assert os.path.exists(os.path.join(resumed, "results.json"))


def _resume(workdir):
  out = subprocess.run(_cmd(workdir), cwd=REPO, env=_env(), check=True,
                       capture_output=True, text=True).stdout
  line = next(x for x in out.splitlines() if x.startswith("resumed from"))
  return int(line.split()[-1])


def test_sigkill_then_resume_equals_uninterrupted(uninterrupted, tmp_path):
  killed = str(tmp_path / "killed")
  kill_after = int(np.random.default_rng(0).integers(4, STEPS - 1))  # fixed
  code, _ = _run_until(killed, kill_after, signal.SIGKILL)
  assert code == -signal.SIGKILL, "the run ended before the kill"
  assert not os.path.exists(os.path.join(killed, "results.json"))
  start = _resume(killed)
  assert 0 < start <= kill_after and start % EVERY == 0, (start, kill_after)
  _same_as_uninterrupted(uninterrupted, killed, start)


def test_sigterm_checkpoints_the_next_step_exits_and_resumes_exactly(
    uninterrupted, tmp_path):
  # Between periodic checkpoints (every 3): only the preemption save keeps
  # the steps since the last one.
  workdir, term_after = str(tmp_path / "preempted"), 7
  code, out = _run_until(workdir, term_after, signal.SIGTERM)
  assert code == 0, out[-3000:]
  line = next(x for x in out.splitlines() if x.startswith("preempted"))
  saved = int(line.split("checkpoint of step ")[1].split()[0])
  assert term_after <= saved < STEPS and saved % EVERY, (saved, line)
  assert "run the same command again to resume" in line
  assert not os.path.exists(os.path.join(workdir, "results.json"))
  assert _resume(workdir) == saved
  _same_as_uninterrupted(uninterrupted, workdir, saved)


def _state(x):
  return {"step": jnp.asarray(x, jnp.int32),
          "params": {"w": jnp.full((4, 3), float(x))}}


def test_interrupted_save_is_not_restored(tmp_path):
  workdir = str(tmp_path)
  mngr = checkpoint.manager(workdir, save_every=1, keep=5, async_save=False)
  for step in (1, 2):
    assert checkpoint.save(mngr, step, _state(step))
  mngr.close()
  folder = os.path.join(workdir, "checkpoints")
  # A save of step 3 killed before orbax's final rename: a complete copy and a
  # truncated one, both under orbax's own tmp-dir name.
  shutil.copytree(os.path.join(folder, "2"),
                  os.path.join(folder, "3" + checkpoint.TMP_MARKER))
  partial = os.path.join(folder, "4" + checkpoint.TMP_MARKER)
  shutil.copytree(os.path.join(folder, "2"), partial)
  for root, _, files in os.walk(partial):
    for name in files[: len(files) // 2 + 1]:
      os.remove(os.path.join(root, name))

  mngr = checkpoint.manager(workdir, save_every=1, keep=5, async_save=False)
  assert mngr.all_steps() == [1, 2]
  state, step = checkpoint.restore_latest(mngr, _state(0))
  assert step == 2 and int(state["step"]) == 2
  np.testing.assert_array_equal(np.asarray(state["params"]["w"]), 2.0)
  assert checkpoint.incomplete_checkpoints(workdir) == [
      "3" + checkpoint.TMP_MARKER, "4" + checkpoint.TMP_MARKER]
  # Training on saves step 3 over the stale tmp dir and finalizes it.
  assert checkpoint.save(mngr, 3, _state(3))
  mngr.close()
  mngr = checkpoint.manager(workdir, save_every=1, keep=5, async_save=False)
  state, step = checkpoint.restore_latest(mngr, _state(0))
  assert step == 3 and float(state["params"]["w"][0, 0]) == 3.0


def test_restore_places_arrays_with_target_shardings(tmp_path):
  mesh = jax.make_mesh((jax.device_count(),), ("x",),
                       axis_types=(jax.sharding.AxisType.Auto,))
  sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
  mngr = checkpoint.manager(str(tmp_path), 1, 2, async_save=False)
  checkpoint.save(mngr, 1, {"w": jnp.arange(16.0)})
  target = {"w": jax.device_put(jnp.zeros(16), sharded)}
  state, step = checkpoint.restore_latest(mngr, target)
  assert step == 1 and state["w"].sharding == sharded
  np.testing.assert_array_equal(np.asarray(state["w"]), np.arange(16.0))


def _largest_file(folder):
  files = [os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs]
  return max(files, key=os.path.getsize)


@pytest.mark.parametrize("damage", ["truncated", "zeroed"])
def test_damaged_latest_checkpoint_is_named_kept_and_the_previous_used(
    tmp_path, capsys, damage):
  workdir = str(tmp_path)
  mngr = checkpoint.manager(workdir, save_every=1, keep=5, async_save=False)
  for step in (1, 2, 3):
    assert checkpoint.save(mngr, step, _state(step))
  mngr.close()
  folder = os.path.join(workdir, "checkpoints")
  victim = _largest_file(os.path.join(folder, "3"))   # the array data
  with open(victim, "rb") as f:
    raw = f.read()
  with open(victim, "wb") as f:
    f.write(raw[:len(raw) // 2] if damage == "truncated" else bytes(len(raw)))

  mngr = checkpoint.manager(workdir, save_every=1, keep=5, async_save=False)
  state, step = checkpoint.restore_latest(mngr, _state(0))
  assert step == 2 and int(state["step"]) == 2
  np.testing.assert_array_equal(np.asarray(state["params"]["w"]), 2.0)
  assert "damaged checkpoint 3" in capsys.readouterr().out
  # Kept for inspection, not deleted; the step can be saved again.
  kept = os.path.join(folder, "3.damaged")
  assert os.path.isdir(kept) and os.path.exists(
      victim.replace(os.path.join(folder, "3"), kept))
  assert mngr.all_steps() == [1, 2]
  assert checkpoint.save(mngr, 3, _state(3))
  mngr.close()
  mngr = checkpoint.manager(workdir, save_every=1, keep=5, async_save=False)
  state, step = checkpoint.restore_latest(mngr, _state(0))
  assert step == 3 and float(state["params"]["w"][0, 0]) == 3.0


def test_preemption_notice_catches_sigterm_and_restores_the_handler():
  before = signal.getsignal(signal.SIGTERM)
  notice = distributed.PreemptionNotice()
  assert not notice.reached(1)
  os.kill(os.getpid(), signal.SIGTERM)    # handled: the process lives on
  assert notice.reached(2)
  notice.close()
  assert signal.getsignal(signal.SIGTERM) == before
