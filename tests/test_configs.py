"""configs/: every config and variant loads; advertised variants exist.

A config that takes an argument (`--config=configs/NAME.py:VARIANT`) lists its
variants in VARIANTS, the first being get_config()'s default.
"""
import importlib
import inspect
import os
import pathlib
import re
import subprocess
import sys

import ml_collections
import pytest

from configs import common
from mtjax import main

REPO = pathlib.Path(__file__).resolve().parents[1]
NAMES = sorted(p.stem for p in (REPO / "configs").glob("*.py")
               if p.stem not in ("__init__", "common"))
MODULES = {n: importlib.import_module(f"configs.{n}") for n in NAMES}
SPECS = [(n, v) for n in NAMES for v in (None,) + getattr(
    MODULES[n], "VARIANTS", ())]
# `configs/NAME.py:variant` in a config, the README or docs/ (lower case:
# not the VARIANT placeholder).
ADVERTISED = re.compile(r"configs/(\w+)\.py:([a-z0-9_]+)\b")


def _path(name):
  return str(REPO / "configs" / f"{name}.py")


def _spec_id(spec):
  name, variant = spec
  return f"{name}:{variant}" if variant else name


def test_there_are_configs():
  assert {"quickstart", "phatgoose", "lora_expert"} <= set(NAMES)


@pytest.mark.parametrize("spec", SPECS, ids=_spec_id)
def test_config_loads_by_path(spec):
  name, variant = spec
  cli = f"{_path(name)}:{variant}" if variant else _path(name)
  config = main._load_config(cli)  # pylint: disable=protected-access
  assert isinstance(config, ml_collections.ConfigDict)
  assert config.to_json_best_effort()   # serialisable (workdir config.json)
  module = MODULES[name]
  expected = module.get_config(variant) if variant else module.get_config()
  assert config == expected  # the package import builds the same config


@pytest.mark.parametrize("name", NAMES)
def test_variants_are_declared_and_the_first_is_the_default(name):
  module = MODULES[name]
  params = inspect.signature(module.get_config).parameters
  variants = getattr(module, "VARIANTS", ())
  if not params:
    assert not variants, f"{name}: VARIANTS but get_config() takes none"
    return
  assert variants, f"{name}: get_config takes {list(params)}; list VARIANTS"
  (param,) = params.values()
  assert param.default == variants[0]
  assert module.get_config() == module.get_config(variants[0])
  with pytest.raises(ValueError, match="no_such_variant"):
    module.get_config("no_such_variant")


def _advertised():
  texts = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md")),
           *sorted((REPO / "configs").glob("*.py"))]
  found = set()
  for path in texts:
    if path.exists():
      for m in ADVERTISED.finditer(path.read_text()):
        found.add((m.group(1), m.group(2), path.name))
  return sorted(found)


def test_advertised_variants_exist():
  advertised = _advertised()
  assert ("quickstart", "llama", "quickstart.py") in advertised
  assert ("phatgoose", "t5", "phatgoose.py") in advertised
  for name, variant, where in advertised:
    assert name in MODULES, f"{where} names configs/{name}.py: no such config"
    assert variant in getattr(MODULES[name], "VARIANTS", ()), (
        f"{where} advertises configs/{name}.py:{variant}, not in "
        f"{name}.VARIANTS")
    main._load_config(f"{_path(name)}:{variant}")  # pylint: disable=protected-access


def test_common_blocks_are_fresh_and_overridable():
  a, b = common.tiny_t5(), common.tiny_t5(d_model=64)
  assert (a.d_model, b.d_model, a.arch, common.tiny_llama().arch) == (
      128, 64, "t5", "llama")
  a.d_model = 1
  assert common.tiny_t5().d_model == 128   # a new ConfigDict every call
  opt = common.adamw(learning_rate=0.5, decay="constant",
                     end_factor=common.OMIT, extra=1)
  assert opt.learning_rate == 0.5 and opt.extra == 1
  assert "end_factor" not in opt
  assert "groups" not in common.eval_block(groups=common.OMIT)
  assert common.byte_data().mixture == "held_in"


def test_config_loads_without_installing_configs(tmp_path):
  """From another directory with `configs` not installed, mtjax.main finds
  the config's package beside the file (configs/multihost_tiny.py imports
  configs.quickstart and configs.common)."""
  script = f"""
import sys
from mtjax import main   # from an install or PYTHONPATH; then forget both:
for finder in sys.meta_path:   # an editable install's `configs`
  mapping = getattr(sys.modules.get(getattr(finder, "__module__", "")),
                    "MAPPING", None)
  if isinstance(mapping, dict):
    mapping.pop("configs", None)
sys.path = [p for p in sys.path if p not in ("", {str(REPO)!r})]
try:
  import configs
  sys.exit("configs importable before loading: the test proves nothing")
except ImportError:
  pass
c = main._load_config({_path("multihost_tiny")!r})
import configs.common
print(c.get("job", "train"), c.model.d_model, configs.common.__file__)
"""
  env = dict(os.environ, PYTHONPATH=str(REPO))
  out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300,
                       check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  job, d_model, common_file = out.stdout.split()[-3:]
  assert (job, d_model) == ("train", "32")
  assert pathlib.Path(common_file).resolve() == REPO / "configs" / "common.py"
