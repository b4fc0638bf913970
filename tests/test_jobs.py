"""Every config in configs/ names a job that mtjax.main can dispatch."""
import pathlib

import pytest

from mtjax import experiments, main

CONFIGS = sorted((pathlib.Path(__file__).parents[1] / "configs").glob("*.py"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_job_resolves_to_a_function(path):
  config = main._load_config(str(path))  # pylint: disable=protected-access
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
