"""The PHATGOOSE (with merge rows) and soft-injection pipelines on several
processes: 2 processes x 4 devices give the table of 1 process x 8 devices.

Each topology is one launch of launch/local.py whose command is this file
(`python -m tests.test_multihost_experiments WORKDIR`, `main` below): both
jobs through mtjax.main.run_job, on tiny configs (a one-layer byte-level
decoder with 2 LoRA experts, 8 examples of 3 tasks, rows base / merged /
phatgoose / self_positioning; a tiny soft-injection test bed on 2 tasks, one
per process, with an alpha-transfer triple across them). The two launches
run at the same time.

What differs between the topologies, and how it is compared:
  * PHATGOOSE training reads the whole stream on every process and places
    its devices' rows (data.shard_by='rows'): the global batches are the
    same; only the order of the cross-device gradient sums may differ (gloo
    between processes vs. in-process). Accuracies, per-example correctness
    and the intervals computed from them are compared exactly (a flip would
    need two answer choices' log-likelihoods within float rounding of each
    other); routing diagnostics (means of routing weights and entropies) and
    the saved expert weights to 1e-4 / 1e-5 absolute (0 measured).
  * Soft injection runs each task whole on one device of the process that
    owns it, with process 0's test bed: the same program on the same inputs,
    so its rows are compared exactly, the test bed's losses to 1e-5 relative.
  * Timings and memory are left out.
Equal tables cannot show duplicated rows in a global batch (a batch that
holds every row twice gives the same mean loss), so the placed batches are
checked directly: in 'rows' mode the global batch equals the single-process
one, and in 'examples' mode (the default) the two processes read different
seqio shards and the global batch is their concatenation.

  python -m pytest -q -s tests/test_multihost_experiments.py
"""
import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
TIMEOUT_S = 600
FAST_COMPILE = ("--xla_backend_optimization_level=0 "
                "--xla_llvm_disable_expensive_passes=true")
# Prompts of one padded length (64): their generations share compilations.
SI_TASKS = ("add_compare", "sort_descending")
# Training with another order of the gradient sums: f32 ulps grown by a few
# Adam steps (tests/test_multihost.py measures ~1e-6 after 12 steps).
DIAG_TOL = 1e-4      # absolute; routing shares and entropies are O(1)
WEIGHT_TOL = 1e-5    # absolute; LoRA weights and gates are O(0.1)
LOSS_TOL = 1e-5      # relative; one device, same program: normally exact


# ------------------------------------------------------------ the configs --

def phatgoose_config():
  """configs/phatgoose.py (decoder) shrunk: one layer, 2 experts, 8
  examples of each of 3 rank-classification tasks."""
  from configs import phatgoose  # noqa: PLC0415 (configs is the repo's)
  c = phatgoose.get_config()
  c.model.update(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                 num_attention_heads=2, num_key_value_heads=2)
  c.data.update(inputs_length=48, targets_length=8)
  c.data.shard_by = "rows"     # the same batches for any process count
  c.held_in = ("compare", "parity")
  c.held_out = ("add_compare",)
  c.batch_size = 8
  c.base_steps = 0
  c.expert_steps = 2
  c.gate_steps = 2
  c.diagnostics_examples = 8
  c.eval.update(batch_size=8, max_examples=8)
  c.methods = (
      dict(name="base"), dict(name="merged"), dict(name="phatgoose"),
      dict(name="self_positioning", kind="merge",
           merge=dict(name="self_positioning"), steps=2, lr=5e-2))
  return c


def soft_injection_config():
  """configs/soft_injection.py shrunk: 2 tasks (one per process), one
  alpha-transfer triple across them."""
  from configs import soft_injection  # noqa: PLC0415 (configs is the repo's)
  c = soft_injection.get_config()
  c.testbed.update(steps=2, batch_size=4, max_len=64, hidden=32, layers=1,
                   heads=2, mlp=32)
  c.tasks = SI_TASKS
  c.transfer = ((SI_TASKS[0], SI_TASKS[1], SI_TASKS[0]),)
  c.update(shots=(0,), num_prompts=2, num_shots=2, val_examples=4,
           fit_examples=4, eval_examples=4, eval_batch_size=4,
           max_new_tokens=3, max_prompt_len=64, score_targets=False)
  c.alpha.update(steps=2, batch_size=2)
  c.prompt_tuning.length = 0   # no prompt-tuning row
  return c


# ------------------------------------------ the command each process runs --

def first_global_batches():
  """Per config.data.shard_by: {'tokens': the first global training batch
  of the held-in mixture as `batches` + `run.put` place it (gathered),
  'local': this process's rows}. A single process reads only 'rows' (the
  reference; its 'examples' batch would be the same one, and is not
  compared)."""
  import jax  # noqa: PLC0415 (the launcher sets the devices first)

  from mtjax import distributed  # noqa: PLC0415 (after initialize)
  from mtjax.evaluation import evaluate  # noqa: PLC0415
  from mtjax.experiments import phatgoose as pg  # noqa: PLC0415
  run, out = pg.setup(phatgoose_config()), {}
  modes = ("rows", "examples") if jax.process_count() > 1 else ("rows",)
  for mode in modes:
    r = dataclasses.replace(run, shard=distributed.data_shard(run.mesh, mode))
    host = next(pg.batches(r, "held_in", 5))["decoder_target_tokens"]
    placed = r.put({"t": host}, r.mesh)["t"]
    out[mode] = {"tokens": np.asarray(evaluate.fetch(placed)).tolist(),
                 "local": np.asarray(host).tolist()}
  return out


def main(workdir):
  """Both jobs on this process (one of launch/local.py's)."""
  import jax  # noqa: PLC0415 (the launcher sets the devices first)

  from mtjax import distributed  # noqa: PLC0415
  from mtjax import main as cli  # noqa: PLC0415
  distributed.maybe_initialize()
  workdir = pathlib.Path(workdir)
  batches = first_global_batches()
  cli.run_job(phatgoose_config(), str(workdir / "phatgoose"))
  cli.run_job(soft_injection_config(), str(workdir / "soft_injection"))
  # Each process writes what it placed (the only per-process file here).
  info = dict(process=jax.process_index(), processes=jax.process_count(),
              devices=jax.device_count(), batches=batches)
  (workdir / f"process_{jax.process_index()}.json").write_text(
      json.dumps(info))


# ------------------------------------------------------------------ tests --

def _launch(workdir, num_processes, devices_per_process):
  command = [sys.executable, str(REPO / "launch" / "local.py"),
             f"--num_processes={num_processes}",
             f"--devices_per_process={devices_per_process}", "--",
             sys.executable, "-m", "tests.test_multihost_experiments",
             str(workdir)]
  # Compiled without LLVM optimisations (as tests/test_cached_generation.py),
  # alike in both topologies: compilation is most of the time here. The
  # launcher adds the device count.
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", XLA_FLAGS=FAST_COMPILE)
  return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True,
                          start_new_session=True)


def _finish(proc):
  try:
    out, _ = proc.communicate(timeout=TIMEOUT_S)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, 9)
    raise
  assert proc.returncode == 0, out[-6000:]
  return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("multihost_experiments")
  t0 = time.monotonic()
  one = _launch(root / "one", 1, 8)
  two = _launch(root / "two", 2, 4)
  outs = {"one": _finish(one), "two": _finish(two)}
  print(f"\n[multihost experiments] both launches took "
        f"{time.monotonic() - t0:.0f}s")
  return {"one": root / "one", "two": root / "two", "outs": outs}


def _json(path):
  return json.loads(pathlib.Path(path).read_text())


def _max_diff(a, b, path=""):
  """Max abs difference of two JSON trees of the same structure (numbers)."""
  if isinstance(a, dict):
    assert sorted(a) == sorted(b), (path, sorted(a), sorted(b))
    return max([_max_diff(a[k], b[k], f"{path}/{k}") for k in a] + [0.0])
  if isinstance(a, list):
    assert len(a) == len(b), path
    return max([_max_diff(x, y, f"{path}[{i}]")
                for i, (x, y) in enumerate(zip(a, b, strict=True))] + [0.0])
  if isinstance(a, str) or isinstance(b, str) or a is None or b is None:
    assert a == b, (path, a, b)
    return 0.0
  return abs(float(a) - float(b))


def test_processes_and_batches(runs):
  infos = {k: [_json(p) for p in sorted(runs[k].glob("process_*.json"))]
           for k in ("one", "two")}
  assert [(i["processes"], i["devices"]) for i in infos["one"]] == [(1, 8)]
  assert [(i["processes"], i["devices"]) for i in infos["two"]] == [(2, 8)] * 2
  ref = infos["one"][0]["batches"]
  for info in infos["two"]:
    rows, by_example = info["batches"]["rows"], info["batches"]["examples"]
    assert rows["tokens"] == ref["rows"]["tokens"]      # same global batch
    assert np.shape(rows["tokens"])[0] == 8             # batch_size, no dups
    assert np.shape(by_example["tokens"])[0] == 8
    assert np.shape(by_example["local"])[0] == 4        # half per process
  # 'examples': the global batch is process 0's rows then process 1's, each
  # read from its own seqio shard: different examples.
  locals_ = [i["batches"]["examples"]["local"] for i in infos["two"]]
  assert infos["two"][0]["batches"]["examples"]["tokens"] == (
      locals_[0] + locals_[1])
  assert not {tuple(r) for r in locals_[0]} & {tuple(r) for r in locals_[1]}


def test_phatgoose_table_is_the_same(runs):
  ref = _json(runs["one"] / "phatgoose" / "phatgoose_results.json")
  got = _json(runs["two"] / "phatgoose" / "phatgoose_results.json")
  rows = ["base", "merged", "phatgoose", "self_positioning"]
  assert list(ref["results"]) == list(got["results"]) == rows
  assert got["errors"] == ref["errors"] == {}
  for key in ("results", "correct", "scores", "averages", "experts",
              "groups", "held_out", "library_mb"):
    assert got[key] == ref[key], key
  diag = _max_diff(ref["diagnostics"], got["diagnostics"])
  weights = _library_diff(runs)
  print(f"\n[multihost experiments] PHATGOOSE 2x4 vs 1x8: {len(rows)} rows "
        f"equal; diagnostics max abs diff {diag:.3g}; library weights max "
        f"abs diff {weights:.3g}")
  assert diag <= DIAG_TOL and weights <= WEIGHT_TOL
  assert set(got["diagnostics"]) == {"phatgoose"}
  for name in ("routing_choices.npz", "routing_held_out.png"):
    assert (runs["two"] / "phatgoose" / name).is_file(), name
  assert not (runs["two"] / "phatgoose" /
              "phatgoose_results.partial.json").exists()


def _library_diff(runs):
  from safetensors.numpy import load_file  # noqa: PLC0415 (test only)
  files = sorted((runs["one"] / "phatgoose" / "library").rglob(
      "*.safetensors"))
  assert len(files) == 2, files   # one folder per expert
  diff = 0.0
  for f in files:
    rel = f.relative_to(runs["one"])
    a, b = load_file(f), load_file(runs["two"] / rel)
    assert sorted(a) == sorted(b)
    diff = max([diff] + [float(np.abs(a[k] - b[k]).max()) for k in a])
  return diff


def _si_table(out):
  """The soft-injection results without timings and memory."""
  drop = ("sec", "mem_mb", "mem_source", "first", "nll")   # NaN: not scored
  return {
      "results": {t: {m: {k: v for k, v in r.items() if k not in drop}
                      for m, r in rows.items()}
                  for t, rows in out["results"].items()},
      "summary": {m: {k: v for k, v in s.items() if k not in drop}
                  for m, s in out["summary"].items()},
      "transfer": out["transfer"], "skipped": out["skipped"]}


def test_soft_injection_table_is_the_same(runs):
  ref = _json(runs["one"] / "soft_injection" / "soft_injection_results.json")
  got = _json(runs["two"] / "soft_injection" / "soft_injection_results.json")
  assert list(got["results"]) == list(ref["results"]) == list(SI_TASKS)
  assert list(got["transfer"]) == [SI_TASKS[0]]
  assert _si_table(got) == _si_table(ref)
  losses = max(abs(g[1] - r[1]) / abs(r[1]) for g, r in zip(
      got["testbed_losses"], ref["testbed_losses"], strict=True))
  print(f"\n[multihost experiments] soft injection 2x4 vs 1x8: tables equal; "
        f"test-bed loss max rel diff {losses:.3g}")
  assert losses <= LOSS_TOL
  for task in SI_TASKS:   # process 0 wrote every task's embedding
    assert (runs["two"] / "soft_injection" / "task_embeddings" / task /
            "soft_injection.safetensors").is_file()


def test_soft_injection_tasks_are_split_over_processes(runs):
  """Each task's rows come from one process: its log line is there only."""
  lines = runs["outs"]["two"].splitlines()
  for i, task in enumerate(SI_TASKS):
    ran = {line[1] for line in lines
           if line.startswith("[") and line[4:].startswith(f"{task} (")}
    assert ran == {str(i)}, (task, ran)


if __name__ == "__main__":
  main(sys.argv[1])
