"""Rank classification and greedy generation through any method.

Both build batches in the same feature layout the training pipeline produces
(seqio EncDecFeatureConverter / PrefixLMFeatureConverter), so scores come from
the same `mtjax.data.model_inputs` mapping and the same `method.apply` as
training.

Rank classification (T0 protocol, Sanh et al. 2022): every answer choice is
scored by the log-likelihood of its tokens given the inputs; the prediction is
the argmax of the summed log-likelihood ('accuracy') and of the
length-normalised one ('accuracy_norm'). All (example, choice) pairs of a task
are flattened into rows and scored in fixed-shape batches (one compilation).

Generation: greedy decoding with the shared loop `mtjax.models.decoding.decode`
through `method.apply`, so the method's interceptors act on every token. A
method with `cached_decoding` (mtjax.methods.transform: full, LoRA, (IA)3,
prompt tuning, multitask prompts, soft injection, the routers but retrieval)
is decoded with the KV cache: decoder-only models prefill the prompt once
(rows re-aligned to the left, so every row's next token lands in one cache
slot) and run one cached step per token; T5 encodes once and caches the
decoder. Other methods recompute their forward over the filled buffer at
every step (`cached=False` forces that for any method). Both paths give the
same tokens and, per step, the same logits up to float rounding
(tests/test_cached_generation.py). Predictions are compared by exact match
and by the seqio task's metric functions.
"""
import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from mtjax import data
from mtjax.methods import transform
from mtjax.models import decoding
from mtjax.training import trainer

Method = Any  # a method object (mtjax.methods / mtjax.routing)
Model = Any  # a flax linen module (mtjax.models)


# Decoder batches of evaluation are cut to their longest row, rounded up to
# this many slots (a few shapes compile; short rows skip the padding).
PROMPT_BUCKET = 32


def bucket(longest: int, cap: int) -> int:
  """Slots for a batch whose longest row has `longest` tokens: rounded up to
  PROMPT_BUCKET, at most `cap` (the configured length)."""
  return min(cap, -(-int(longest) // PROMPT_BUCKET) * PROMPT_BUCKET)


def _pad(ids, length, pad_id=0):
  ids = list(ids)[:length]
  return ids + [pad_id] * (length - len(ids))


def score_rows(rows, kind, lengths, pad_id=0, lm=False):
  """Feature-converter batch (numpy) for (input_ids, target_ids) rows.

  Encoder-decoder: encoder_input_tokens (B, Li), decoder_* (B, Lt).
  Decoder: the concatenation inputs+targets (B, Li+Lt), loss on the targets.
  Rows are cut by `fit_row`. Masks are explicit ('encoder_mask',
  'decoder_mask'), so a pad id (`pad_id`) or an id-0 token means nothing;
  lm=True (pretrained LMs, lm_format vocabularies) leaves seqio's start slot
  out of the decoder mask, so the model reads exactly the prompt's tokens.
  """
  li, lt = lengths["inputs"], lengths["targets"]
  rows = [data.fit_row(i, t, kind, lengths)[:2] for i, t in rows]
  if kind == "encoder_decoder":
    tgt = np.array([_pad(t, lt, pad_id) for _, t in rows], np.int32)
    dec_mask = np.array([_pad([1] * len(t), lt) for _, t in rows], np.int32)
    return {
        "encoder_input_tokens": np.array([_pad(i, li, pad_id) for i, _ in rows],
                                         np.int32),
        "encoder_mask": np.array([_pad([1] * len(i), li) for i, _ in rows],
                                 np.int32),
        "decoder_target_tokens": tgt,
        "decoder_input_tokens": np.pad(tgt[:, :-1], ((0, 0), (1, 0))),
        "decoder_mask": dec_mask,
        "decoder_loss_weights": dec_mask,
    }
  seqs, weights, causal, masks = [], [], [], []
  for inp, tgt in rows:
    seqs.append(_pad(inp + tgt, li + lt, pad_id))
    weights.append(_pad([0] * len(inp) + [1] * len(tgt), li + lt))
    causal.append(_pad([1] * (len(inp) + 1), li + lt))
    masks.append(_pad([0 if lm else 1] + [1] * len(inp + tgt), li + lt))
  seqs = np.array(seqs, np.int32)
  return {
      "decoder_target_tokens": seqs,
      "decoder_input_tokens": np.pad(seqs[:, :-1], ((0, 0), (1, 0)),
                                     constant_values=pad_id if lm else 0),
      "decoder_loss_weights": np.array(weights, np.int32),
      "decoder_causal_attention": np.array(causal, np.int32),
      "decoder_mask": np.array(masks, np.int32),
  }


def fetch(tree):
  """Device arrays -> numpy on every process (gathered across processes).

  Every process builds the same evaluation batches (put_global_batch), so
  every process gets the whole result.
  """
  if all(x.is_fully_addressable for x in jax.tree.leaves(tree)):
    return jax.device_get(tree)
  return multihost_utils.process_allgather(tree, tiled=True)


def _batches(rows, batch_size, mesh):
  """Rows in chunks of batch_size, the last padded with copies of row 0.

  batch_size is rounded up to a multiple of the mesh's batch shards.
  """
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  batch_size = -(-batch_size // shards) * shards
  for start in range(0, len(rows), batch_size):
    chunk = rows[start:start + batch_size]
    yield chunk + [rows[0]] * (batch_size - len(chunk)), len(chunk)


def make_scorer(method, model):
  """jitted (params, batch) -> summed target log-likelihood (B,), counts (B,)."""
  kind = trainer.model_kind(model)

  @jax.jit
  def score(params, batch):
    logp, _ = trainer.token_scores(method, model, params, batch, kind)
    w = batch["decoder_loss_weights"].astype(jnp.float32)
    return (logp * w).sum(-1), w.sum(-1)
  return score


def score_choices(scorer, model, params, examples, lengths, batch_size, mesh,
                  pad_id=0, lm=False):
  """Per example: (log-likelihood of each choice (C,), its size (C,), cut).

  size: the choice's UTF-8 bytes ('choice_bytes'), else its token count.
  cut: whether the prompt or a choice was cut to `lengths` (see `fit_row`).
  """
  kind = trainer.model_kind(model)
  rows, owner = [], []
  cut = np.zeros(len(examples), bool)
  for e, ex in enumerate(examples):
    for ids in ex["choice_ids"]:
      rows.append((ex["input_ids"], ids))
      owner.append(e)
      cut[e] |= data.fit_row(ex["input_ids"], ids, kind, lengths)[2]
  # Decoder rows are scored shortest first, each batch padded only to its
  # longest row (rounded up to PROMPT_BUCKET, at most Li + Lt): a few shapes
  # compile, and short rows stop paying for the longest prompt of the task.
  order = np.arange(len(rows))
  if kind == "decoder":
    order = np.argsort([len(i) + len(t) for i, t in rows], kind="stable")
  sums, counts = np.zeros(len(rows)), np.zeros(len(rows))
  done = 0
  for chunk, n in _batches([rows[k] for k in order], batch_size, mesh):
    chunk_lengths = lengths
    if kind == "decoder":
      cap = lengths["inputs"] + lengths["targets"]
      longest = max(len(i) + len(t) for i, t in chunk[:n])
      chunk_lengths = {"inputs": bucket(longest, cap),
                       "targets": 0}
      if chunk_lengths["inputs"] == cap:
        chunk_lengths = lengths
    batch = trainer.put_global_batch(
        score_rows(chunk, kind, chunk_lengths, pad_id=pad_id, lm=lm), mesh)
    s, c = fetch(scorer(params, batch))
    sums[order[done:done + n]] = s[:n]
    counts[order[done:done + n]] = c[:n]
    done += n
  owner = np.array(owner)
  out = []
  for e, ex in enumerate(examples):
    idx = owner == e
    size = np.asarray(ex.get("choice_bytes", counts[idx]), np.float64)
    out.append((sums[idx], size, bool(cut[e])))
  return out


def rank_classification(scorer, model, params, examples, lengths, batch_size,
                        mesh, pad_id=0, lm=False):
  """Metrics and the predicted choice index per example.

  metrics: 'accuracy' (argmax of the summed log-likelihood of each choice's
  tokens), 'accuracy_norm' (argmax of log-likelihood / the choice's length in
  UTF-8 bytes, lm-eval's acc_norm; examples without 'choice_bytes' divide by
  the token count), 'truncated' (examples whose prompt or a choice was cut to
  the configured lengths, see `fit_row`), 'num_examples'.
  """
  scored = score_choices(scorer, model, params, examples, lengths, batch_size,
                         mesh, pad_id=pad_id, lm=lm)
  pred = [int(np.argmax(s)) for s, _, _ in scored]
  pred_norm = [int(np.argmax(s / np.maximum(n, 1))) for s, n, _ in scored]
  labels = np.array([ex["label"] for ex in examples])
  return {"accuracy": float(np.mean(np.array(pred) == labels)),
          "accuracy_norm": float(np.mean(np.array(pred_norm) == labels)),
          "truncated": int(sum(c for _, _, c in scored)),
          "num_examples": len(examples)}, pred


def make_greedy(method: Method, model: Model, max_new: int,
                eos_id: Optional[int] = None, cached: Optional[bool] = None,
                return_logits: bool = False) -> Callable:
  """jitted (params, batch, start) -> greedy ids (B, max_new).

  `batch` is a `generation_batch` (optionally with 'adapter_index' (B,)) and
  `start` (B,) each row's last prompt slot in the decoder buffer (0 for T5).
  The loop is `decoding.decode`; with `eos_id` a row emits 0 after its EOS and
  the remaining steps are skipped once every row has ended. The jit contains
  `method.apply`, so the method's interceptors are part of the trace.

  cached: None uses the KV cache iff the method declares `cached_decoding`
  (see the module docstring); True requires it; False recomputes the forward
  over the whole buffer at every step. return_logits: the function returns
  (ids, logits (B, max_new, V)), the logits each token was chosen from.
  """
  supported = transform.cached_decoding(method)
  if cached is None:
    cached = supported
  elif cached and not supported:
    raise ValueError(
        f"{type(method).__name__} does not declare cached_decoding = True "
        "(see mtjax.methods.transform), so it cannot decode with the KV "
        "cache; use cached=False (recomputation)")
  kind = trainer.model_kind(model)
  fn = _cached_greedy if cached else _greedy
  return jax.jit(functools.partial(fn, method, model, kind, int(max_new),
                                   decoding.eos_tuple(eos_id),
                                   bool(return_logits)))


def generation_inputs(method: Method, batch: dict, kind: str,
                      start: jax.Array) -> dict:
  """method.apply inputs of a generation batch (both decoding paths).

  The model inputs (`data.model_inputs`), 'adapter_index' when the batch has
  one, and, for a method naming a `prompt_end_input` (soft injection's
  'injection_position'), each row's last prompt slot `start`.
  """
  inputs = data.model_inputs(batch, kind)
  if "adapter_index" in batch:
    inputs["adapter_index"] = batch["adapter_index"]
  key = getattr(method, "prompt_end_input", None)
  if key:
    inputs[key] = jnp.asarray(start, jnp.int32)
  return inputs


def _greedy(method, model, kind, max_new, eos_ids, return_logits, params,
            batch, start):
  """Greedy decoding recomputing `method.apply` over the filled buffer.

  carry = (decoder buffer (B, W), slot (B,) whose logits choose the next
  token); each step writes the token after that slot and reruns the forward.
  """
  buf = batch["decoder_input_tokens"]
  width = buf.shape[1]
  rows = jnp.arange(buf.shape[0])

  def logits_at(buf, slot):
    b = dict(batch, decoder_input_tokens=buf)
    logits = method.apply(model, params, generation_inputs(method, b, kind,
                                                           start))
    return logits[rows, jnp.minimum(slot, width - 1)]

  def prefill():
    return logits_at(buf, start), (buf, start)

  def step(carry, tok):
    buf, slot = carry
    nxt = slot + 1
    at = jnp.minimum(nxt, width - 1)
    buf = buf.at[rows, at].set(jnp.where(nxt < width, tok, buf[rows, at]))
    return logits_at(buf, nxt), (buf, nxt)

  return decoding.decode(prefill, step, max_new, eos_ids=eos_ids, pad_id=0,
                         return_logits=return_logits)


def _cached_greedy(method, model, kind, max_new, eos_ids, return_logits,
                   params, batch, start):
  """Greedy decoding with the KV cache, through method.apply(decode=...)."""
  inputs = generation_inputs(method, batch, kind, start)
  fns = (_decoder_fns if kind == "decoder" else _t5_fns)(
      method, model, params, inputs, start, max_new)
  return decoding.decode(*fns, max_new, eos_ids=eos_ids, pad_id=0,
                         return_logits=return_logits)


def _decoder_fns(method, model, params, inputs, start, max_new):
  """(prefill, step) of a decoder-only model.

  The buffer holds row b's prompt in slots 0..start[b] (right padding after
  it); the prefill takes the P = W - max_new + 1 slots ending at start[b],
  left-padded (masked), so every row's next token goes to cache slot P (+
  what the method prepends, e.g. soft prompts). Positions follow the mask
  (HF's cumsum), as in the full forward. A row needs start + max_new <= W,
  which `generate_rows` guarantees; with a sliding-window model the left
  padding takes room in the window (as in HF).
  """
  ids, mask = inputs["input_ids"], inputs["attention_mask"]
  b, width = ids.shape
  p = max(width - max_new + 1, 1)
  src = jnp.arange(p)[None, :] - (p - 1 - start)[:, None]
  real = src >= 0
  src = jnp.clip(src, 0, width - 1)
  prompt = {
      "input_ids": jnp.where(real, jnp.take_along_axis(ids, src, 1), 0),
      "attention_mask": jnp.where(real, jnp.take_along_axis(mask, src, 1), 0)}
  rest = {k: v for k, v in inputs.items() if k not in prompt}
  key = getattr(method, "prompt_end_input", None)
  if key:
    rest[key] = jnp.full((b,), p - 1, jnp.int32)

  def apply(params, x, decode, cache):
    logits, cache = method.apply(model, params, {**rest, **x}, decode=decode,
                                 cache=cache)
    return logits[:, -1], cache

  # The creation pass only gives the cache's shapes (sized by its inputs).
  full = {"input_ids": jnp.zeros((b, p + max_new), jnp.int32),
          "attention_mask": jnp.ones((b, p + max_new), jnp.int32)}
  shapes = jax.eval_shape(
      lambda q: apply(q, full, transform.PREFILL, None)[1], params)
  cache = jax.tree.map(lambda t: jnp.zeros(t.shape, t.dtype), shapes)

  def prefill():
    return apply(params, prompt, transform.PREFILL, cache)

  def step(cache, tok):
    new = {"input_ids": tok[:, None],
           "attention_mask": jnp.ones_like(tok)[:, None]}
    return apply(params, new, transform.STEP, cache)

  return prefill, step


def _t5_fns(method, model, params, inputs, start, max_new):
  """(prefill, step) of an encoder-decoder model: encode once, cache the decoder.

  The decoder buffer's first slot (decoder_start_token_id) starts every row,
  as `generate_rows` lays it out (start = 0). The cache creation pass is a
  real decoder pass: it computes the cross-attention keys/values of the
  encoding, through the method's interceptors.
  """
  del start
  extra = {k: v for k, v in inputs.items()
           if k not in ("input_ids", "attention_mask", "decoder_input_ids",
                        "decoder_attention_mask")}
  enc = {"input_ids": inputs["input_ids"],
         "attention_mask": inputs["attention_mask"], **extra}
  encoded = method.apply(model, params, enc, method="encode")
  base = {"encoded": encoded, "attention_mask": inputs["attention_mask"],
          **extra}
  first = inputs["decoder_input_ids"][:, :1]

  def apply(tokens, decode, cache):
    logits, cache = method.apply(model, params,
                                 {**base, "decoder_input_ids": tokens},
                                 method="decode", decode=decode, cache=cache)
    return logits[:, -1], cache

  def prefill():
    _, cache = apply(jnp.broadcast_to(first, (first.shape[0], max_new)),
                     transform.PREFILL, None)
    return apply(first, transform.PREFILL, cache)

  def step(cache, tok):
    return apply(tok[:, None], transform.STEP, cache)

  return prefill, step


def generation_batch(input_ids: list, kind: str, lengths: dict,
                     max_new: int, pad_id: int = 0, lm: bool = False) -> tuple:
  """(numpy feature batch, start (B,)) of prompts for the greedy functions.

  Decoder-only: the buffer is inputs+targets (seqio's start slot, the prompt
  cut to its last Li tokens, then room for max_new tokens), every slot after
  the start slot attended causally (later slots are filled in); `start` is
  each prompt's last slot. T5: encoder inputs, a decoder buffer of
  max(targets, max_new) slots, start 0. pad_id, lm: as in `score_rows`.
  """
  li = lengths["inputs"]
  if kind == "encoder_decoder":
    lengths = dict(lengths, targets=max(lengths["targets"], max_new))
  else:
    lengths = dict(lengths, targets=max_new)
    # Keep room for the answer: a prompt keeps its last Li tokens (fit_row's
    # left truncation), never the max_new slots.
    input_ids = [list(i)[max(0, len(i) - li):] for i in input_ids]
  rows = [(ids, []) for ids in input_ids]
  feats = score_rows(rows, kind, lengths, pad_id=pad_id, lm=lm)
  width = feats["decoder_target_tokens"].shape[1]
  feats["decoder_target_tokens"] = np.ones_like(feats["decoder_target_tokens"])
  if kind == "encoder_decoder":
    start = np.zeros(len(rows), np.int32)
    feats["decoder_mask"] = np.ones_like(feats["decoder_target_tokens"])
  else:
    start = np.array([len(i) for i in input_ids], np.int32)
    after_start = (np.arange(width) >= 1)[None, :].astype(np.int32)
    feats["decoder_mask"] = np.maximum(feats["decoder_mask"], after_start)
  feats["decoder_loss_weights"] = np.ones_like(feats["decoder_loss_weights"])
  return feats, start


def generate_rows(greedy, model, params, input_ids, lengths, max_new,
                  batch_size, mesh, eos_id, pad_id=0, lm=False):
  """Greedy continuations (lists of ids, cut at EOS) of each input.

  pad_id, lm: the batch layout of `generation_batch` (as in `score_rows`).
  """
  kind = trainer.model_kind(model)
  # Decoder prompts go shortest first, each batch's buffer cut to its longest
  # prompt (rounded up to PROMPT_BUCKET, at most Li): a few shapes compile,
  # and a batch of short prompts stops paying for Li slots.
  order = np.arange(len(input_ids))
  if kind == "decoder":
    order = np.argsort([len(i) for i in input_ids], kind="stable")
  outputs = [None] * len(input_ids)
  rows = [(input_ids[k], []) for k in order]
  done = 0
  for chunk, n in _batches(rows, batch_size, mesh):
    chunk_lengths = lengths
    if kind == "decoder":
      longest = max(len(i) for i, _ in chunk[:n])
      chunk_lengths = dict(lengths, inputs=bucket(longest, lengths["inputs"]))
    feats, start = generation_batch([i for i, _ in chunk], kind,
                                    chunk_lengths, max_new, pad_id=pad_id,
                                    lm=lm)
    batch = trainer.put_global_batch(feats, mesh)
    start = trainer.put_global_batch({"s": start}, mesh)["s"]
    ids = np.asarray(fetch(greedy(params, batch, start)))[:n]
    for k, row in zip(order[done:done + n], ids.tolist(), strict=True):
      outputs[k] = row[:row.index(eos_id)] if eos_id in row else row
    done += n
  return outputs


def generation(greedy, model, params, examples, vocab, task, lengths,
               max_new, batch_size, mesh):
  """{'exact_match', **task metric fns} for greedy predictions."""
  outs = generate_rows(greedy, model, params,
                       [ex["input_ids"] for ex in examples], lengths, max_new,
                       batch_size, mesh, vocab.eos_id,
                       pad_id=data.pad_token_id(vocab), lm=data.lm_format(vocab))
  preds = [vocab.decode(o) for o in outs]
  targets = [ex["targets"] for ex in examples]
  match = data.answer_match(task, vocab)
  result = {"exact_match": float(np.mean(
      [match(p, t) for p, t in zip(preds, targets, strict=True)])),
            # prompts cut to their last Li tokens (generation_batch)
            "truncated": int(sum(len(ex["input_ids"]) > lengths["inputs"]
                                 for ex in examples)),
            "num_examples": len(examples)}
  for fn in data.metric_fns(task, vocab):
    for k, v in fn(targets=targets, predictions=preds).items():
      result.setdefault(k, float(v))
  return result, preds


def evaluate_task(fns, model, params, task, vocab, cfg, lengths, mesh,
                  return_correct: bool = False):
  """Metrics of one task (rank classification or generation) on its eval rows.

  fns: {'score': make_scorer(...), 'greedy': make_greedy(...)}.
  return_correct: also return per-example correctness (N,) float (the
  'accuracy' or 'exact_match' of each row), for bootstrap intervals.
  """
  examples = data.eval_examples(task, vocab, split=cfg.get("split",
                                                            "validation"),
                                max_examples=cfg.get("max_examples") or None)
  if not examples:
    raise ValueError(f"task {task!r} has no evaluation examples")
  if data.task_kind(task, vocab) == "rank_classification":
    metrics, pred = rank_classification(
        fns["score"], model, params, examples, lengths, cfg.batch_size, mesh,
        pad_id=data.pad_token_id(vocab), lm=data.lm_format(vocab))
    preds = [ex["answer_choices"][p] for ex, p in zip(examples, pred, strict=True)]
    targets = [ex["answer_choices"][ex["label"]] for ex in examples]
    for fn in data.metric_fns(task, vocab):
      for k, v in fn(targets=targets, predictions=preds).items():
        metrics.setdefault(k, float(v))
    correct = np.array([ex["label"] == p for ex, p in zip(examples, pred,
                                                          strict=True)], float)
    return (metrics, correct) if return_correct else metrics
  metrics, preds = generation(fns["greedy"], model, params, examples, vocab,
                              task, lengths, cfg.max_new_tokens,
                              cfg.batch_size, mesh)
  match = data.answer_match(task, vocab)
  correct = np.array([match(p, ex["targets"])
                      for p, ex in zip(preds, examples, strict=True)], float)
  return (metrics, correct) if return_correct else metrics


def evaluate_all(method, model, params, groups, vocab, cfg, lengths, mesh,
                 log=print):
  """{task: metrics} for every task of groups {group: [plain task names]}."""
  fns = {"score": make_scorer(method, model),
         "greedy": make_greedy(method, model, cfg.max_new_tokens,
                               eos_id=vocab.eos_id)}
  results = {}
  for group, tasks in groups.items():
    for task in tasks:
      if task not in results:
        results[task] = evaluate_task(fns, model, params, task, vocab, cfg,
                                      lengths, mesh)
        log(f"eval {group}/{task}: " + " ".join(
            f"{k}={v:.4f}" for k, v in sorted(results[task].items())))
  return results
