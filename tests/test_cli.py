"""CLI: override checking, the workdir config guard, results.json."""
import json
import os
import subprocess
import sys

import pytest

from mtjax import main as cli
from mtjax.training import checkpoint
from job_env import job_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(REPO, "configs", "quickstart.py")
TINY = [
    "--config.model.d_model=32", "--config.model.d_kv=8",
    "--config.model.num_heads=2", "--config.model.d_ff=64",
    "--config.model.num_layers=1", "--config.model.num_decoder_layers=1",
    "--config.batch_size=8", "--config.num_train_steps=3",
    "--config.log_every=1", "--config.eval.groups=('parity','copy')",
    "--config.eval.max_examples=4", "--config.eval.max_new_tokens=4",
]


def _run(workdir, *extra):
  env = job_env()
  return subprocess.run(
      [sys.executable, "-m", "mtjax.main", "--config=configs/quickstart.py",
       f"--workdir={workdir}", *extra], cwd=REPO, env=env,
      capture_output=True, text=True)


def test_unknown_key_fails_listing_valid_keys(tmp_path):
  out = _run(tmp_path, "--config.optimizer.learning_rat=0.1")
  assert out.returncode != 0
  assert "--config.optimizer.learning_rat is not a field" in out.stderr
  assert "optimizer.learning_rate (float" in out.stderr
  assert "model.d_model (int" in out.stderr
  assert not os.path.exists(tmp_path / "config.json")


def test_wrong_type_fails_listing_valid_keys(tmp_path):
  out = _run(tmp_path, "--config.batch_size=large")
  assert out.returncode != 0
  assert "--config.batch_size=large: expected int" in out.stderr
  assert "num_train_steps (int" in out.stderr


def test_group_is_not_a_field():
  with pytest.raises(SystemExit, match="is a group, not a field"):
    cli.check_overrides(["x", f"--config={QUICKSTART}", "--config.model=3"])
  cli.check_overrides(["x", f"--config={QUICKSTART}",
                       "--config.model.d_model=64", "--config.seed=3"])


def test_workdir_with_other_config_refuses_to_start(tmp_path):
  config = cli._load_config(QUICKSTART)  # pylint: disable=protected-access
  checkpoint.check_workdir_config(str(tmp_path), config)
  before = (tmp_path / "config.json").read_text()
  out = _run(tmp_path, "--config.batch_size=16",
             "--config.optimizer.name=adafactor")
  assert out.returncode != 0
  assert "batch_size: saved 32, now 16" in out.stderr
  assert "optimizer.name: saved 'adamw', now 'adafactor'" in out.stderr
  assert "--config.overwrite_config=True" in out.stderr
  assert (tmp_path / "config.json").read_text() == before
  assert not os.path.exists(tmp_path / "checkpoints")


def test_overwrite_config_keeps_the_old_one(tmp_path):
  config = cli._load_config(QUICKSTART)  # pylint: disable=protected-access
  checkpoint.check_workdir_config(str(tmp_path), config)
  config.batch_size = 16
  with pytest.raises(ValueError, match="batch_size"):
    checkpoint.check_workdir_config(str(tmp_path), config)
  config.overwrite_config = True
  checkpoint.check_workdir_config(str(tmp_path), config)
  kept = [p for p in os.listdir(tmp_path) if p.startswith("config.2")]
  assert len(kept) == 1
  assert json.loads((tmp_path / kept[0]).read_text())["batch_size"] == 32
  assert json.loads((tmp_path / "config.json").read_text())["batch_size"] == 16


def test_tiny_run_writes_results_json(tmp_path):
  out = _run(tmp_path, *TINY)
  assert out.returncode == 0, out.stderr[-3000:]
  results = json.loads((tmp_path / "results.json").read_text())
  assert set(results) == {"parity", "copy", "average/extra"}
  assert set(results["parity"]) >= {"accuracy", "accuracy_norm"}
  assert 0.0 <= results["parity"]["accuracy"] <= 1.0
  assert "exact_match" in results["copy"]
  assert "task " in out.stdout and "parity" in out.stdout  # printed table
  steps = [json.loads(l)["step"] for l in
           (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert steps == [1, 2, 3]
