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

Under several processes (mtjax.distributed) every process loads the same
model (the test bed is trained on each process's own device, then process
0's weights are broadcast), runs the whole per-task work -- task embedding,
alpha and prompt fitting, scoring -- for its share of the tasks
(`distributed.process_split`), and the rows are gathered onto every process
(`distributed.all_gather_objects`); alpha transfer is split the same way.
No task depends on another process's, so the table is the same for any
number of processes. Process 0 alone writes files.
"""
import dataclasses
import json
import os
import resource
import time
from typing import Any, Callable, Iterator, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mtjax import data, distributed, methods, paths
from mtjax.data import suite
from mtjax.evaluation import analysis
from mtjax.evaluation.results import bootstrap_ci
from mtjax.experiments.train import JOBS
from mtjax.methods import prompt_tuning
from mtjax.methods import soft_injection as si
from mtjax.models import decoder, gguf, hf, sharding
from mtjax.training import fit, trainer


def one_device_mesh():
  """A (1, 1, 1) mesh on this process's first device: the experiment's
  models are tiny (each process runs its own tasks on it)."""
  return sharding.make_mesh((1, 1, 1), devices=jax.local_devices()[:1])


def optimizer(learning_rate, **options):
  """An optimizer config for Fitter: AdamW (no weight decay unless given),
  constant learning rate unless `decay` is given."""
  return ml_collections.ConfigDict(dict(
      {"name": "adamw", "learning_rate": learning_rate, "decay": "constant"},
      **options))


def lm_batch(ids, weights, mask=None):
  """Right-padded token rows (B, T) and their loss weights -> a Fitter batch
  (the trainer's decoder format: predict ids[:, 1:] from ids[:, :-1]).

  mask (B, T): 1 on real tokens; given, it is the batch's 'decoder_mask' (a
  real LM's id 0 is a token, so `token != 0` cannot mark padding)."""
  ids, weights = np.asarray(ids, np.int32), np.asarray(weights, np.float32)
  out = {"decoder_input_tokens": ids[:, :-1],
         "decoder_target_tokens": ids[:, 1:],
         "decoder_loss_weights": weights[:, 1:],
         "task_index": np.zeros((len(ids),), np.int32)}
  if mask is not None:
    out["decoder_mask"] = np.asarray(mask, np.int32)[:, :-1]
  return out


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
# A PromptFormat turns a task's examples into token ids and reads answers back.
# Two exist: the test bed's 'x\ny\n\n' byte format (`byte_format`) and the
# paper's 'Q: x\nA: y\n\n' format for a pretrained LM (`paper_format`). The
# prompt functions below also take a plain `encode` (text -> ids): it means
# the byte format with that encoder.


@dataclasses.dataclass(frozen=True)
class PromptFormat:
  """prompt(demos, query) -> prompt ids; target(example) -> ids the model
  should continue the prompt with (the answer and its line end); answer(ids
  (T,)) -> the answer text of generated ids; correct(answer, example) ->
  bool; stop_ids: the tokens that end generation."""
  prompt: Callable[[list, dict], list]
  target: Callable[[dict], list]
  answer: Optional[Callable[[Any], str]] = None
  correct: Optional[Callable[[str, dict], bool]] = None
  stop_ids: tuple = ()


def byte_format(encode, vocab=None):
  """The test bed's format: 'x1\\ny1\\n\\n...x\\n' then 'y\\n'; exact match of
  the stripped answer (answer/correct need `vocab`)."""
  stop = encode("\n")[0]
  answer = None if vocab is None else (
      lambda ids: decode_answer(vocab, ids, stop))
  return PromptFormat(
      prompt=lambda demos, q: encode(suite.render_few_shot(demos, q) + "\n"),
      target=lambda ex: encode(ex["targets"] + "\n"), answer=answer,
      correct=lambda a, ex: a == ex["targets"].strip(), stop_ids=(stop,))


def as_format(fmt):
  """A PromptFormat, or a plain encode function (-> `byte_format(encode)`)."""
  return fmt if isinstance(fmt, PromptFormat) else byte_format(fmt)


def answer_space(output: str) -> str:
  """What separates 'A:' from an answer: a space, none before a number (the
  reference code's rule for digit outputs, so a digit-splitting tokenizer's
  first target token is the digit, not a bare space)."""
  return "" if str(output).strip().lstrip("-").isdigit() else " "


def paper_prompt(demos, query):
  """The paper's prompt text: 'Q: {input}\nA: {output}\n\n' per
  demonstration ('A:{output}' for numbers, `answer_space`), then
  'Q: {input}\nA:'."""
  shots = "".join(f"Q: {d['inputs']}\nA:{answer_space(d['targets'])}"
                  f"{d['targets']}\n\n" for d in demos)
  return shots + f"Q: {query['inputs']}\nA:"


def paper_normalize(text, task):
  """The reference evaluation's normalisation (Soft_Injection eval.py): 'St.'
  read as 'Saint', the first line, cut at '(', stripped, lower-cased except
  for the capitalize* / lowercase* tasks."""
  text = text.replace("St.", "Saint").split("\n")[0].split("(")[0].strip()
  keep_case = "capitalize" in task.lower() or "lowercase" in task.lower()
  return text if keep_case else text.lower()


def paper_match(output, target, task, prefix=True):
  """Exact match after `paper_normalize`. prefix=True compares the output's
  first len(target) characters, as the reference code does (so 'colder'
  matches 'cold'); prefix=False needs the whole line to be equal."""
  out, tgt = paper_normalize(output, task), paper_normalize(target, task)
  return (out[:len(tgt)] if prefix else out) == tgt


def first_line(vocab, ids, eos_ids=()):
  """Generated ids -> the reference's answer: the text up to EOS (not
  decoded), stripped, then its first line (so an answer after a leading
  newline counts)."""
  ids = [int(i) for i in ids]
  cut = next((j for j, t in enumerate(ids) if t in set(eos_ids)), len(ids))
  return vocab.decode(ids[:cut]).strip().split("\n")[0].strip()


def paper_format(vocab, task, prefix=True):
  """The paper's format for a BPE vocabulary: the whole prompt string encoded
  at once (after the BOS token if the vocabulary has one), the target ' y\n'
  (the space after 'A:' belongs to the answer's first token; none before a
  number, `answer_space`), generation stopped only at an end-of-text token
  (vocab.stop_ids: EOS, <|endoftext|>; max_new_tokens otherwise), the
  first line of the stripped text scored by `paper_match`, as the reference
  code generates, strips, then cuts."""
  bos = [vocab.bos_id] if getattr(vocab, "bos_id", None) is not None else []
  eos = tuple(int(i) for i in getattr(vocab, "stop_ids", ())) or (
      () if vocab.eos_id is None else (int(vocab.eos_id),))
  return PromptFormat(
      prompt=lambda demos, q: bos + vocab.encode(paper_prompt(demos, q)),
      target=lambda ex: vocab.encode(answer_space(ex["targets"])
                                     + ex["targets"] + "\n"),
      answer=lambda ids: first_line(vocab, ids, eos),
      correct=lambda a, ex: paper_match(a, ex["targets"], task, prefix),
      stop_ids=eos)


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


def render(demos, query, fmt, max_len, kept=None):
  """Prompt ids of demos + query (`as_format(fmt)`), dropping first demos to
  fit max_len; `kept` (a list) receives how many demonstrations remain."""
  fmt, demos = as_format(fmt), list(demos)
  while True:
    ids = fmt.prompt(demos, query)
    if len(ids) <= max_len or not demos:
      if kept is not None:
        kept.append(len(demos))
      return ids[-max_len:]
    demos = demos[1:]


def few_shot_prompts(train, queries, k, seed, fmt, max_len, kept=None):
  """One prompt per query with k demonstrations sampled from train (not the
  query); `kept` receives each prompt's demonstrations after `render` cut
  it to max_len."""
  rng = np.random.default_rng(seed)
  out = []
  for q in queries:
    pool = [i for i in rng.permutation(len(train))[:k + 1]
            if train[i]["inputs"] != q["inputs"]][:k]
    out.append(render([train[i] for i in pool], q, fmt, max_len, kept))
  return out


def shots_used(kept, k):
  """{'shots': k, 'shots_mean': mean demonstrations kept, 'prompts_cut':
  prompts that lost some} of a `kept` list."""
  return {"shots": k, "shots_mean": float(np.mean(kept)) if kept else 0.0,
          "prompts_cut": int(sum(n < k for n in kept))}


def embedding_prompts(train, num_prompts, num_shots, seed, fmt, max_len,
                      kept=None):
  """M prompts of N demonstrations + a held query from `train` (as the
  paper); `kept` receives each prompt's demonstrations after cutting."""
  rng = np.random.default_rng(seed)
  rows = []
  for _ in range(num_prompts):
    idx = rng.choice(len(train), size=min(num_shots + 1, len(train)),
                     replace=False)
    rows.append(render([train[i] for i in idx[1:]], train[idx[0]], fmt,
                       max_len, kept))
  ids, mask = left_pad(rows)
  return {"input_ids": ids, "attention_mask": mask}


def decode_answer(vocab, ids, stop_id):
  ids = [int(i) for i in ids]
  if stop_id in ids:
    ids = ids[:ids.index(stop_id)]
  return vocab.decode([i for i in ids if i > 2]).strip()


def timed_generation(gen_fn, prompts, batch_size):
  """Runs gen_fn(ids, mask) over left-padded batches; -> (outputs, s/example).

  Compilation is excluded: each distinct batch shape is run once first.
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
  shapes = {ids.shape: (ids, mask) for _, (ids, mask) in batches}
  for ids, mask in shapes.values():  # compile every shape
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


def exact_match(fmt, outputs, examples):
  """-> (mean, per-example correct (N,) float, answers) under `fmt`."""
  preds = [fmt.answer(o) for o in outputs]
  correct = np.asarray([fmt.correct(p, ex)
                        for p, ex in zip(preds, examples, strict=True)],
                       np.float64)
  return float(correct.mean()), correct, preds


def scoring_batch(prompts, examples, fmt):
  """Right-padded prompt + target rows for teacher-forced scoring.

  -> dict input_ids, attention_mask (B, T), weights (B, T) on the target
  tokens, position (B,) of each prompt's last token.
  """
  fmt = as_format(fmt)
  rows, pos, spans = [], [], []
  for p, ex in zip(prompts, examples, strict=True):
    y = fmt.target(ex)
    rows.append(list(p) + y)
    pos.append(len(p) - 1)
    spans.append((len(p), len(p) + len(y)))
  t = -(-max(len(r) for r in rows) // 32) * 32
  ids = np.zeros((len(rows), t), np.int32)
  w = np.zeros((len(rows), t), np.float32)
  mask = np.zeros((len(rows), t), np.int32)
  for i, (r, (a, b)) in enumerate(zip(rows, spans, strict=True)):
    ids[i, :len(r)] = r
    mask[i, :len(r)] = 1
    w[i, a:b] = 1.0
  return {"input_ids": ids, "attention_mask": mask, "weights": w,
          "position": np.asarray(pos, np.int32)}


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


def first_token_batch(examples, fmt, max_len):
  """Left-padded zero-shot prompts + their first target token (fit_alpha);
  fmt: a PromptFormat or an encode function (`as_format`)."""
  fmt = as_format(fmt)
  ids, mask = left_pad([render([], ex, fmt, max_len) for ex in examples])
  first = np.asarray([fmt.target(ex)[0] for ex in examples], np.int32)
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


def target_batch(examples, fmt, max_len):
  """Right-padded zero-shot prompt + target, loss on the target -> `lm_batch`."""
  fmt = as_format(fmt)
  rows, weights = [], []
  for ex in examples:
    a = render([], ex, fmt, max_len)
    b = fmt.target(ex)
    rows.append(a + b)
    weights.append([0] * len(a) + [1] * len(b))
  t = max(len(r) for r in rows)
  ids = np.zeros((len(rows), t), np.int32)
  w = np.zeros((len(rows), t), np.float32)
  mask = np.zeros((len(rows), t), np.int32)
  for i, (r, wt) in enumerate(zip(rows, weights, strict=True)):
    ids[i, :len(r)] = r
    w[i, :len(r)] = wt
    mask[i, :len(r)] = 1
  return lm_batch(ids, w, mask)


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
# run_experiment: the model (`load_lm`: the test bed trained here, or a real
# pretrained LM from a GGUF file or an HF folder), then per task (`task_data`:
# the bundled suite / registered real tasks in the byte format, or the paper's
# tasks in its 'Q: x\nA: y' format) every method's generations scored
# (`_method_rows`), bootstrap intervals (`summarize`), alpha transfer between
# tasks (`alpha_transfer`) and the head analysis (mtjax.evaluation.analysis).


@dataclasses.dataclass
class LM:
  model: Any
  params: Any
  vocab: Any
  info: dict     # how it was made (test bed losses and seconds, or the file)


def load_lm(config) -> LM:
  """config.model_source: 'testbed' (trained here, config.testbed), 'gguf'
  (config.model.gguf_path; its own tokenizer) or 'hf' (config.model.hf_path,
  tokenizer config.vocab)."""
  source = config.get("model_source", "testbed")
  if source == "testbed":
    return _testbed_lm(config)
  m = config.model
  if source == "gguf":
    model, params = gguf.load(m.gguf_path, dtype=m.dtype,
                              param_dtype=m.param_dtype, mesh=one_device_mesh())
    return LM(model, params, data.vocabulary("gguf:" + m.gguf_path),
              {"source": "gguf", "path": m.gguf_path})
  if source == "hf":
    model, params = hf.load(m.hf_path, dtype=m.dtype, param_dtype=m.param_dtype,
                            mesh=one_device_mesh())
    return LM(model, params, data.vocabulary(config.vocab),
              {"source": "hf", "path": m.hf_path})
  raise ValueError(f"unknown model_source {source!r}: 'testbed', 'gguf', 'hf'")


def _testbed_lm(config):
  vocab, tb = data.vocabulary(config.vocab), config.testbed
  bed = train_testbed(
      vocab, steps=tb.steps, batch_size=tb.batch_size, max_len=tb.max_len,
      max_shots=tb.max_shots, remap_prob=tb.remap_prob,
      learning_rate=tb.learning_rate, seed=config.seed,
      model_kwargs=dict(hidden=tb.hidden, layers_=tb.layers, heads=tb.heads,
                        mlp=tb.mlp))
  print(f"test bed: {tb.steps} steps in {bed.seconds:.0f}s, loss "
        f"{bed.losses[-1][1]:.3f}", flush=True)
  # Trained alike on every process (same seed and batches); process 0's
  # weights make sure every process scores its tasks with the same model.
  bed.params = distributed.broadcast_from_main(bed.params)
  return LM(bed.model, bed.params, vocab, {
      "source": "testbed", "testbed_losses": bed.losses,
      "testbed_seconds": bed.seconds})


def paper_examples(task, split, tasks_dir, max_examples=0):
  """<tasks_dir>/<task>/<split>.json ({'input', 'output'} rows; split 'train',
  'valid' or 'test') -> the experiment's examples {'inputs', 'targets',
  'answer_choices': []}, the first `max_examples` (0 = all)."""
  with open(os.path.join(tasks_dir, task, f"{split}.json")) as f:
    rows = json.load(f)
  rows = rows[:max_examples] if max_examples else rows
  return [{"inputs": str(r["input"]), "targets": str(r["output"]),
           "answer_choices": []} for r in rows]


@dataclasses.dataclass
class TaskData:
  fmt: PromptFormat
  demos: list    # demonstrations: ICL prompts and the task embedding
  fit: list      # alpha / prompt fitting rows
  val: list      # validation rows (best-step selection)
  test: list     # scored rows


def task_data(task, vocab, cfg) -> TaskData:
  """A paper task (in cfg.paper_tasks): demonstrations and fitting rows from
  train, validation the first cfg.val_examples of valid, test the first
  cfg.eval_examples of test (the paper's splits). A suite / registered real
  task: `_suite_data`."""
  if task in tuple(cfg.get("paper_tasks", ())):
    root = cfg.paper_tasks_dir
    train = paper_examples(task, "train", root)
    return TaskData(
        paper_format(vocab, task, cfg.get("em_prefix", False)), train,
        train[:cfg.fit_examples] if cfg.fit_examples else train,
        paper_examples(task, "valid", root, cfg.val_examples),
        paper_examples(task, "test", root, cfg.eval_examples))
  return _suite_data(task, vocab, cfg)


def _suite_data(task, vocab, cfg):
  """Suite or registered real task, byte format: its validation split is the
  test set; train is split into disjoint slices demonstrations | alpha fit |
  alpha val (small real train sets, e.g. FewGLUE's 32: 1/4 | 1/2 | 1/4)."""
  if task in suite.TASKS:
    train = suite.examples(task, "train")
    evals = suite.examples(task, "validation", max_examples=cfg.eval_examples)
  else:
    data.register(vocab)
    train = data.eval_examples(task, vocab, split="train")
    evals = data.eval_examples(task, vocab, split="validation",
                               max_examples=cfg.eval_examples)
  n = len(train)
  n_val, n_fit = min(cfg.val_examples, n // 4), min(cfg.fit_examples, n // 2)
  return TaskData(byte_format(vocab.encode, vocab), train[:n - n_fit - n_val],
                  train[n - n_fit - n_val:n - n_val], train[n - n_val:], evals)


def memory_mark():
  """(source, bytes): the device's peak_bytes_in_use when jax reports it
  (accelerators), else the process's max RSS (CPU). Both are peaks since the
  process started, so a difference is how much a step raised the peak."""
  stats = jax.local_devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return "device peak_bytes_in_use", int(stats["peak_bytes_in_use"])
  return "process max RSS", resource.getrusage(
      resource.RUSAGE_SELF).ru_maxrss * 1024


def kv_cache_mb(model_config, tokens):
  """f32 KV-cache megabytes of one sequence of `tokens` tokens."""
  c = model_config
  kv = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
  head_dim = getattr(c, "head_dim", None) or (
      c.hidden_size // c.num_attention_heads)
  return 2 * c.num_hidden_layers * kv * head_dim * tokens * 4 / 2**20


def generation_row(lm, td, prompts, prefill, payload, cfg,
                   virtual_tokens=0):
  """Greedy generations of `prompts` scored under td.fmt -> {em, correct (N,),
  sec (per example), mem_mb (peak raised, `memory_mark`), tokens (mean prompt
  length), kv_mb (KV cache per example at that length + the prefill's
  `virtual_tokens` (prompt tuning's soft prompt) + new tokens)}."""
  gen = lambda i, m: si.greedy_with_prefill(
      lm.model, lm.params, jnp.asarray(i), jnp.asarray(m), payload, prefill,
      cfg.max_new_tokens, td.fmt.stop_ids, 0)
  source, before = memory_mark()
  outs, sec = timed_generation(gen, prompts, cfg.eval_batch_size)
  em, correct, answers = exact_match(td.fmt, outs, td.test)
  tokens = float(np.mean([len(p) for p in prompts]))
  return dict(em=em, correct=correct.tolist(), sec=sec,
              mem_mb=(memory_mark()[1] - before) / 2**20, mem_source=source,
              tokens=tokens, answers=answers, virtual_tokens=virtual_tokens,
              kv_mb=kv_cache_mb(lm.model.config, tokens + virtual_tokens
                                + cfg.max_new_tokens))


def scored_row(lm, td, prompts, prefill, payload, logit_fn, cfg,
               virtual_tokens=0):
  """`generation_row` + teacher-forced target scores {first, nll} (NaN when
  cfg.score_targets is off)."""
  row = generation_row(lm, td, prompts, prefill, payload, cfg,
                       virtual_tokens)
  row.update(first=float("nan"), nll=float("nan"))
  if cfg.get("score_targets", True):
    nll, first = target_scores(jax.jit(logit_fn),
                               scoring_batch(prompts, td.test, td.fmt),
                               cfg.eval_batch_size)
    row.update(first=float(first.mean()), nll=float(nll.mean()))
  print(f"  {len(prompts)} prompts: EM {row['em']:.3f}, "
        f"{row['sec'] * 1e3:.0f} ms/example", flush=True)
  return row


def injected_logits(lm, emb, alpha):
  return lambda i, m, pos: si.apply_injected(
      lm.model, lm.params, {"input_ids": i, "attention_mask": m}, emb, alpha,
      positions=pos)


def fit_task_alpha(lm, td, emb, cfg, seed):
  enc = lambda rows: first_token_batch(rows, td.fmt, cfg.max_prompt_len)
  return fit_alpha(lm.model, lm.params, emb, enc(td.fit), enc(td.val),
                   steps=cfg.alpha.steps, learning_rate=cfg.alpha.learning_rate,
                   batch_size=cfg.alpha.batch_size, seed=seed)


def prompt_tuning_row(lm, td, zero, cfg, seed):
  """Prompt tuning with the alpha budget, scored on the zero-shot prompts."""
  enc = lambda rows: target_batch(rows, td.fmt, cfg.max_prompt_len)
  prompt = fit_prompt(
      lm.model, lm.params, enc(td.fit), enc(td.val),
      length=cfg.prompt_tuning.length, steps=cfg.alpha.steps,
      learning_rate=cfg.prompt_tuning.learning_rate,
      batch_size=cfg.alpha.batch_size, seed=seed).value
  method = prompt_tuning.PromptTuning(length=cfg.prompt_tuning.length)
  return scored_row(lm, td, zero, prompt_prefill, (prompt,),
                    lambda i, m, pos: method.apply(
                        lm.model, {"base": lm.params,
                                   "prompt": {"embedding": prompt}},
                        {"input_ids": i, "attention_mask": m}), cfg,
                    virtual_tokens=int(np.shape(prompt)[0]))


def _method_rows(lm, task, cfg, seed):
  """Per method (zero-shot, icl-k, soft-injection, prompt-tuning): a
  `scored_row` on one task; -> (rows, extra: embedding, alpha, fit, data)."""
  td = task_data(task, lm.vocab, cfg)
  plain = lambda i, m, pos: lm.model.apply({"params": lm.params}, i, m)
  prompts = lambda k, kept=None: few_shot_prompts(
      td.demos, td.test, k, seed, td.fmt, cfg.max_prompt_len, kept)
  rows = {}
  for k in cfg.shots:
    kept = []
    name = "zero-shot" if k == 0 else f"icl-{k}"
    rows[name] = scored_row(lm, td, prompts(k, kept), si.plain_prefill, (),
                            plain, cfg)
    # Prompts over max_prompt_len lose their first demonstrations: say so.
    rows[name].update(shots_used(kept, k))
    if rows[name]["prompts_cut"]:
      print(f"  {task} {name}: {rows[name]['prompts_cut']} prompts cut to "
            f"{cfg.max_prompt_len} tokens, {rows[name]['shots_mean']:.1f} "
            "demonstrations kept on average", flush=True)
  start = time.perf_counter()
  emb_kept = []
  emb = si.task_embedding(lm.model, lm.params, embedding_prompts(
      td.demos, cfg.num_prompts, cfg.num_shots, seed, td.fmt,
      cfg.max_prompt_len, emb_kept), batch_size=cfg.eval_batch_size)
  fitted = fit_task_alpha(lm, td, emb, cfg, seed)
  alpha = si.alpha_of(fitted.value)
  fit_seconds = time.perf_counter() - start
  rows["soft-injection"] = scored_row(
      lm, td, prompts(0), si.injected_prefill, (emb, alpha, None),
      injected_logits(lm, emb, alpha), cfg)
  # The embedding's prompts: shots kept of cfg.num_shots.
  rows["soft-injection"].update(shots_used(emb_kept, cfg.num_shots))
  if cfg.prompt_tuning.length:
    rows["prompt-tuning"] = prompt_tuning_row(lm, td, prompts(0), cfg, seed)
  return rows, dict(embedding=np.asarray(emb), alpha=np.asarray(alpha),
                    fit=fitted, data=td, fit_seconds=fit_seconds)


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


def summarize(results, seed=0):
  """Per method: the task-mean EM with its 95% bootstrap interval (examples
  resampled within each task), per-task intervals, and mean costs."""
  out = {}
  for m in next(iter(results.values())):
    rows = {t: r[m] for t, r in results.items()}
    mean, lo, hi = analysis.task_mean_ci(
        [r["correct"] for r in rows.values()], seed=seed)
    out[m] = {"em": mean, "ci95": [lo, hi],
              "per_task_ci95": {t: list(bootstrap_ci(r["correct"], seed=seed))
                                for t, r in rows.items()},
              **{k: float(np.mean([r[k] for r in rows.values()]))
                 for k in ("sec", "mem_mb", "tokens", "kv_mb")}}
  return out


def format_summary(summary):
  lines = [f"{'method':<16}{'EM':>6}  {'95% CI':<15}{'ms/ex':>7}"
           f"{'peak+MB':>9}{'tokens':>8}{'KV MB':>7}"]
  for m, s in summary.items():
    lines.append(f"{m:<16}{s['em']:>6.3f}  [{s['ci95'][0]:.3f}, "
                 f"{s['ci95'][1]:.3f}]{s['sec'] * 1e3:>7.1f}{s['mem_mb']:>9.1f}"
                 f"{s['tokens']:>8.1f}{s['kv_mb']:>7.2f}")
  return "\n".join(lines)


def alpha_transfer(lm, extras, results, cfg):
  """config.transfer = ((A, similar B, dissimilar C), ...): A's test EM with A's
  embedding and A's own alpha (its soft-injection row), B's alpha, C's alpha.
  -> {A: {'own'|'similar'|'dissimilar': {'alpha_of', 'em', 'correct'}}};
  triples with a task that was not run are left out. Each process runs its
  share of the triples; every process gets all of them."""
  triples = [t for t in cfg.get("transfer", ()) if set(t) <= set(extras)]
  mine = []
  for i, (a, similar, dissimilar) in distributed.process_split(
      list(enumerate(triples))):
    own = results[a]["soft-injection"]
    row = {"own": {"alpha_of": a, "em": own["em"], "correct": own["correct"]}}
    td, emb = task_data(a, lm.vocab, cfg), extras[a]["embedding"]
    zero = few_shot_prompts(td.demos, td.test, 0, cfg.seed, td.fmt,
                            cfg.max_prompt_len)
    for kind, b in (("similar", similar), ("dissimilar", dissimilar)):
      r = generation_row(lm, td, zero, si.injected_prefill,
                         (emb, extras[b]["alpha"], None), cfg)
      row[kind] = {"alpha_of": b, "em": r["em"], "correct": r["correct"]}
    mine.append((i, a, row))
    print(f"alpha transfer {a}: " + ", ".join(
        f"{k} ({v['alpha_of']}) {v['em']:.3f}" for k, v in row.items()),
          flush=True)
  gathered = [r for part in distributed.all_gather_objects(mine) for r in part]
  return {a: row for _, a, row in sorted(gathered, key=lambda r: r[0])}


def task_names(config):
  """The paper's tasks (config.paper_tasks), then config.tasks and
  config.real_tasks; with neither paper nor suite tasks, the suite's
  held-out tasks."""
  paper = list(config.get("paper_tasks", ()))
  named = list(config.tasks) + list(config.real_tasks)
  if not paper and not config.tasks:
    named = list(suite.HELD_OUT) + named
  return paper + named


def _run_task(lm, task, config):
  start = time.perf_counter()
  rows, extra = _method_rows(lm, task, config, config.seed)
  del extra["data"]   # its PromptFormat's functions do not cross processes
  extra["seconds"] = time.perf_counter() - start
  print(task, f"({extra['seconds']:.0f}s; embedding + alpha "
        f"{extra['fit_seconds']:.0f}s)", json.dumps(
            {m: {k: r[k] for k in ("em", "first", "nll", "sec", "mem_mb")}
             for m, r in rows.items()}), flush=True)
  return rows, extra


def _save_embedding(workdir, task, extra, config):
  si.save(paths.join(workdir, "task_embeddings"), task, extra["embedding"],
          extra["fit"].value, num_prompts=config.num_prompts,
          num_shots=config.num_shots, best_step=extra["fit"].best_step,
          best_val_loss=extra["fit"].best_val_loss)


def run_tasks(lm, config, workdir):
  """-> (results {task: rows}, extras {task: extra}, skipped {task: why}),
  in task order, on every process.

  In rounds of one task per process (`distributed.process_split` of the
  round's tasks): each process runs its task, the round is gathered, and
  process 0 writes its embeddings and alphas under WORKDIR/task_embeddings
  (a stopped run keeps the rounds done)."""
  names, count = task_names(config), jax.process_count()
  results, extras, skipped = {}, {}, {}
  for first in range(0, len(names), count):
    mine = _run_share(lm, distributed.process_split(
        names[first:first + count]), config)
    done = gather_by_task(names, *mine)
    if distributed.is_main_process():
      for task, extra in done[1].items():
        _save_embedding(workdir, task, extra, config)
    for part, new in zip((results, extras, skipped), done, strict=True):
      part.update(new)
  return results, extras, skipped


def _run_share(lm, tasks, config):
  """`_run_task` of each task -> (results, extras, skipped) dicts; a real
  task that cannot be loaded is skipped (the suite's and paper's raise)."""
  results, extras, skipped = {}, {}, {}
  for task in tasks:
    try:
      results[task], extras[task] = _run_task(lm, task, config)
    except (KeyError, ValueError, FileNotFoundError) as e:
      if task in suite.TASKS or task in tuple(config.get("paper_tasks", ())):
        raise
      skipped[task] = f"{type(e).__name__}: {e}"
      print(f"skipping {task}: {skipped[task]}", flush=True)
  return results, extras, skipped


def gather_by_task(names, *parts):
  """Per-process dicts {task: value} -> each dict with every process's
  tasks, in the order of `names`, on every process."""
  everyone = distributed.all_gather_objects(parts)
  out = []
  for i in range(len(parts)):
    merged = {t: v for proc in everyone for t, v in proc[i].items()}
    out.append({t: merged[t] for t in names if t in merged})
  return tuple(out)


COLUMNS = {
    "em": "exact match of the greedy answer (paper tasks: the reference "
          "normalisation, paper_match)",
    "correct": "per-example EM (0/1), for the bootstrap intervals",
    "first": "first target token accuracy (argmax), teacher-forced",
    "nll": "target NLL per token, teacher-forced",
    "sec": "seconds per example, greedy generation (compilation excluded)",
    "mem_mb": "MB the peak memory rose during the method's generation "
              "(mem_source: device peak_bytes_in_use, or process max RSS on "
              "CPU; 0 when it stayed under an earlier peak)",
    "tokens": "mean prompt length in tokens",
    "kv_mb": "f32 KV cache MB per example (prompt + new tokens)"}


def write_outputs(workdir, out, texts):
  paths.write_json(paths.join(workdir, "soft_injection_results.json"), out,
                   indent=1, default=str)
  paths.write_text(paths.join(workdir, "soft_injection_table.txt"),
                   "\n\n".join(texts) + "\n")


@JOBS.register("soft_injection")
def run_experiment(config, workdir: str) -> dict:
  """Loads or trains the model, compares methods per task, writes JSON, the
  tables, the alpha heatmap, head overlaps and the alpha-transfer plot.

  Every process gets the gathered rows; process 0 alone writes files and
  prints the tables (the others return only results, summary, transfer and
  skipped)."""
  main = distributed.is_main_process()
  if main:
    paths.makedirs(workdir)
  start = time.perf_counter()
  lm = load_lm(config)
  results, extras, skipped = run_tasks(lm, config, workdir)
  summary = summarize(results, config.seed)
  transfer = alpha_transfer(lm, extras, results, config)
  alphas = {t: e["alpha"] for t, e in extras.items()}
  if not main:
    return {"results": results, "summary": summary, "transfer": transfer,
            "skipped": skipped, "heatmap": "", "transfer_plot": ""}
  png, overlap = analysis.write_analysis(alphas, workdir,
                                         k=config.top_k or None)
  transfer_png = analysis.plot_transfer(
      transfer, paths.join(workdir, "alpha_transfer.png")) if transfer else ""
  texts = [format_table(results), format_summary(summary), overlap,
           analysis.format_transfer(transfer)]
  print("EM: exact match of the greedy answer; 1st: first answer token "
        "accuracy; NLL: target loss per token; ms/ex: greedy generation time "
        "per example\n" + "\n\n".join(texts))
  out = {"results": results, "summary": summary, "transfer": transfer,
         "columns": COLUMNS, "skipped": skipped, "model": lm.info,
         "task_seconds": {t: e["seconds"] for t, e in extras.items()},
         "seconds": time.perf_counter() - start, "heatmap": png,
         "transfer_plot": transfer_png, "config": config.to_dict()}
  out.update({k: v for k, v in lm.info.items() if k.startswith("testbed_")})
  write_outputs(workdir, out, texts)
  print(f"wrote {workdir}/soft_injection_results.json and {png}")
  return out
