"""Runs N JAX processes on this machine, as if they were N hosts of a pod.

Each process gets M fake CPU devices and joins one jax.distributed job over
localhost with gloo collectives (via mtjax.distributed.maybe_initialize, which
reads the MTJAX_* variables set here). Use it to test multi-host code paths
(per-process data shards, global arrays, checkpointing, barriers) without a pod:

  python launch/local.py --num_processes=2 --devices_per_process=4 -- \\
      python -m mtjax.main --config=configs/X.py --workdir=/tmp/run2

Output lines are prefixed by the process index ('[1] ...'); --log_dir also
writes process_<i>.log. If one process fails, the others are terminated and
the launcher exits with that process's code. SIGINT/SIGTERM are forwarded.
With --num_processes=1 the same command runs single-process over the same
total device count (set --devices_per_process accordingly), for comparisons.
"""
import argparse
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time

# Seconds before SIGKILL. JAX's preemption notifier catches SIGTERM (so a
# trainer can checkpoint at its next sync point), which does not end a process
# waiting in a collective for a dead peer: after a failure we wait only briefly.
GRACE_AFTER_FAILURE_S = 3
GRACE_AFTER_SIGNAL_S = 30


def free_port():
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def child_env(base, index, num_processes, devices_per_process, coordinator,
              platform="cpu"):
  """Environment of process `index`: fake devices + the MTJAX_* variables."""
  env = dict(base)
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  flags.append(f"--xla_force_host_platform_device_count={devices_per_process}")
  env["XLA_FLAGS"] = " ".join(flags)
  env["MTJAX_COORDINATOR"] = coordinator
  env["MTJAX_NUM_PROCESSES"] = str(num_processes)
  env["MTJAX_PROCESS_ID"] = str(index)
  env["PYTHONUNBUFFERED"] = "1"  # stream lines as they come
  if platform:
    env["JAX_PLATFORMS"] = platform
  return env


def _pump(index, stream, out_lock, log_file):
  prefix = f"[{index}] ".encode()
  for line in iter(stream.readline, b""):
    with out_lock:
      sys.stdout.buffer.write(prefix + line)
      sys.stdout.buffer.flush()
    if log_file:
      log_file.write(line)
      log_file.flush()
  stream.close()


def _signal_group(proc, sig):
  try:
    os.killpg(proc.pid, sig)  # the command and anything it spawned
  except ProcessLookupError:
    pass


def _exit_code(returncode):
  return 128 - returncode if returncode < 0 else returncode


def launch(command, num_processes=2, devices_per_process=4, platform="cpu",
           log_dir=None, port=None):
  """Runs `command` (argv list) as `num_processes` processes; returns exit code."""
  if not command:
    raise ValueError("no command given: put it after '--', e.g. "
                     "launch/local.py --num_processes=2 -- python -m mtjax.main ...")
  coordinator = f"localhost:{port or free_port()}"
  log_dir = pathlib.Path(log_dir) if log_dir else None
  if log_dir:
    log_dir.mkdir(parents=True, exist_ok=True)
  out_lock = threading.Lock()
  procs, pumps, logs = [], [], []
  for i in range(num_processes):
    env = child_env(os.environ, i, num_processes, devices_per_process,
                    coordinator, platform)
    # Own process group: a terminal Ctrl-C reaches us once and we forward it,
    # and terminating a process also reaches its children.
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    log = open(log_dir / f"process_{i}.log", "wb") if log_dir else None
    pump = threading.Thread(target=_pump, args=(i, proc.stdout, out_lock, log),
                            daemon=True)
    pump.start()
    procs.append(proc)
    pumps.append(pump)
    logs.append(log)

  received = []  # signals we forwarded
  def forward(signum, frame):
    del frame
    received.append(signum)
    again = len(received) > 1  # a second Ctrl-C: stop waiting
    for p in procs:
      if p.poll() is None:
        _signal_group(p, signal.SIGKILL if again else signum)
  old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}

  failure, kill_at = None, None  # (index, exit code), deadline for SIGKILL
  try:
    while True:
      codes = [p.poll() for p in procs]
      if failure is None:
        bad = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
        if bad:
          failure = (bad[0][0], _exit_code(bad[0][1]))
          running = [i for i, c in enumerate(codes) if c is None]
          if running and not received:
            print(f"[launch] process {failure[0]} exited with code {failure[1]}; "
                  f"terminating processes {running}", file=sys.stderr, flush=True)
          for i in running:
            _signal_group(procs[i], signal.SIGTERM)
      if (failure or received) and kill_at is None:
        kill_at = time.monotonic() + (
            GRACE_AFTER_FAILURE_S if failure else GRACE_AFTER_SIGNAL_S)
      if all(c is not None for c in codes):
        break
      if kill_at is not None and time.monotonic() > kill_at:
        for p in procs:
          if p.poll() is None:
            _signal_group(p, signal.SIGKILL)
      time.sleep(0.05)
  finally:
    for s, handler in old.items():
      signal.signal(s, handler)
    for pump in pumps:
      pump.join(timeout=5)
    for log in logs:
      if log:
        log.close()
  if received:
    # Every process stopped cleanly (e.g. saved a preemption checkpoint on
    # SIGTERM and exited 0): success. Otherwise the codes only echo the
    # forwarded signal.
    if all(p.returncode == 0 for p in procs):
      return 0
    return 128 + received[0]
  return failure[1] if failure else 0


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  if "--" in argv:
    split = argv.index("--")
    flags, command = argv[:split], argv[split + 1:]
  else:
    flags, command = argv, []
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
      usage="%(prog)s [flags] -- COMMAND [ARGS...]")
  parser.add_argument("--num_processes", type=int, default=2)
  parser.add_argument("--devices_per_process", type=int, default=4,
                      help="fake CPU devices per process")
  parser.add_argument("--platform", default="cpu",
                      help="JAX_PLATFORMS for the processes; '' leaves it unset")
  parser.add_argument("--log_dir", default=None,
                      help="also write each process's output to process_<i>.log")
  parser.add_argument("--port", type=int, default=None,
                      help="coordinator port (default: a free one)")
  args = parser.parse_args(flags)
  if args.num_processes < 1 or args.devices_per_process < 1:
    parser.error("--num_processes and --devices_per_process must be >= 1")
  if not command:
    parser.error("no command: put it after '--', e.g. "
                 "-- python -m mtjax.main --config=configs/X.py --workdir=DIR")
  return launch(command, args.num_processes, args.devices_per_process,
                args.platform, args.log_dir, args.port)


if __name__ == "__main__":
  sys.exit(main())
