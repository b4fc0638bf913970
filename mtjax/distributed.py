"""Multi-host set-up: one JAX process per host (TPU pod, SLURM node, or fake).

`maybe_initialize(config)` runs once at the start of the trainer, before any JAX
computation. It calls `jax.distributed.initialize` when asked to by, in order:

  1. `config.distributed` with an explicit `coordinator_address`
     ('host:port'), `num_processes` and `process_id`;
  2. the environment: MTJAX_COORDINATOR ('host:port' or 'auto'),
     MTJAX_NUM_PROCESSES, MTJAX_PROCESS_ID (set by launch/local.py; launch/tpu.py
     and launch/slurm.sh set MTJAX_COORDINATOR=auto);
  3. `config.distributed == 'auto'` (or its `coordinator_address == 'auto'`):
     JAX's own cluster detection (Cloud TPU VMs, SLURM, Open MPI, k8s). When no
     cluster is detected it stays single-process, so one config runs anywhere.

Without any of these it does nothing: a plain single-process run.

Afterwards every process runs the same program (SPMD). Each loads only its own
shard of the data (`process_shard`; `data_shard` for config.data.shard_by) and
`local_batch_to_global` stitches the per-process batches into one global
jax.Array sharded over the mesh. Work that needs no collectives (e.g. whole
tasks on one local device) is split with `process_split` and its results
joined with `all_gather_objects`; `broadcast_from_main` gives every process
process 0's arrays.
"""
import logging
import os
import pickle
import signal
import sys
from typing import Any, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

ENV_COORDINATOR = "MTJAX_COORDINATOR"
ENV_NUM_PROCESSES = "MTJAX_NUM_PROCESSES"
ENV_PROCESS_ID = "MTJAX_PROCESS_ID"
BATCH_AXES = ("data", "fsdp")  # mesh axes of the logical 'batch' axis (sharding.RULES)


def _field(obj, name):
  """obj.name or obj[name] (ConfigDict, dict or dataclass), else None."""
  if obj is None:
    return None
  if isinstance(obj, dict) or hasattr(obj, "keys") and hasattr(obj, "get"):
    return obj.get(name)
  return getattr(obj, name, None)


def distributed_args(config=None, environ=None):
  """What `maybe_initialize` would do: None (single process), 'auto', or
  a dict(coordinator_address, num_processes, process_id). Pure; no JAX calls."""
  environ = os.environ if environ is None else environ
  dist = _field(config, "distributed")
  auto = isinstance(dist, str) and dist == "auto"
  if isinstance(dist, str) and dist not in ("auto", ""):
    raise ValueError(f"config.distributed={dist!r}: use 'auto', or a dict with "
                     "coordinator_address, num_processes and process_id.")
  address = None if isinstance(dist, str) else _field(dist, "coordinator_address")
  if address == "auto":
    auto, address = True, None
  if address:
    num, pid = _field(dist, "num_processes"), _field(dist, "process_id")
    source = "config.distributed"
  elif environ.get(ENV_COORDINATOR):
    address = environ[ENV_COORDINATOR]
    if address == "auto":
      return "auto"
    num, pid = environ.get(ENV_NUM_PROCESSES), environ.get(ENV_PROCESS_ID)
    source = f"${ENV_NUM_PROCESSES} / ${ENV_PROCESS_ID}"
  else:
    return "auto" if auto else None
  if num is None or pid is None:
    raise ValueError(
        f"coordinator {address!r} is set but num_processes/process_id are not: "
        f"set both in {source} (or use 'auto' on a TPU pod or SLURM job).")
  return dict(coordinator_address=str(address), num_processes=int(num),
              process_id=int(pid))


def maybe_initialize(config=None):
  """Initialises jax.distributed if config or environment ask for it.

  Must run before any JAX computation. Idempotent: a second call (or a call
  after someone else initialised) does nothing. Returns True when running as
  part of a multi-process job.
  """
  if jax.distributed.is_initialized():
    return True
  args = distributed_args(config)
  if args is None:
    return False
  # Cross-process collectives on CPU (fake devices in tests, launch/local.py);
  # the GPU/TPU backends ignore this option.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if args == "auto":
    try:
      jax.distributed.initialize()
    except ValueError as e:  # 'coordinator_address should be defined.'
      logging.warning("distributed 'auto': no TPU pod / SLURM / MPI cluster "
                      "detected (%s); running as a single process.", e)
      return False
  else:
    # All three given: skip cluster detection so that e.g. a SLURM allocation
    # around launch/local.py cannot override the launcher's choice.
    jax.distributed.initialize(**args, cluster_detection_method="deactivate")
  _exit_promptly_on_uncaught_exception()
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
  return True


def _exit_promptly_on_uncaught_exception():
  """After the traceback, exit now instead of at JAX's shutdown barrier.

  At exit JAX waits (up to 5 minutes) for every process to reach shutdown;
  after a crash the others never do (they wait in a collective for this one),
  so the whole job would hang. Exiting lets launchers see the failure and stop
  the rest. Only for uncaught exceptions: `sys.exit(n)` still waits there.
  """
  previous = sys.excepthook
  def hook(kind, value, traceback):
    previous(kind, value, traceback)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(130 if issubclass(kind, KeyboardInterrupt) else 1)
  sys.excepthook = hook


class PreemptionNotice:
  """Whether the job was asked to stop (SIGTERM: Spot/queued TPU reclaim,
  SLURM's time limit, k8s eviction), agreed by every process at one step.

  Multi-process jobs use JAX's preemption sync manager
  (`multihost_utils.reached_preemption_sync_point`): it catches SIGTERM on
  any host, and every host learns the same step at which to save. A single
  process has no sync manager, so a SIGTERM handler sets a flag, read at the
  next step. `reached(step)` must be called at every step by every process.
  """

  def __init__(self) -> None:
    self.signalled = False
    self.multi = jax.distributed.is_initialized() and jax.process_count() > 1
    self._installed, self._previous = False, None
    if not self.multi:
      try:
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        self._installed = True
      except ValueError:   # not the main thread: no handler, no notice
        logging.warning("PreemptionNotice: not in the main thread; SIGTERM "
                        "will not checkpoint before exiting")

  def _handle(self, signum, frame) -> None:
    del signum, frame
    self.signalled = True

  def reached(self, step: int) -> bool:
    if self.multi:
      return bool(multihost_utils.reached_preemption_sync_point(step))
    return self.signalled

  def close(self) -> None:
    """Restores the previous SIGTERM handler."""
    if self._installed:   # None: a handler not set from Python -> default
      signal.signal(signal.SIGTERM, self._previous or signal.SIG_DFL)


def is_main_process():
  """True on process 0: the one that writes logs, summaries and configs."""
  return jax.process_index() == 0


def process_shard(mesh=None, batch_axes=BATCH_AXES):
  """(index, count) of this process's data shard, for seqio.ShardInfo.

  Without a mesh: (process_index, process_count). With a mesh, processes whose
  devices hold the same slice of the batch (batch axes not spanning all hosts,
  e.g. tensor parallelism across hosts) get the same shard, as
  `local_batch_to_global` expects.
  """
  if mesh is None:
    return jax.process_index(), jax.process_count()
  axes = [a for a in batch_axes if a in mesh.axis_names]
  dims = [mesh.axis_names.index(a) for a in axes]
  slices = {}  # process -> set of batch-slice indices its devices hold
  for pos, device in np.ndenumerate(mesh.devices):
    coord = np.ravel_multi_index([pos[d] for d in dims],
                                 [mesh.devices.shape[d] for d in dims]) if dims else 0
    slices.setdefault(device.process_index, set()).add(int(coord))
  groups = sorted({tuple(sorted(s)) for s in slices.values()})
  return groups.index(tuple(sorted(slices[jax.process_index()]))), len(groups)


def data_shard(mesh, shard_by: str = "examples") -> tuple:
  """(index, count) of the training stream this process reads.

  shard_by 'examples': its own seqio shard (`process_shard`; reads scale
  with the number of hosts, and the batches depend on the process count).
  'rows': (0, 1), every process reads the whole stream and places only its
  devices' rows (`put_global_batch`): the same global batches for any number
  of processes. The same choice as the training job's `config.data.shard_by`
  (mtjax.experiments.train).
  """
  if shard_by not in ("examples", "rows"):
    raise ValueError(f"config.data.shard_by={shard_by!r}: use 'examples' or "
                     "'rows'")
  return (0, 1) if shard_by == "rows" else process_shard(mesh)


def process_split(items: Sequence) -> list:
  """This process's share of `items`: every process_count()-th, from its
  index (all of them in a single process). Work units that need no
  collectives (e.g. whole tasks on a local device); `all_gather_objects`
  joins the results."""
  return list(items)[jax.process_index()::jax.process_count()]


def all_gather_objects(obj: Any) -> list:
  """[obj of process 0, obj of process 1, ...] on every process (any
  picklable object; [obj] for one process). Every process must call it."""
  if jax.process_count() == 1:
    return [obj]
  raw = np.frombuffer(pickle.dumps(obj), np.uint8)
  sizes = multihost_utils.process_allgather(np.int64(raw.size))   # (P,)
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:raw.size] = raw
  everyone = multihost_utils.process_allgather(padded)            # (P, max)
  return [pickle.loads(row[:n].tobytes())
          for row, n in zip(everyone, sizes, strict=True)]


def broadcast_from_main(tree: Any) -> Any:
  """Process 0's values of a pytree of arrays (the same shapes on every
  process), each placed like the leaf it replaces (a jax.Array keeps its
  sharding, which must be process-local; numpy stays numpy). The tree
  itself in a single process. Every process must call it."""
  if jax.process_count() == 1:
    return tree
  values = multihost_utils.broadcast_one_to_all(tree)
  return jax.tree.map(
      lambda v, old: jax.device_put(v, old.sharding)
      if isinstance(old, jax.Array) else v, values, tree)


def local_batch_to_global(local_batch, mesh, batch_sharding=None):
  """Per-process numpy batch (pytree, leading dim B_local) -> global jax.Arrays.

  batch_sharding: a Sharding or PartitionSpec for every leaf; default shards
  the leading (batch) dim over ('data', 'fsdp'). The global batch is
  B_local * (number of process shards). Works unchanged with one process.
  """
  if batch_sharding is None:
    batch_sharding = PartitionSpec(tuple(a for a in BATCH_AXES if a in mesh.axis_names))
  if isinstance(batch_sharding, PartitionSpec):
    batch_sharding = NamedSharding(mesh, batch_sharding)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(batch_sharding, np.asarray(x)),
      local_batch)


def sync(name):
  """Barrier across all processes (no-op for one process); `name` must match."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)
