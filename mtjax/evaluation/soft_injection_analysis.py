"""Analysis of learned soft-injection head selections (see
mtjax/methods/soft_injection.py): per-task heatmaps of alpha over (layer, head)
and the overlap (Jaccard) of the top-k heads between tasks.
"""
import dataclasses
import itertools
import json
import os
from typing import Any

import numpy as np


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
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  tasks = sorted(alphas)
  fig, axes = plt.subplots(1, len(tasks), figsize=(2.2 * len(tasks) + 1, 2.8),
                           squeeze=False)
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
  fig.savefig(path, dpi=120, bbox_inches="tight")
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
  words = set()
  while len(words) < n:
    words.add("".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"),
                                 size=rng.integers(2, 6))))
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
  from mtjax.data import suite  # pylint: disable=g-import-not-at-top
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
  from mtjax.models import decoder  # pylint: disable=g-import-not-at-top
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
  import time  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from mtjax.data import suite  # pylint: disable=g-import-not-at-top
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
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  return nn.unbox(tree)
