"""PHATGOOSE: post-hoc gates that route tokens among independently trained LoRAs.

Muqeeth, Liu, Liu, Raffel, "Learning to Route Among Specialized Experts for
Zero-Shot Generalization", ICML 2024 (arXiv:2402.05859).

1. Each expert is a LoRA trained on one task (mtjax.methods.lora).
2. Gate training, per expert and post hoc (base and LoRA frozen): every adapted
   module gets a gate vector v (init zeros) and computes
       y = x W + LoRA(x * sigmoid(<x, v>))
   trained on the expert's own task for a few steps (paper: 100). Gates are
   stored with the expert, so adding an expert never touches the others.
3. Inference (`RoutedLoRA`, strategy 'phatgoose'): in each module and for each
   token, scores <LN(x), LN(v_e)> / sqrt(d) over the E experts (LN = layer norm
   without affine parameters), softmax, keep the top k (default 2),
   renormalise, add the weighted expert outputs. Experts are applied by
   sort-and-segment (routing.apply_experts), so cost grows with k, not E.

`RoutedLoRA` also runs the library-based baselines (routing_baselines.py):
'arrow', 'fixed' (oracle / task-level / retrieval: fixed weights per module
or per example), 'uniform' (average of all experts' updates) and 'merged'
(average of the LoRA parameters).

Parameters of a routed model: {'base': ..., 'experts': nested by module path
{'lora_a': (E, d, r), 'lora_b': (E, r, o), 'gate': (E, d) | 'proto': (E, d) |
'weights': (E,)}}. With an 'experts' mesh axis (see `expert_mesh`) the leading
axis is sharded over it by the logical rule ('experts', 'experts').
"""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mtjax.methods import routing, transform
from mtjax.models import sharding

STRATEGIES = ("phatgoose", "arrow", "fixed", "uniform", "merged")


# ------------------------------------------------------------ gate training

class GateTraining:
  """One frozen LoRA expert plus trainable PHATGOOSE gates (step 2 above).

  params: {'base', 'lora': single-expert LoRA tree, 'gate': {path: {'gate':
  (d,)}}}; only 'gate/.*' is trained.
  """
  trainable = r"gate/.*"
  name = "phatgoose_gates"

  def __init__(self, lora, expert=None):
    self.lora = lora   # a mtjax.methods.lora.LoRA (rank, alpha, targets)
    self.expert = expert   # the expert's 'lora' tree, for init()

  def init(self, rng, model, base_params=None):
    """{'lora': the expert (frozen), 'gate': zeros}, boxed like LoRA.init."""
    del rng, base_params
    if self.expert is None:
      raise ValueError("GateTraining.init needs the expert: "
                       "GateTraining(lora, expert=lora_tree)")
    return {"lora": self.expert, "gate": self.init_gates(model)}

  def init_gates(self, model):
    """Zero gate per targeted module, with the kernel's input logical axis."""
    flat = {p: {"gate": transform.boxed(jnp.zeros((t.shape[0],), jnp.float32),
                                        (t.in_axis,))}
            for p, t in self.lora._targets(model).items()}
    return transform.nest(flat)

  def hook(self, next_fun, x, leaf, ctx):
    gate = jax.nn.sigmoid(x.astype(jnp.float32) @ leaf["gate"])[..., None]
    # LoRA's own hook adds the update of the gated input to the base output.
    return self.lora.hook(lambda _: next_fun(x), (x * gate).astype(x.dtype),
                          leaf, ctx)

  def apply(self, model, params, inputs, *, rng=None, deterministic=True,
            method=None):
    inputs = transform.model_kwargs(inputs)
    tree = merge_leaves(params["lora"], params["gate"])
    icpt = transform.linear_interceptor(tree, self.hook, None, rng,
                                        deterministic)
    return transform.run(model, params["base"], inputs, [icpt], rng=rng,
                         deterministic=deterministic, method=method)


def merge_leaves(*trees):
  """Per-module dicts merged: {path: {'lora_a', ...}} + {path: {'gate'}}."""
  out = {}
  for tree in trees:
    for path, leaf in transform.flatten(nn.unbox(tree)).items():
      out[path] = leaf
  return transform.nest(out)


# ----------------------------------------------------------------- library

def new_library():
  """An expert library: names and one {'lora': tree, 'gate': tree} per expert."""
  return {"names": [], "experts": []}


def add_expert(library, name, lora_tree, gate_tree=None):
  """A new library with one more expert; existing entries are shared as is."""
  if name in library["names"]:
    raise ValueError(f"expert {name!r} is already in the library")
  entry = {"lora": lora_tree}
  if gate_tree is not None:
    entry["gate"] = gate_tree
  return {"names": library["names"] + [name],
          "experts": library["experts"] + [entry]}


def stack_library(library, with_gates=True):
  """{path: {'lora_a': (E, d, r), 'lora_b': (E, r, o)[, 'gate': (E, d)]}}."""
  if not library["experts"]:
    raise ValueError("the expert library is empty: add experts first")
  keys = ("lora", "gate") if with_gates else ("lora",)
  flats = []
  for i, e in enumerate(library["experts"]):
    missing = [k for k in keys if k not in e]
    if missing:
      raise ValueError(f"expert {library['names'][i]!r} has no {missing}: train "
                       "its PHATGOOSE gates (train_gates) before routing")
    flats.append(transform.flatten(merge_leaves(*[e[k] for k in keys])))
  paths = sorted(flats[0])
  for name, f in zip(library["names"], flats):
    if sorted(f) != paths:
      raise ValueError(f"expert {name!r} adapts different modules than "
                       f"{library['names'][0]!r}; all experts need the same "
                       "LoRA targets")
  return transform.nest({p: jnp.stack([jnp.asarray(f[p]) for f in flats])
                         for p in paths})


LOGICAL = {"lora_a": lambda t: ("experts", t.in_axis, "rank"),
           "lora_b": lambda t: ("experts", "rank", t.out_axis),
           "gate": lambda t: ("experts", t.in_axis),
           "proto": lambda t: ("experts", t.in_axis),
           "weights": lambda t: ("experts",)}


def expert_axes(stacked, model):
  """Tree of logical axis names for a stacked library (for sharding)."""
  mods = transform.linear_modules(transform.abstract_params(model))
  flat = {}
  for path, _ in transform.flatten(stacked).items():
    mod, leaf = path.rsplit("/", 1)
    flat[path] = LOGICAL[leaf](mods[mod])
  return transform.nest(flat)


def expert_mesh(num_expert_shards, devices=None):
  """Mesh (data, fsdp, tensor, experts): experts sharded over the last axis.

  Tokens are split over 'data' as usual; each expert shard holds E/n experts
  of every module, and XLA partitions the sorted-assignment gathers over it.
  """
  return sharding.make_mesh((-1, 1, 1, num_expert_shards),
                            sharding.MESH_AXES + ("experts",), devices)


def shard_experts(stacked, model, mesh):
  """Places a stacked library by the logical rules ('experts' -> 'experts')."""
  axes = expert_axes(stacked, model)
  return jax.tree.map(
      lambda x, names: jax.device_put(x, jax.sharding.NamedSharding(
          mesh, sharding.logical_to_spec(names, x.shape, mesh))),
      stacked, axes, is_leaf=lambda x: isinstance(x, tuple))


# ---------------------------------------------------------------- routing

class RoutedLoRA:
  """Routing among a stacked LoRA library (see module docstring).

  strategy: 'phatgoose' (leaf 'gate'), 'arrow' (leaf 'proto'), 'fixed' (leaf
  'weights' (E,) per module, or inputs['expert_weights'] (B, E) per example),
  'uniform', 'merged'. top_k applies to phatgoose/arrow/fixed.
  """
  trainable = r"experts/.*/(weights)"
  name = "routed_lora"

  def __init__(self, lora, strategy="phatgoose", top_k=2, impl="auto"):
    if strategy not in STRATEGIES:
      raise ValueError(f"routing strategy {strategy!r}: use one of {STRATEGIES}")
    if top_k < 1:
      raise ValueError(f"top_k must be >= 1, got {top_k}")
    self.lora, self.strategy, self.top_k, self.impl = lora, strategy, top_k, impl

  def route(self, h, leaf, example_weights, batch):
    """(idx (N, k), w (N, k), logits (N, E) or None) for tokens h (N, d)."""
    num_e = leaf["lora_a"].shape[0]
    k = min(self.top_k, num_e)
    if self.strategy == "phatgoose":
      logits = routing.phatgoose_logits(h, leaf["gate"])
    elif self.strategy == "arrow":
      logits = routing.arrow_logits(h, leaf["proto"])
    else:   # fixed: per-example weights from the inputs, else per-module ones
      wts = leaf["weights"][None] if example_weights is None else example_weights
      vals, idx = jax.lax.top_k(wts.astype(jnp.float32), k)   # (B or 1, k)
      w = vals / jnp.maximum(vals.sum(-1, keepdims=True), 1e-9)
      reps = h.shape[0] // idx.shape[0]
      return (jnp.repeat(idx, reps, 0).astype(jnp.int32),
              jnp.repeat(w, reps, 0), None)
    idx, w = routing.top_k(logits, k)
    return idx, w, logits

  def hook(self, next_fun, x, leaf, ctx, example_weights=None, records=None):
    y = next_fun(x)
    dtype = ctx.module.dtype
    h = x.reshape(-1, x.shape[-1]).astype(dtype)
    a, b = leaf["lora_a"], leaf["lora_b"]
    if self.strategy == "uniform":
      delta = routing.apply_all_uniform(h, a, b)
    elif self.strategy == "merged":
      delta = (h @ a.mean(0).astype(dtype)) @ b.mean(0).astype(dtype)
    else:
      idx, w, logits = self.route(h, leaf, example_weights, x.shape[0])
      delta = routing.apply_experts(h, a, b, idx, w, self.impl)
      if records is not None:
        rec = {"idx": idx.reshape(x.shape[:-1] + idx.shape[-1:]),
               "w": w.reshape(x.shape[:-1] + w.shape[-1:])}
        if logits is not None:
          rec["entropy"] = routing.entropy(logits).reshape(x.shape[:-1])
        records[ctx.path] = rec
    delta = delta.reshape(y.shape[:-1] + (-1,)) * self.lora.scale
    return y + delta.astype(y.dtype)

  def apply(self, model, params, inputs, *, rng=None, deterministic=True,
            method=None, records=None):
    """Logits; when `records` is a dict it receives per-module routing."""
    example_weights = inputs.get("expert_weights")
    inputs = transform.model_kwargs(inputs)

    def hook(next_fun, x, leaf, ctx):
      return self.hook(next_fun, x, leaf, ctx, example_weights, records)
    icpt = transform.linear_interceptor(params["experts"], hook, None, rng,
                                        deterministic)
    return transform.run(model, params["base"], inputs, [icpt], rng=rng,
                         deterministic=deterministic, method=method)


def routed_params(base, stacked, strategy, weights=None):
  """{'base', 'experts'} for a RoutedLoRA strategy from a stacked library.

  weights: for 'fixed', (E,) shared by all modules or {path: (E,)}.
  """
  flat = transform.flatten(stacked)
  out = {}
  for path, x in flat.items():
    mod, leaf = path.rsplit("/", 1)
    if leaf in ("lora_a", "lora_b"):
      out[path] = x
    elif leaf == "gate" and strategy == "phatgoose":
      out[path] = x
  if strategy == "phatgoose" and not any(p.endswith("/gate") for p in out):
    raise ValueError("strategy 'phatgoose' needs gates in the library")
  mods = sorted({p.rsplit("/", 1)[0] for p in out})
  if strategy == "arrow":
    for m in mods:
      out[m + "/proto"] = routing.arrow_prototypes(flat[m + "/lora_a"],
                                                   flat[m + "/lora_b"])
  if strategy == "fixed":
    if weights is None:
      raise ValueError("strategy 'fixed' needs weights (E,) or {path: (E,)}")
    for m in mods:
      w = weights[m] if isinstance(weights, dict) else weights
      out[m + "/weights"] = jnp.asarray(w, jnp.float32)
  return {"base": base, "experts": transform.nest(out)}


# ------------------------------------------------------------ diagnostics

_BLOCK = re.compile(r"(encoder|decoder|model)/(?:block|layers)_(\d+)")


def layer_name(path):
  """'encoder/block_3/...' -> 'enc3', 'decoder/block_0/...' -> 'dec0'."""
  m = _BLOCK.search(path)
  if not m:
    return path
  return {"encoder": "enc", "decoder": "dec", "model": "L"}[m.group(1)] + \
      m.group(2)


def token_mask(path, shape, inputs):
  """Which of a module's (B, T) tokens are real (not padding)."""
  enc = inputs.get("attention_mask")
  dec = inputs.get("decoder_attention_mask")
  reads_encoder = path.startswith("encoder") or re.search(
      r"EncDecAttention/(k|v)$", path)
  mask = enc if (reads_encoder or dec is None) else dec
  if mask is None or tuple(mask.shape) != tuple(shape):
    return np.ones(shape, bool)
  return np.asarray(mask) > 0


def summarize_records(records, inputs, num_experts, own_expert=None):
  """Per module: entropy (mean over real tokens), load (E,), oracle agreement.

  own_expert: the task's own expert index (held-in tasks) or None.
  Returns {path: {'entropy', 'load', 'top1_own', 'topk_own', 'tokens'}}.
  """
  out = {}
  for path, rec in records.items():
    idx = np.asarray(rec["idx"])
    mask = token_mask(path, idx.shape[:-1], inputs)
    sel = idx[mask]                                   # (n, k)
    load = np.bincount(sel.reshape(-1), minlength=num_experts).astype(float)
    row = {"tokens": int(mask.sum()), "load": load / max(load.sum(), 1.0)}
    if "entropy" in rec:
      row["entropy"] = float(np.asarray(rec["entropy"])[mask].mean())
    if own_expert is not None:
      row["top1_own"] = float(np.mean(sel[:, 0] == own_expert))
      row["topk_own"] = float(np.mean(np.any(sel == own_expert, -1)))
    out[path] = row
  return out


def by_layer(summary, key):
  """Mean of a scalar diagnostic over the modules of each layer."""
  acc = {}
  for path, row in summary.items():
    if key in row:
      acc.setdefault(layer_name(path), []).append(row[key])
  return {k: float(np.mean(v)) for k, v in sorted(acc.items(), key=_layer_key)}


def _layer_key(item):
  name = item[0]
  m = re.match(r"([a-zA-Z]+)(\d+)$", name)
  return (m.group(1), int(m.group(2))) if m else (name, 0)


def layer_loads(summary):
  """{layer: (E,) mean load over its modules}."""
  acc = {}
  for path, row in summary.items():
    acc.setdefault(layer_name(path), []).append(row["load"])
  return {k: np.mean(v, 0) for k, v in sorted(acc.items(), key=_layer_key)}


def plot_routing(loads_by_task, expert_names, path, title="PHATGOOSE routing"):
  """PNG: one heat map per task, layers (rows) x experts (columns) = load."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  tasks = list(loads_by_task)
  if not tasks:
    raise ValueError("plot_routing: no tasks to plot")
  fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 5),
                           squeeze=False)
  for ax, task in zip(axes[0], tasks):
    layers_ = list(loads_by_task[task])
    mat = np.stack([loads_by_task[task][l] for l in layers_])
    im = ax.imshow(mat, aspect="auto", cmap="viridis", vmin=0)
    ax.set_title(task, fontsize=9)
    ax.set_yticks(range(len(layers_)), layers_, fontsize=7)
    if len(expert_names) <= 32:
      ax.set_xticks(range(len(expert_names)), expert_names, rotation=90,
                    fontsize=7)
    ax.set_xlabel("expert")
    fig.colorbar(im, ax=ax, fraction=0.04)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path
