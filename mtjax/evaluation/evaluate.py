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

Generation: greedy decoding with the shared loop `mtjax.models.decoding.decode`,
whose step recomputes the method's forward pass over the filled buffer (no
KV cache, so it works for every method, including soft prompts and routing;
answers here are short). Predictions are compared by exact match and
by the seqio task's metric functions.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from mtjax import data
from mtjax.models import decoding
from mtjax.training import trainer


def _pad(ids, length):
  ids = list(ids)[:length]
  return ids + [0] * (length - len(ids))


def score_rows(rows, kind, lengths):
  """Feature-converter batch (numpy) for (input_ids, target_ids) rows.

  Encoder-decoder: encoder_input_tokens (B, Li), decoder_* (B, Lt).
  Decoder: the concatenation inputs+targets (B, Li+Lt), loss on the targets.
  """
  li, lt = lengths["inputs"], lengths["targets"]
  if kind == "encoder_decoder":
    tgt = np.array([_pad(t, lt) for _, t in rows], np.int32)
    return {
        "encoder_input_tokens": np.array([_pad(i, li) for i, _ in rows],
                                         np.int32),
        "decoder_target_tokens": tgt,
        "decoder_input_tokens": np.pad(tgt[:, :-1], ((0, 0), (1, 0))),
        "decoder_loss_weights": (tgt > 0).astype(np.int32),
    }
  seqs, weights, causal = [], [], []
  for inp, tgt in rows:
    inp, tgt = list(inp)[:li], list(tgt)[:lt]
    seqs.append(_pad(inp + tgt, li + lt))
    weights.append(_pad([0] * len(inp) + [1] * len(tgt), li + lt))
    causal.append(_pad([1] * (len(inp) + 1), li + lt))
  seqs = np.array(seqs, np.int32)
  return {
      "decoder_target_tokens": seqs,
      "decoder_input_tokens": np.pad(seqs[:, :-1], ((0, 0), (1, 0))),
      "decoder_loss_weights": np.array(weights, np.int32),
      "decoder_causal_attention": np.array(causal, np.int32),
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


def rank_classification(scorer, model, params, examples, lengths, batch_size,
                        mesh):
  """{'accuracy', 'accuracy_norm'} and the predicted choice index per example."""
  kind = trainer.model_kind(model)
  rows, owner = [], []
  for e, ex in enumerate(examples):
    for ids in ex["choice_ids"]:
      rows.append((ex["input_ids"], ids))
      owner.append(e)
  sums, counts = [], []
  for chunk, n in _batches(rows, batch_size, mesh):
    batch = trainer.put_global_batch(score_rows(chunk, kind, lengths), mesh)
    s, c = fetch(scorer(params, batch))
    sums.append(s[:n])
    counts.append(c[:n])
  sums, counts = np.concatenate(sums), np.concatenate(counts)
  owner = np.array(owner)
  pred, pred_norm = [], []
  for e in range(len(examples)):
    idx = owner == e
    pred.append(int(np.argmax(sums[idx])))
    pred_norm.append(int(np.argmax(sums[idx] / np.maximum(counts[idx], 1))))
  labels = np.array([ex["label"] for ex in examples])
  return {"accuracy": float(np.mean(np.array(pred) == labels)),
          "accuracy_norm": float(np.mean(np.array(pred_norm) == labels))}, pred


def make_greedy(method, model, max_new, eos_id=None):
  """jitted (params, batch, start) -> greedy ids (B, max_new).

  `start` (B,) is each row's first target slot in the decoder buffer. The
  loop is `decoding.decode`; with `eos_id` a row emits 0 after its EOS and
  the remaining steps are skipped once every row has ended. The jit contains
  `method.apply`, so the method's interceptors are part of the trace.
  """
  kind = trainer.model_kind(model)
  return jax.jit(functools.partial(_greedy, method, model, kind, max_new,
                                   decoding.eos_tuple(eos_id)))


def _greedy(method, model, kind, max_new, eos_ids, params, batch, start):
  """Greedy decoding recomputing `method.apply` over the filled buffer.

  carry = (decoder buffer (B, W), slot (B,) whose logits choose the next
  token); each step writes the token after that slot and reruns the forward.
  """
  buf = batch["decoder_input_tokens"]
  width = buf.shape[1]
  rows = jnp.arange(buf.shape[0])

  def logits_at(buf, slot):
    b = dict(batch, decoder_input_tokens=buf)
    logits = method.apply(model, params, data.model_inputs(b, kind))
    return logits[rows, jnp.minimum(slot, width - 1)]

  def prefill():
    return logits_at(buf, start), (buf, start)

  def step(carry, tok):
    buf, slot = carry
    nxt = slot + 1
    at = jnp.minimum(nxt, width - 1)
    buf = buf.at[rows, at].set(jnp.where(nxt < width, tok, buf[rows, at]))
    return logits_at(buf, nxt), (buf, nxt)

  return decoding.decode(prefill, step, max_new, eos_ids=eos_ids, pad_id=0)


def generate_rows(greedy, model, params, input_ids, lengths, max_new,
                  batch_size, mesh, eos_id):
  """Greedy continuations (lists of ids, cut at EOS) of each input."""
  kind = trainer.model_kind(model)
  if kind == "encoder_decoder":
    lengths = dict(lengths, targets=max(lengths["targets"], max_new))
  else:
    lengths = dict(lengths, targets=max_new)
  outputs = []
  rows = [(ids, []) for ids in input_ids]
  for chunk, n in _batches(rows, batch_size, mesh):
    feats = score_rows(chunk, kind, lengths)
    full = {"decoder_target_tokens": np.ones_like(
        feats["decoder_target_tokens"])}
    if kind == "encoder_decoder":
      start = np.zeros(len(chunk), np.int32)
    else:
      start = np.array([min(len(i), lengths["inputs"]) for i, _ in chunk],
                       np.int32)
      # Causal attention over the whole buffer: later slots are filled in.
      full["decoder_causal_attention"] = feats["decoder_causal_attention"]
    feats.update(full)
    feats["decoder_loss_weights"] = np.ones_like(feats["decoder_loss_weights"])
    batch = trainer.put_global_batch(feats, mesh)
    start = trainer.put_global_batch({"s": start}, mesh)["s"]
    ids = np.asarray(fetch(greedy(params, batch, start)))[:n]
    for row in ids.tolist():
      outputs.append(row[:row.index(eos_id)] if eos_id in row else row)
  return outputs


def generation(greedy, model, params, examples, vocab, task, lengths,
               max_new, batch_size, mesh):
  """{'exact_match', **task metric fns} for greedy predictions."""
  outs = generate_rows(greedy, model, params,
                       [ex["input_ids"] for ex in examples], lengths, max_new,
                       batch_size, mesh, vocab.eos_id)
  preds = [vocab.decode(o) for o in outs]
  targets = [ex["targets"] for ex in examples]
  result = {"exact_match": float(np.mean(
      [p.strip() == t.strip() for p, t in zip(preds, targets, strict=True)]))}
  for fn in data.metric_fns(task, vocab):
    for k, v in fn(targets=targets, predictions=preds).items():
      result.setdefault(k, float(v))
  return result, preds


def evaluate_task(fns, model, params, task, vocab, cfg, lengths, mesh):
  """Metrics of one task (rank classification or generation) on its eval rows.

  fns: {'score': make_scorer(...), 'greedy': make_greedy(...)}.
  """
  examples = data.eval_examples(task, vocab, split=cfg.get("split",
                                                            "validation"),
                                max_examples=cfg.get("max_examples") or None)
  if not examples:
    raise ValueError(f"task {task!r} has no evaluation examples")
  if data.task_kind(task, vocab) == "rank_classification":
    metrics, pred = rank_classification(fns["score"], model, params, examples,
                                        lengths, cfg.batch_size, mesh)
    preds = [ex["answer_choices"][p] for ex, p in zip(examples, pred, strict=True)]
    targets = [ex["answer_choices"][ex["label"]] for ex in examples]
    for fn in data.metric_fns(task, vocab):
      for k, v in fn(targets=targets, predictions=preds).items():
        metrics.setdefault(k, float(v))
    return metrics
  metrics, _ = generation(fns["greedy"], model, params, examples, vocab, task,
                          lengths, cfg.max_new_tokens, cfg.batch_size, mesh)
  return metrics


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
