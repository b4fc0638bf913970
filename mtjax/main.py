r"""Command line: python -m mtjax.main --config=configs/NAME.py --workdir=DIR.

Any config field can be overridden, e.g. --config.num_train_steps=100
--config.optimizer.learning_rate=3e-4. Overrides are checked before anything
runs: an unknown key or a value of the wrong type stops with a message that
lists the valid keys.
"""
import importlib.util
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from mtjax import distributed, experiments

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file (configs/*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None,
                               "Folder for checkpoints, summaries, results.")


def _load_config(spec):
  """get_config() of a config file path ('file.py' or 'file.py:arg')."""
  path, _, arg = spec.partition(":")
  if not os.path.exists(path):
    raise SystemExit(f"--config={spec}: no such file {path!r}")
  folder = os.path.dirname(os.path.abspath(path))
  if os.path.exists(os.path.join(folder, "__init__.py")):
    # A config in a package (configs/) imports its siblings by package name
    # (`from configs import common`): the package's parent goes on sys.path
    # so that they come from the same checkout as the file, installed or not.
    root = os.path.dirname(folder)
    if root not in sys.path:
      sys.path.insert(0, root)
  module_spec = importlib.util.spec_from_file_location("_mtjax_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def valid_keys(config, prefix=""):
  """{'a.b': value} for every field of a (nested) ConfigDict."""
  out = {}
  for k, v in config.items():
    if hasattr(v, "items") and hasattr(v, "to_dict"):
      out.update(valid_keys(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _convert(value, default):
  """Parses a flag string like config_flags does for the default's type."""
  if isinstance(default, bool):
    if value.lower() in ("true", "1", "false", "0"):
      return value.lower() in ("true", "1")
    raise ValueError(f"{value!r} is not a bool")
  if isinstance(default, int):
    return int(value)
  if isinstance(default, float):
    return float(value)
  return value


def check_overrides(argv):
  """Exits with a clear message if a --config.* override is unknown or mistyped."""
  spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")),
              None)
  if spec is None:
    return
  keys = valid_keys(_load_config(spec))
  listing = "\n  ".join(f"{k} ({type(v).__name__}: {v!r})"
                        for k, v in sorted(keys.items()))
  for arg in argv:
    if not arg.startswith("--config."):
      continue
    key, has_value, value = arg[len("--config."):].partition("=")
    parents = {k.rsplit(".", 1)[0] for k in keys if "." in k}
    if key not in keys:
      kind = "is a group, not a field" if key in parents else "is not a field"
      raise SystemExit(f"--config.{key} {kind} of {spec}. Valid keys:\n  "
                       f"{listing}")
    default = keys[key]
    if has_value and default is not None and not isinstance(
        default, (tuple, list, dict)):
      try:
        _convert(value, default)
      except ValueError:
        raise SystemExit(
            f"--config.{key}={value}: expected {type(default).__name__} like "
            f"the default {default!r}. Valid keys:\n  {listing}") from None


def run_job(config, workdir: str):
  """Runs config.job (default 'train') on workdir; jobs are registered by
  the experiment modules (mtjax.experiments.JOBS)."""
  job = config.get("job", "train")
  if job not in experiments.JOBS:
    raise ValueError(f"config.job={job!r} is not a job; use one of "
                     f"{experiments.JOBS.names()}")
  return experiments.JOBS.get(job)(config, workdir)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if _CONFIG.value is None or _WORKDIR.value is None:
    raise app.UsageError("both --config=configs/NAME.py and --workdir=DIR "
                         "are required")
  distributed.maybe_initialize(_CONFIG.value)
  run_job(_CONFIG.value, _WORKDIR.value)


def run():
  check_overrides(sys.argv)
  app.run(main)


if __name__ == "__main__":
  run()
