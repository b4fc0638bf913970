"""Soft injection experiments (mtjax/methods/soft_injection.py; "Soft Injection
of Task Embeddings Outperforms Prompt-Based In-Context Learning", 2025).

  * analysis: per-task heatmaps of the learned alpha over (layer, head) and
    the overlap (Jaccard) of the top-k heads between tasks;
  * the test bed: a small Llama-style decoder trained on the bundled suite in
    MetaICL format (train_testbed);
  * prompts, scoring and timed generation shared by the tests, the benchmark
    and `run_experiment` (the configs/soft_injection.py job), which compares
    zero-shot, k-shot ICL, soft injection and prompt tuning per task.
"""
import dataclasses
import itertools
import json
import os
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtjax import data
from mtjax.data import suite
from mtjax.evaluation import plots
from mtjax.experiments.train import JOBS
from mtjax.methods import prompt_tuning
from mtjax.methods import soft_injection as si
from mtjax.models import decoder


def top_k_heads(alpha, k):
  """(L, H) alpha -> set of (layer, head) of the k largest values."""
  alpha = np.asarray(alpha)
  flat = np.argsort(-alpha, axis=None, kind="stable")[:k]
  return {tuple(int(i) for i in np.unravel_index(f, alpha.shape)) for f in flat}


def jaccard_matrix(alphas, k):
  """{task: (L, H)} -> (tasks, (n, n) Jaccard overlap of their top-k heads)."""
  tasks = sorted(alphas)
  tops = {t: top_k_heads(alphas[t], k) for t in tasks}
  mat = np.ones((len(tasks), len(tasks)))
  for (i, a), (j, b) in itertools.product(enumerate(tasks), repeat=2):
    mat[i, j] = len(tops[a] & tops[b]) / max(1, len(tops[a] | tops[b]))
  return tasks, mat


def format_jaccard(tasks, mat, k):
  width = max(len(t) for t in tasks)
  lines = [f"Jaccard overlap of top-{k} heads"]
  lines.append(" " * width + " " + " ".join(f"{t[:8]:>8}" for t in tasks))
  for t, row in zip(tasks, mat):
    lines.append(f"{t:>{width}} " + " ".join(f"{v:8.2f}" for v in row))
  return "\n".join(lines)


def plot_alpha_heatmaps(alphas, path, title="soft-injection alpha"):
  """One heatmap (layers x heads, colour = alpha in [0, 1]) per task -> PNG path."""
  plt = plots.pyplot()
  tasks = sorted(alphas)
  fig, axes = plt.subplots(1, len(tasks), figsize=(2.2 * len(tasks) + 1, 3.0),
                           squeeze=False, constrained_layout=True)
  for ax, task in zip(axes[0], tasks):
    a = np.asarray(alphas[task])
    im = ax.imshow(a, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    ax.set_title(task, fontsize=8)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(a.shape[1]))
    ax.set_yticks(range(a.shape[0]))
  fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="alpha")
  fig.suptitle(title, fontsize=9)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def write_analysis(alphas, workdir, k=None):
  """Heatmap PNG + Jaccard JSON/text under workdir; returns (png, text)."""
  some = np.asarray(next(iter(alphas.values())))
  k = k or max(1, some.size // 4)
  png = plot_alpha_heatmaps(alphas, os.path.join(workdir, "alpha_heatmap.png"))
  tasks, mat = jaccard_matrix(alphas, k)
  text = format_jaccard(tasks, mat, k)
  with open(os.path.join(workdir, "head_overlap.json"), "w") as f:
    json.dump({"k": k, "tasks": tasks, "jaccard": mat.tolist(),
               "top_k": {t: sorted(top_k_heads(alphas[t], k)) for t in tasks},
               "alpha": {t: np.asarray(alphas[t]).tolist() for t in tasks}},
              f, indent=1)
  with open(os.path.join(workdir, "head_overlap.txt"), "w") as f:
    f.write(text + "\n")
  return png, text


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
                  model_kwargs=None, log_every=100):
  """Trains the test-bed decoder with a compact optax loop -> TestBed."""
  tasks = list(tasks or suite.HELD_IN)
  model = testbed_model(vocab, **(model_kwargs or {}))
  params = model.init(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32))
  params = nn_unbox(params["params"])
  sched = optax.warmup_cosine_decay_schedule(0.0, learning_rate, max(1, steps // 10), steps,
                                             learning_rate * 0.1)
  opt = optax.chain(optax.clip_by_global_norm(1.0),
                    optax.adamw(sched, weight_decay=0.01))
  state = opt.init(params)

  def loss_fn(p, ids, w):
    logits = model.apply({"params": p}, ids[:, :-1], (ids[:, :-1] != 0))
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:])
    return (ce * w[:, 1:]).sum() / jnp.maximum(w[:, 1:].sum(), 1.0)

  @jax.jit
  def step(p, s, ids, w):
    loss, g = jax.value_and_grad(loss_fn)(p, ids, w)
    upd, s = opt.update(g, s, p)
    return optax.apply_updates(p, upd), s, loss

  batches = testbed_batches(tasks, vocab, batch_size, max_len, max_shots,
                            remap_prob, seed)
  losses, start = [], time.time()
  for i in range(steps):
    ids, w = next(batches)
    params, state, loss = step(params, state, ids, w)
    if (i + 1) % log_every == 0 or i + 1 == steps:
      losses.append((i + 1, float(loss)))
  return TestBed(model, params, vocab, losses, time.time() - start)


def nn_unbox(tree):
  return nn.unbox(tree)


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


def first_token_batch(examples, encode, max_len):
  """Zero-shot prompts + first target token, for fitting alpha."""
  ids, mask = left_pad([render([], ex, encode, max_len) for ex in examples])
  first = np.asarray([encode(ex["targets"] + "\n")[0] for ex in examples],
                     np.int32)
  return {"input_ids": ids, "attention_mask": mask, "first_target": first}


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
  for (idx, _), res in zip(batches, results):
    res = np.asarray(res)
    for j, i in enumerate(idx):
      outs[i] = res[j]
  return outs, seconds / len(prompts)


def exact_match(vocab, outputs, examples, stop_id):
  preds = [decode_answer(vocab, o, stop_id) for o in outputs]
  return float(np.mean([p == ex["targets"].strip()
                        for p, ex in zip(preds, examples)])), preds


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
  """Right-padded zero-shot prompt + 'y\\n' with loss weights on 'y\\n'."""
  rows, weights = [], []
  for ex in examples:
    a = render([], ex, encode, max_len)
    b = encode(ex["targets"] + "\n")
    rows.append(a + b)
    weights.append([0] * len(a) + [1] * len(b))
  t = max(len(r) for r in rows)
  ids = np.zeros((len(rows), t), np.int32)
  w = np.zeros((len(rows), t), np.float32)
  for i, (r, wt) in enumerate(zip(rows, weights)):
    ids[i, :len(r)] = r
    w[i, :len(r)] = wt
  return {"input_ids": ids, "attention_mask": (ids != 0).astype(np.int32),
          "weights": w}


def fit_prompt(model, params, train, val, *, length=10, steps=400,
               learning_rate=0.1, batch_size=1, eval_every=10, seed=0):
  """Prompt tuning (Lester et al. 2021) with the same budget as fit_alpha.

  train / val: `target_batch` dicts. Loss: cross-entropy of the whole target.
  Keeps the prompt with the best validation loss. -> (prompt (P, d), best loss)
  """
  method = prompt_tuning.PromptTuning(length=length, init="vocab",
                                      sample_vocab=model.config.vocab_size)
  tree = nn.unbox(method.init(jax.random.key(seed), model, params))["prompt"]

  def loss_fn(prompt_tree, b):
    logits = method.apply(model, {"base": params, "prompt": prompt_tree},
                          {"input_ids": b["input_ids"],
                           "attention_mask": b["attention_mask"]})
    ce = optax.softmax_cross_entropy_with_integer_labels(
        logits[:, :-1], b["input_ids"][:, 1:])
    w = b["weights"][:, 1:]
    return (ce * w).sum() / jnp.maximum(w.sum(), 1.0)

  opt = optax.adam(learning_rate)

  @jax.jit
  def step(t, s, b):
    loss, g = jax.value_and_grad(loss_fn)(t, b)
    u, s = opt.update(g, s, t)
    return optax.apply_updates(t, u), s, loss

  val_loss = jax.jit(loss_fn)
  val = {k: jnp.asarray(v) for k, v in val.items()}
  rng = np.random.default_rng(seed)
  n = len(train["input_ids"])
  state = opt.init(tree)
  best = (float(val_loss(tree, val)), tree)
  for i in range(1, steps + 1):
    idx = rng.choice(n, size=batch_size, replace=False)
    tree, state, _ = step(tree, state, {k: v[idx] for k, v in train.items()})
    if i % eval_every == 0 or i == steps:
      v = float(val_loss(tree, val))
      if v < best[0]:
        best = (v, tree)
  return best[1]["embedding"], best[0]


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
  fit = si.fit_alpha(model, params, emb,
                     first_token_batch(fit_rows, enc, cfg.max_prompt_len),
                     first_token_batch(val_rows, enc, cfg.max_prompt_len),
                     steps=cfg.alpha.steps, learning_rate=cfg.alpha.learning_rate,
                     batch_size=cfg.alpha.batch_size, seed=seed)
  alpha = si.alpha_of(fit.alpha_logits)
  evaluate("soft-injection", zero, si.injected_prefill, (emb, alpha, None),
           lambda i, m, pos: si.apply_injected(
               model, params, {"input_ids": i, "attention_mask": m}, emb,
               alpha, positions=pos))
  extra.update(alpha=np.asarray(alpha), embedding=np.asarray(emb),
               best_step=fit.best_step, best_val_loss=fit.best_val_loss)

  if cfg.prompt_tuning.length:
    prompt, _ = fit_prompt(
        model, params, target_batch(fit_rows, enc, cfg.max_prompt_len),
        target_batch(val_rows, enc, cfg.max_prompt_len),
        length=cfg.prompt_tuning.length, steps=cfg.alpha.steps,
        learning_rate=cfg.prompt_tuning.learning_rate,
        batch_size=cfg.alpha.batch_size, seed=seed)
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
  fmt = lambda r: f"{r['em']:>6.2f}{r['first']:>5.2f}{r['nll']:>6.2f}{r['sec'] * 1e3:>6.1f}"
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
            np.log(extra["alpha"] / (1 - extra["alpha"])),
            num_prompts=config.num_prompts, num_shots=config.num_shots,
            best_step=extra["best_step"], best_val_loss=extra["best_val_loss"])
    print(task, json.dumps(rows), flush=True)
  table = format_table(results)
  print("EM: exact match of the greedy answer; 1st: first answer token "
        "accuracy; NLL: target loss per token; ms/ex: greedy generation time "
        "per example")
  print(table)
  png, overlap = write_analysis(alphas, workdir, k=config.top_k or None)
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
  for p, ex in zip(prompts, examples):
    y = encode(ex["targets"] + "\n")
    rows.append(list(p) + y)
    pos.append(len(p) - 1)
    spans.append((len(p), len(p) + len(y)))
  t = -(-max(len(r) for r in rows) // 32) * 32
  ids = np.zeros((len(rows), t), np.int32)
  w = np.zeros((len(rows), t), np.float32)
  for i, (r, (a, b)) in enumerate(zip(rows, spans)):
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
