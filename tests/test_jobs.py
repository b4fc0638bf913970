"""Every config in configs/, in every variant, names a job that mtjax.main can
dispatch (loading and variants themselves: tests/test_configs.py)."""
import importlib
import pathlib

import pytest

from mtjax import experiments, main

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"
CONFIGS = sorted(p for p in CONFIG_DIR.glob("*.py")
                 if p.stem not in ("__init__", "common"))
SPECS = [(p, v) for p in CONFIGS for v in (None,) + getattr(
    importlib.import_module(f"configs.{p.stem}"), "VARIANTS", ())]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s[0].stem + (
    f":{s[1]}" if s[1] else ""))
def test_config_job_resolves_to_a_function(spec):
  path, variant = spec
  config = main._load_config(  # pylint: disable=protected-access
      f"{path}:{variant}" if variant else str(path))
  job = config.get("job", "train")
  assert job in experiments.JOBS, (
      f"{path.name}: job {job!r} not in {experiments.JOBS.names()}")
  assert callable(experiments.JOBS.get(job))


def test_unknown_job_is_refused(tmp_path):
  config = main._load_config(str(CONFIGS[0]))  # pylint: disable=protected-access
  with config.unlocked():
    config.job = "no_such_job"
  with pytest.raises(ValueError, match="no_such_job.*phatgoose"):
    main.run_job(config, str(tmp_path))
  assert not list(tmp_path.iterdir())  # nothing written
