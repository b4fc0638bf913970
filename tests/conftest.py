"""Test set-up: 8 fake CPU devices so sharding is exercised without a pod."""
import os

import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

# Compilation dominates this suite's time on CPU (tiny models, many shapes),
# so the tests compile without LLVM's expensive passes. Rounding can differ
# from a default compile (BLOOM's logits move ~1e-4), so a test that compares
# with another library at a tight tolerance compiles with XLA's defaults
# (tests/test_decoder.py::test_logits_match_hf); ...
FAST_COMPILE = ("--xla_backend_optimization_level=0 "
                "--xla_llvm_disable_expensive_passes=true")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                      + FAST_COMPILE)
# ... and share one persistent compilation cache, made fresh for each session
# (the xdist workers and the subprocesses the tests start inherit it): the
# resume, fault and multi-process tests launch the same tiny programs many
# times. Hits are the same executables, so no result depends on the cache.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _CACHE = tempfile.mkdtemp(prefix="mtjax-tests-jax-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
  atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# Exactness tests compare f32 results at 1e-5; GPUs would otherwise use TF32
# matmuls (the routing tests fail at default precision on an H200 and pass at
# 'highest'). No effect on CPU.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pathlib  # noqa: E402

import pytest  # noqa: E402

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data():
  """../shared/data, or a skip that says why."""
  if not SHARED_DATA.is_dir():
    pytest.skip(f"{SHARED_DATA} is absent: the real evaluation material ships "
                "beside the checkout in shared/data")
  return SHARED_DATA


def pytest_addoption(parser):
  parser.addoption("--slow", action="store_true", default=False,
                   help="also run tests marked slow (the real-model tier: "
                   "python -m pytest -q --slow -m slow tests)")


def pytest_configure(config):
  config.addinivalue_line(
      "markers", "slow: real-model checks too long for the default run "
      "(run with --slow)")


def pytest_collection_modifyitems(config, items):
  if config.getoption("--slow"):
    return
  skip = pytest.mark.skip(reason="slow tier: run with --slow (README, Tests)")
  for item in items:
    if "slow" in item.keywords:
      item.add_marker(skip)
