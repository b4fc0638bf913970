"""Multi-run jobs over the trainer: an expert library, prompt transfer.

  library          one expert per task (config.library.tasks), each trained by
                   the ordinary trainer, written to an expert library
                   (mtjax.methods.library) with its evaluation metrics;
  prompt_transfer  multitask prompt tuning on a source mixture, then prompt
                   tuning on each target task from the source's shared prompt.
"""
import copy
import hashlib
import json

import seqio

from mtjax import data, paths
from mtjax.experiments import train
from mtjax.experiments.train import JOBS
from mtjax.methods import adapters, library


def _plain_tasks(spec, reg):
  """'held_in' / 'held_out' / 'a,b,c' / a tuple -> plain task names."""
  if isinstance(spec, str):
    if spec in ("held_in", "held_out"):
      return list(getattr(reg, spec))
    spec = [t for t in spec.split(",") if t]
  tasks = list(spec)
  if not tasks:
    raise ValueError("config.library.tasks is empty: name tasks ('a,b'), "
                     "'held_in' or 'held_out'")
  for t in tasks:
    reg.seqio_name(t)  # raises with the known names
  return tasks


@JOBS.register("library")
def train_library(config, workdir: str) -> "library.Library":
  """Trains one expert per task (config.library.tasks) into a library.

  Each task runs the ordinary trainer (mtjax.experiments.train) on that task
  alone in WORKDIR/runs/<task> (resumable: finished experts are skipped), then
  its adapter-only checkpoint is written to the library with the task's
  evaluation metrics. The base is the same for every expert (config.model
  with config.seed, or config.model.hf_path). Returns the Library.
  """
  lib_cfg = config.library
  reg = data.register(data.vocabulary(config.data.vocab))
  tasks = _plain_tasks(lib_cfg.tasks, reg)
  lib = library.Library(lib_cfg.get("root") or paths.join(workdir, "library"))
  model_cfg = config.model.to_dict()
  base_id = model_cfg.get("hf_path") or "scratch:" + hashlib.sha256(
      json.dumps([model_cfg, config.seed], sort_keys=True,
                 default=str).encode()).hexdigest()[:12]
  done = {e.name for e in lib.list()} if paths.isdir(lib.root) else set()
  for task in tasks:
    if task in done:
      print(f"library: expert {task!r} exists in {lib.root}, skipped",
            flush=True)
      continue
    cfg = copy.deepcopy(config)
    with cfg.unlocked():
      cfg.data.mixture = task
      cfg.eval.groups = (task,)
    run_dir = paths.join(workdir, "runs", task)
    results = train.train_and_evaluate(cfg, run_dir)
    params = adapters.load_adapter(run_dir)
    lib.add(task, cfg.method, params, task=task, base_model=base_id,
            steps=cfg.num_train_steps, metrics=results.get(task, {}))
    print(f"library: added expert {task!r} to {lib.root}", flush=True)
  return lib


@JOBS.register("prompt_transfer")
def train_prompt_transfer(config, workdir: str) -> dict:
  """Multitask prompt transfer: a source prompt, then target-task prompts.

  Stage 1 (WORKDIR/source): multitask prompt tuning (config.transfer.source
  method, e.g. shared prompt x per-task rank-1) on config.transfer.
  source_mixture. Stage 2 (WORKDIR/targets/<task>): plain prompt tuning on each
  of config.transfer.target_tasks, initialised from the source's shared prompt.
  Returns {task: results} of the target runs.
  """
  tcfg = config.transfer
  reg = data.register(data.vocabulary(config.data.vocab))
  source_dir = paths.join(workdir, "source")
  src = copy.deepcopy(config)
  with src.unlocked():
    src.method = copy.deepcopy(tcfg.source_method)
    if src.method.get("num_tasks", 0) == 0:   # one per task of the mixture
      src.method.num_tasks = len(_mixture_tasks(reg.seqio_name(
          tcfg.source_mixture)))
    src.data.mixture = tcfg.source_mixture
    src.num_train_steps = tcfg.source_steps
    src.eval.groups = ()
  train.train_and_evaluate(src, source_dir)
  out = {}
  for task in _plain_tasks(tcfg.target_tasks, reg):
    cfg = copy.deepcopy(config)
    with cfg.unlocked():
      cfg.method.init_from = source_dir
      cfg.data.mixture = task
      cfg.eval.groups = (task,)
    out[task] = train.train_and_evaluate(
        cfg, paths.join(workdir, "targets", task))
  return out


def _mixture_tasks(seqio_name):
  provider = seqio.get_mixture_or_task(seqio_name)
  return (provider.tasks if isinstance(provider, seqio.Mixture)
          else [provider])
