"""Learned merges: a few merge coefficients fitted by the one fit loop.

Each learned merge is a method (the mtjax.methods contract: `init`,
`apply`, `trainable`, optionally `training_loss`) whose only trainable
leaves are its coefficients; the task vectors (or source adapters) are
frozen leaves of its params and the base stays frozen, so
`mtjax.training.fit.Fitter(merge, model, mesh, optimizer, steps)` fits it
like any method, and `merge.merge(model, params)` returns the merged base
params (for evaluation, `hf.save`, or as a new base). Params:

  {'base': theta_base,
   'task_vectors': {leaf path...: (T, *leaf shape)}   (frozen; stacked taus)
   'merge': {'coef': ...}}                              (trainable, 'merge/.*')

  merged = theta_base + sum_t clamp(lambda_t[, block]) tau_t[, block]

Registered in `MERGES` (mtjax.merging.static) beside the static merges,
built with the frozen inputs passed along:
  MERGES.build({'name': 'adamerging', 'granularity': 'layer'},
               task_vectors=tvs)
(not in mtjax.methods.METHODS: they need task vectors or source adapters
that a job config cannot hold, and METHODS belongs to the layer below).

  'adamerging'  AdaMerging (Yang et al. 2024, "AdaMerging: Adaptive Model
      Merging for Multi-Task Learning", arXiv:2310.02575): task-wise (one
      lambda per task vector) or layer-wise (one per task vector and
      parameter tensor, as the authors' code does) coefficients, initialised
      at 0.3 and clamped to [0, 1] in the forward (their code), fitted by
      minimising the entropy of the predictions on unlabeled inputs
      (`training_loss`). For a language model the predictions are the
      next-token distributions; positions='targets' (default) averages the
      entropy over the loss-weighted positions (where the model predicts
      the answer; the answer ids are never read, but with multi-token
      answers later positions see earlier answer tokens by teacher forcing),
      positions='all' over every unpadded position (prompt included: no
      answer at all is needed).
  'atlas'  aTLAS (Zhang et al. 2024, "Knowledge Composition using Task
      Vectors with Learned Anisotropic Scaling", arXiv:2407.03003): one
      coefficient per task vector and parameter block (tensor), initialised
      at 0, unclamped, fitted by cross-entropy on a few labelled examples
      (the fit loop's default loss).
  'self_positioning'  learned interpolation (arXiv 2024, "Self Positioning"
      as named in issue 14; its exact formulation was not available here):
      theta_base + sum_t lambda_t tau_t with one lambda per task vector,
      initialised at 1/T (the average) and fitted by SGD on the
      cross-entropy of validation examples.
  'scalearn'  ScaLearn (Frohmann et al. 2024, "ScaLearn: Simple and Highly
      Parameter-Efficient Task Transfer by Learning to Scale",
      arXiv:2310.01217): the outputs of K frozen source adapters (LoRA
      experts here; bottleneck adapters in the paper) are combined per
      layer as sum_k omega_k (.) o_k, with no softmax or sum-to-one
      constraint (those are the paper's ablations). Variants (paper, Sec. 3
      and the authors' configs): 'scalearn' omega_k^l in R^d per layer l
      (here: per targeted module) and source; 'uniform' (ScaLearnUniform)
      one scalar per layer and source; '++' (ScaLearn++) and 'uniform++'
      (ScaLearnUniform++) share the scales across layers (here: one set per
      module kind, e.g. all q_proj, since kinds differ in width). Init
      N(init_scale / K, 0.001) with init_scale 2 and dropout 0.3 on the
      scales while training (the authors' default config). Since scaling a
      module's output by omega is right-multiplying its update by
      diag(omega), `merge` folds the result into the base exactly.
"""
import re
from typing import Any, Callable, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mtjax.merging import lora_merge, static
from mtjax.merging.static import MERGES
from mtjax.methods import adapters, transform

Model = Any  # a flax linen module (mtjax.models)

# AdaMerging's prior for every coefficient (Yang et al. 2024, authors' code).
ADAMERGING_INIT = 0.3


def _names_of(model: Model) -> dict:
  """{'/'-joined base param path: logical axis names} of the model."""
  leaves = jax.tree_util.tree_flatten_with_path(
      transform.abstract_params(model),
      is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))[0]
  out = {}
  for path, leaf in leaves:
    key = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
    value = leaf.value if isinstance(leaf, nn.LogicallyPartitioned) else leaf
    names = (leaf.names if isinstance(leaf, nn.LogicallyPartitioned)
             else (None,) * len(value.shape))
    out[key] = (tuple(value.shape), tuple(names))
  return out


def _concrete(tree: Any) -> bool:
  return tree is not None and not any(
      isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(tree))


class CoefficientMerge:
  """theta_base + sum_t lambda tau_t with trainable lambda (module doc).

  task_vectors: T TaskVectors (or trees) of one structure, paths as in the
    base params ('decoder/layers_0/self_attn/q_proj/kernel');
  granularity: 'task' (lambda (T,)) or 'tensor' (lambda (T,) per tensor);
  init: the coefficients' initial value (None: 1/T);
  clamp: (lo, hi) applied in the forward, or None.
  """
  trainable = r"merge/.*"
  cached_decoding = True   # the plain model on merged params
  def __init__(self, task_vectors: Sequence[Any], granularity: str = "task",
               init: Optional[float] = None,
               clamp: Optional[Sequence[float]] = None) -> None:
    if granularity not in ("task", "tensor"):
      raise ValueError(f"granularity={granularity!r}: use 'task' or 'tensor'")
    self.tasks = static.gather(task_vectors)
    self.granularity = granularity
    self.init_value = (1.0 / self.tasks.num if init is None else float(init))
    if clamp is not None and (len(clamp) != 2 or clamp[0] > clamp[1]):
      raise ValueError(f"clamp={clamp!r}: give (lo, hi) with lo <= hi or None")
    self.clamp = None if clamp is None else (float(clamp[0]), float(clamp[1]))

  @property
  def num_tasks(self) -> int:
    return self.tasks.num

  def check_base(self, base_params: dict) -> None:
    """Raises if the task vectors' fingerprint is not that of base_params."""
    if self.tasks.base is None:
      return
    fp = adapters.fingerprint(base_params)
    if fp != self.tasks.base:
      raise ValueError(f"the task vectors were computed from a different base "
                       f"(fingerprint {self.tasks.base}) than the params given "
                       f"({fp}): merge them into the base they came from")

  def init(self, rng: Optional[jax.Array], model: Model,
           base_params: Optional[dict] = None) -> dict:
    """{'task_vectors': stacked (frozen), 'merge': {'coef': ...}}, boxed
    with logical names (the task axis first, replicated). The base is
    fingerprinted against the task vectors when its values are known (not
    under jit, where trainer.init_params calls this)."""
    del rng  # deterministic init
    names = _names_of(model)
    flat = {}
    for path, x in zip(self.tasks.paths, self.tasks.stacked, strict=True):
      if path not in names:
        raise ValueError(f"task vector leaf {path!r} is not a parameter of the "
                         f"model (e.g. {sorted(names)[:3]}); compute task "
                         "vectors from this model's params")
      if names[path][0] != tuple(x.shape[1:]):
        raise ValueError(f"task vector leaf {path} has shape {x.shape[1:]}, "
                         f"the model's is {names[path][0]}")
      flat[path] = transform.boxed(x, (None,) + names[path][1])
    if _concrete(base_params):
      self.check_base(base_params)
    t = self.num_tasks
    if self.granularity == "task":
      coef = transform.boxed(jnp.full((t,), self.init_value), (None,))
    else:
      coef = transform.nest({p: transform.boxed(
          jnp.full((t,), self.init_value), (None,)) for p in self.tasks.paths})
    return {"task_vectors": transform.nest(flat), "merge": {"coef": coef}}

  def coefficients(self, params: dict) -> dict:
    """{leaf path: lambda (T,)} as used in the forward (clamped)."""
    coef = nn.unbox(params["merge"]["coef"])
    flat = ({p: coef for p in self.tasks.paths} if self.granularity == "task"
            else transform.flatten(coef))
    if self.clamp is not None:
      flat = {p: jnp.clip(c, *self.clamp) for p, c in flat.items()}
    return flat

  def merge(self, model: Model, params: dict) -> dict:
    """The merged base params, theta_base + sum_t lambda tau_t."""
    del model
    lam = self.coefficients(params)
    tvs = transform.flatten(nn.unbox(params["task_vectors"]))

    def one(path, x):
      key = "/".join(str(getattr(k, "key", getattr(k, "name", k)))
                     for k in path)
      if key not in tvs:
        return x
      delta = jnp.einsum("t,t...->...", lam[key].astype(jnp.float32),
                         tvs[key].astype(jnp.float32))
      return (x.astype(jnp.float32) + delta).astype(x.dtype)

    return jax.tree_util.tree_map_with_path(one, params["base"])

  def apply(self, model: Model, params: dict, inputs: dict, *,
            rng: Optional[jax.Array] = None, deterministic: bool = True,
            method: Union[str, Callable, None] = None,
            decode: Optional[str] = None,
            cache: Optional[dict] = None) -> Any:
    """Logits of the model on the merged params (or (logits, cache))."""
    kwargs = {k: v for k, v in transform.model_kwargs(inputs).items()
              if k != "adapter_index"}
    rngs = {"dropout": rng} if (rng is not None and not deterministic) else {}
    return transform.apply_model(model, self.merge(model, params), kwargs,
                                 method=method, decode=decode, cache=cache,
                                 deterministic=deterministic, rngs=rngs)


class _Capture:
  """Stands in for a method: records the inputs and logits of its apply."""

  def __init__(self, method: Any) -> None:
    self._method, self.seen = method, {}

  def __getattr__(self, name: str) -> Any:
    return getattr(self._method, name)

  def apply(self, model: Model, params: dict, inputs: dict,
            **kwargs: Any) -> Any:
    logits = self._method.apply(model, params, inputs, **kwargs)
    self.seen.update(inputs=inputs, logits=logits)
    return logits


def entropy_loss(task_loss: Callable, positions: str = "targets") -> Callable:
  """A fit-loop loss (trainer.target_token_loss's signature) giving the
  entropy of the next-token distribution per position instead of the NLL.

  It runs `task_loss` (e.g. trainer.target_token_loss, which maps the batch
  to model inputs and calls method.apply once) and reads the logits of that
  call, so batches are read exactly as in training; the NLL it computes is
  unused (and dropped by XLA). positions 'targets': weights =
  decoder_loss_weights (the answer positions; the target ids are never
  read); 'all': every unpadded position the model saw (its attention mask,
  the decoder's for T5).
  """
  if positions not in ("targets", "all"):
    raise ValueError(f"positions={positions!r}: use 'targets' (the loss-"
                     "weighted positions) or 'all' (every unpadded position)")

  def loss(method, model, kind, params, batch, rng):
    capture = _Capture(method)
    _, correct, weights = task_loss(capture, model, kind, params, batch, rng)
    if "logits" not in capture.seen:
      raise ValueError("entropy_loss wraps a task loss that calls "
                       "method.apply (e.g. trainer.target_token_loss)")
    logp = jax.nn.log_softmax(capture.seen["logits"].astype(jnp.float32))
    entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
    if positions == "all":
      inputs = capture.seen["inputs"]
      mask = inputs.get("decoder_attention_mask", inputs.get("attention_mask"))
      weights = (jnp.ones(entropy.shape) if mask is None
                 else jnp.asarray(mask).astype(jnp.float32))
    return entropy, correct, weights

  return loss


@MERGES.register("adamerging")
class AdaMerging(CoefficientMerge):
  """AdaMerging: entropy-minimised task-/layer-wise coefficients."""

  def __init__(self, task_vectors: Sequence[Any], granularity: str = "layer",
               init: float = ADAMERGING_INIT,
               clamp: Optional[Sequence[float]] = (0.0, 1.0),
               positions: str = "targets") -> None:
    if granularity not in ("task", "layer"):
      raise ValueError(f"granularity={granularity!r}: 'task' (task-wise "
                       "AdaMerging) or 'layer' (layer-wise: one coefficient "
                       "per parameter tensor)")
    super().__init__(task_vectors, "task" if granularity == "task"
                     else "tensor", init, clamp)
    entropy_loss(None, positions)   # validates
    self.positions = positions

  def training_loss(self, task_loss: Callable) -> Callable:
    """The fit loop's loss: the entropy of the predictions (`entropy_loss`
    around `task_loss`; labels unused)."""
    return entropy_loss(task_loss, self.positions)


@MERGES.register("atlas")
class ATLAS(CoefficientMerge):
  """aTLAS: anisotropic (per-block) scaling, cross-entropy on few shots."""

  def __init__(self, task_vectors: Sequence[Any], blockwise: bool = True,
               init: float = 0.0) -> None:
    super().__init__(task_vectors, "tensor" if blockwise else "task", init,
                     None)


@MERGES.register("self_positioning")
class SelfPositioning(CoefficientMerge):
  """Learned interpolation coefficients, cross-entropy on validation data."""

  def __init__(self, task_vectors: Sequence[Any],
               init: Optional[float] = None) -> None:
    super().__init__(task_vectors, "task", init, None)


# -------------------------------------------------------------- ScaLearn

SCALEARN_VARIANTS = ("scalearn", "uniform", "++", "uniform++")


@MERGES.register("scalearn")
class ScaLearn:
  """Learned scaling of K frozen source LoRAs' outputs (module docstring).

  Params: {'base', 'sources': {module: {'lora_a': (K, in, r), 'lora_b':
  (K, r, out) * alpha/r}} (frozen), 'scalearn': {module: {'omega'}} or, for
  the '++' variants, {'shared': {kind: {'omega'}}}}; omega (K, out) or (K,).
  """
  trainable = r"scalearn/.*"
  cached_decoding = True   # per-token hooks, as LoRA

  def __init__(self, experts: Sequence[Any], variant: str = "scalearn",
               init_scale: float = 2.0, init_std: float = 1e-3,
               dropout: float = 0.3) -> None:
    if variant not in SCALEARN_VARIANTS:
      raise ValueError(f"variant={variant!r}: use one of "
                       f"{list(SCALEARN_VARIANTS)} (ScaLearn, ScaLearnUniform,"
                       " ScaLearn++, ScaLearnUniform++)")
    self.experts, self.shapes = lora_merge.check_experts(experts)
    self.variant = variant
    self.init_scale, self.init_std = float(init_scale), float(init_std)
    self.dropout = float(dropout)

  @property
  def num_sources(self) -> int:
    return len(self.experts)

  @property
  def uniform(self) -> bool:
    return self.variant.startswith("uniform")

  @property
  def shared(self) -> bool:
    return self.variant.endswith("++")

  @staticmethod
  def kind(path: str) -> str:
    """The module kind shared by the '++' variants: the path's last part."""
    return path.rsplit("/", 1)[-1]

  def _targets(self, model):
    return transform.resolve_targets(
        model, [re.escape(p) for p in sorted(self.shapes)])

  def init(self, rng: Optional[jax.Array], model: Model,
           base_params: Optional[dict] = None) -> dict:
    del base_params
    rng = jax.random.key(0) if rng is None else rng
    targets = self._targets(model)
    top = max(e.method.rank for e in self.experts)
    mods = [e.modules() for e in self.experts]
    k = self.num_sources
    sources, omegas = {}, {}
    for i, path in enumerate(sorted(targets)):
      t = targets[path]
      a = np.stack([lora_merge.pad_rank(np.asarray(m[path][0], np.float32), 1, top)
                    for m in mods])
      b = np.stack([lora_merge.pad_rank(np.asarray(m[path][1], np.float32), 0, top)
                    * e.scale for m, e in zip(mods, self.experts, strict=True)])
      sources[path] = {
          "lora_a": transform.boxed(jnp.asarray(a), (None, t.in_axis, "rank")),
          "lora_b": transform.boxed(jnp.asarray(b), (None, "rank", t.out_axis))}
      key = self.kind(path) if self.shared else path
      if key in omegas:
        continue
      shape, names = ((k,), (None,)) if self.uniform else (
          (k, t.shape[1]), (None, t.out_axis))
      omega = self.init_scale / k + self.init_std * jax.random.normal(
          jax.random.fold_in(rng, i), shape)
      omegas[key] = {"omega": transform.boxed(omega, names)}
    scales = ({"shared": omegas} if self.shared else transform.nest(omegas))
    return {"sources": transform.nest(sources), "scalearn": scales}

  def omegas(self, params: dict) -> dict:
    """{module path: omega (K, out) or (K,)}."""
    tree = nn.unbox(params["scalearn"])
    if self.shared:
      return {p: tree["shared"][self.kind(p)]["omega"] for p in self.shapes}
    flat = transform.flatten(tree)
    return {p: flat[p + "/omega"] for p in self.shapes}

  def hook(self, next_fun: Callable, x: jax.Array, leaf: dict,
           ctx: transform.HookContext) -> jax.Array:
    y = next_fun(x)
    dtype = ctx.module.dtype
    h = x.astype(dtype)
    z = jnp.einsum("...i,kir->...kr", h, leaf["lora_a"].astype(dtype))
    out = jnp.einsum("...kr,kro->...ko", z, leaf["lora_b"].astype(dtype))
    omega = ctx.dropout(leaf["omega"], self.dropout).astype(dtype)
    if omega.ndim == 1:
      combined = jnp.einsum("...ko,k->...o", out, omega)
    else:
      combined = jnp.sum(out * omega, axis=-2)
    return y + combined.astype(y.dtype)

  def apply(self, model: Model, params: dict, inputs: dict, *,
            rng: Optional[jax.Array] = None, deterministic: bool = True,
            method: Union[str, Callable, None] = None,
            decode: Optional[str] = None,
            cache: Optional[dict] = None) -> Any:
    """Logits, or (logits, cache) with `decode` (transform's docstring)."""
    inputs = transform.model_kwargs(inputs)
    sources = transform.flatten(nn.unbox(params["sources"]))
    omegas = self.omegas(params)
    tree = transform.nest({
        p: {"lora_a": sources[p + "/lora_a"], "lora_b": sources[p + "/lora_b"],
            "omega": omegas[p]} for p in self.shapes})
    icpt = transform.linear_interceptor(tree, self.hook, None, rng,
                                        deterministic)
    return transform.run(model, params["base"], inputs, [icpt], rng=rng,
                         deterministic=deterministic, method=method,
                         decode=decode, cache=cache)

  def merge(self, model: Model, params: dict) -> dict:
    """Base params with sum_k dW_k diag(omega_k) folded into the kernels
    (exactly the trained forward, without dropout)."""
    del model
    sources = transform.flatten(nn.unbox(params["sources"]))
    omegas = self.omegas(params)
    base = jax.tree.map(lambda x: x, params["base"])
    for p in self.shapes:
      a, b = sources[p + "/lora_a"], sources[p + "/lora_b"]
      omega = omegas[p]
      if omega.ndim == 1:
        delta = jnp.einsum("kir,kro,k->io", a, b, omega)
      else:
        delta = jnp.einsum("kir,kro,ko->io", a, b, omega)
      node = transform.lookup(base, p.split("/"))
      node["kernel"] = (node["kernel"] + delta).astype(node["kernel"].dtype)
    return base
