"""Runs an mtjax config on every host of a Cloud TPU VM slice (pod or single host).

Steps, each one gcloud (or local tar) command:
  1. describe NAME: reuse the TPU VM / queued resource if it exists, else
  2. create it (--queued: queued resource, then wait until ACTIVE),
  3. ship the code: tarball of this working tree (git-tracked + untracked,
     non-ignored files) scp'd to all workers, or --git_url/--git_ref cloned,
  4. install on all workers: pip install -e . plus jax[tpu] of the same version,
  5. run `python3 -m mtjax.main --config=... --workdir=gs://...` on all
     workers at once (--worker=all), streaming their output here; each process
     finds its peers via JAX's TPU cluster detection (MTJAX_COORDINATOR=auto),
  6. with --delete, delete the TPU afterwards (also when the run fails).

  python launch/tpu.py --name=mt-v4 --zone=us-central2-b --accelerator_type=v4-32 \\
      --config=configs/X.py --workdir=gs://BUCKET/runs/x --dry_run

--dry_run prints every command, in order, and runs nothing.
"""
import argparse
import collections
import os
import pathlib
import re
import shlex
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
REMOTE_DIR = "~/mtjax"
REMOTE_TARBALL = "mtjax.tar.gz"  # relative to the home directory (scp and ssh)

# TPU software ("runtime") versions recommended for JAX, per generation.
RUNTIME_VERSIONS = {
    "v2": "tpu-ubuntu2204-base",
    "v3": "tpu-ubuntu2204-base",
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}
ALIASES = {"v5e": "v5litepod"}  # gcloud spells v5e 'v5litepod'

Step = collections.namedtuple("Step", "name argv note")


def accelerator_type(name):
  """'v5e-16' -> 'v5litepod-16'; validates 'GENERATION-SIZE'."""
  match = re.fullmatch(r"(v\w+?)-(\d+)", name or "")
  generation = match and ALIASES.get(match.group(1), match.group(1))
  if not match or generation not in RUNTIME_VERSIONS:
    known = ", ".join(sorted([*RUNTIME_VERSIONS, *ALIASES]))
    raise ValueError(f"--accelerator_type={name!r}: expected GENERATION-SIZE "
                     f"such as v4-32 or v5e-16, with GENERATION one of {known}.")
  return f"{generation}-{match.group(2)}"


def runtime_version(accel):
  return RUNTIME_VERSIONS[accel.split("-")[0]]


def _gcloud(*words, zone, project):
  argv = ["gcloud", "compute", "tpus", *words, f"--zone={zone}"]
  return argv + ([f"--project={project}"] if project else [])


def ssh_all(name, command, zone, project):
  """`command` (a shell string) on every worker of the slice at once."""
  return _gcloud("tpu-vm", "ssh", name, zone=zone, project=project) + [
      "--worker=all", "--command", command]


def create_steps(a, accel, runtime):
  kind = "queued-resources" if a.queued else "tpu-vm"
  what = "queued resource" if a.queued else "TPU VM"
  probe = Step("describe", _gcloud(kind, "describe", a.name, zone=a.zone,
                                   project=a.project),
               f"reuse the {what} {a.name} if it exists (then skip create)")
  spot = ["--spot"] if a.spot else []
  if a.queued:
    create = _gcloud(kind, "create", a.name, zone=a.zone, project=a.project) + [
        f"--node-id={a.name}", f"--accelerator-type={accel}",
        f"--runtime-version={runtime}", *spot]
    wait = Step("wait", _gcloud(kind, "describe", a.name, zone=a.zone,
                                project=a.project) + ["--format=value(state.state)"],
                "poll every 30 s until ACTIVE")
    return [probe, Step("create", create, f"create {what} {a.name}"), wait]
  create = _gcloud(kind, "create", a.name, zone=a.zone, project=a.project) + [
      f"--accelerator-type={accel}", f"--version={runtime}", *spot]
  return [probe, Step("create", create, f"create {what} {a.name}")]


def code_steps(a):
  """Ship the code: a clone of --git_url, or a tarball of this working tree."""
  if a.git_url:
    clone = (f"rm -rf {REMOTE_DIR} && git clone --quiet {shlex.quote(a.git_url)} "
             f"{REMOTE_DIR} && cd {REMOTE_DIR} && git checkout --quiet "
             f"{shlex.quote(a.git_ref)}")
    return [Step("clone", ssh_all(a.name, clone, a.zone, a.project),
                 f"clone {a.git_url}@{a.git_ref} on all workers")]
  tarball = f"/tmp/mtjax-{a.name}.tar.gz"
  pack = (f"cd {shlex.quote(str(REPO))} && git ls-files -z --cached --others "
          f"--exclude-standard | tar --null --ignore-failed-read -T - -czf "
          f"{shlex.quote(tarball)}")
  scp = _gcloud("tpu-vm", "scp", tarball, f"{a.name}:{REMOTE_TARBALL}",
                zone=a.zone, project=a.project) + ["--worker=all"]
  unpack = (f"rm -rf {REMOTE_DIR} && mkdir -p {REMOTE_DIR} && "
            f"tar -xzf {REMOTE_TARBALL} -C {REMOTE_DIR}")
  return [Step("pack", ["bash", "-c", pack], "tarball of this working tree"),
          Step("scp", scp, "copy it to all workers"),
          Step("unpack", ssh_all(a.name, unpack, a.zone, a.project),
               "unpack on all workers")]


def install_step(a):
  install = (f"cd {REMOTE_DIR} && python3 -m pip install -q -e . && "
             'python3 -m pip install -q "jax[tpu]==$(python3 -c '
             '"import jax; print(jax.__version__)")"')
  return Step("install", ssh_all(a.name, install, a.zone, a.project),
              "install mtjax and the TPU build of the same jax on all workers")


def run_step(a):
  overrides = [f"--config.{kv}" for o in a.overrides for kv in shlex.split(o)]
  main = ["python3", "-m", "mtjax.main", f"--config={a.config}",
          f"--workdir={a.workdir}", *overrides]
  command = f"cd {REMOTE_DIR} && MTJAX_COORDINATOR=auto {shlex.join(main)}"
  return Step("run", ssh_all(a.name, command, a.zone, a.project),
              "train on all workers at once; output streams here")


def delete_step(a):
  if a.queued:  # --force also deletes the TPU VM the queued resource holds
    argv = _gcloud("queued-resources", "delete", a.name, zone=a.zone,
                   project=a.project) + ["--force", "--quiet"]
  else:
    argv = _gcloud("tpu-vm", "delete", a.name, zone=a.zone,
                   project=a.project) + ["--quiet"]
  return Step("delete", argv, f"delete {a.name}")


def plan(a):
  """Every step, in order, as Step(name, argv, note). Pure: runs nothing."""
  accel = accelerator_type(a.accelerator_type)
  runtime = a.runtime_version or runtime_version(accel)
  steps = create_steps(a, accel, runtime) + code_steps(a)
  steps += [install_step(a), run_step(a)]
  return steps + ([delete_step(a)] if a.delete else [])


def format_plan(steps):
  lines = []
  for i, step in enumerate(steps, 1):
    lines += [f"# {i}. {step.name}: {step.note}", shlex.join(step.argv)]
  return "\n".join(lines)


def _wait_active(step, minutes):
  deadline = time.monotonic() + 60 * minutes
  while True:
    state = subprocess.run(step.argv, capture_output=True, text=True).stdout.strip()
    print(f"[tpu] queued resource state: {state or '?'}", flush=True)
    if state == "ACTIVE":
      return
    if state in ("FAILED", "SUSPENDED", "SUSPENDING"):
      raise RuntimeError(f"queued resource is {state}; see `{shlex.join(step.argv[:-1])}`")
    if time.monotonic() > deadline:
      raise TimeoutError(f"queued resource not ACTIVE after {minutes} min "
                         "(raise --wait_minutes, or try another zone)")
    time.sleep(30)


def execute(steps, wait_minutes):
  """Runs the plan; returns the first failing exit code, else the run's (0).

  The delete step, if planned, runs in any case.
  """
  delete = steps[-1] if steps[-1].name == "delete" else None
  skip = set()
  try:
    for step in steps[:-1] if delete else steps:
      if step.name in skip:
        continue
      print(f"[tpu] {step.name}: {shlex.join(step.argv)}", flush=True)
      if step.name == "describe":
        if subprocess.run(step.argv, capture_output=True).returncode == 0:
          print("[tpu] it exists: reusing it", flush=True)
          skip.add("create")
      elif step.name == "wait":
        _wait_active(step, wait_minutes)
      elif (code := subprocess.run(step.argv).returncode) != 0:
        print(f"[tpu] step {step.name} failed with exit code {code}",
              file=sys.stderr, flush=True)
        return code
    return 0
  finally:
    if delete:
      print(f"[tpu] {delete.name}: {shlex.join(delete.argv)}", flush=True)
      subprocess.run(delete.argv)


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--name", required=True, help="TPU VM (and queued resource) name")
  p.add_argument("--zone", required=True)
  p.add_argument("--accelerator_type", required=True,
                 help="e.g. v4-32, v5litepod-16 (alias v5e-16), v5p-8, v6e-8")
  p.add_argument("--runtime_version", default=None,
                 help="default per generation: " + ", ".join(
                     f"{k}={v}" for k, v in RUNTIME_VERSIONS.items()))
  p.add_argument("--project", default=None, help="default: gcloud's configured one")
  p.add_argument("--queued", action="store_true", help="use a queued resource")
  p.add_argument("--spot", action="store_true", help="Spot (preemptible) capacity")
  p.add_argument("--config", required=True, help="config path inside the repo")
  p.add_argument("--workdir", required=True, help="gs://BUCKET/path shared by all hosts")
  p.add_argument("--overrides", action="append", default=[],
                 help="space-separated config overrides, e.g. 'train.steps=100 "
                      "model.dtype=bfloat16' (repeatable)")
  p.add_argument("--git_url", default=None,
                 help="clone this repository instead of copying the working tree")
  p.add_argument("--git_ref", default="main")
  p.add_argument("--delete", action="store_true", help="delete the TPU afterwards")
  p.add_argument("--wait_minutes", type=float, default=60,
                 help="--queued: how long to wait for ACTIVE")
  p.add_argument("--dry_run", action="store_true", help="print the commands only")
  a = p.parse_args(argv)
  if not a.workdir.startswith("gs://"):
    p.error(f"--workdir={a.workdir}: use a gs:// path; every host writes "
            "checkpoints there and a TPU VM's disk is lost when it is deleted.")
  if not a.git_url and not (REPO / a.config).is_file():
    message = (f"--config={a.config}: no such file under {REPO} (give the path "
               "relative to the repository root, e.g. configs/X.py)")
    if not a.dry_run:
      p.error(message)
    print(f"# warning: {message}")
  try:
    accelerator_type(a.accelerator_type)
  except ValueError as e:
    p.error(str(e))
  return a


def main(argv=None):
  a = parse_args(sys.argv[1:] if argv is None else argv)
  steps = plan(a)
  if a.dry_run:
    print(format_plan(steps))
    return 0
  if not any((pathlib.Path(d) / "gcloud").exists()
             for d in os.environ.get("PATH", "").split(os.pathsep)):
    sys.exit("gcloud is not on PATH: install the Google Cloud CLI "
             "(https://cloud.google.com/sdk/docs/install) or use --dry_run.")
  return execute(steps, a.wait_minutes)


if __name__ == "__main__":
  sys.exit(main())
