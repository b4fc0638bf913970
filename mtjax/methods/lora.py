"""LoRA: low-rank adapters on chosen linear maps (Hu et al. 2021, arXiv:2106.09685).

For a targeted layers.Linear with kernel W (in, out):
  y = x W + dropout(x) A B * alpha / r,   A (in, r), B (r, out)
A is kaiming-uniform (PEFT's default: bound = 1/sqrt(in)) or normal(1/r)
('gaussian'), B is zero, so a fresh adapter leaves the model unchanged.

Params: {'lora': nested-by-module-path {'lora_a': (in, r), 'lora_b': (r, out)}},
logical axes (in_axis, 'rank') and ('rank', out_axis) of the target kernel.
A library of E adapters stacks them as (E, in, r) / (E, r, out) with a leading
'adapters' axis (not in sharding.RULES, so replicated); inputs['adapter_index']
(B,) picks one per example (a mixed-adapter batch, as served by Punica, Chen
et al. 2023, arXiv:2310.18547, and S-LoRA, Sheng et al. 2023,
arXiv:2311.03285). Each example's tokens are then assignments to its adapter
(k = 1, weight 1) applied by mtjax.methods.grouped, the kernels routing uses:
`impl` 'auto' is a per-example gather of the factors on CPU, Punica's SGMV
(prefill, training) or BGMV (decoding) Pallas kernels on GPU, megablox on
TPU (grouped.per_example_impl); no Python loop over adapters.

Config (ml_collections or dict): rank=8, alpha=16, dropout=0.0,
targets=(regexes over module paths, e.g. '.*self_attn/(q_proj|v_proj)'),
init_a='kaiming_uniform'|'gaussian', num_experts=0 (0: a single adapter),
impl='auto' (mixed-adapter batches: one of grouped.IMPLS).
"""
import math
from typing import Any, Callable, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtjax.methods import adapters, grouped, transform

DEFAULT_TARGETS = {
    "t5": (r".*(SelfAttention|EncDecAttention)/(q|v)",),
    "mt5": (r".*(SelfAttention|EncDecAttention)/(q|v)",),
}
DEFAULT_DECODER_TARGETS = (r".*self_attn/(q_proj|v_proj)",)

Model = Any  # a flax linen module (mtjax.models)


def default_targets(model: Model) -> tuple:
  return DEFAULT_TARGETS.get(model.config.model_type, DEFAULT_DECODER_TARGETS)


@transform.METHODS.register("lora")
class LoRA:
  """The LoRA method (see module docstring)."""
  trainable = r"lora/.*"
  cached_decoding = True  # per-token hooks: a step sees only its new token

  def __init__(self, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
               targets: Union[str, Sequence[str], None] = None,
               init_a: str = "kaiming_uniform", num_experts: int = 0,
               init_from: Optional[str] = None, impl: str = "auto") -> None:
    if rank < 1:
      raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    if init_a not in ("kaiming_uniform", "gaussian"):
      raise ValueError(f"init_a {init_a!r}: use 'kaiming_uniform' or 'gaussian'")
    if impl not in grouped.IMPLS:
      raise ValueError(f"impl {impl!r}: use one of {grouped.IMPLS}")
    self.impl = impl
    self.rank, self.alpha, self.dropout = int(rank), float(alpha), float(dropout)
    self.targets = None if targets is None else tuple(
        [targets] if isinstance(targets, str) else targets)
    self.init_a, self.num_experts = init_a, int(num_experts)
    self.init_from = init_from or None

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  def _targets(self, model):
    return transform.resolve_targets(model, self.targets or default_targets(model))

  def init(self, rng: Optional[jax.Array], model: Model,
           base_params: Optional[dict] = None) -> dict:
    """Method params; leaves are nn.LogicallyPartitioned (nn.unbox for arrays)."""
    del base_params  # shapes come from the abstract model
    loaded = self._load(model) if self.init_from else None
    rng = jax.random.key(0) if rng is None else rng   # unused when loaded
    lead = (self.num_experts,) if self.num_experts else ()
    lead_axes = ("adapters",) if self.num_experts else ()
    flat = {}
    for i, (path, t) in enumerate(sorted(self._targets(model).items())):
      d_in, d_out = t.shape
      key = jax.random.fold_in(rng, i)
      if self.init_a == "kaiming_uniform":
        bound = 1.0 / math.sqrt(d_in)   # kaiming_uniform(a=sqrt(5)), as torch/PEFT
        a = jax.random.uniform(key, lead + (d_in, self.rank), jnp.float32,
                               -bound, bound)
      else:
        a = jax.random.normal(key, lead + (d_in, self.rank)) / self.rank
      b = jnp.zeros(lead + (self.rank, d_out), jnp.float32)
      if loaded is not None:
        a, b = self._loaded_leaf(loaded, path, a.shape, b.shape)
      flat[path] = {
          "lora_a": transform.boxed(a, lead_axes + (t.in_axis, "rank")),
          "lora_b": transform.boxed(b, lead_axes + ("rank", t.out_axis))}
    return {"lora": transform.nest(flat)}


  def _load(self, model):
    """Adapter params from `init_from` (expert / PEFT / orbax / workdir)."""
    tree = adapters.load_adapter(self.init_from, model)
    if "lora" not in tree:
      raise ValueError(f"init_from={self.init_from!r} holds {sorted(tree)}, "
                       "not LoRA params")
    return tree["lora"]

  def _loaded_leaf(self, loaded, path, a_shape, b_shape):
    node = transform.lookup(loaded, path.split("/"))
    if node is None:
      raise ValueError(f"init_from={self.init_from!r} has no LoRA for {path}; "
                       "use the targets it was trained with")
    a, b = jnp.asarray(node["lora_a"]), jnp.asarray(node["lora_b"])
    if a.shape != a_shape or b.shape != b_shape:
      raise ValueError(f"init_from={self.init_from!r}: {path} has shapes "
                       f"{a.shape}, {b.shape}; this method expects {a_shape}, "
                       f"{b_shape} (rank / num_experts differ?)")
    return a, b

  def hook(self, next_fun: Callable, x: jax.Array, leaf: dict,
           ctx: transform.HookContext) -> jax.Array:
    y = next_fun(x)
    dtype = ctx.module.dtype
    a, b = leaf["lora_a"], leaf["lora_b"]
    h = ctx.dropout(x.astype(dtype), self.dropout)
    if a.ndim == 2:
      delta = (h @ a.astype(dtype)) @ b.astype(dtype)
    else:   # a library (E, in, r), (E, r, out): each example its adapter
      transform.check_adapter_index(a, ctx.adapter_index)
      delta = grouped.apply_per_example(h, a, b, ctx.adapter_index, self.impl)
    return y + (delta * self.scale).astype(y.dtype)

  def apply(self, model: Model, params: dict, inputs: dict, *,
            rng: Optional[jax.Array] = None, deterministic: bool = True,
            method: Union[str, Callable, None] = None,
            decode: Optional[str] = None, cache: Optional[dict] = None) -> Any:
    """Logits, or (logits, cache) with `decode` (see transform's docstring)."""
    inputs = transform.model_kwargs(inputs)
    icpt = transform.linear_interceptor(
        nn.unbox(params["lora"]), self.hook, inputs.get("adapter_index"), rng,
        deterministic)
    return transform.run(model, params["base"], inputs, [icpt], rng=rng,
                         deterministic=deterministic, method=method,
                         decode=decode, cache=cache)

  def merge(self, model: Model, params: dict) -> dict:
    """Base params with B A * scale folded into the kernels (single adapter)."""
    base = jax.tree.map(lambda x: x, params["base"])
    for path, leaf in transform.flatten(params["lora"]).items():
      if not path.endswith("/lora_a"):
        continue
      mod = path[:-len("/lora_a")]
      a = leaf
      b = transform.lookup(params["lora"], mod.split("/"))["lora_b"]
      if a.ndim != 2:
        raise ValueError("merge needs a single adapter, not a stacked library")
      node = transform.lookup(base, mod.split("/"))
      node["kernel"] = node["kernel"] + (a @ b) * self.scale
    return base
