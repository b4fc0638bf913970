"""train_and_evaluate(config, workdir): the whole job, resumable.

WORKDIR layout:
  config.json       the run's config (a different one refuses to start)
  checkpoints/      orbax steps (every config.checkpoint_every, last N kept)
  metrics.jsonl     one line per logged step: {"step", "train/loss", ...}
                    (appended; after a resume a step may appear twice, the
                    later line is the resumed run's)
  tb/               TensorBoard events
  results.json      {task: {metric: value}, 'average/<group>': {...}}

WORKDIR may be a gs:// URL (mtjax.paths): every file above is written there
through etils.epath and orbax. TensorBoard events go to
config.tensorboard_dir if set (any path TensorFlow's file system takes,
gs:// included), else WORKDIR/tb.
"""
import json
import time

import jax
from absl import logging

from mtjax import data, distributed, methods, paths
from mtjax.evaluation import evaluate
from mtjax.evaluation import results as results_lib
from mtjax.models import sharding
from mtjax.registry import Registry
from mtjax.training import checkpoint, fit, metrics, trainer

# config.job -> the function(config, workdir) that runs it; every experiment
# module registers its jobs here (mtjax.main dispatches on config.job).
JOBS = Registry("job")


def _check_batch(config, mesh):
  rows = mesh.shape["data"] * mesh.shape["fsdp"]
  b, k = config.batch_size, config.get("grad_accum", 1)
  if b % (k * jax.process_count()) or (b // k) % rows:
    raise ValueError(
        f"batch_size={b} must split into grad_accum={k} microbatches whose "
        f"size is divisible by the data*fsdp mesh size {rows} (and by the "
        f"{jax.process_count()} processes)")


def setup(config, workdir, num_tasks=1):
  """Model, method, the Fitter, params (trainable state + frozen) and mesh."""
  del workdir
  mesh = sharding.make_mesh(tuple(config.mesh_shape))
  _check_batch(config, mesh)
  model_rng, method_rng = jax.random.split(jax.random.key(config.seed))
  model, base = trainer.build_model(config.model, model_rng, mesh)
  method = methods.build(config.get("method"))
  flat, flat_sh = trainer.init_params(model, method, method_rng, mesh, base)
  pattern = config.get("trainable") or method.trainable
  fitter = fit.Fitter(method, model, mesh, config.optimizer,
                      config.num_train_steps, num_tasks=num_tasks,
                      seed=config.seed, grad_accum=config.get("grad_accum", 1),
                      dropout=config.get("dropout", False), trainable=pattern,
                      remat=config.get("remat", "none"))
  state, frozen = fitter.init(flat, flat_sh)
  return dict(mesh=mesh, model=model, method=method, state=state,
              frozen=frozen, fitter=fitter, pattern=pattern)


def eval_groups(entries, reg):
  """{'held_in': [...], 'held_out': [...], 'extra': [...]} from config entries.

  An entry is 'held_in', 'held_out' (the suite's groups) or a task name;
  task names are gathered in the group 'extra'.
  """
  groups = {}
  for entry in entries:
    if entry in ("held_in", "held_out"):
      groups[entry] = list(getattr(reg, entry))
    else:
      reg.seqio_name(entry)  # a clear error for an unknown task
      groups.setdefault("extra", []).append(entry)
  return groups


def _log(msg):
  """Printed by process 0 (the job's output); logged by the others."""
  if jax.process_index() == 0:
    print(msg, flush=True)
  else:
    logging.info(msg)


@JOBS.register("train")
def train_and_evaluate(config, workdir: str) -> dict:
  """Trains config.num_train_steps steps (resuming), then evaluates."""
  workdir = paths.absolute(workdir)
  paths.makedirs(workdir)
  is_writer = jax.process_index() == 0
  checkpoint.check_workdir_config(workdir, config, is_writer)
  vocab = data.vocabulary(config.data.vocab)
  reg = data.register(vocab)
  mixture = reg.seqio_name(config.data.mixture)
  s = setup(config, workdir, num_tasks=len(data.task_names(mixture, vocab)))
  mesh, model, method = s["mesh"], s["model"], s["method"]
  trainer.check_vocab(model, vocab)
  n_train = sum(x.size for x in jax.tree.leaves(s["state"]["params"]))
  n_frozen = sum(x.size for x in jax.tree.leaves(s["frozen"]))
  _log(f"{model.config.model_type}: {n_train:,} trainable params "
       f"({s['pattern']!r}), {n_frozen:,} frozen; mesh {dict(mesh.shape)}")

  mngr = checkpoint.manager(workdir, config.checkpoint_every,
                            config.keep_checkpoints)
  for name in checkpoint.incomplete_checkpoints(workdir):
    _log(f"ignoring incomplete checkpoint {name} (an interrupted save)")
  state, start = checkpoint.restore_latest(mngr, s["state"])
  if start:
    _log(f"resumed from step {start}")

  kind = trainer.model_kind(model)
  lengths = {"inputs": config.data.inputs_length,
             "targets": config.data.targets_length}
  if start < config.num_train_steps:
    try:
      state = _train_loop(config, workdir, s, state, start, mngr, vocab, reg,
                          kind, lengths)
    except Preempted as p:
      checkpoint.finish(mngr)
      _log(f"preempted (SIGTERM): checkpoint of step {p.step} saved in "
           f"{workdir}; run the same command again to resume from it")
      return {"preempted_at_step": p.step}
  checkpoint.finish(mngr)

  params = s["fitter"].params(state, s["frozen"])
  groups = eval_groups(config.eval.groups, reg)
  t0 = time.time()
  with sharding.use_mesh(mesh):
    res = evaluate.evaluate_all(method, model, params, groups, vocab,
                                config.eval, lengths, mesh, log=_log)
  res = results_lib.with_averages(res, groups)
  _log(f"evaluation took {time.time() - t0:.1f}s")
  if is_writer:
    path = results_lib.write_json(res, workdir)
    _log("\n" + results_lib.table(res, groups) + f"\n(written to {path})")
  return res


class Preempted(Exception):  # noqa: N818 (an event, not a failure)
  """Raised by the fit loop after the preemption checkpoint of `step`."""

  def __init__(self, step: int) -> None:
    super().__init__(step)
    self.step = step


def _train_loop(config, workdir, s, state, start, mngr, vocab, reg, kind,
                lengths):
  """The fit loop with logging, TensorBoard and periodic checkpoints."""
  mesh, fitter = s["mesh"], s["fitter"]
  # 'examples': each process reads its own seqio shard (scales to many
  # hosts; batches depend on the process count). 'rows': every process reads
  # the whole stream and places only its devices' rows (the same batches for
  # any number of processes, at the cost of reading everything everywhere).
  shard_by = config.data.get("shard_by", "examples")
  if shard_by not in ("examples", "rows"):
    raise ValueError(f"config.data.shard_by={shard_by!r}: use 'examples' or "
                     "'rows'")
  shard, num_shards = distributed.process_shard(mesh)
  if shard_by == "rows":
    shard, num_shards = 0, 1
  batches = data.train_batches(
      reg.seqio_name(config.data.mixture), vocab, lengths,
      config.batch_size // num_shards, kind, seed=config.data.seed,
      start_step=start, shard_index=shard, num_shards=num_shards,
      pack=config.data.get("pack", False))
  put = trainer.put_global_batch if shard_by == "rows" else trainer.put_batch
  plain = {v: k for k, v in reg.names.items()}
  task_names = [plain.get(t, t) for t in batches.task_names]
  total, log_every = config.num_train_steps, config.log_every
  writer = metrics.writer(config.get("tensorboard_dir") or
                         paths.join(workdir, "tb"))
  progress = metrics.Progress(start, total, log_every)
  log_file = paths.LineLog(paths.join(workdir, "metrics.jsonl")) \
      if jax.process_index() == 0 else None
  adapter_key = (config.get("method") or {}).get("adapter_index_from")

  def prepare(host):
    if adapter_key:
      host["adapter_index"] = host[adapter_key]
    return host

  preemption = distributed.PreemptionNotice()

  def on_step(done, state, m):
    scalars = None
    if done % log_every == 0 or done == total:
      scalars = metrics.scalars_from_metrics(m, task_names,
                                             fitter.schedule(done - 1))
      writer.write_scalars(done, scalars)
      if log_file:
        log_file.write(json.dumps({"step": done, **scalars}))
    progress.update(done, scalars)
    stop = preemption.reached(done)
    if checkpoint.save(mngr, done, state, force=done == total or stop) \
        and log_file:
      log_file.sync()  # on object stores: lines up to this checkpoint kept
    if stop and done < total:
      raise Preempted(done)

  failed = True
  try:
    with sharding.use_mesh(mesh):
      state, _ = fitter.run(state, s["frozen"], batches, start, put=put,
                            prepare=prepare, on_step=on_step)
    failed = False
  except OSError as e:
    if paths.is_no_space(e) and not isinstance(e, checkpoint.NoSpaceError):
      raise checkpoint.no_space_error(mngr, e, "writing metrics") from e
    raise
  finally:
    preemption.close()
    progress.close()
    _close_outputs(writer, log_file, quiet=failed)
  return state


def _close_outputs(writer, log_file, quiet):
  """Flushes TensorBoard and closes metrics.jsonl. After a failure (`quiet`)
  their own errors (e.g. the same full disk) are logged, not raised over the
  error that stopped the run."""
  for close in (writer.flush, log_file.close if log_file else None):
    if close is None:
      continue
    try:
      close()
    except Exception as e:  # noqa: BLE001 (re-raised unless quiet)
      if not quiet:
        raise
      logging.warning("closing run outputs after a failure: %s: %s",
                      type(e).__name__, e)
