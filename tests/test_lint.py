"""The linter (ruff, configured in ruff.toml) passes over the package."""
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_ruff_finds_nothing_in_mtjax():
  out = subprocess.run([sys.executable, "-m", "ruff", "check", "mtjax"],
                       cwd=ROOT, capture_output=True, text=True, check=False)
  assert out.returncode == 0, out.stdout + out.stderr
