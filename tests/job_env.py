"""The environment of a job a test starts as a subprocess (python -m mtjax.main
or a -c snippet): conftest.py's XLA flags and compilation cache, the device
count asked for, CPU only."""
import os


def job_env(devices: int = 1, **extra: str) -> dict:
  """os.environ with `extra`, XLA_FLAGS asking for `devices` host devices."""
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  flags.append(f"--xla_force_host_platform_device_count={devices}")
  return dict(os.environ, **extra, XLA_FLAGS=" ".join(flags),
              TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu")
