"""Routing among a stacked LoRA library: the router base class and registry.

A router is a method (the mtjax.methods contract) over params {'base': ...,
'experts': {path: {'lora_a': (E, d, r), 'lora_b': (E, r, o), <its leaves>}}}.
In each targeted module and for each token it picks k experts with weights
(`route`) and adds their weighted LoRA updates; experts are applied by
kernels.apply_experts (impl 'auto': sort-and-segment for many tokens, a
per-assignment gather or the BGMV kernel for a decoding step's few), so cost
grows with k, not E.

Routers are registered by name in `ROUTERS`. A new token-level router is one
class: subclass `RoutedLoRA`, implement `logits(h, leaf)` (and, if it needs
per-module leaves computed from the library, `library_leaves`), decorate it
with `@ROUTERS.register('name')`; `build_router(name, lora, ...)` and
`routed_params(base, stacked, name)` then serve it everywhere.

Registered here: 'phatgoose' (Muqeeth et al. 2024: <LN(x), LN(v_e)>/sqrt(d),
softmax, top-k renormalised), 'arrow' (Ostapenko et al. 2024, "Towards
Modular LLMs by Building and Reusing a Library of LoRAs", arXiv:2405.11157:
|<x, u_e>| with u_e the top singular vector of expert e's update), 'fixed'
(oracle / task-level / retrieval: fixed weights per module or per example),
'uniform' (the mean of all experts' updates) and 'merged' (the mean of the
LoRA parameters, "Merged Experts"). More in baselines.py.
"""
from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from mtjax.methods import transform
from mtjax.registry import Registry
from mtjax.routing import kernels

ROUTERS = Registry("router")

LoRAMethod = Any  # a mtjax.methods.lora.LoRA (rank, alpha, targets, scale)
Model = Any  # a flax linen module (mtjax.models)


class RoutedLoRA:
  """Token-level routing among a stacked LoRA library (see module docstring).

  Subclasses implement `logits(h, leaf)` (N, d) -> (N, E), or override
  `route` for non-token-level choices. `leaves` names the per-module library
  leaves (beyond lora_a/lora_b) the router reads.
  """
  trainable = r"experts/.*/(weights)"
  name = "routed_lora"
  leaves: tuple = ()
  # KV-cached decoding (mtjax.methods.transform) is exact: a token's route
  # depends on its own hidden state (or on per-example inputs), which a
  # decoding step computes as the full forward would.
  cached_decoding = True

  def __init__(self, lora: LoRAMethod, top_k: int = 2, impl: str = "auto") -> None:
    if top_k < 1:
      raise ValueError(f"top_k must be >= 1, got {top_k}")
    self.lora, self.top_k, self.impl = lora, int(top_k), impl

  # -- params -------------------------------------------------------------
  def library_leaves(self, module: dict, **options: Any) -> dict:
    """Router leaves of one module from its stacked library leaves."""
    del options
    missing = [k for k in self.leaves if k not in module]
    if missing:
      raise ValueError(f"router {self.name!r} needs {missing} in the library "
                       "(PHATGOOSE gates: train them with GateTraining)")
    return {k: module[k] for k in self.leaves}

  # -- routing ------------------------------------------------------------
  def logits(self, h: jax.Array, leaf: dict) -> jax.Array:
    raise NotImplementedError(f"{type(self).__name__} routes without logits")

  def route(self, h: jax.Array, leaf: dict,
            example_weights: Optional[jax.Array], batch: int) -> tuple:
    """(idx (N, k), w (N, k), logits (N, E) or None) for tokens h (N, d)."""
    del example_weights, batch
    k = min(self.top_k, leaf["lora_a"].shape[0])
    logits = self.logits(h, leaf)
    idx, w = kernels.top_k(logits, k)
    return idx, w, logits

  def routing_inputs(self, inputs: dict) -> Optional[jax.Array]:
    """What `route` receives as example_weights, taken from the inputs."""
    return inputs.get("expert_weights")

  def impl_for(self, example_weights: Optional[jax.Array]) -> str:
    """The kernels.apply_experts impl of one call."""
    del example_weights
    return self.impl

  def delta(self, h: jax.Array, leaf: dict,
            example_weights: Optional[jax.Array], batch: int,
            records: Optional[dict], path: str) -> jax.Array:
    """Summed expert updates (N, o) of tokens h (N, d)."""
    idx, w, logits = self.route(h, leaf, example_weights, batch)
    if records is not None:
      rec = {"idx": idx, "w": w}
      if logits is not None:
        rec["entropy"] = kernels.entropy(logits)
      records[path] = rec
    return kernels.apply_experts(h, leaf["lora_a"], leaf["lora_b"], idx, w,
                                 self.impl_for(example_weights))

  def hook(self, next_fun: Callable, x: jax.Array, leaf: dict,
           ctx: transform.HookContext,
           example_weights: Optional[jax.Array] = None,
           records: Optional[dict] = None) -> jax.Array:
    y = next_fun(x)
    h = x.reshape(-1, x.shape[-1]).astype(ctx.module.dtype)
    rec = {} if records is not None else None
    delta = self.delta(h, leaf, example_weights, x.shape[0], rec, ctx.path)
    if rec:   # per-token records back to (B, T, ...)
      records[ctx.path] = {k: v.reshape(x.shape[:-1] + v.shape[1:])
                           for k, v in rec[ctx.path].items()}
    delta = delta.reshape(y.shape[:-1] + (-1,)) * self.lora.scale
    return y + delta.astype(y.dtype)

  def apply(self, model: Model, params: dict, inputs: dict, *,
            rng: Optional[jax.Array] = None, deterministic: bool = True,
            method: Union[str, Callable, None] = None,
            records: Optional[dict] = None, decode: Optional[str] = None,
            cache: Optional[dict] = None) -> Any:
    """Logits; when `records` is a dict it receives per-module routing.

    decode/cache: KV-cached decoding, returning (logits, cache) (see
    mtjax.methods.transform).
    """
    example_weights = self.routing_inputs(inputs)
    inputs = transform.model_kwargs(inputs)

    def hook(next_fun, x, leaf, ctx):
      return self.hook(next_fun, x, leaf, ctx, example_weights, records)
    icpt = transform.linear_interceptor(params["experts"], hook, None, rng,
                                        deterministic)
    return transform.run(model, params["base"], inputs, [icpt], rng=rng,
                         deterministic=deterministic, method=method,
                         decode=decode, cache=cache)


@ROUTERS.register("phatgoose")
class PhatgooseRouter(RoutedLoRA):
  """PHATGOOSE: per token, softmax of <LN(x), LN(gate_e)>/sqrt(d), top k."""
  name = "phatgoose"
  leaves = ("gate",)

  def logits(self, h: jax.Array, leaf: dict) -> jax.Array:
    return kernels.phatgoose_logits(h, leaf["gate"])


@ROUTERS.register("arrow")
class ArrowRouter(RoutedLoRA):
  """Arrow: |<x, u_e>|, u_e the top singular vector of A_e B_e, top k."""
  name = "arrow"
  leaves = ("proto",)

  def library_leaves(self, module: dict, **options: Any) -> dict:
    del options
    return {"proto": kernels.arrow_prototypes(module["lora_a"],
                                              module["lora_b"])}

  def logits(self, h: jax.Array, leaf: dict) -> jax.Array:
    return kernels.arrow_logits(h, leaf["proto"])


@ROUTERS.register("fixed")
class FixedRouter(RoutedLoRA):
  """Fixed weights: leaf 'weights' (E,) per module, or inputs['expert_weights']
  (B, E) per example; the top k kept and renormalised."""
  name = "fixed"
  leaves = ("weights",)

  def library_leaves(self, module: dict,
                     weights: Union[ArrayLike, dict, None] = None,
                     path: Optional[str] = None, **options: Any) -> dict:
    del options
    if weights is None:
      raise ValueError("router 'fixed' needs weights (E,) or {path: (E,)}")
    w = weights[path] if isinstance(weights, dict) else weights
    return {"weights": jnp.asarray(w, jnp.float32)}

  def route(self, h: jax.Array, leaf: dict,
            example_weights: Optional[jax.Array], batch: int) -> tuple:
    k = min(self.top_k, leaf["lora_a"].shape[0])
    wts = leaf["weights"][None] if example_weights is None else example_weights
    return fixed_choices(wts, k, h.shape[0]) + (None,)


@ROUTERS.register("uniform")
class UniformRouter(RoutedLoRA):
  """The mean of every expert's update (the averaged delta W)."""
  name = "uniform"

  def delta(self, h: jax.Array, leaf: dict,
            example_weights: Optional[jax.Array], batch: int,
            records: Optional[dict], path: str) -> jax.Array:
    return kernels.apply_all_uniform(h, leaf["lora_a"], leaf["lora_b"])


@ROUTERS.register("merged")
class MergedRouter(RoutedLoRA):
  """One LoRA whose A and B are the means of the experts' A and B."""
  name = "merged"

  def delta(self, h: jax.Array, leaf: dict,
            example_weights: Optional[jax.Array], batch: int,
            records: Optional[dict], path: str) -> jax.Array:
    dtype = h.dtype
    return (h @ leaf["lora_a"].mean(0).astype(dtype)) @ \
        leaf["lora_b"].mean(0).astype(dtype)


def build_router(name: str, lora: LoRAMethod, **options: Any) -> RoutedLoRA:
  """A registered router by name, e.g. build_router('phatgoose', lora, top_k=2)."""
  return ROUTERS.build({"name": name, **options}, lora)


def fixed_choices(weights: jax.Array, k: int, num_tokens: int) -> tuple:
  """Top k of per-example (B, E) or shared (1, E) weights, renormalised and
  repeated for each example's tokens: idx (N, k) int32, w (N, k)."""
  vals, idx = jax.lax.top_k(weights.astype(jnp.float32), k)
  w = vals / jnp.maximum(vals.sum(-1, keepdims=True), 1e-9)
  reps = num_tokens // idx.shape[0]
  return jnp.repeat(idx, reps, 0).astype(jnp.int32), jnp.repeat(w, reps, 0)


def routed_params(base: dict, stacked: dict, router: Union[str, RoutedLoRA],
                  weights: Union[ArrayLike, dict, None] = None,
                  lora: Optional[LoRAMethod] = None) -> dict:
  """{'base', 'experts'} for a router (name or object) from a stacked library.

  weights: for 'fixed', (E,) shared by all modules or {path: (E,)}.
  """
  if isinstance(router, str):
    router = ROUTERS.get(router)(lora)
  flat = transform.flatten(stacked)
  modules = sorted({p.rsplit("/", 1)[0] for p in flat})
  out = {}
  for mod in modules:
    leaves = {p.rsplit("/", 1)[1]: x for p, x in flat.items()
              if p.rsplit("/", 1)[0] == mod}
    out[mod + "/lora_a"], out[mod + "/lora_b"] = (leaves["lora_a"],
                                                  leaves["lora_b"])
    options: dict = {"path": mod}
    if weights is not None:
      options["weights"] = weights
    for leaf, x in router.library_leaves(leaves, **options).items():
      out[f"{mod}/{leaf}"] = x
  return {"base": base, "experts": transform.nest(out)}
