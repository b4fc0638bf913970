"""Launchers: TPU dry runs, real multi-process JAX jobs on localhost, SLURM auto-detection."""
import os
import pathlib
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from mtjax import distributed
from job_env import job_env

REPO = pathlib.Path(__file__).resolve().parents[1]
LOCAL = [sys.executable, str(REPO / "launch" / "local.py")]
TPU = [sys.executable, str(REPO / "launch" / "tpu.py")]


def _run(argv, timeout, env=None):
  start = time.monotonic()
  out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                       cwd=REPO, env=env)
  return out, time.monotonic() - start


def _commands(stdout):
  return [l for l in stdout.splitlines() if l and not l.startswith("#")]


def _index(commands, *words):
  """Index of the first command containing all `words`."""
  hits = [i for i, c in enumerate(commands) if all(w in c for w in words)]
  assert hits, f"no command with {words} in:\n" + "\n".join(commands)
  return hits[0]


@pytest.mark.parametrize("accel,want_type,want_runtime", [
    ("v4-32", "v4-32", "tpu-ubuntu2204-base"),
    ("v5e-16", "v5litepod-16", "v2-alpha-tpuv5-lite"),
])
def test_tpu_dry_run_prints_the_whole_sequence(accel, want_type, want_runtime):
  out, _ = _run(TPU + [
      "--name=mt-test", "--zone=us-central2-b", f"--accelerator_type={accel}",
      "--config=configs/quickstart.py", "--workdir=gs://bucket/runs/a",
      "--overrides=train.steps=7", "--delete", "--dry_run"], timeout=60)
  assert out.returncode == 0, out.stderr
  cmds = _commands(out.stdout)
  create = _index(cmds, "gcloud compute tpus tpu-vm create mt-test",
                  f"--accelerator-type={want_type}", f"--version={want_runtime}")
  pack = _index(cmds, "git ls-files", "tar")
  scp = _index(cmds, "tpu-vm scp", "mt-test:", "--worker=all")
  install = _index(cmds, "tpu-vm ssh mt-test", "--worker=all", "pip install -q -e .",
                   "jax[tpu]")
  run = _index(cmds, "tpu-vm ssh mt-test", "--worker=all", "-m mtjax.main",
               "--config=configs/quickstart.py", "--workdir=gs://bucket/runs/a",
               "--config.train.steps=7", "MTJAX_COORDINATOR=auto")
  delete = _index(cmds, "tpu-vm delete mt-test")
  assert create < pack < scp < install < run < delete == len(cmds) - 1
  assert all("--zone=us-central2-b" in c for c in cmds if c.startswith("gcloud"))


def test_tpu_dry_run_queued_clone():
  out, _ = _run(TPU + [
      "--name=q1", "--zone=us-west4-a", "--accelerator_type=v5e-16", "--queued",
      "--spot", "--project=proj", "--git_url=https://example.com/mtjax.git",
      "--git_ref=v1", "--config=configs/quickstart.py", "--workdir=gs://b/r",
      "--delete", "--dry_run"], timeout=60)
  assert out.returncode == 0, out.stderr
  cmds = _commands(out.stdout)
  create = _index(cmds, "queued-resources create q1", "--node-id=q1",
                  "--accelerator-type=v5litepod-16",
                  "--runtime-version=v2-alpha-tpuv5-lite", "--spot")
  wait = _index(cmds, "queued-resources describe q1", "state.state")
  clone = _index(cmds, "--worker=all", "git clone", "https://example.com/mtjax.git",
                 "checkout --quiet v1")
  install = _index(cmds, "--worker=all", "pip install")
  run = _index(cmds, "--worker=all", "-m mtjax.main")
  delete = _index(cmds, "queued-resources delete q1", "--force")
  assert create < wait < clone < install < run < delete
  assert not any("scp" in c for c in cmds)
  assert all("--project=proj" in c for c in cmds)


def test_tpu_bad_flags_are_named():
  out, _ = _run(TPU + ["--name=x", "--zone=z", "--accelerator_type=v9-8",
                       "--config=configs/quickstart.py", "--workdir=gs://b",
                       "--dry_run"], timeout=60)
  assert out.returncode == 2 and "--accelerator_type='v9-8'" in out.stderr
  out, _ = _run(TPU + ["--name=x", "--zone=z", "--accelerator_type=v4-8",
                       "--config=configs/quickstart.py", "--workdir=/tmp/x",
                       "--dry_run"], timeout=60)
  assert out.returncode == 2 and "gs://" in out.stderr


COLLECTIVES = textwrap.dedent("""
    import jax, numpy as np
    from jax.experimental import multihost_utils
    from mtjax import distributed
    from mtjax.models.sharding import make_mesh
    assert distributed.maybe_initialize(None)
    assert distributed.maybe_initialize(None)  # idempotent
    assert jax.process_count() == 2 and jax.device_count() == 4, jax.devices()
    assert jax.local_device_count() == 2
    pid = jax.process_index()
    got = multihost_utils.process_allgather(np.array([10 * pid + 1]))
    assert got.ravel().tolist() == [1, 11], got
    mesh = make_mesh((-1, 1, 1))
    assert distributed.process_shard(mesh) == (pid, 2)
    local = {"x": np.full((2, 3), pid + 1, np.float32)}
    glob = distributed.local_batch_to_global(local, mesh)
    assert glob["x"].shape == (4, 3)
    # psum across all 4 devices of both processes: 6 ones + 6 twos.
    total = jax.jit(lambda x: x.sum())(glob["x"])
    assert float(total) == 18.0, total
    # Tensor axis across the two processes: both hold the whole batch, so
    # they form one data shard and must feed identical local batches.
    from jax.sharding import Mesh
    devs = np.array(jax.devices()).reshape(2, 2).T.reshape(2, 1, 2)
    tp_mesh = Mesh(devs, ("data", "fsdp", "tensor"))
    assert distributed.process_shard(tp_mesh) == (0, 1)
    same = {"x": np.arange(6, dtype=np.float32).reshape(2, 3)}
    glob = distributed.local_batch_to_global(same, tp_mesh)
    assert glob["x"].shape == (2, 3)
    assert float(jax.jit(lambda x: x.sum())(glob["x"])) == 15.0
    distributed.sync("done")
    print("OK", pid, distributed.is_main_process())
""")


def test_local_two_processes_real_collectives():
  out, took = _run(LOCAL + ["--num_processes=2", "--devices_per_process=2", "--",
                            sys.executable, "-c", COLLECTIVES], timeout=120)
  assert out.returncode == 0, out.stdout + out.stderr
  assert "[0] OK 0 True" in out.stdout and "[1] OK 1 False" in out.stdout, out.stdout


@pytest.mark.parametrize("how,want_code", [("os._exit(3)", 3),
                                           ("raise RuntimeError('boom')", 1)])
def test_local_propagates_failure_without_hanging(how, want_code):
  # Process 1 dies; process 0 waits at a barrier for it and must be stopped.
  snippet = textwrap.dedent(f"""
      import os, jax
      from mtjax import distributed
      distributed.maybe_initialize()
      if jax.process_index() == 1:
        {how}
      distributed.sync("never")
      print("UNREACHABLE")
  """)
  out, took = _run(LOCAL + ["--num_processes=2", "--devices_per_process=1", "--",
                            sys.executable, "-c", snippet], timeout=90)
  assert out.returncode == want_code, out.stdout + out.stderr
  assert "UNREACHABLE" not in out.stdout
  # Process 0 was still waiting and the launcher stopped it ...
  assert "terminating processes [0]" in out.stderr, out.stderr
  # ... promptly: well before gloo's 30 s barrier timeout (or JAX's 300 s
  # shutdown barrier, where a crashed process would otherwise wait).
  assert took < 25, took


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_auto_detects_a_slurm_step():
  """MTJAX_COORDINATOR=auto (launch/slurm.sh) + SLURM's variables: JAX's own detection."""
  snippet = ("import jax; from mtjax import distributed; "
             "assert distributed.maybe_initialize(); "
             "print('SLURM', jax.process_index(), jax.process_count(), jax.device_count())")
  port = str(_free_port())
  procs = []
  for i in range(2):
    env = job_env(MTJAX_COORDINATOR="auto", SLURM_JOB_ID="4242",
                  SLURM_STEP_NODELIST="localhost", SLURM_NTASKS="2",
                  SLURM_PROCID=str(i), SLURM_LOCALID=str(i),
                  JAX_COORDINATOR_PORT=port)
    procs.append(subprocess.Popen([sys.executable, "-c", snippet], env=env, cwd=REPO,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True))
  try:
    outs = [p.communicate(timeout=90)[0] for p in procs]
  finally:
    for p in procs:
      p.kill()
  for i, (p, out) in enumerate(zip(procs, outs)):
    assert p.returncode == 0 and f"SLURM {i} 2 2" in out, out


def test_maybe_initialize_is_a_no_op_without_config_or_env(monkeypatch):
  for var in ("MTJAX_COORDINATOR", "MTJAX_NUM_PROCESSES", "MTJAX_PROCESS_ID"):
    monkeypatch.delenv(var, raising=False)
  assert distributed.distributed_args(None) is None
  assert distributed.distributed_args({"distributed": None}) is None
  assert distributed.maybe_initialize(None) is False
  import jax
  assert not jax.distributed.is_initialized() and jax.process_count() == 1
  assert distributed.process_shard() == (0, 1) and distributed.is_main_process()
  distributed.sync("single process: returns at once")


def test_distributed_args_sources_and_errors():
  env = {"MTJAX_COORDINATOR": "localhost:1234", "MTJAX_NUM_PROCESSES": "2",
         "MTJAX_PROCESS_ID": "1"}
  want = dict(coordinator_address="localhost:1234", num_processes=2, process_id=1)
  assert distributed.distributed_args(None, env) == want
  # The launcher's environment overrides a config's 'auto' ...
  assert distributed.distributed_args({"distributed": "auto"}, env) == want
  # ... but an explicit address in the config wins over the environment.
  explicit = {"coordinator_address": "h:9", "num_processes": 4, "process_id": 3}
  assert distributed.distributed_args({"distributed": explicit}, env) == dict(
      coordinator_address="h:9", num_processes=4, process_id=3)
  assert distributed.distributed_args({"distributed": "auto"}, {}) == "auto"
  assert distributed.distributed_args(
      {"distributed": {"coordinator_address": "auto"}}, {}) == "auto"
  assert distributed.distributed_args(None, {"MTJAX_COORDINATOR": "auto"}) == "auto"
  with pytest.raises(ValueError, match="num_processes/process_id"):
    distributed.distributed_args(None, {"MTJAX_COORDINATOR": "h:1"})
  with pytest.raises(ValueError, match="config.distributed='yes'"):
    distributed.distributed_args({"distributed": "yes"}, {})


def test_slurm_script_parses():
  out, _ = _run(["bash", "-n", str(REPO / "launch" / "slurm.sh")], timeout=30)
  assert out.returncode == 0, out.stderr
  out, _ = _run(["bash", str(REPO / "launch" / "slurm.sh")], timeout=30)
  assert out.returncode == 2 and "usage: sbatch launch/slurm.sh" in out.stderr
