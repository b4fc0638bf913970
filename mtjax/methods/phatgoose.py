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
import os
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


def save_library(library, root, lora, overwrite=False):
  """Writes each expert (LoRA + its gates) as a mtjax.methods.library folder.

  An expert's folder holds {'lora': ..., 'gate': ...}; adding an expert later
  writes one new folder and leaves the others' files untouched.
  """
  from mtjax.methods import library as disk  # pylint: disable=g-import-not-at-top
  lib = disk.Library(root)
  cfg = {"name": "lora", "rank": lora.rank, "alpha": lora.alpha,
         "targets": list(lora.targets or ())}
  have = set(e.name for e in lib.list()) if os.path.isdir(root) else set()
  for name, entry in zip(library["names"], library["experts"]):
    if name not in have or overwrite:   # existing experts are left as they are
      lib.add(name, cfg, entry, task=name, overwrite=overwrite)
  return root


def load_library(root, names=None):
  """The in-memory library from expert folders written by `save_library`."""
  from mtjax.methods import library as disk  # pylint: disable=g-import-not-at-top
  lib = disk.Library(root)
  names = names or [e.name for e in lib.list()]
  out = new_library()
  for name in names:
    params = lib.get(name).params()
    out = add_expert(out, name, params["lora"], params.get("gate"))
  return out


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
      return fixed_choices(wts, k, h.shape[0]) + (None,)
    idx, w = routing.top_k(logits, k)
    return idx, w, logits

  def routing_inputs(self, inputs):
    """What `route` receives as example_weights, taken from the inputs."""
    return inputs.get("expert_weights")

  def impl_for(self, example_weights):
    """The routing.apply_experts impl of one call."""
    del example_weights
    return self.impl

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
      delta = routing.apply_experts(h, a, b, idx, w,
                                    self.impl_for(example_weights))
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
    example_weights = self.routing_inputs(inputs)
    inputs = transform.model_kwargs(inputs)

    def hook(next_fun, x, leaf, ctx):
      return self.hook(next_fun, x, leaf, ctx, example_weights, records)
    icpt = transform.linear_interceptor(params["experts"], hook, None, rng,
                                        deterministic)
    return transform.run(model, params["base"], inputs, [icpt], rng=rng,
                         deterministic=deterministic, method=method)


def fixed_choices(weights, k, num_tokens):
  """Top k of per-example (B, E) or shared (1, E) weights, renormalised and
  repeated for each example's tokens: idx (N, k) int32, w (N, k)."""
  vals, idx = jax.lax.top_k(weights.astype(jnp.float32), k)
  w = vals / jnp.maximum(vals.sum(-1, keepdims=True), 1e-9)
  reps = num_tokens // idx.shape[0]
  return jnp.repeat(idx, reps, 0).astype(jnp.int32), jnp.repeat(w, reps, 0)


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
  order = {"enc": 0, "L": 0, "dec": 1}
  return ((order.get(m.group(1), 2), int(m.group(2))) if m
          else (3, name))


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


# ---------------------------------------------------------------- pipeline
# run(config, workdir): base -> one LoRA expert per held-in task -> gates ->
# every method on held-in and held-out tasks (configs/phatgoose.py).

_T0 = [None]


def _log(msg):
  import time  # pylint: disable=g-import-not-at-top
  _T0[0] = _T0[0] or time.time()
  print(f"[{time.time() - _T0[0]:6.0f}s] {msg}", flush=True)


class _Fitter:
  """Trains one method's trainable leaves with mtjax.training.trainer pieces.

  The jitted step is built once and reused for every call with the same
  shapes (all experts, all gate sets), so each stage compiles once.
  """

  def __init__(self, method, model, mesh, opt_cfg, num_steps, seed=0):
    from mtjax.training import trainer  # pylint: disable=g-import-not-at-top
    self.t, self.method, self.model, self.mesh = trainer, method, model, mesh
    self.num_steps = num_steps
    self.tx, _ = trainer.make_optimizer(opt_cfg, max(num_steps, 1))
    self.step = trainer.make_train_step(method, model, self.tx, 64, 1, seed)
    self.fn = None

  def __call__(self, flat, flat_sh, batches, adapter_map=None):
    """Trained full param tree and the last loss."""
    t = self.t
    trainable, frozen = t.split_trainable(flat, self.method.trainable)
    state, state_sh = t.init_state(
        self.tx, trainable, {k: flat_sh[k] for k in trainable}, self.mesh)
    frozen = {k: jax.device_put(v, flat_sh[k]) for k, v in frozen.items()}
    if self.fn is None:
      self.fn = t.jit_train_step(self.step, state_sh,
                                 {k: flat_sh[k] for k in frozen}, self.mesh)
    loss = float("nan")
    for _ in range(self.num_steps):
      host = next(batches)
      host["task_index"] = np.minimum(host["task_index"], 63)
      if adapter_map is not None:
        host["adapter_index"] = adapter_map[host["task_index"]]
      state, m = self.fn(state, frozen, t.put_batch(host, self.mesh))
    if self.num_steps:
      loss = float(m["loss"])
    return t.unflatten({**state["params"], **frozen}), loss


def _flat_with_shardings(method, model, mesh, base, rng):
  from mtjax.training import trainer  # pylint: disable=g-import-not-at-top
  return trainer.init_params(model, method, rng, mesh, base)


def _batches(ctx, name, seed):
  from mtjax import data  # pylint: disable=g-import-not-at-top
  return data.train_batches(ctx["reg"].seqio_name(name), ctx["vocab"],
                            ctx["lengths"], ctx["config"].batch_size,
                            ctx["kind"], seed=seed)


def _mixture(ctx, seed):
  """Held-in mixture batches and its task names in mixture order (the
  'task_index' of each row indexes this list)."""
  it = _batches(ctx, "held_in", seed)
  plain = {v: k for k, v in ctx["reg"].names.items()}
  return it, [plain.get(n, n) for n in it.task_names]


def _eval_inputs(ctx, task, max_examples):
  """Teacher-forced model-input batches of a task's eval examples."""
  from mtjax import data  # pylint: disable=g-import-not-at-top
  from mtjax.evaluation import evaluate  # pylint: disable=g-import-not-at-top
  cfg = ctx["config"]
  exs = data.eval_examples(task, ctx["vocab"], split=cfg.eval.split,
                           max_examples=max_examples)
  rows = [(e["input_ids"], e["target_ids"]) for e in exs]
  bs = cfg.eval.batch_size
  out = []
  for start in range(0, len(rows), bs):
    chunk = rows[start:start + bs]
    chunk = chunk + [chunk[0]] * (bs - len(chunk))   # fixed shape, one compile
    batch = evaluate.score_rows(chunk, ctx["kind"], ctx["lengths"])
    out.append(data.model_inputs(batch, ctx["kind"]))
  return out, len(rows)


def _evaluate(ctx, name, method, params_for_task, tasks):
  """{task: metrics} with one compiled scorer/greedy for all tasks."""
  from mtjax.evaluation import evaluate  # pylint: disable=g-import-not-at-top
  cfg = ctx["config"]
  key = ("eval_fns", id(method))
  if key not in ctx:   # one compilation per method object, not per task
    ctx[key] = (method, {
        "score": evaluate.make_scorer(method, ctx["model"]),
        "greedy": evaluate.make_greedy(method, ctx["model"],
                                       cfg.eval.max_new_tokens)})
  fns = ctx[key][1]
  res = {}
  for task in tasks:
    res[task] = evaluate.evaluate_task(
        fns, ctx["model"], params_for_task(task), task, ctx["vocab"], cfg.eval,
        ctx["lengths"], ctx["mesh"])
  _log(f"[{name}] " + " ".join(f"{t}={_headline(m):.3f}"
                                for t, m in res.items()))
  return res


def _headline(metrics):
  for key in ("accuracy", "exact_match"):
    if key in metrics:
      return float(metrics[key])
  return float(next(iter(metrics.values())))


def _route_records(ctx, method, params, task, max_examples):
  """[(records, inputs)] of a routed method on a task's eval inputs."""
  key = ("records", id(method))
  if key not in ctx:
    def fn(p, inp):
      rec = {}
      method.apply(ctx["model"], p, inp, records=rec)
      return rec
    ctx[key] = (method, jax.jit(fn))
  out = []
  batches, n = _eval_inputs(ctx, task, max_examples)
  for inp in batches:
    rec = jax.device_get(ctx[key][1](params, inp))
    out.append((rec, jax.device_get(inp)))
  return out, n


def diagnostics(ctx, method, params_for_task, tasks, own, num_experts):
  """Per task: entropy and oracle agreement per layer, load per expert."""
  out, loads = {}, {}
  for task in tasks:
    recs, _ = _route_records(ctx, method, params_for_task(task), task,
                             ctx["config"].diagnostics_examples)
    merged = {}
    for rec, inp in recs:
      for path, row in summarize_records(rec, inp, num_experts,
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
    loads[task] = layer_loads(merged)
    out[task] = {
        "entropy_by_layer": by_layer(merged, "entropy"),
        "load": np.mean([m["load"] for m in merged.values()], 0).tolist()}
    if task in own:
      out[task]["top1_own_by_layer"] = by_layer(merged, "top1_own")
      out[task]["topk_own_by_layer"] = by_layer(merged, "topk_own")
      out[task]["top1_own"] = float(np.mean(
          [m["top1_own"] for m in merged.values()]))
  return out, loads


def save_choices(ctx, method, params_for_task, tasks, path):
  """npz of per-token, per-module choices: '<task>|<module>|idx' etc."""
  arrays = {}
  for task in tasks:
    recs, n = _route_records(ctx, method, params_for_task(task), task,
                             ctx["config"].diagnostics_examples)
    for mod in recs[0][0]:
      for key in ("idx", "w"):
        arrays[f"{task}|{mod}|{key}"] = np.concatenate(
            [r[mod][key] for r, _ in recs])[:n]
      arrays[f"{task}|{mod}|mask"] = np.concatenate(
          [token_mask(mod, r[mod]["idx"].shape[:-1], i) for r, i in recs])[:n]
  np.savez_compressed(path, **arrays)
  return path


def _opt(config, lr):
  opt = config.optimizer.copy_and_resolve_references() if hasattr(
      config.optimizer, "copy_and_resolve_references") else dict(
          config.optimizer)
  opt.learning_rate = lr
  return opt


def train_library(ctx, base, lora, rng):
  """One LoRA expert per held-in task, then its gates: the library."""
  cfg = ctx["config"]
  model, mesh = ctx["model"], ctx["mesh"]
  fit = _Fitter(lora, model, mesh, _opt(cfg, cfg.expert_lr), cfg.expert_steps,
                cfg.seed)
  experts = []
  for i, task in enumerate(ctx["held_in"]):
    flat, sh = _flat_with_shardings(lora, model, mesh, base,
                                    jax.random.fold_in(rng, i))
    p, loss = fit(flat, sh, _batches(ctx, task, cfg.seed + i))
    experts.append(p["lora"])
    _log(f"expert {task}: {cfg.expert_steps} steps, loss {loss:.3f}")
  gates = GateTraining(lora)
  gfit = _Fitter(gates, model, mesh, _opt(cfg, cfg.gate_lr), cfg.gate_steps,
                 cfg.seed)
  library = new_library()
  for i, task in enumerate(ctx["held_in"]):
    gates.expert = experts[i]
    flat, sh = _flat_with_shardings(gates, model, mesh, base, rng)
    p, loss = gfit(flat, sh, _batches(ctx, task, cfg.seed + 1000 + i))
    library = add_expert(library, task, experts[i], p["gate"])
    _log(f"gates {task}: {cfg.gate_steps} steps, loss {loss:.3f}")
  return library


def _table(results, held_in, held_out):
  """Text table (rows methods, columns tasks + averages) and averages dict."""
  tasks = held_in + held_out
  cols = tasks + ["avg_held_in", "avg_held_out"]
  rows, avgs = [], {}
  for name, res in results.items():
    vals = {t: _headline(res[t]) for t in tasks if t in res}
    hi = [vals[t] for t in held_in if t in vals]
    ho = [vals[t] for t in held_out if t in vals]
    vals["avg_held_in"] = float(np.mean(hi)) if hi else float("nan")
    vals["avg_held_out"] = float(np.mean(ho)) if ho else float("nan")
    avgs[name] = {"held_in": vals["avg_held_in"],
                  "held_out": vals["avg_held_out"]}
    rows.append((name, vals))
  short = [c[:9] for c in cols]
  lines = ["method".ljust(12) + " ".join(s.rjust(9) for s in short)]
  for name, vals in rows:
    lines.append(name.ljust(12) + " ".join(
        f"{vals.get(c, float('nan')):9.3f}" for c in cols))
  return "\n".join(lines), avgs


def setup(config):
  """Mesh, data registry, model and base params (trained if base_steps)."""
  from mtjax import data  # pylint: disable=g-import-not-at-top
  from mtjax.methods import lora as lora_lib  # pylint: disable=g-import-not-at-top
  from mtjax.training import trainer  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh(tuple(config.mesh_shape))
  vocab = data.vocabulary(config.data.vocab)
  reg = data.register(vocab)
  rng = jax.random.key(config.seed)
  model_cfg = config.model.copy_and_resolve_references()
  if not model_cfg.get("hf_path") and not model_cfg.vocab_size:
    model_cfg.vocab_size = vocab.vocab_size
  model, base = trainer.build_model(model_cfg, rng, mesh)
  ctx = dict(config=config, vocab=vocab, reg=reg, model=model, mesh=mesh,
             kind=trainer.model_kind(model), rng=rng,
             lengths={"inputs": config.data.inputs_length,
                      "targets": config.data.targets_length},
             held_in=list(config.held_in or reg.held_in),
             held_out=list(config.held_out or reg.held_out),
             lora=lora_lib.LoRA(rank=config.expert.rank,
                                alpha=config.expert.alpha,
                                targets=tuple(config.expert.targets)))
  if config.base_steps:
    full = trainer.FullFineTuning()
    with sharding.use_mesh(mesh):
      flat, sh = _flat_with_shardings(full, model, mesh, base, rng)
      p, loss = _Fitter(full, model, mesh, _opt(config, config.base_lr),
                        config.base_steps, config.seed)(
                            flat, sh, _batches(ctx, config.base_mixture,
                                               config.seed + 7))
    base = p["base"]
    _log(f"base: {config.base_steps} steps on {config.base_mixture}, "
         f"loss {loss:.3f}")
  ctx["base"] = base
  return ctx


def run(config, workdir):
  """The full pipeline of configs/phatgoose.py; returns the results dict."""
  import json  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  from mtjax import data  # pylint: disable=g-import-not-at-top
  from mtjax.methods import routing_baselines as rb  # pylint: disable=g-import-not-at-top
  from mtjax.training import trainer  # pylint: disable=g-import-not-at-top

  t_start = time.time()
  _check_workdir(workdir, config)
  os.makedirs(workdir, exist_ok=True)
  ctx = setup(config)
  mesh, model, base, lora = ctx["mesh"], ctx["model"], ctx["base"], ctx["lora"]
  held_in, held_out, rng = ctx["held_in"], ctx["held_out"], ctx["rng"]
  kind = ctx["kind"]
  methods = [m for m in config.methods.split(",") if m]
  results, diag, errors, plot = {}, {}, {}, {}
  with sharding.use_mesh(mesh):
    lib_dir = config.get("library_dir") or os.path.join(workdir, "library")
    if config.get("library_dir") and os.path.isdir(lib_dir):
      library = load_library(lib_dir, held_in)   # base must match (base_steps)
      _log(f"loaded {len(held_in)} experts with gates from {lib_dir}")
    else:
      library = train_library(ctx, base, lora, jax.random.fold_in(rng, 1))
      save_library(library, lib_dir, lora)
      _log(f"library written to {lib_dir}")
    stacked = stack_library(library)
    num_e = len(held_in)
    own = {t: i for i, t in enumerate(held_in)}
    tasks = held_in + held_out
    _log(f"library: {num_e} experts, {_size_mb(stacked):.1f} MB "
         f"({time.time() - t_start:.0f}s so far)")

    def routed(strategy, k, **kw):
      m = RoutedLoRA(lora, strategy, top_k=k, impl=config.impl)
      p = routed_params(base, stacked, strategy, **kw)
      return m, p

    def _run_method(name):
      if name == "base":
        results[name] = _evaluate(ctx, name, trainer.FullFineTuning(),
                                  lambda t: {"base": base}, tasks)
      elif name == "multitask":
        flat, sh = _flat_with_shardings(lora, model, mesh, base,
                                        jax.random.fold_in(rng, 2))
        p, _ = _Fitter(lora, model, mesh, _opt(config, config.expert_lr),
                       config.multitask_steps, config.seed)(
                           flat, sh, _batches(ctx, "held_in", config.seed + 3))
        results[name] = _evaluate(ctx, name, lora, lambda t, p=p: p, tasks)
      elif name in ("phatgoose", "arrow", "uniform", "merged"):
        m, p = routed(name, config.top_k)
        results[name] = _evaluate(ctx, name, m, lambda t, p=p: p, tasks)
        if name in ("phatgoose", "arrow"):
          diag[name], loads = diagnostics(ctx, m, lambda t, p=p: p, tasks, own,
                                          num_e)
          if name == "phatgoose":
            _composing_share(diag[name], loads, held_in, held_out)
            ho_loads = {t: loads[t] for t in held_out}
            plot["path"] = plot_routing(
                ho_loads, held_in, os.path.join(workdir, "routing_held_out.png"),
                "PHATGOOSE: share of routed tokens per expert, by layer")
            save_choices(ctx, m, lambda t, p=p: p, tasks,
                         os.path.join(workdir, "routing_choices.npz"))
      elif name == "oracle":
        m, _ = routed("fixed", 1, weights=np.ones(num_e))
        def with_w(w):
          return routed_params(base, stacked, "fixed", weights=w)
        res = _evaluate(ctx, name, m, lambda t: with_w(rb.one_hot(own[t], num_e)),
                        held_in)
        for t in held_out:   # best single expert, chosen with the labels
          best = None
          for e in range(num_e):
            r = _evaluate(ctx, f"expert {held_in[e]} on {t}", m,
                          lambda _, e=e: with_w(rb.one_hot(e, num_e)), [t])[t]
            if best is None or _headline(r) > _headline(best):
              best = dict(r, expert=held_in[e])
          res[t] = best
        results[name] = res
      elif name == "task_gate":
        it, rows = _mixture(ctx, config.seed + 6)
        m = rb.TaskGateRouting(lora, stacked, len(rows), config.top_k,
                               config.impl)
        flat, sh = _flat_with_shardings(m, model, mesh, base, rng)
        p, loss = _Fitter(m, model, mesh, _opt(config, config.task_gate.lr),
                          config.task_gate.steps, config.seed)(
                              flat, sh, it,
                              adapter_map=np.arange(len(rows), dtype=np.int32))
        _log(f"task_gate: {config.task_gate.steps} steps, loss {loss:.3f}")
        row = {t: i for i, t in enumerate(rows)}
        results[name] = _evaluate(
            ctx, name, m,
            lambda t, p=p: rb.task_gate_eval_params(p, row.get(t)), tasks)
      elif name == "task_avg":
        mp, pp = routed("phatgoose", config.top_k)
        m, _ = routed("fixed", config.top_k, weights=np.ones(num_e))
        def task_params(t, mp=mp, pp=pp):
          recs, _ = _route_records(ctx, mp, pp, t, config.diagnostics_examples)
          w = rb.task_level_weights([r for r, _ in recs], [i for _, i in recs],
                                    num_e, config.top_k)
          return routed_params(base, stacked, "fixed", weights=w)
        results[name] = _evaluate(ctx, name, m, task_params, tasks)
      elif name == "retrieval":
        m = rb.RetrievalRouting(lora, impl=config.impl)
        per_expert = []
        for i, t in enumerate(held_in):
          it = _batches(ctx, t, config.seed + 5000 + i)
          per_expert.append([data.model_inputs(next(it), kind)
                             for _ in range(config.retrieval_batches)])
        cen = rb.centroids(model, base, per_expert)
        p = dict(routed_params(base, stacked, "fixed",
                               weights=np.ones(num_e)),
                 retrieval={"centroids": cen})
        results[name] = _evaluate(ctx, name, m, lambda t, p=p: p, tasks)
        diag[name], _ = diagnostics(ctx, m, lambda t, p=p: p, tasks, own, num_e)
      elif name in ("poly", "mhr", "mhr_mu", "mhr_z"):
        heads = 1 if name == "poly" else config.poly.heads
        key = ("poly_params", heads)
        it, poly_tasks = _mixture(ctx, config.seed + 4)
        pm = rb.PolyLoRA(lora, len(poly_tasks), config.poly.num_skills, heads)
        if key not in ctx:
          flat, sh = _flat_with_shardings(pm, model, mesh, base,
                                          jax.random.fold_in(rng, 3))
          amap = np.arange(len(poly_tasks), dtype=np.int32)
          ctx[key], loss = _Fitter(pm, model, mesh,
                                   _opt(config, config.expert_lr),
                                   config.poly.steps, config.seed)(
                                       flat, sh, it, adapter_map=amap)
          _log(f"{'poly' if heads == 1 else 'mhr'}: {config.poly.steps} steps, "
               f"loss {loss:.3f}")
        poly_own = {t: i for i, t in enumerate(poly_tasks)}   # 'alloc' rows
        pp = ctx[key]
        if name == "mhr_mu":
          fn = lambda t, pp=pp: rb.poly_eval_params(pp, None)
        elif name == "mhr_z":
          fn = lambda t, pp=pp, pm=pm: (
              rb.poly_eval_params(pp, poly_own[t]) if t in poly_own
              else _fit_alloc(ctx, pm, pp, t))
        else:
          fn = lambda t, pp=pp: rb.poly_eval_params(pp, poly_own.get(t))
        results[name] = _evaluate(ctx, name, pm, fn, tasks)
      else:
        raise ValueError(f"unknown method {name!r} in config.methods; use "
                         "base, multitask, oracle, uniform, merged, arrow, "
                         "phatgoose, task_gate, task_avg, retrieval, poly, "
                         "mhr, mhr_mu, mhr_z")

    for name in methods:
      t0 = time.time()
      try:
        _run_method(name)
      except Exception as e:  # pylint: disable=broad-except
        if not config.get("continue_on_error"):
          raise
        _log(f"METHOD {name} FAILED: {type(e).__name__}: {e}")
        errors[name] = f"{type(e).__name__}: {e}"
      _log(f"  ({name}: {time.time() - t0:.0f}s)")

  table, avgs = _table(results, held_in, held_out)
  out = {"results": results, "averages": avgs, "diagnostics": diag,
         "errors": errors,
         "experts": held_in, "held_out": held_out,
         "library_mb": _size_mb(stacked),
         "seconds": time.time() - t_start}
  with open(os.path.join(workdir, "phatgoose_results.json"), "w") as f:
    json.dump(out, f, indent=1, default=_json_default)
  _log("\n" + table)
  if "phatgoose" in diag:
    _log("PHATGOOSE own-expert top-1 rate per layer (held-in; chance "
         f"{1 / num_e:.3f}):")
    for t in held_in:
      _log(f"  {t}: " + " ".join(
          f"{k}={v:.2f}" for k, v in diag["phatgoose"][t][
              "top1_own_by_layer"].items()))
  if "phatgoose" in diag:
    for t in held_out:
      share = diag["phatgoose"][t].get("composing_share_by_layer")
      if share:
        parts = diag["phatgoose"][t]["composes"]
        _log(f"  held-out {t}: share of routed tokens on {'+'.join(parts)} "
             f"(chance {len(parts) / num_e:.2f}): " +
             " ".join(f"{k}={v:.2f}" for k, v in share.items()))
  if plot:
    _log(f"routing plot: {plot['path']}")
  for name, err in errors.items():
    _log(f"FAILED {name}: {err}")
  _log(f"total {time.time() - t_start:.0f}s; results in {workdir}")
  return out


def _composing_share(diag, loads, held_in, held_out):
  """Held-out tasks of the bundled suite compose held-in skills
  (data.suite.COMPOSES): the share of routed slots on those skills' experts,
  per layer, next to its chance level len(parts) / E."""
  from mtjax.data import suite  # pylint: disable=g-import-not-at-top
  for t in held_out:
    parts = [p for p in suite.COMPOSES.get(t, ()) if p in held_in]
    if parts:
      idx = [held_in.index(p) for p in parts]
      diag[t]["composes"] = parts
      diag[t]["composing_share_by_layer"] = {
          layer: float(np.asarray(v)[idx].sum()) for layer, v in loads[t].items()}


def _check_workdir(workdir, config):
  """Refuses to overwrite an earlier run's results or library."""
  done = [f for f in ("phatgoose_results.json", "library")
          if os.path.exists(os.path.join(workdir, f))]
  lib_dir = config.get("library_dir") or ""
  if lib_dir and os.path.abspath(lib_dir) == os.path.abspath(
      os.path.join(workdir, "library")):
    done = [f for f in done if f != "library"]   # reusing it on purpose
  if done:
    raise FileExistsError(
        f"{workdir} already holds a PHATGOOSE run ({', '.join(done)}); "
        "nothing was changed. Use a new --workdir, or reuse its experts and "
        f"gates with --config.library_dir={os.path.join(workdir, 'library')} "
        "and a new --workdir.")


def _fit_alloc(ctx, poly, params, task):
  """MHR-z: fits only 'alloc_eval' on the task's training data."""
  cfg = ctx["config"]
  zpoly = type(poly)(poly.lora, poly.num_tasks, poly.num_skills, poly.heads)
  zpoly.trainable = r"alloc_eval/.*"
  from mtjax.training import trainer  # pylint: disable=g-import-not-at-top
  p0 = routing_baselines_eval(params)
  flat = trainer.flatten(p0)
  sh = {k: jax.sharding.NamedSharding(ctx["mesh"], jax.sharding.PartitionSpec())
        if not hasattr(v, "sharding") else v.sharding for k, v in flat.items()}
  key = ("mhr_z_fitter", id(poly))
  if key not in ctx:
    ctx[key] = _Fitter(zpoly, ctx["model"], ctx["mesh"],
                       _opt(cfg, cfg.poly.z_lr), cfg.poly.z_steps, cfg.seed)
  p, _ = ctx[key](flat, sh, _batches(ctx, task, cfg.seed + 9000))
  return p


def routing_baselines_eval(params):
  from mtjax.methods import routing_baselines as rb  # pylint: disable=g-import-not-at-top
  return rb.poly_eval_params(params, None)


def _size_mb(tree):
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)) / 2**20


def _json_default(x):
  if isinstance(x, (np.ndarray, jnp.ndarray)):
    return np.asarray(x).tolist()
  if isinstance(x, (np.floating, np.integer)):
    return x.item()
  return str(x)


def main(argv):
  from absl import flags  # pylint: disable=g-import-not-at-top
  del argv
  run(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", None, "configs/phatgoose.py")
  flags.DEFINE_string("workdir", None, "output folder")
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
