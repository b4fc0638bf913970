r"""The PHATGOOSE experiment: experts, gates, then every router on one table.

Muqeeth et al. 2024 (arXiv:2402.05859); configs/phatgoose.py describes the run.

  run(config, workdir):
    setup           mesh, data, model; the base (trained on base_mixture for
                    base_steps, or loaded from model.hf_path)
    library         one LoRA expert per held-in task, then its PHATGOOSE gates
                    (mtjax.routing.experts), written to WORKDIR/library
    config.methods  each entry {'name': row label, 'kind': what runs it
                    (default: the name), **options} is evaluated on held-in
                    and held-out tasks; one table, phatgoose_results.json

What runs an entry, looked up by its kind:
  1. a function registered in `STEPS` here (base, multitask, oracle,
     task_gate, phatgoose_task_avg, avg_activation, retrieval, poly, mhr,
     mhr_mu, mhr_z, the token-level routers below, and 'merge': a merge of the library's
     experts from mtjax.merging, static or learned, `merge_step`);
  2. else a router in mtjax.routing.ROUTERS that needs no training: the
     library's routed params, evaluated (options: top_k, impl);
  3. else a method in mtjax.methods.METHODS: trained on the held-in mixture
     from the base for `steps` steps, then evaluated (options: the method's).
So a new router or method is registered where it is defined, and listed in
the config; nothing here changes.
"""
import dataclasses
import json
import time
import zlib
from typing import Callable, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from mtjax import data, distributed, merging, methods, paths, routing
from mtjax.data import si_tasks, suite
from mtjax.data import tasks as tasks_lib
from mtjax.evaluation import evaluate, plots
from mtjax.evaluation import results as results_lib
from mtjax.experiments.train import JOBS
from mtjax.methods import adapters
from mtjax.methods import lora as lora_lib
from mtjax.methods.full import FullFineTuning
from mtjax.models import sharding
from mtjax.registry import Registry
from mtjax.routing import baselines as rb
from mtjax.routing import diagnostics as diag_lib
from mtjax.routing import experts as ex
from mtjax.training import fit, trainer

# kind -> function(run: Run, entry: dict) -> {task: metrics}.
STEPS = Registry("PHATGOOSE experiment step")


@dataclasses.dataclass
class Run:
  """Everything an entry needs: the setup, the library, and shared results."""
  config: object
  vocab: object
  reg: object
  model: object
  mesh: object
  kind: str
  rng: jax.Array
  lengths: dict       # training feature lengths (config.data)
  held_in: list     # evaluation tasks of the held-in datasets
  held_out: list    # evaluation tasks of the held-out datasets
  lora: object
  # Datasets: {name: its evaluation tasks} (one promptsource template each;
  # a suite task is its own dataset). One expert per held-in dataset.
  groups: dict = dataclasses.field(default_factory=dict)
  experts: list = dataclasses.field(default_factory=list)
  base: dict = None
  stacked: dict = None
  workdir: str = ""
  diagnostics: dict = dataclasses.field(default_factory=dict)
  plot: dict = dataclasses.field(default_factory=dict)
  # Trained params shared by several entries (Poly for poly/mhr/...), by key.
  trained: dict = dataclasses.field(default_factory=dict)
  # Per-example correctness {row name: {task: (N,)}}, for the intervals.
  correct: dict = dataclasses.field(default_factory=dict)
  # Ids of the examples scored {row name: {task: [id]}} (`example_ids`).
  example_ids: dict = dataclasses.field(default_factory=dict)
  start: float = dataclasses.field(default_factory=time.time)
  # (index, count) of the training stream this process reads
  # (distributed.data_shard of config.data.shard_by).
  shard: tuple = (0, 1)
  # {(training source, split): its feature lengths} (`train_lengths`).
  train_lengths: dict = dataclasses.field(default_factory=dict)
  # Evaluation lengths: config.eval.inputs_length / targets_length where set
  # (a task's longest prompt may exceed what training needs), else `lengths`.
  eval_lengths: dict = None

  @property
  def put(self):
    """Places a training batch of `batches`: this process's rows of its own
    shard, or (one shard) its devices' rows of the whole batch."""
    return (trainer.put_global_batch if self.shard[1] == 1
            else trainer.put_batch)

  @property
  def tasks(self) -> list:
    return self.held_in + self.held_out

  @property
  def num_experts(self) -> int:
    return len(self.experts)

  @property
  def own(self) -> dict:
    """{held-in dataset or task: index of its own expert}."""
    out = {}
    for i, name in enumerate(self.experts):
      out.update({name: i, **{t: i for t in self.groups[name]}})
    return out

  def eval_tasks(self, row: str) -> list:
    """The tasks a row is evaluated on: held-in and held-out, or held-out
    only when config.held_in_rows (a tuple of row names) leaves it out."""
    rows = self.config.get("held_in_rows", None)
    if rows is None or row in rows:
      return self.tasks
    return list(self.held_out)

  def split_of(self, task: str) -> str:
    """Evaluation split: held-in tasks use config.held_in_split when set
    (rows their experts never saw), every other task config.eval.split."""
    if task in self.held_in and self.config.get("held_in_split"):
      return self.config.held_in_split
    return self.config.eval.split

  def log(self, msg: str) -> None:
    """Printed by process 0 (the job's output), logged by the others."""
    msg = f"[{time.time() - self.start:6.0f}s] {msg}"
    if distributed.is_main_process():
      print(msg, flush=True)
    else:
      logging.info(msg)


# ------------------------------------------------------------------ setup

def setup(config) -> Run:
  """Mesh, data registry, model and base params (trained if base_steps)."""
  mesh = sharding.make_mesh(tuple(config.mesh_shape))
  vocab = data.vocabulary(config.data.vocab)
  reg = data.register(vocab)
  rng = jax.random.key(config.seed)
  model_cfg = config.model.copy_and_resolve_references()
  if not (model_cfg.get("hf_path") or model_cfg.get("gguf_path")
          or model_cfg.get("vocab_size")):
    model_cfg.vocab_size = vocab.vocab_size
  model, base = trainer.build_model(model_cfg, rng, mesh)
  trainer.check_vocab(model, vocab)
  held_in = dataset_groups(reg, config.held_in or reg.held_in,
                           config.get("templates", 0))
  held_out = dataset_groups(reg, config.held_out or reg.held_out,
                            config.get("templates", 0))
  run = Run(config=config, vocab=vocab, reg=reg, model=model, mesh=mesh,
            kind=trainer.model_kind(model), rng=rng,
            lengths={"inputs": config.data.inputs_length,
                     "targets": config.data.targets_length},
            held_in=[t for ts in held_in.values() for t in ts],
            held_out=[t for ts in held_out.values() for t in ts],
            groups={**held_in, **held_out}, experts=list(held_in),
            lora=lora_lib.LoRA(rank=config.expert.rank,
                               alpha=config.expert.alpha,
                               targets=tuple(config.expert.targets)))
  run.eval_lengths = {
      k: config.eval.get(f"{k}_length", None) or run.lengths[k]
      for k in ("inputs", "targets")}
  if len(set(run.tasks)) != len(run.tasks):
    raise ValueError("config.held_in and config.held_out share tasks: "
                     f"{sorted(set(run.held_in) & set(run.held_out))}")
  run.shard = distributed.data_shard(
      mesh, config.data.get("shard_by", "examples"))
  rows = mesh.shape["data"] * mesh.shape["fsdp"]
  if config.batch_size % rows or config.batch_size % run.shard[1]:
    raise ValueError(
        f"batch_size={config.batch_size} must split evenly over the "
        f"{run.shard[1]} data shards (processes) and the data*fsdp mesh "
        f"size {rows}")
  if config.base_steps:
    full = FullFineTuning()
    with sharding.use_mesh(mesh):
      p, loss = fit_method(run, full, base, rng, config.base_lr,
                           config.base_steps,
                           batches(run, config.base_mixture, config.seed + 7))
    base = p["base"]
    run.log(f"base: {config.base_steps} steps on {config.base_mixture}, "
            f"loss {loss:.3f}")
  run.base = base
  return run


def optimizer(config, lr: float):
  """config.optimizer with another learning rate."""
  opt = config.optimizer.copy_and_resolve_references()
  opt.learning_rate = lr
  return opt


def dataset_groups(reg, names, templates: int = 0) -> dict:
  """{name: evaluation tasks}: a real dataset (reg.real) -> its promptsource
  template tasks (the first `templates`, 0 = all; its lm-eval '.plain'
  format only when it has no template), anything else -> [itself]."""
  out = {}
  for name in names:
    if name not in reg.real:
      reg.seqio_name(name)   # a clear error for unknown names
      out[name] = [name]
      continue
    tasks = [t for t in reg.real[name] if not t.endswith(".plain")]
    tasks = tasks or list(reg.real[name])
    out[name] = tasks[:templates] if templates else tasks
  return out


def train_source(run: Run, name: str) -> str:
  """seqio name of the training data of a task, a dataset (its templates at
  equal rates) or 'held_in' (every held-in dataset at an equal rate)."""
  if name == "held_in":
    members = {t: 1.0 / len(run.groups[d]) for d in run.experts
               for t in run.groups[d]}
  elif name in run.groups:
    members = {t: 1.0 for t in run.groups[name]}
  else:
    return run.reg.seqio_name(name)
  if len(members) == 1:
    return run.reg.seqio_name(next(iter(members)))
  # Named by its members: another run in this process may mix other tasks.
  key = zlib.crc32(json.dumps(sorted(members.items())).encode())
  return tasks_lib.add_mixture(
      tasks_lib.seqio_name(run.vocab, f"phatgoose.{name}.{key:08x}"),
      {run.reg.seqio_name(t): r for t, r in members.items()})


def batches(run: Run, name: str, seed: int, split: Optional[str] = None):
  """Training batches (`split`, default config.train_split) of a task, a
  dataset or the held-in mixture (`train_source`); .task_names are seqio
  task names. config.trim_batches > 0 cuts each batch to its longest row,
  rounded up to that many tokens (`data.trim_batch`: only padding goes).

  This process's rows: batch_size / count rows of its shard `run.shard`
  (one shard: the whole batch); place them with `run.put`."""
  index, count = run.shard
  source = train_source(run, name)
  split = split or run.config.get("train_split", "train")
  return data.train_batches(source, run.vocab,
                            train_lengths(run, source, split),
                            run.config.batch_size // count, run.kind,
                            seed=seed, shard_index=index, num_shards=count,
                            split=split,
                            trim_to=run.config.get("trim_batches", 0))


def train_lengths(run: Run, source: str, split: str) -> dict:
  """run.lengths, the source's truncated training rows logged once: rows
  too long lose their prompt's start (`data.fit_row`, as in evaluation)."""
  if (source, split) not in run.train_lengths:
    cut, total = data.count_truncated(source, run.vocab, run.lengths,
                                      run.kind, split=split)
    run.log(f"train rows of {source} ({split}): {cut}/{total} truncated to "
            f"{run.lengths} (prompts keep their end)")
    run.train_lengths[source, split] = dict(run.lengths)
  return run.train_lengths[source, split]


def mixture(run: Run, seed: int) -> tuple:
  """Held-in mixture batches and its plain task names in mixture order (the
  'task_index' of each row indexes this list)."""
  it = batches(run, "held_in", seed)
  plain = {v: k for k, v in run.reg.names.items()}
  return it, [plain.get(n, n) for n in it.task_names]


def fit_method(run: Run, method, base, rng, lr: float, steps: int, it,
               by_task: bool = False, fitter: Optional[fit.Fitter] = None,
               put: Optional[Callable] = None):
  """Trains `method` from `base` on batches `it` with the one fit loop.

  by_task: rows pick their adapter by task ('adapter_index' = task_index).
  put: places a host batch (default `run.put`, for `batches`; a stand-in
  run without one: trainer.put_batch).
  Returns (nested params, last loss); pass `fitter` to reuse a compiled step.
  """
  fitter = fitter or fit.Fitter(
      method, run.model, run.mesh, optimizer(run.config, lr), steps,
      num_tasks=len(it.task_names), seed=run.config.seed)
  flat, flat_sh = trainer.init_params(run.model, method, rng, run.mesh, base)
  prepare = None
  if by_task:
    def prepare(host):
      host["adapter_index"] = host["task_index"]
      return host
  put = put or getattr(run, "put", trainer.put_batch)
  return fitter.fit(flat, flat_sh, it, prepare=prepare, put=put)


def train_library(run: Run, rng) -> dict:
  """One LoRA expert per held-in dataset, then its gates: the library."""
  cfg, lora = run.config, run.lora
  expert_fit = fit.Fitter(lora, run.model, run.mesh,
                          optimizer(cfg, cfg.expert_lr), cfg.expert_steps,
                          seed=cfg.seed)
  trained = []
  for i, task in enumerate(run.experts):
    p, loss = fit_method(run, lora, run.base, jax.random.fold_in(rng, i),
                         cfg.expert_lr, cfg.expert_steps,
                         batches(run, task, cfg.seed + i), fitter=expert_fit)
    trained.append(p["lora"])
    run.log(f"expert {task}: {cfg.expert_steps} steps, loss {loss:.3f}")
  gates = ex.GateTraining(lora)
  gate_fit = fit.Fitter(gates, run.model, run.mesh,
                        optimizer(cfg, cfg.gate_lr), cfg.gate_steps,
                        seed=cfg.seed)
  library = ex.new_library()
  for i, task in enumerate(run.experts):
    gates.expert = trained[i]
    p, loss = fit_method(run, gates, run.base, rng, cfg.gate_lr,
                         cfg.gate_steps,
                         batches(run, task, cfg.seed + 1000 + i),
                         fitter=gate_fit)
    library = ex.add_expert(library, task, trained[i], p["gate"])
    run.log(f"gates {task}: {cfg.gate_steps} steps, loss {loss:.3f}")
  return library


# ------------------------------------------------------------- evaluation

def eval_fns(run: Run, method) -> dict:
  """Compiled scorer and greedy decoder of a method (reuse across tasks)."""
  return {"score": evaluate.make_scorer(method, run.model),
          "greedy": evaluate.make_greedy(method, run.model,
                                         run.config.eval.max_new_tokens)}


def evaluate_method(run: Run, name: str, method, params_for_task: Callable,
                    tasks: list, fns: Optional[dict] = None,
                    split: Union[str, Callable[[str], str], None] = None,
                    max_examples: Optional[int] = None) -> dict:
  """{task: metrics} with one compiled scorer/greedy for all tasks; each
  task's per-example correctness goes to run.correct[name], the ids of the
  examples it scored (`example_ids`) to run.example_ids[name].

  The split is `run.split_of(task)` and the example count config.eval's
  (config.held_in_examples for held-in tasks, when set), unless `split` /
  `max_examples` are given (model selection on a validation split; `split`
  may be a function of the task)."""
  fns = fns or eval_fns(run, method)
  res, correct = {}, run.correct.setdefault(name, {})
  ids = run.example_ids.setdefault(name, {})
  for task in tasks:
    cfg = run.config.eval.copy_and_resolve_references()
    cfg.split = (split(task) if callable(split) else split
                 ) or run.split_of(task)
    if max_examples:
      cfg.max_examples = max_examples
    elif task in run.held_in and run.config.get("held_in_examples"):
      cfg.max_examples = run.config.held_in_examples
    res[task], correct[task] = evaluate.evaluate_task(
        fns, run.model, params_for_task(task), task, run.vocab, cfg,
        run.eval_lengths, run.mesh, return_correct=True)
    ids[task] = example_ids(data.eval_examples(
        task, run.vocab, split=cfg.split,
        max_examples=cfg.get("max_examples") or None))   # evaluate_task's
    if len(ids[task]) != len(correct[task]):
      raise AssertionError(f"{task}: {len(ids[task])} example ids for "
                           f"{len(correct[task])} scored examples")
  run.log(f"[{name}] " + " ".join(f"{t}={headline(m):.3f}"
                                  for t, m in res.items()))
  return res


def example_ids(examples: list) -> list:
  """Per example, crc32 of its input and target text: which examples a row
  scored, so results files can be checked to hold the same ones."""
  return [zlib.crc32(f"{e['inputs']}\x00{e['targets']}".encode())
          for e in examples]


def headline(metrics: dict) -> float:
  for key in ("accuracy", "exact_match"):
    if key in metrics:
      return float(metrics[key])
  return float(next(iter(metrics.values())))


def input_batches(run: Run, examples: list, prompts_only: bool = False,
                  method=None) -> list:
  """Model-input batches (fixed shape: one compile) of eval examples.

  Teacher-forced rows (input_ids + target_ids), or with prompts_only the
  prompts alone, unlabeled: no target token reaches the model, and the masks
  cover the prompt only (decoder-only: seqio's start slot and the prompt; T5:
  the encoder's prompt and the decoder's start slot, the one decoder position
  that exists before any target). A method naming a `prompt_end_input`
  (retrieval) gets each decoder-only row's last prompt position there, as
  the trainer's token_scores gives it. The batch size is config.eval's,
  rounded up to a multiple of the mesh's batch shards (`eval_batch_size`).
  """
  bs = eval_batch_size(run)
  rows = [(e["input_ids"], [] if prompts_only else e["target_ids"])
          for e in examples]
  key = getattr(method, "prompt_end_input", None)
  out = []
  for start in range(0, len(rows), bs):
    chunk = rows[start:start + bs]
    chunk = chunk + [chunk[0]] * (bs - len(chunk))   # fixed batch size
    lengths = run.eval_lengths
    if run.kind == "decoder":   # cut to the longest row (few shapes compile)
      longest = max(len(i) + len(t) for i, t in chunk)
      lengths = {"inputs": evaluate.bucket(longest, sum(lengths.values())),
                 "targets": 0}
    batch = evaluate.score_rows(chunk, run.kind, lengths,
                                pad_id=data.pad_token_id(run.vocab),
                                lm=data.lm_format(run.vocab))
    if prompts_only and run.kind == "encoder_decoder":
      batch["decoder_mask"] = np.zeros_like(batch["decoder_mask"])
      batch["decoder_mask"][:, 0] = 1
    inputs = data.model_inputs(batch, run.kind)
    if key and run.kind == "decoder":
      inputs[key] = np.asarray(trainer.prompt_ends(method, batch))
    out.append(inputs)
  return out


def eval_batch_size(run: Run) -> int:
  """config.eval.batch_size rounded up to a multiple of the mesh's batch
  shards (data * fsdp), as evaluate's batches are."""
  shards = run.mesh.shape["data"] * run.mesh.shape["fsdp"]
  return -(-run.config.eval.batch_size // shards) * shards


def eval_inputs(run: Run, task: str, max_examples: int,
                prompts_only: bool = False, method=None) -> tuple:
  """(model-input batches of a task's eval examples, number of examples):
  teacher-forced, or the prompts alone (`input_batches`)."""
  exs = data.eval_examples(task, run.vocab, split=run.split_of(task),
                           max_examples=max_examples)
  return input_batches(run, exs, prompts_only, method), len(exs)


class Recorder:
  """Per-module routing records of a routed method (compiled once)."""

  def __init__(self, run: Run, method):
    self.run, self.method = run, method

    def records(p, inp):
      rec = {}
      method.apply(run.model, p, inp, records=rec)
      return rec
    self.fn = jax.jit(records)

  def __call__(self, params, task: str, max_examples: int,
               prompts_only: bool = False) -> tuple:
    """([(records, inputs)] per eval batch, number of real rows)."""
    exs = data.eval_examples(task, self.run.vocab,
                             split=self.run.split_of(task),
                             max_examples=max_examples)
    return self.records(params, exs, prompts_only), len(exs)

  def records(self, params, examples: list, prompts_only: bool = False
              ) -> list:
    """[(records, inputs)] per batch of `examples` (`input_batches`), cut
    to the real rows (the last batch's padding copies are dropped).

    Every process builds the same batches and places its devices' rows
    (put_global_batch); the records are gathered onto every process."""
    out, bs = [], eval_batch_size(self.run)
    for i, inp in enumerate(input_batches(self.run, examples, prompts_only,
                                          self.method)):
      m = min(bs, len(examples) - i * bs)
      placed = trainer.put_global_batch(inp, self.run.mesh)
      rec = jax.tree.map(lambda x, m=m: np.asarray(x)[:m],
                         evaluate.fetch(self.fn(params, placed)))
      out.append((rec, {k: np.asarray(v)[:m] for k, v in inp.items()}))
    return out


def diagnostics(run: Run, recorder: Recorder, params_for_task: Callable,
                tasks: list, num_experts: int) -> tuple:
  """Per task: entropy and oracle agreement per layer, load per expert."""
  out, loads = {}, {}
  own = run.own
  for task in tasks:
    # config.diagnostics_prompts_only: routing as at test time, where a
    # router never sees the gold answer (else teacher-forced rows).
    recs, _ = recorder(
        params_for_task(task), task, run.config.diagnostics_examples,
        prompts_only=run.config.get("diagnostics_prompts_only", False))
    merged = {}
    for rec, inp in recs:
      for path, row in diag_lib.summarize_records(rec, inp, num_experts,
                                                  own.get(task)).items():
        m = merged.setdefault(path, {"tokens": 0})
        n = row["tokens"]
        for k, v in row.items():
          if k != "tokens":
            m[k] = m.get(k, 0.0) + np.asarray(v) * n
        m["tokens"] += n
    for m in merged.values():
      for k in list(m):
        if k != "tokens":
          m[k] = m[k] / max(m["tokens"], 1)
    loads[task] = diag_lib.layer_loads(merged)
    out[task] = {
        "entropy_by_layer": diag_lib.by_layer(merged, "entropy"),
        "load": np.mean([m["load"] for m in merged.values()], 0).tolist()}
    if task in own:
      out[task]["top1_own_by_layer"] = diag_lib.by_layer(merged, "top1_own")
      out[task]["topk_own_by_layer"] = diag_lib.by_layer(merged, "topk_own")
      out[task]["top1_own"] = float(np.mean(
          [m["top1_own"] for m in merged.values()]))
  return out, loads


def save_choices(run: Run, recorder: Recorder, params_for_task: Callable,
                 tasks: list, path: str) -> str:
  """npz of per-token, per-module choices: '<task>|<module>|idx' etc.
  Every process records (collectives); process 0 writes."""
  arrays = {}
  for task in tasks:
    recs, n = recorder(params_for_task(task), task,
                       run.config.diagnostics_examples)
    for mod in recs[0][0]:
      for key in ("idx", "w"):
        arrays[f"{task}|{mod}|{key}"] = concat_rows(
            [r[mod][key] for r, _ in recs])[:n]
      arrays[f"{task}|{mod}|mask"] = concat_rows(
          [diag_lib.token_mask(mod, r[mod]["idx"].shape[:-1], i)
           for r, i in recs])[:n]
  if distributed.is_main_process():
    paths.savez(path, **arrays)
  return path


def concat_rows(arrays: list) -> np.ndarray:
  """Batches (B_i, L_i, ...) -> (sum B_i, max L_i, ...), zero-padded on the
  token axis (`input_batches` cuts each batch to its longest row; the zero
  mask marks the padding)."""
  width = max(a.shape[1] for a in arrays) if arrays[0].ndim > 1 else None
  if width is None:
    return np.concatenate(arrays)
  return np.concatenate([np.pad(a, [(0, 0), (0, width - a.shape[1])]
                                + [(0, 0)] * (a.ndim - 2)) for a in arrays])


def composing_share(diag: dict, loads: dict, held_in: list,
                    held_out: list) -> None:
  """Held-out tasks of the bundled suite compose held-in skills
  (data.suite.COMPOSES): the share of routed slots on those skills' experts,
  per layer, next to its chance level len(parts) / E."""
  for t in held_out:
    parts = [p for p in suite.COMPOSES.get(t, ()) if p in held_in]
    if parts:
      idx = [held_in.index(p) for p in parts]
      diag[t]["composes"] = parts
      diag[t]["composing_share_by_layer"] = {
          layer: float(np.asarray(v)[idx].sum())
          for layer, v in loads[t].items()}


def family_share(diag: dict, loads: dict, held_in: list,
                 held_out: list) -> None:
  """Soft Injection skills (data.si_tasks.FAMILIES): per held-out task, the
  share of routed slots on the experts of its own family, per layer and
  averaged over layers, next to its chance level (family experts / E).
  Tasks whose family has no expert get no entry."""
  families = [si_tasks.family_of(d) for d in held_in]
  for t in held_out:
    fam = si_tasks.family_of(t.split(".")[0])
    idx = [i for i, f in enumerate(families) if f == fam]
    if not idx:
      continue
    by_layer = {layer: float(np.asarray(v)[idx].sum())
                for layer, v in loads[t].items()}
    diag[t].update(family=fam, family_experts=[held_in[i] for i in idx],
                   family_share_by_layer=by_layer,
                   family_share=float(np.mean(list(by_layer.values()))),
                   family_chance=len(idx) / len(held_in))


# ---------------------------------------------------------------- entries

def options(entry: dict, *drop: str) -> dict:
  """An entry's options without its name/kind (and `drop`)."""
  return {k: v for k, v in entry.items()
          if k not in ("name", "kind") + drop}


def routed(run: Run, kind: str, entry: dict, **leaf_options) -> tuple:
  """(router, params) of a registered library router for an entry."""
  opts = {"top_k": run.config.top_k, "impl": run.config.impl,
          **options(entry)}
  router = routing.build_router(kind, run.lora, **opts)
  return router, routing.routed_params(run.base, run.stacked, router,
                                       **leaf_options)


@STEPS.register("base")
def base_step(run: Run, entry: dict) -> dict:
  del entry
  return evaluate_method(run, "base", FullFineTuning(),
                         lambda t: {"base": run.base},
                         run.eval_tasks("base"))


@STEPS.register("multitask")
def multitask_step(run: Run, entry: dict) -> dict:
  """One LoRA (the experts' config) trained on the held-in mixture."""
  cfg = run.config
  p, _ = fit_method(run, run.lora, run.base, jax.random.fold_in(run.rng, 2),
                    entry.get("lr", cfg.expert_lr),
                    entry.get("steps", cfg.multitask_steps),
                    batches(run, "held_in", cfg.seed + 3))
  return evaluate_method(run, entry["name"], run.lora, lambda t: p,
                         run.eval_tasks(entry["name"]))


def token_router_step(run: Run, entry: dict) -> dict:
  """A library router evaluated as is; PHATGOOSE and Arrow get diagnostics."""
  name, kind = entry["name"], entry.get("kind", entry["name"])
  router, p = routed(run, kind, entry)
  res = evaluate_method(run, name, router, lambda t: p,
                        run.eval_tasks(name))
  if kind in ("phatgoose", "arrow"):
    recorder = Recorder(run, router)
    run.diagnostics[name], loads = diagnostics(run, recorder, lambda t: p,
                                               run.tasks, run.num_experts)
    if kind == "phatgoose":
      composing_share(run.diagnostics[name], loads, run.experts, run.held_out)
      if run.config.get("families"):
        family_share(run.diagnostics[name], loads, run.experts, run.held_out)
      run.plot["path"] = paths.join(run.workdir, "routing_held_out.png")
      if distributed.is_main_process():   # the one process that writes
        plots.plot_routing(
            {t: loads[t] for t in run.held_out}, run.experts,
            run.plot["path"],
            "PHATGOOSE: share of routed tokens per expert, by layer")
      save_choices(run, recorder, lambda t: p, run.tasks,
                   paths.join(run.workdir, "routing_choices.npz"))
  return res


for _kind in ("phatgoose", "arrow", "uniform", "merged"):
  STEPS.register(_kind)(token_router_step)


@STEPS.register("oracle")
def oracle_step(run: Run, entry: dict) -> dict:
  """Held-in: the dataset's own expert; held-out: the single expert with the
  best median over the dataset's templates, chosen with the labels (an
  upper bound): on the scored examples themselves, or, with
  entry['select_examples'], on that many examples of config.valid_split
  (cheaper, and no selection bias in the scored examples)."""
  num_e, own, name = run.num_experts, run.own, entry["name"]
  router, _ = routed(run, "fixed", dict(options(entry, "select_examples"),
                                        top_k=1), weights=np.ones(num_e))

  def with_w(w):
    return routing.routed_params(run.base, run.stacked, router, weights=w)
  fns = eval_fns(run, router)
  res = evaluate_method(run, name, router,
                        lambda t: with_w(rb.one_hot(own[t], num_e)),
                        [t for t in run.eval_tasks(name) if t in own], fns)
  for d, tasks in run.groups.items():
    if d in run.experts:
      continue
    best = None
    select = ({"split": run.config.valid_split,
               "max_examples": entry["select_examples"]}
              if entry.get("select_examples") else {})
    for e, expert in enumerate(run.experts):
      label = f"expert {expert} on {d}"
      r = evaluate_method(run, label, router,
                          lambda _, e=e: with_w(rb.one_hot(e, num_e)), tasks,
                          fns, **select)
      score = float(np.median([headline(r[t]) for t in tasks]))
      run.diagnostics.setdefault(name, {}).setdefault(
          d, {"selection": "validation" if select else "scored examples",
              "scores": {}})["scores"][expert] = score
      kept = (run.correct.pop(label), run.example_ids.pop(label))
      if best is None or score > best[0]:
        best = (score, expert, r, *kept)
    if select:   # the chosen expert on the scored examples
      e = run.experts.index(best[1])
      label = f"expert {best[1]} on {d}"
      r = evaluate_method(run, label, router,
                          lambda _, e=e: with_w(rb.one_hot(e, num_e)), tasks,
                          fns)
      best = (best[0], best[1], r, run.correct.pop(label),
              run.example_ids.pop(label))
    run.diagnostics[name][d]["chosen"] = best[1]
    for t in tasks:
      res[t] = dict(best[2][t], expert=best[1])
      run.correct[name][t] = best[3][t]
      run.example_ids[name][t] = best[4][t]
  return res


@STEPS.register("task_gate")
def task_gate_step(run: Run, entry: dict) -> dict:
  cfg = run.config
  it, rows = mixture(run, cfg.seed + 6)
  gate = rb.TaskGateRouting(run.lora, run.stacked, len(rows),
                            entry.get("top_k", cfg.top_k), cfg.impl)
  steps = entry.get("steps", cfg.task_gate.steps)
  p, loss = fit_method(run, gate, run.base, run.rng,
                       entry.get("lr", cfg.task_gate.lr), steps, it,
                       by_task=True)
  run.log(f"task_gate: {steps} steps, loss {loss:.3f}")
  row = {t: i for i, t in enumerate(rows)}
  return evaluate_method(run, entry["name"], gate,
                         lambda t: rb.task_gate_eval_params(p, row.get(t)),
                         run.eval_tasks(entry["name"]))


def task_avg_weights(recorder: Recorder, params: dict, examples: list,
                     num_experts: int, top_k: int) -> dict:
  """{module path: (E,)} task-level PHATGOOSE weights of a task.

  Muqeeth et al. 2024 (arXiv:2402.05859): PHATGOOSE's routing (`recorder`,
  of a phatgoose router with `params`) over the task's unlabeled inputs --
  the prompts of `examples` alone, never their gold targets -- averaged over
  their tokens, top k kept (rb.task_level_weights).
  """
  recs = recorder.records(params, examples, prompts_only=True)
  return rb.task_level_weights([r for r, _ in recs], [i for _, i in recs],
                               num_experts, top_k)


@STEPS.register("phatgoose_task_avg")
def task_avg_step(run: Run, entry: dict) -> dict:
  """PHATGOOSE's routing averaged over a task's prompts (`task_avg_weights`):
  one fixed top-k mixture per module and task. Ours, not the paper's
  "average activation" baseline (that is `avg_activation_step`)."""
  cfg, num_e = run.config, run.num_experts
  top_k = entry.get("top_k", cfg.top_k)
  scorer, scorer_params = routed(run, "phatgoose", dict(top_k=top_k))
  recorder = Recorder(run, scorer)
  router, _ = routed(run, "fixed", dict(top_k=top_k), weights=np.ones(num_e))

  def task_params(t):
    exs = data.eval_examples(t, run.vocab, split=run.split_of(t),
                             max_examples=cfg.diagnostics_examples)
    w = task_avg_weights(recorder, scorer_params, exs, num_e, top_k)
    return routing.routed_params(run.base, run.stacked, router, weights=w)
  return evaluate_method(run, entry["name"], router, task_params,
                         run.eval_tasks(entry["name"]))


@STEPS.register("avg_activation")
def avg_activation_step(run: Run, entry: dict) -> dict:
  """The PHATGOOSE paper's "average activation" baseline: each expert's
  router vector in a module is the mean input of that module over
  entry['batches'] (default config.retrieval_batches) of the expert's own
  training batches, the expert applied (rb.average_activations); tokens are
  then routed per token, top-k, exactly as PHATGOOSE routes with its gates."""
  cfg = run.config
  n = entry.get("batches", cfg.retrieval_batches)
  vectors = []
  for i, (task, tree) in enumerate(zip(run.experts, expert_lora_trees(run),
                                       strict=True)):
    it = batches(run, task, cfg.seed + 6000 + i)
    hosts = [run.put(data.model_inputs(next(it), run.kind), run.mesh)
             for _ in range(n)]
    vectors.append(rb.average_activations(run.model, run.base, run.lora,
                                          tree, hosts))
  router = routing.build_router("phatgoose", run.lora, **{
      "top_k": cfg.top_k, "impl": cfg.impl, **options(entry, "batches")})
  p = routing.routed_params(run.base, rb.with_gates(run.stacked, vectors),
                            router)
  run.log(f"[{entry['name']}] router vectors: mean module inputs over {n} "
          "training batches per expert")
  return evaluate_method(run, entry["name"], router, lambda t: p,
                         run.eval_tasks(entry["name"]))


def prompt_inputs(run: Run, method, host: dict) -> dict:
  """Model inputs of a training batch, with each decoder-only row's last
  prompt position under the method's `prompt_end_input` (as token_scores)."""
  inputs = data.model_inputs(host, run.kind)
  key = getattr(method, "prompt_end_input", None)
  if key and run.kind == "decoder":
    inputs[key] = trainer.prompt_ends(method, host)
  return inputs


@STEPS.register("retrieval")
def retrieval_step(run: Run, entry: dict) -> dict:
  """Retrieval by prompt centroids (rb.RetrievalRouting): each expert's
  centroid pools the prompts of `retrieval_batches` of its training batches;
  an example is routed once, from its prompt (KV-cached decoding on
  decoder-only models)."""
  cfg, num_e = run.config, run.num_experts
  router = rb.RetrievalRouting(run.lora, impl=cfg.impl,
                               cached_decoding=run.kind == "decoder")
  per_expert = []
  for i, t in enumerate(run.experts):
    it = batches(run, t, cfg.seed + 5000 + i)
    # Global arrays: the centroid pools every process's rows.
    per_expert.append([run.put(prompt_inputs(run, router, next(it)), run.mesh)
                       for _ in range(cfg.retrieval_batches)])
  cen = rb.centroids(run.model, run.base, per_expert)
  p = dict(routing.routed_params(run.base, run.stacked, router,
                                 weights=np.ones(num_e)),
           retrieval={"centroids": cen})
  res = evaluate_method(run, entry["name"], router, lambda t: p,
                        run.eval_tasks(entry["name"]))
  run.diagnostics[entry["name"]], _ = diagnostics(
      run, Recorder(run, router), lambda t: p, run.tasks, num_e)
  return res


def poly_step(run: Run, entry: dict) -> dict:
  """Poly (heads=1) / MHR (heads>1) trained once on the held-in mixture.

  Evaluation: a held-in task uses its learned allocation; on held-out tasks
  poly/mhr use zero allocation logits (rb.poly_eval_params), mhr_mu the
  uniform skill average, mhr_z an allocation fitted on the task's data."""
  cfg, kind = run.config, entry.get("kind", entry["name"])
  heads = entry.get("heads", 1 if kind == "poly" else cfg.poly.heads)
  it, poly_tasks = mixture(run, cfg.seed + 4)
  poly = rb.PolyLoRA(run.lora, len(poly_tasks), cfg.poly.num_skills, heads)
  key = f"poly heads={heads}"
  if key not in run.trained:   # poly/mhr/mhr_mu/mhr_z share one training
    # dropout=True gives the step an rng: PolyLoRA samples its allocation
    # (relaxed Bernoulli) with it; the base model still runs deterministic
    # (PolyLoRA's model_dropout=False), like the experts' training.
    poly_fit = fit.Fitter(poly, run.model, run.mesh,
                          optimizer(cfg, cfg.expert_lr), cfg.poly.steps,
                          num_tasks=len(poly_tasks), seed=cfg.seed,
                          dropout=True)
    run.trained[key], loss = fit_method(
        run, poly, run.base, jax.random.fold_in(run.rng, 3), cfg.expert_lr,
        cfg.poly.steps, it, by_task=True, fitter=poly_fit)
    run.log(f"{'poly' if heads == 1 else 'mhr'}: {cfg.poly.steps} steps, "
            f"loss {loss:.3f}")
  params = run.trained[key]
  poly_own = {t: i for i, t in enumerate(poly_tasks)}   # 'alloc' rows
  if kind == "mhr_mu":
    params_for = lambda t: rb.poly_eval_params(params, None)
  elif kind == "mhr_z":
    fit_z = alloc_fitter(run, poly, params)
    params_for = lambda t: (rb.poly_eval_params(params, poly_own[t])
                            if t in poly_own else fit_z(t))
    return evaluate_method(run, entry["name"], poly, params_for,
                           run.eval_tasks(entry["name"]),
                           split=lambda t: z_eval_split(run, t))
  else:
    params_for = lambda t: rb.poly_eval_params(params, poly_own.get(t))
  return evaluate_method(run, entry["name"], poly, params_for,
                         run.eval_tasks(entry["name"]))


def z_eval_split(run: Run, task: str) -> str:
  """The split MHR-z scores a task on: held-out tasks config.poly.z_eval_split
  (when set), which must share no row with the split z is fitted on
  (config.poly.z_split); held-in tasks as every row."""
  split = run.split_of(task)
  if task in run.held_in:
    return split
  split = run.config.poly.get("z_eval_split", None) or split
  fit_split = z_fit_split(run)
  if tasks_lib.splits_share_rows(fit_split, split):
    raise ValueError(
        f"mhr_z would fit its allocation for {task} on split {fit_split!r} "
        f"and score it on {split!r}, which share rows; set "
        "config.poly.z_split / z_eval_split to disjoint splits (e.g. "
        "'val_train' / 'val_test', or 'train' / 'validation')")
  return split


def z_fit_split(run: Run) -> str:
  return (run.config.poly.get("z_split", None)
          or run.config.get("train_split", "train"))


for _kind in ("poly", "mhr", "mhr_mu", "mhr_z"):
  STEPS.register(_kind)(poly_step)


def alloc_fitter(run: Run, poly, params) -> Callable:
  """MHR-z: task -> params with only 'alloc_eval' fitted on the task's
  training data (few-shot, not zero-shot)."""
  cfg = run.config
  zpoly = type(poly)(poly.lora, poly.num_tasks, poly.num_skills, poly.heads,
                     poly.temperature)
  zpoly.trainable = r"alloc_eval/.*"
  flat = trainer.flatten(rb.poly_eval_params(params, None))
  replicated = jax.sharding.NamedSharding(run.mesh,
                                          jax.sharding.PartitionSpec())
  flat_sh = {k: getattr(v, "sharding", replicated) for k, v in flat.items()}
  # dropout=True: the allocation is sampled while it is fitted (as in Poly's
  # training); the base model runs deterministic (PolyLoRA.model_dropout).
  fitter = fit.Fitter(zpoly, run.model, run.mesh, optimizer(cfg, cfg.poly.z_lr),
                      cfg.poly.z_steps, seed=cfg.seed, dropout=True)

  def fit_task(task):
    z_eval_split(run, task)   # refuses a split that shares the scored rows
    return fitter.fit(flat, flat_sh, batches(run, task, cfg.seed + 9000,
                                             split=z_fit_split(run)),
                      put=run.put)[0]
  return fit_task


# ---------------------------------------------------------------- merges

def expert_task_vectors(run: Run) -> list:
  """The library's experts as task vectors over the base: per expert
  {module path/kernel: A B s}, with the base's fingerprint (mtjax.merging)."""
  fp = adapters.fingerprint(run.base)
  return [merging.TaskVector(merging.lora_delta(run.lora, {"lora": tree}), fp)
          for tree in expert_lora_trees(run)]


def unlabeled_prompt_batches(run: Run, tasks: list, seed: int):
  """Endless training-layout batches of the prompts of `tasks`' evaluation
  examples, unlabeled: each row is (prompt, one placeholder target token),
  so the loss-weighted position is where the model predicts the answer's
  first token, and no answer is ever read (AdaMerging's test-time data).
  Every process draws the same global batches: place them with
  trainer.put_global_batch."""
  exs = [e for t in tasks for e in data.eval_examples(
      t, run.vocab, split=run.split_of(t),
      max_examples=run.config.eval.max_examples)]
  rng = np.random.default_rng(seed)
  bs, pad = run.config.batch_size, data.pad_token_id(run.vocab)
  while True:
    pick = rng.choice(len(exs), bs, replace=len(exs) < bs)
    batch = evaluate.score_rows([(exs[i]["input_ids"], [pad]) for i in pick],
                                run.kind, run.lengths, pad_id=pad,
                                lm=data.lm_format(run.vocab))
    batch["task_index"] = np.zeros(bs, np.int32)
    yield batch


MERGE_DATA = ("held_out_prompts", "eval_prompts", "held_in")


@STEPS.register("merge")
def merge_step(run: Run, entry: dict) -> dict:
  """A merge of the library's experts (mtjax.merging.MERGES), evaluated as
  one model on every task of the row (zero-shot on held-out tasks).

  entry: {'name': row, 'kind': 'merge', 'merge': {'name': 'ties',
  'density': 0.2, ...}, 'weights': (E,) or a number for every expert,
  'steps', 'lr', 'data'}. Static merges are computed once. Learned merges
  are fitted with the one fit loop for `steps` steps on 'data':
  'held_out_prompts' (unlabeled prompts of the held-out tasks: AdaMerging's
  test-time adaptation), 'eval_prompts' (unlabeled prompts of every task the
  row is scored on: the paper's protocol when the merged tasks are
  evaluated too) or 'held_in' (the held-in mixture: aTLAS, Self
  Positioning, ScaLearn with the experts' own training data, so held-out
  tasks stay zero-shot).
  """
  cfg = run.config
  spec = dict(entry.get("merge") or {"name": entry["name"]})
  name = spec["name"]
  if is_static(spec):
    params = static_merge(run, spec, entry.get("weights", 1.0))
    run.log(f"{entry['name']}: {name} of {run.num_experts} experts")
  else:
    tvs = expert_task_vectors(run)
    if name == "scalearn":
      merge = merging.MERGES.build(spec, experts=[
          merging.LoRAExpert(run.lora, {"lora": tree})
          for tree in expert_lora_trees(run)])
    else:
      merge = merging.MERGES.build(spec, task_vectors=tvs)
    source = entry.get("data", "held_out_prompts" if name == "adamerging"
                       else "held_in")
    prompts = {"held_out_prompts": run.held_out,
               "eval_prompts": run.eval_tasks(entry["name"])}
    it = (unlabeled_prompt_batches(run, prompts[source], cfg.seed + 13)
          if source in prompts else batches(run, "held_in", cfg.seed + 14))
    steps = entry.get("steps", cfg.get("merge_steps", 20))
    lr = entry.get("lr", 1e-2)
    # dropout=True hands the step an rng: ScaLearn drops scales in training.
    fitter = fit.Fitter(merge, run.model, run.mesh, optimizer(cfg, lr), steps,
                        seed=cfg.seed, dropout=name == "scalearn")
    fitted, loss = fit_method(
        run, merge, run.base, run.rng, lr, steps, it, fitter=fitter,
        put=trainer.put_global_batch if source in prompts else run.put)
    run.trained[f"merge {entry['name']}"] = (merge, fitted)
    params = merge.merge(run.model, fitted)
    run.log(f"{entry['name']}: {name} fitted {steps} steps on {source}, "
            f"loss {loss:.4f}")
  return evaluate_method(run, entry["name"], FullFineTuning(),
                         lambda t: {"base": params},
                         run.eval_tasks(entry["name"]))


def is_static(spec: dict) -> bool:
  """Whether a merge spec {'name': ...} names a static (unfitted) merge."""
  return issubclass(merging.MERGES.get(spec["name"]),
                    merging.static.StaticMerge)


def static_merge(run: Run, spec: dict, weights) -> dict:
  """Base params plus the static merge `spec` of the experts' task vectors;
  weights: one number for every expert, or (E,)."""
  merge = merging.MERGES.build(spec)
  w = (np.full(run.num_experts, weights) if np.ndim(weights) == 0
       else np.asarray(weights))
  merged = merge(expert_task_vectors(run), w, jax.random.fold_in(run.rng, 11))
  return merging.apply_task_vector(run.base, merged)


def expert_lora_trees(run: Run) -> list:
  """Per expert, its LoRA tree {module: {'lora_a', 'lora_b'}} (no gates)."""
  flat = trainer.flatten(run.stacked)
  return [trainer.unflatten({k: v[i] for k, v in flat.items()
                             if k.endswith(("/lora_a", "/lora_b"))})
          for i in range(run.num_experts)]


def method_step(run: Run, entry: dict) -> dict:
  """A registered method trained on the held-in mixture from the base."""
  cfg = run.config
  method = methods.build(dict(options(entry, "steps", "lr"),
                              name=entry.get("kind", entry["name"])))
  steps = entry.get("steps", cfg.multitask_steps)
  p, loss = fit_method(run, method, run.base, jax.random.fold_in(run.rng, 2),
                       entry.get("lr", cfg.expert_lr), steps,
                       batches(run, "held_in", cfg.seed + 3))
  run.log(f"{entry['name']}: {steps} steps, loss {loss:.3f}")
  return evaluate_method(run, entry["name"], method, lambda t: p,
                         run.eval_tasks(entry["name"]))


def step_for(entry: dict) -> Callable:
  """The function that runs an entry (see module docstring)."""
  kind = entry.get("kind", entry["name"])
  if kind == "merge" and entry.get("data", "held_in") not in MERGE_DATA:
    raise ValueError(f"merge row {entry['name']!r}: data={entry['data']!r}; "
                     f"use one of {MERGE_DATA}")
  if kind in STEPS:
    return STEPS.get(kind)
  if kind in routing.ROUTERS:
    return token_router_step
  if kind in methods.METHODS:
    return method_step
  raise ValueError(
      f"config.methods entry {entry!r}: kind {kind!r} is no experiment step "
      f"({STEPS.names()}), router ({routing.ROUTERS.names()}) or method "
      f"({methods.METHODS.names()}); register it or fix the name")


def run_entries(run: Run, entries: list, continue_on_error: bool = False,
                on_row: Optional[Callable] = None) -> tuple:
  """({row name: {task: metrics}}, {row name: error}) of config entries.

  on_row(results, errors), if given, runs after each entry (the pipeline
  writes the rows done so far, so a stopped run keeps them).
  """
  results, errors = {}, {}
  for entry in entries:
    entry = dict(entry)
    step = step_for(entry)
    t0 = time.time()
    try:
      results[entry["name"]] = step(run, entry)
    except Exception as e:  # noqa: BLE001 (logged; continue_on_error)
      if not continue_on_error:
        raise
      run.log(f"METHOD {entry['name']} FAILED: {type(e).__name__}: {e}")
      errors[entry["name"]] = f"{type(e).__name__}: {e}"
    run.log(f"  ({entry['name']}: {time.time() - t0:.0f}s)")
    if on_row is not None:
      on_row(results, errors)
  return results, errors


def write_results(r: Run, results: dict, errors: dict, path: str) -> tuple:
  """(table text, output dict) of the rows so far, written to `path`."""
  text, scores = table(r, results)
  out = {"results": results, "scores": scores,
         "averages": {n: {k: v[k][0] for k in ("held_in", "held_out")
                          if k in v} for n, v in scores.items()},
         "diagnostics": r.diagnostics, "correct": r.correct,
         "example_ids": r.example_ids,
         "errors": errors, "experts": r.experts, "groups": r.groups,
         "held_out": r.held_out,
         "library_mb": size_mb(r.stacked),
         "seconds": time.time() - r.start}
  if not distributed.is_main_process():   # every process has the rows;
    return text, out                      # process 0 writes them
  paths.write_json(path, out, indent=1, default=json_default)  # atomic
  return text, out


# -------------------------------------------------------------------- run

def table(run: Run, results: dict) -> tuple:
  """Text table (rows methods; columns datasets, held-in and held-out means)
  and {row: {dataset or mean: [point, lo, hi]}}.

  A dataset's score is the median over its templates (T0); intervals are
  95% bootstrap intervals over the evaluated examples
  (results_lib.median_of_templates).
  """
  groups_in = {d: run.groups[d] for d in run.experts}
  groups_out = {d: ts for d, ts in run.groups.items() if d not in groups_in}
  cols = list(groups_in) + list(groups_out) + ["held_in", "held_out"]
  scores = {}
  for name, res in results.items():
    correct = run.correct.get(name, {})
    row = {}
    for label, groups in (("held_in", groups_in), ("held_out", groups_out)):
      groups = {d: ts for d, ts in groups.items()
                if all(t in res and t in correct for t in ts)}
      if groups:
        ci = results_lib.median_of_templates(correct, groups)
        row.update({d: list(v) for d, v in ci.items() if d != "mean"})
        row[label] = list(ci["mean"])
    scores[name] = row
  width = max([len(n) for n in results] + [6]) + 1
  lines = ["method".ljust(width) + " ".join(c[:17].rjust(17) for c in cols)]
  for name, row in scores.items():
    lines.append(name.ljust(width) + " ".join(
        (f"{row[c][0]:.3f} [{row[c][1]:.2f},{row[c][2]:.2f}]"
         if c in row else "-").rjust(17) for c in cols))
  return "\n".join(lines), scores


def check_workdir(workdir: str, config) -> None:
  """Refuses to overwrite an earlier run's results or library."""
  done = [f for f in ("phatgoose_results.json",
                      "phatgoose_results.partial.json", "library")
          if paths.exists(paths.join(workdir, f))]
  lib_dir = config.get("library_dir") or ""
  if lib_dir and paths.absolute(lib_dir) == paths.absolute(
      paths.join(workdir, "library")):
    done = [f for f in done if f != "library"]   # reusing it on purpose
  if done:
    raise FileExistsError(
        f"{workdir} already holds a PHATGOOSE run ({', '.join(done)}); "
        "nothing was changed. Use a new --workdir, or reuse its experts and "
        f"gates with --config.library_dir={paths.join(workdir, 'library')} "
        "and a new --workdir.")


def selected_entries(config) -> list:
  """config.methods, filtered by the comma-separated names in config.only."""
  entries = [dict(e) for e in config.methods]
  only = [n for n in config.get("only", "").split(",") if n]
  unknown = sorted(set(only) - {e["name"] for e in entries})
  if unknown:
    raise ValueError(f"config.only names {unknown}, which are not in "
                     f"config.methods {[e['name'] for e in entries]}")
  return [e for e in entries if not only or e["name"] in only]


@JOBS.register("phatgoose")
def run(config, workdir: str) -> dict:
  """The full pipeline of configs/phatgoose.py; returns the results dict.

  Under several processes every process runs it (SPMD): each reads its
  shard of the training data (`batches`, config.data.shard_by), evaluation
  rows are split over the devices of all processes and gathered
  (mtjax.evaluation.evaluate), so every process holds the whole table;
  process 0 alone writes the library, results, plot and routing choices.
  """
  check_workdir(workdir, config)
  entries = selected_entries(config)
  for entry in entries:
    step_for(entry)   # a clear error before anything trains
  lib = config.get("library_dir") or ""
  if config.get("require_library") and not paths.isdir(lib):
    raise FileNotFoundError(
        f"config.library_dir={lib!r} is not an expert library, and this "
        "config only reuses one (require_library): run the PHATGOOSE config "
        "first (its WORKDIR/library), or point --config.library_dir at it")
  lib_dir = config.get("library_dir") or paths.join(workdir, "library")
  reuse = bool(config.get("library_dir")) and paths.isdir(lib_dir)
  # Every process has checked the workdir before process 0 writes to it.
  distributed.sync("phatgoose_workdir_checked")
  if distributed.is_main_process():
    paths.makedirs(workdir)
  r = setup(config)
  r.workdir = workdir
  if config.get("families"):   # the Soft Injection tasks (configs :skills)
    check_overlaps(r)
  with sharding.use_mesh(r.mesh):
    if reuse:
      library = ex.load_library(lib_dir, r.experts, base_params=r.base)
      r.log(f"loaded {r.num_experts} experts with gates from {lib_dir}")
    else:
      library = train_library(r, jax.random.fold_in(r.rng, 1))
      save_library(r, library, lib_dir)
    r.stacked = ex.stack_library(library)
    r.log(f"library: {r.num_experts} experts, {size_mb(r.stacked):.1f} MB "
          f"({time.time() - r.start:.0f}s so far)")
    partial = paths.join(workdir, "phatgoose_results.partial.json")
    results, errors = run_entries(
        r, entries, config.get("continue_on_error", False),
        on_row=lambda res, err: write_results(r, res, err, partial))
  text, out = write_results(r, results, errors,
                            paths.join(workdir, "phatgoose_results.json"))
  if distributed.is_main_process():
    paths.remove(partial)
  report(r, text, errors)
  return out


def check_overlaps(r: Run) -> None:
  """What the scored held-out test rows share with the held-in train files
  (si_tasks.file_overlaps), logged and kept in run.diagnostics['overlaps']:
  a shared input with the same output would let an expert have seen the
  answer."""
  si_dir = paths.join(str(tasks_lib.default_data_dir()), "soft_injection_tasks")
  o = si_tasks.file_overlaps(si_dir, r.experts, [
      d for d in r.groups if d not in r.experts],
                             r.config.eval.max_examples or None)
  r.diagnostics["overlaps"] = o
  for d, v in o["held_out"].items():
    r.log(f"overlap {d}: of {v['rows']} scored test rows, {v['input_seen']} "
          f"inputs appear in a held-in train file, {v['pair_seen']} with the "
          "same output")


def save_library(r: Run, library: dict, lib_dir: str) -> None:
  """Process 0 writes the library's folders; its arrays are gathered onto
  every process first (a collective: every process calls this)."""
  experts = evaluate.fetch(library["experts"])
  if distributed.is_main_process():
    ex.save_library(dict(library, experts=experts), lib_dir, r.lora,
                    base_params=r.base)
  r.log(f"library written to {lib_dir}")


def report(r: Run, text: str, errors: dict) -> None:
  """Prints the table and the PHATGOOSE routing diagnostics."""
  r.log("\n" + text)
  num_e = r.num_experts
  diag = r.diagnostics.get("phatgoose")
  if diag:
    r.log("PHATGOOSE own-expert top-1 rate per layer (held-in; chance "
          f"{1 / num_e:.3f}):")
    for t in r.held_in:
      r.log(f"  {t}: " + " ".join(
          f"{k}={v:.2f}" for k, v in diag[t]["top1_own_by_layer"].items()))
    for t in r.held_out:
      if "family_share" in diag[t]:
        r.log(f"  held-out {t}: share of routed tokens on its family "
              f"{diag[t]['family']} ({len(diag[t]['family_experts'])} "
              f"experts): {diag[t]['family_share']:.3f} (chance "
              f"{diag[t]['family_chance']:.3f})")
      share = diag[t].get("composing_share_by_layer")
      if share:
        parts = diag[t]["composes"]
        r.log(f"  held-out {t}: share of routed tokens on {'+'.join(parts)} "
              f"(chance {len(parts) / num_e:.2f}): " +
              " ".join(f"{k}={v:.2f}" for k, v in share.items()))
  if r.plot:
    r.log(f"routing plot: {r.plot['path']}")
  for name, err in errors.items():
    r.log(f"FAILED {name}: {err}")
  r.log(f"total {time.time() - r.start:.0f}s; results in {r.workdir}")


def size_mb(tree) -> float:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)) / 2**20


def json_default(x):
  if isinstance(x, (np.ndarray, jnp.ndarray)):
    return np.asarray(x).tolist()
  if isinstance(x, (np.floating, np.integer)):
    return x.item()
  return str(x)
