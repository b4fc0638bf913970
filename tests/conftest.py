"""Test set-up: 8 fake CPU devices so sharding is exercised without a pod."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
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
