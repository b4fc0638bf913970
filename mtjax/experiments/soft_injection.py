"""Soft injection experiment (mtjax/methods/soft_injection.py; "Soft Injection
of Task Embeddings Outperforms Prompt-Based In-Context Learning", 2025).

  * the test bed: a small Llama-style decoder trained from scratch on the
    bundled suite in MetaICL format (`train_testbed`);
  * fitting: head-selection alpha (`fit_alpha`) and prompt tuning
    (`fit_prompt`) with the model frozen, keeping the best-validation
    parameters (`fit_best`);
  * prompts, scoring and timed generation shared by the tests, the benchmark
    and `run_experiment` (the 'soft_injection' job, configs/soft_injection.py),
    which compares zero-shot, k-shot ICL, soft injection and prompt tuning per
    task; the alpha heatmaps and head overlaps are mtjax.evaluation.analysis.

All three trainings run the one fit loop (mtjax.training.fit.Fitter): the
test bed is full fine-tuning ('full'), alpha is the 'soft_injection' method
(trainable 'soft_injection/alpha_logits') with the first-target-token loss
(si.first_token_loss), prompt tuning the 'prompt_tuning' method with the
default target-token loss. Everything runs on one device (`one_device_mesh`):
the models are tiny and alpha is fitted with batch size 1.
"""
import dataclasses
import json
import os
import time
from typing import Any, Callable, Iterator, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mtjax import data, methods
from mtjax.data import suite
from mtjax.evaluation import analysis
from mtjax.experiments.train import JOBS
from mtjax.methods import prompt_tuning
from mtjax.methods import soft_injection as si
from mtjax.models import decoder, hf, sharding
from mtjax.training import fit, trainer


def one_device_mesh():
  """A (1, 1, 1) mesh on the first device: the experiment's models are tiny."""
  return sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])


def optimizer(learning_rate, **options):
  """An optimizer config for Fitter: AdamW (no weight decay unless given),
  constant learning rate unless `decay` is given."""
  return ml_collections.ConfigDict(dict(
      {"name": "adamw", "learning_rate": learning_rate, "decay": "constant"},
      **options))


def lm_batch(ids, weights):
  """Right-padded token rows (B, T) and their loss weights -> a Fitter batch
  (the trainer's decoder format: predict ids[:, 1:] from ids[:, :-1])."""
  ids, weights = np.asarray(ids, np.int32), np.asarray(weights, np.float32)
  return {"decoder_input_tokens": ids[:, :-1],
          "decoder_target_tokens": ids[:, 1:],
          "decoder_loss_weights": weights[:, 1:],
          "task_index": np.zeros((len(ids),), np.int32)}


def epoch_batches(rows: dict, batch_size: int, seed: int) -> Iterator[dict]:
  """Infinite host batches of `batch_size` rows of the dict of arrays `rows`,
  drawn without replacement and reshuffled each epoch (numpy, seeded)."""
  n = len(next(iter(rows.values())))
  rng = np.random.default_rng(seed)
  order = rng.permutation(n)
  while True:
    if len(order) < batch_size:
      order = np.concatenate([order, rng.permutation(n)])
    idx, order = order[:batch_size], order[batch_size:]
    yield {k: np.asarray(v)[idx] for k, v in rows.items()}


# ---------------------------------------------------------------- test bed --
# A small Llama-style decoder trained on the bundled suite in MetaICL format
# (k demonstrations 'x\ny\n\n' before the query), with loss on every target so
# each sequence trains k-shot prediction for all k at once. With probability
# `remap_prob` a classification prompt's labels are replaced by random words
# (consistently across its demonstrations and query, as in symbol tuning, Wei
# et al. 2023, arXiv:2305.08298): the instruction then no longer names the
# answer, which pushes the model to read the label space off the
# demonstrations -- the in-context ability soft injection distils.


@dataclasses.dataclass
class TestBed:
  model: Any
  params: Any
  vocab: Any
  losses: list
  seconds: float


def _random_labels(rng, n):
  # A dict keeps draw order: a set's order would follow PYTHONHASHSEED and make
  # the test bed differ from one process to the next.
  words = {}
  while len(words) < n:
    words["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"),
                             size=rng.integers(2, 6)))] = None
  return list(words)


def _segments(rng, demos, query, remap):
  """[(input text, target text)] for demos + query, labels remapped if asked."""
  rows = demos + [query]
  if remap and query["answer_choices"]:
    new = _random_labels(rng, len(query["answer_choices"]))
    return [(r["inputs"], new[r["label"]]) for r in rows]
  return [(r["inputs"], r["targets"]) for r in rows]


def icl_sequence(rng, segments, encode, max_len):
  """Tokens (max_len,), loss weights (max_len,) for 'x\\ny\\n\\n' segments.

  Drops leading demonstrations until the sequence fits; loss on 'y\\n'.
  """
  while True:
    ids, weights = [], []
    for x, y in segments:
      a, b = encode(x + "\n"), encode(y + "\n")
      ids += a + b + encode("\n")
      weights += [0] * len(a) + [1] * len(b) + [0]
    if len(ids) <= max_len or len(segments) == 1:
      break
    segments = segments[1:]
  ids, weights = ids[:max_len], weights[:max_len]
  pad = max_len - len(ids)
  return (np.asarray(ids + [0] * pad, np.int32),
          np.asarray(weights + [0] * pad, np.float32))


def testbed_batches(tasks, vocab, batch_size, max_len, max_shots, remap_prob,
                    seed):
  """Infinite iterator of (ids (B,T), weights (B,T)) MetaICL training batches."""
  train = {t: suite.examples(t, "train") for t in tasks}
  rng = np.random.default_rng(seed)
  while True:
    ids, ws = [], []
    for _ in range(batch_size):
      task = tasks[rng.integers(len(tasks))]
      rows = train[task]
      pick = rng.choice(len(rows), size=rng.integers(0, max_shots + 1) + 1,
                        replace=False)
      segs = _segments(rng, [rows[i] for i in pick[1:]], rows[pick[0]],
                       rng.random() < remap_prob)
      i, w = icl_sequence(rng, segs, vocab.encode, max_len)
      ids.append(i)
      ws.append(w)
    yield np.stack(ids), np.stack(ws)


def testbed_model(vocab, hidden=64, layers_=4, heads=4, mlp=128, max_len=1024):
  cfg = decoder.DecoderConfig(
      model_type="llama", vocab_size=vocab.vocab_size, hidden_size=hidden,
      intermediate_size=mlp, num_hidden_layers=layers_,
      num_attention_heads=heads, max_position_embeddings=max_len,
      pad_token_id=0, eos_token_id=vocab.eos_id)
  return decoder.Model(cfg)


def train_testbed(vocab, *, tasks=None, steps=600, batch_size=32, max_len=256,
                  max_shots=5, remap_prob=0.5, learning_rate=3e-3, seed=0,
                  model_kwargs=None, log_every=100, mesh=None):
  """Trains the test-bed decoder from scratch (full fine-tuning, Fitter) -> TestBed.

  AdamW (weight decay 0.01 on matrices), linear warmup over steps // 10 then
  cosine decay to learning_rate / 10, gradients clipped at norm 1. Seeded:
  `seed` fixes the initial weights and the batches.
  """
  tasks = list(tasks or suite.HELD_IN)
  mesh = mesh or one_device_mesh()
  model = testbed_model(vocab, **(model_kwargs or {}))
  method = methods.build({"name": "full"})
  init_rng, method_rng = jax.random.split(jax.random.key(seed))
  base = sharding.init_sharded(model, init_rng, mesh,
                               **hf.dummy_inputs(model.config))
  flat, flat_sh = trainer.init_params(model, method, method_rng, mesh, base)
  fitter = fit.Fitter(method, model, mesh, optimizer(
      learning_rate, decay="cosine", warmup_steps=max(1, steps // 10),
      end_factor=0.1, weight_decay=0.01, grad_clip=1.0), steps, seed=seed)
  batches = (lm_batch(ids, w) for ids, w in testbed_batches(
      tasks, vocab, batch_size, max_len, max_shots, remap_prob, seed))
  losses = []

  def on_step(done, state, metrics):
    del state
    if done % log_every == 0 or done == steps:
      losses.append((done, float(metrics["loss"])))

  start = time.time()
  with sharding.use_mesh(mesh):
    state, frozen = fitter.init(flat, flat_sh)
    state, _ = fitter.run(state, frozen, batches, on_step=on_step)
  params = fitter.params(state, frozen)["base"]
  return TestBed(model, params, vocab, losses, time.time() - start)


# ------------------------------------------------------ prompts and scoring --


def left_pad(rows, pad_id=0, multiple=32):
  """List of id lists -> ids, mask (B, T) int32, left-padded.

  T is rounded up to `multiple` so that few batch shapes get compiled.
  """
  t = max(len(r) for r in rows)
  t = -(-t // multiple) * multiple
  ids = np.full((len(rows), t), pad_id, np.int32)
  mask = np.zeros((len(rows), t), np.int32)
  for i, r in enumerate(rows):
    ids[i, t - len(r):] = r
    mask[i, t - len(r):] = 1
  return ids, mask


def render(demos, query, encode, max_len):
  """Ids of 'x1\\ny1\\n\\n...xk\\nyk\\n\\nx\\n', dropping first demos to fit max_len."""
  demos = list(demos)
  while True:
    ids = encode(suite.render_few_shot(demos, query) + "\n")
    if len(ids) <= max_len or not demos:
      return ids[-max_len:]
    demos = demos[1:]


def few_shot_prompts(train, queries, k, seed, encode, max_len):
  """One prompt per query with k demonstrations sampled from train (not the query)."""
  rng = np.random.default_rng(seed)
  out = []
  for q in queries:
    pool = [i for i in rng.permutation(len(train))[:k + 1]
            if train[i]["inputs"] != q["inputs"]][:k]
    out.append(render([train[i] for i in pool], q, encode, max_len))
  return out


def embedding_prompts(train, num_prompts, num_shots, seed, encode, max_len):
  """M prompts of N demonstrations + a held query from `train` (as the paper)."""
  rng = np.random.default_rng(seed)
  rows = []
  for _ in range(num_prompts):
    idx = rng.choice(len(train), size=min(num_shots + 1, len(train)),
                     replace=False)
    rows.append(render([train[i] for i in idx[1:]], train[idx[0]], encode,
                       max_len))
  ids, mask = left_pad(rows)
  return {"input_ids": ids, "attention_mask": mask}


def decode_answer(vocab, ids, stop_id):
  ids = [int(i) for i in ids]
  if stop_id in ids:
    ids = ids[:ids.index(stop_id)]
  return vocab.decode([i for i in ids if i > 2]).strip()


def timed_generation(gen_fn, prompts, batch_size):
  """Runs gen_fn(ids, mask) over left-padded batches; -> (outputs, s/example).

  Compilation is excluded: every distinct batch shape is run once first.
  Prompts are bucketed by length (sorted) to limit padding, identically for
  every method.
  """
  order = np.argsort([len(p) for p in prompts], kind="stable")
  batches = []
  for s in range(0, len(prompts), batch_size):
    idx = order[s:s + batch_size]
    rows = [prompts[i] for i in idx]
    rows += [rows[-1]] * (batch_size - len(rows))  # fixed batch shape
    batches.append((idx, left_pad(rows)))
  for _, (ids, mask) in batches:  # compile every shape
    jax.block_until_ready(gen_fn(ids, mask))
  outs = [None] * len(prompts)
  start = time.perf_counter()
  results = [gen_fn(ids, mask) for _, (ids, mask) in batches]
  jax.block_until_ready(results)
  seconds = time.perf_counter() - start
  for (idx, _), res in zip(batches, results, strict=True):
    res = np.asarray(res)
    for j, i in enumerate(idx):
      outs[i] = res[j]
  return outs, seconds / len(prompts)


def exact_match(vocab, outputs, examples, stop_id):
  preds = [decode_answer(vocab, o, stop_id) for o in outputs]
  return float(np.mean([p == ex["targets"].strip()
                        for p, ex in zip(preds, examples, strict=True)])), preds


# ------------------------------------------------ fitting alpha and prompts --


@dataclasses.dataclass
class FitResult:
  params: dict                       # {path: array}: the best-validation
                                     # trainable leaves (host numpy)
  best_step: int                     # 0 = the initial parameters
  best_val_loss: float
  history: list                      # [(step, train_loss, val_loss)]
  value: Optional[np.ndarray] = None  # the fitted array: alpha logits (L, H)
                                      # (fit_alpha), prompt (P, d) (fit_prompt)


def fit_best(fitter: fit.Fitter, flat: dict, flat_sh: dict,
             batches: Iterator[dict], val: dict, *, eval_every: int = 10,
             loss: Callable = trainer.target_token_loss) -> FitResult:
  """fitter.run over `batches`, keeping the trainable leaves with the lowest
  validation loss (mean per-token NLL of `loss` over the host batch `val`),
  evaluated before the first step, every `eval_every` steps and after the
  last. `loss` must be the fitter's."""
  mesh, kind = fitter.mesh, trainer.model_kind(fitter.model)

  def mean_nll(trainable, frozen, batch):
    total, sums = trainer.loss_and_metrics(fitter.method, fitter.model, kind, 1,
                                           trainable, frozen, batch, None, loss)
    return total / jnp.maximum(sums["all_tokens"], 1.0)

  val_fn = jax.jit(mean_nll)
  with sharding.use_mesh(mesh):
    state, frozen = fitter.init(flat, flat_sh)
    val = trainer.put_batch(val, mesh)
    v0 = float(val_fn(state["params"], frozen, val))
    best = {"loss": v0, "step": 0, "params": jax.device_get(state["params"])}
    history = [(0, float("nan"), v0)]

    def on_step(done, state, metrics):
      if done % eval_every and done != fitter.num_steps:
        return
      v = float(val_fn(state["params"], frozen, val))
      history.append((done, float(metrics["loss"]), v))
      if v < best["loss"]:
        best.update(loss=v, step=done, params=jax.device_get(state["params"]))

    fitter.run(state, frozen, batches, on_step=on_step)
  return FitResult(params=best["params"], best_step=best["step"],
                   best_val_loss=best["loss"], history=history)


def first_token_batch(examples, encode, max_len):
  """Left-padded zero-shot prompts + their first target token (fit_alpha)."""
  ids, mask = left_pad([render([], ex, encode, max_len) for ex in examples])
  first = np.asarray([encode(ex["targets"] + "\n")[0] for ex in examples],
                     np.int32)
  return {"input_ids": ids, "attention_mask": mask, "first_target": first,
          "task_index": np.zeros((len(examples),), np.int32)}


def fit_alpha(model, params, embedding, train, val, *, steps=400,
              learning_rate=0.2, batch_size=1, eval_every=10, seed=0,
              pattern=None, mesh=None) -> FitResult:
  """Head selection: Adam (constant learning rate) on the (L, H) alpha
  logits (init 0, alpha 0.5) of the 'soft_injection' method, model frozen,
  loss the cross-entropy of the first target token (si.first_token_loss).

  train / val: `first_token_batch` dicts; batches are drawn without
  replacement from train, reshuffled each epoch (seeded). Keeps the logits
  with the lowest validation loss (FitResult.value, (L, H)), unlike the
  paper's reference code, which keeps the last ones.
  """
  mesh = mesh or one_device_mesh()
  method = methods.build({"name": "soft_injection",
                          "embeddings": np.asarray(embedding, np.float32),
                          "pattern": pattern})
  flat, flat_sh = trainer.init_params(model, method, jax.random.key(seed),
                                      mesh, params)
  fitter = fit.Fitter(method, model, mesh, optimizer(learning_rate), steps,
                      seed=seed, loss=si.first_token_loss)
  result = fit_best(fitter, flat, flat_sh,
                    epoch_batches(train, batch_size, seed), val,
                    eval_every=eval_every, loss=si.first_token_loss)
  result.value = np.asarray(result.params[method.trainable])[0]
  return result


# ------------------------------------------------------------ prompt tuning --


def prompt_prefill(model, params, input_ids, attention_mask, extra,
                   max_new_tokens):
  """Prefill with a soft prompt (P, d) prepended (mtjax.methods.prompt_tuning)."""
  (prompt,) = extra
  b, p = input_ids.shape
  length = prompt.shape[0]
  ids = jnp.concatenate([jnp.zeros((b, length), input_ids.dtype), input_ids], 1)
  mask = jnp.concatenate([jnp.ones((b, length), attention_mask.dtype),
                          attention_mask], 1)
  cache = decoder.init_cache(model, params, b, p + length + max_new_tokens)
  hits = []
  icpt = prompt_tuning.embed_interceptor(
      prompt, p + length, prompt_tuning.embedding_path(model), None, hits)
  with nn.intercept_methods(icpt):
    logits, mut = model.apply({"params": params, "cache": cache}, ids, mask,
                              decode=True, mutable=["cache"])
  assert hits, "the soft prompt was not inserted"
  return logits[:, -1], mut["cache"]


def target_batch(examples, encode, max_len):
  """Right-padded zero-shot prompt + 'y\\n', loss on 'y\\n' -> `lm_batch`."""
  rows, weights = [], []
  for ex in examples:
    a = render([], ex, encode, max_len)
    b = encode(ex["targets"] + "\n")
    rows.append(a + b)
    weights.append([0] * len(a) + [1] * len(b))
  t = max(len(r) for r in rows)
  ids = np.zeros((len(rows), t), np.int32)
  w = np.zeros((len(rows), t), np.float32)
  for i, (r, wt) in enumerate(zip(rows, weights, strict=True)):
    ids[i, :len(r)] = r
    w[i, :len(r)] = wt
  return lm_batch(ids, w)


def fit_prompt(model, params, train, val, *, length=10, steps=400,
               learning_rate=0.1, batch_size=1, eval_every=10, seed=0,
               mesh=None) -> FitResult:
  """Prompt tuning (Lester et al. 2021; the 'prompt_tuning' method, init
  from sampled vocabulary embeddings) with the same budget as fit_alpha.

  train / val: `target_batch` dicts. Loss: cross-entropy of the whole target
  (the trainer's default). Adam, constant learning rate; keeps the prompt
  with the best validation loss (FitResult.value, (P, d)).
  """
  mesh = mesh or one_device_mesh()
  method = methods.build({"name": "prompt_tuning", "length": length,
                          "init": "vocab",
                          "sample_vocab": model.config.vocab_size})
  flat, flat_sh = trainer.init_params(model, method, jax.random.key(seed),
                                      mesh, params)
  fitter = fit.Fitter(method, model, mesh, optimizer(learning_rate), steps,
                      seed=seed)
  result = fit_best(fitter, flat, flat_sh,
                    epoch_batches(train, batch_size, seed), val,
                    eval_every=eval_every)
  result.value = np.asarray(result.params["prompt/embedding"])
  return result


# --------------------------------------------------------------- experiment --


def _task_rows(task, vocab, cfg):
  """(train, eval) example lists of a suite task or a registered real task."""
  if task in suite.TASKS:
    return (suite.examples(task, "train"),
            suite.examples(task, "validation", max_examples=cfg.eval_examples))
  data.register(vocab)
  train = data.eval_examples(task, vocab, split="train")
  evals = data.eval_examples(task, vocab, split="validation",
                             max_examples=cfg.eval_examples)
  return train, evals


def _method_rows(model, params, vocab, task, cfg, seed):
  """Per method: {'em', 'first', 'nll', 'sec'} on one task (see run_experiment)."""
  train, evals = _task_rows(task, vocab, cfg)
  enc, stop = vocab.encode, vocab.encode("\n")[0]
  eos_ids, pad_id, new = (stop,), 0, cfg.max_new_tokens
  bs = cfg.eval_batch_size
  rows, extra = {}, {}

  def evaluate(name, prompts, prefill, payload, logit_fn):
    gen = lambda i, m: si.greedy_with_prefill(
        model, params, jnp.asarray(i), jnp.asarray(m), payload, prefill, new,
        eos_ids, pad_id)
    outs, sec = timed_generation(gen, prompts, bs)
    nll, first = target_scores(jax.jit(logit_fn),
                               scoring_batch(prompts, evals, enc), bs)
    rows[name] = dict(em=exact_match(vocab, outs, evals, stop)[0],
                      first=float(first.mean()), nll=float(nll.mean()), sec=sec)

  plain_logits = lambda i, m, pos: model.apply({"params": params}, i, m)
  for k in cfg.shots:
    prompts = few_shot_prompts(train, evals, k, seed, enc, cfg.max_prompt_len)
    evaluate("zero-shot" if k == 0 else f"icl-{k}", prompts, si.plain_prefill,
             (), plain_logits)
  zero = few_shot_prompts(train, evals, 0, seed, enc, cfg.max_prompt_len)
  # Disjoint train slices: embedding demonstrations | alpha fit | alpha val
  # (small real train sets, e.g. FewGLUE's 32, are split 1/4 | 1/2 | 1/4).
  n = len(train)
  n_val = min(cfg.val_examples, n // 4)
  n_fit = min(cfg.fit_examples, n // 2)
  fit_rows, val_rows = train[n - n_fit - n_val:n - n_val], train[n - n_val:]
  emb_rows = train[:n - n_fit - n_val]

  emb = si.task_embedding(model, params, embedding_prompts(
      emb_rows, cfg.num_prompts, cfg.num_shots, seed, enc, cfg.max_prompt_len),
      batch_size=bs)
  alpha_fit = fit_alpha(
      model, params, emb, first_token_batch(fit_rows, enc, cfg.max_prompt_len),
      first_token_batch(val_rows, enc, cfg.max_prompt_len),
      steps=cfg.alpha.steps, learning_rate=cfg.alpha.learning_rate,
      batch_size=cfg.alpha.batch_size, seed=seed)
  alpha = si.alpha_of(alpha_fit.value)
  evaluate("soft-injection", zero, si.injected_prefill, (emb, alpha, None),
           lambda i, m, pos: si.apply_injected(
               model, params, {"input_ids": i, "attention_mask": m}, emb,
               alpha, positions=pos))
  extra.update(alpha=np.asarray(alpha), alpha_logits=alpha_fit.value,
               embedding=np.asarray(emb), best_step=alpha_fit.best_step,
               best_val_loss=alpha_fit.best_val_loss)

  if cfg.prompt_tuning.length:
    prompt_fit = fit_prompt(
        model, params, target_batch(fit_rows, enc, cfg.max_prompt_len),
        target_batch(val_rows, enc, cfg.max_prompt_len),
        length=cfg.prompt_tuning.length, steps=cfg.alpha.steps,
        learning_rate=cfg.prompt_tuning.learning_rate,
        batch_size=cfg.alpha.batch_size, seed=seed)
    prompt = prompt_fit.value
    method = prompt_tuning.PromptTuning(length=cfg.prompt_tuning.length)
    evaluate("prompt-tuning", zero, prompt_prefill, (prompt,),
             lambda i, m, pos: method.apply(
                 model, {"base": params, "prompt": {"embedding": prompt}},
                 {"input_ids": i, "attention_mask": m}))
  return rows, extra


def format_table(results):
  """results[task][method] = {em, first, nll, sec} -> text table."""
  methods = list(next(iter(results.values())))
  width = max(len(t) for t in results) + 2
  cols = "  EM  1st   NLL ms/ex"
  lines = [f"{'task':<{width}}" + "".join(f"{m:>23}" for m in methods),
           f"{'':<{width}}" + "".join(f"{cols:>23}" for _ in methods)]
  fmt = lambda r: (f"{r['em']:>6.2f}{r['first']:>5.2f}{r['nll']:>6.2f}"
                   f"{r['sec'] * 1e3:>6.1f}")
  for task, row in results.items():
    lines.append(f"{task:<{width}}" + "".join(f"{fmt(row[m]):>23}"
                                              for m in methods))
  mean = {m: {k: np.mean([r[m][k] for r in results.values()])
              for k in ("em", "first", "nll", "sec")} for m in methods}
  lines.append(f"{'mean':<{width}}" + "".join(f"{fmt(mean[m]):>23}"
                                              for m in methods))
  return "\n".join(lines)


@JOBS.register("soft_injection")
def run_experiment(config, workdir: str) -> dict:
  """Trains the test bed, compares methods per task, writes JSON + heatmap."""
  os.makedirs(workdir, exist_ok=True)
  vocab = data.vocabulary(config.vocab)
  tb = config.testbed
  bed = train_testbed(
      vocab, steps=tb.steps, batch_size=tb.batch_size, max_len=tb.max_len,
      max_shots=tb.max_shots, remap_prob=tb.remap_prob,
      learning_rate=tb.learning_rate, seed=config.seed,
      model_kwargs=dict(hidden=tb.hidden, layers_=tb.layers, heads=tb.heads,
                        mlp=tb.mlp))
  print(f"test bed: {tb.steps} steps in {bed.seconds:.0f}s, loss "
        f"{bed.losses[-1][1]:.3f}", flush=True)
  tasks = list(config.tasks or suite.HELD_OUT) + list(config.real_tasks)
  results, alphas, skipped = {}, {}, {}
  for task in tasks:
    try:
      rows, extra = _method_rows(bed.model, bed.params, vocab, task, config,
                                 config.seed)
    except (KeyError, ValueError, FileNotFoundError) as e:
      if task in suite.TASKS:
        raise
      skipped[task] = f"{type(e).__name__}: {e}"
      print(f"skipping {task}: {skipped[task]}", flush=True)
      continue
    results[task], alphas[task] = rows, extra["alpha"]
    si.save(os.path.join(workdir, "task_embeddings"), task, extra["embedding"],
            extra["alpha_logits"], num_prompts=config.num_prompts,
            num_shots=config.num_shots, best_step=extra["best_step"],
            best_val_loss=extra["best_val_loss"])
    print(task, json.dumps(rows), flush=True)
  table = format_table(results)
  print("EM: exact match of the greedy answer; 1st: first answer token "
        "accuracy; NLL: target loss per token; ms/ex: greedy generation time "
        "per example")
  print(table)
  png, overlap = analysis.write_analysis(alphas, workdir,
                                         k=config.top_k or None)
  print(overlap)
  out = {"results": results,
         "columns": {"em": "exact match of the greedy answer",
                     "first": "first target token accuracy (argmax)",
                     "nll": "target NLL per token, teacher-forced",
                     "sec": "seconds per example, greedy generation"},
         "skipped": skipped, "testbed_losses": bed.losses,
         "testbed_seconds": bed.seconds, "heatmap": png,
         "config": config.to_dict()}
  with open(os.path.join(workdir, "soft_injection_results.json"), "w") as f:
    json.dump(out, f, indent=1, default=str)
  with open(os.path.join(workdir, "soft_injection_table.txt"), "w") as f:
    f.write(table + "\n\n" + overlap + "\n")
  print(f"wrote {workdir}/soft_injection_results.json and {png}")
  return out


def scoring_batch(prompts, examples, encode):
  """Right-padded prompt + 'y\\n' rows for teacher-forced scoring.

  -> dict input_ids, attention_mask (B, T), weights (B, T) on 'y\\n' tokens,
  position (B,) of each prompt's last token.
  """
  rows, pos, spans = [], [], []
  for p, ex in zip(prompts, examples, strict=True):
    y = encode(ex["targets"] + "\n")
    rows.append(list(p) + y)
    pos.append(len(p) - 1)
    spans.append((len(p), len(p) + len(y)))
  t = -(-max(len(r) for r in rows) // 32) * 32
  ids = np.zeros((len(rows), t), np.int32)
  w = np.zeros((len(rows), t), np.float32)
  for i, (r, (a, b)) in enumerate(zip(rows, spans, strict=True)):
    ids[i, :len(r)] = r
    w[i, a:b] = 1.0
  return {"input_ids": ids, "attention_mask": (ids != 0).astype(np.int32),
          "weights": w, "position": np.asarray(pos, np.int32)}


def target_scores(logit_fn, batch, batch_size):
  """logit_fn(ids, mask, positions) -> logits; returns per-example
  (target NLL per token, first-token correct) over teacher-forced rows."""
  nll, first = [], []
  n = len(batch["input_ids"])
  for s in range(0, n, batch_size):
    sl = slice(s, s + batch_size)
    ids, w, pos = batch["input_ids"][sl], batch["weights"][sl], batch["position"][sl]
    logits = np.asarray(logit_fn(ids, batch["attention_mask"][sl], pos),
                        np.float64)
    logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
    tok = np.take_along_axis(logp[:, :-1], ids[:, 1:, None], -1)[..., 0]
    nll.extend(-(tok * w[:, 1:]).sum(1) / w[:, 1:].sum(1))
    r = np.arange(len(ids))
    first.extend(logits[r, pos].argmax(-1) == ids[r, pos + 1])
  return np.asarray(nll), np.asarray(first, np.float64)
