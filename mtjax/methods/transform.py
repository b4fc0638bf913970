"""The one mechanism behind every parameter-efficient method: intercepting calls.

A method never edits a model. It runs the unchanged model under
`flax.linen.intercept_methods`; its interceptor sees each module call
(`context.module`, e.g. a `layers.Linear` whose `.path` is
('decoder', 'layers_0', 'self_attn', 'q_proj')) and may change the call's input
or output, reading its own parameters from a separate pytree nested by the
same module path. Targets are chosen like PEFT's `target_modules`: regexes
fully matched against '/'-joined module paths, resolved once from the model's
abstract parameters (`jax.eval_shape`, no forward computation), so a pattern
that matches nothing fails at init with the list of available paths.

Example (a hand-written "scale every q projection output by s"):

  targets = resolve_targets(model, [r'.*self_attn/q_proj'])   # {path: Target}
  extra = {p: {'s': jnp.ones(t.shape[-1])} for p, t in targets.items()}
  tree = nest(extra)                 # {'decoder': {'layers_0': {...}}}

  def hook(next_fun, x, leaf, ctx):  # leaf = tree at this module's path
    return next_fun(x) * leaf['s']

  logits = run(model, base_params, inputs,
               [linear_interceptor(tree, hook)])

Method parameters carry logical axis names derived from the target kernel's
axes (`Target.in_axis`, `Target.out_axis`), so `sharding.RULES` shards them the
same way as the base model. `ctx` (a `HookContext`) carries the per-example
adapter index for mixed-adapter batches (applied by mtjax.methods.grouped,
the sort-and-segment / gather kernels routing uses too) and the
rng/deterministic flags.

Incremental (KV-cached) decoding goes through the same `method.apply`:

  logits, cache = method.apply(model, params, inputs, decode=PREFILL,
                               cache=cache)     # the prompt
  logits, cache = method.apply(model, params, step_inputs, decode=STEP,
                               cache=cache)     # each new token

`decode=None` (the default) is the plain forward, returning logits only.
With `decode` set, the model runs with `decode=True` and its 'cache'
collection: `cache=None` creates it (a plain forward whose inputs set the
cache length, as the models' own `init_cache` does), otherwise it is read and
written and returned with the logits. PREFILL and STEP differ only for
methods that act on the prompt (prompt tuning prepends its soft tokens to the
prefill only; soft injection edits heads in the prefill only); the
interceptor-only methods (LoRA, IA3, routing) treat both alike, so per-token
routing routes each new token in its own step, as a full recomputation would.
A method says it implements this exactly with the class attribute
`cached_decoding = True` (`cached_decoding(method)`); methods without it are
decoded by recomputing their forward over the filled buffer
(mtjax.evaluation.evaluate.make_greedy). `run` below implements the
pass-through for interceptor-based methods.
"""
import contextlib
import dataclasses
import re
import zlib
from typing import Any, Callable, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtjax.models import hf, layers, sharding
from mtjax.registry import Registry, to_dict  # noqa: F401 (to_dict re-used)

# Every method class registers itself here by name (see mtjax.methods.build).
METHODS = Registry("method")

Model = Any  # a flax linen module (mtjax.models)

# `decode` modes of method.apply (see the module docstring); None: no cache.
PREFILL = "prefill"
STEP = "step"
DECODE_MODES = (None, PREFILL, STEP)


def check_decode(decode: Optional[str]) -> Optional[str]:
  """Validates a method.apply `decode` argument (None, PREFILL or STEP)."""
  if decode is False:
    return None
  if decode not in DECODE_MODES:
    raise ValueError(f"decode={decode!r}: use None (no cache), "
                     f"{PREFILL!r} (the prompt) or {STEP!r} (a new token)")
  return decode


def cached_decoding(method: Any) -> bool:
  """Whether `method.apply` implements decode=PREFILL/STEP exactly.

  Read from the method's `cached_decoding` attribute; a method without one
  (e.g. a third-party method) is decoded by recomputation.
  """
  return bool(getattr(method, "cached_decoding", False))


@dataclasses.dataclass(frozen=True)
class Target:
  """A targeted module: its kernel shape (in, out) and logical axis names."""
  path: str
  shape: tuple
  axes: tuple

  @property
  def in_axis(self) -> Optional[str]:
    return self.axes[0]

  @property
  def out_axis(self) -> Optional[str]:
    return self.axes[-1]


@dataclasses.dataclass(frozen=True)
class HookContext:
  """What a hook may need beyond its parameters."""
  path: str
  module: Any
  adapter_index: Optional[jax.Array]   # (B,) int32 or None
  rng: Optional[jax.Array]
  deterministic: bool

  def dropout(self, x: jax.Array, rate: float) -> jax.Array:
    """Dropout with a key derived from the run's rng and this module's path."""
    if self.deterministic or rate == 0.0:
      return x
    if self.rng is None:
      raise ValueError(f"dropout at {self.path} needs an rng: pass rng= to "
                       "method.apply when deterministic=False")
    key = jax.random.fold_in(self.rng, zlib.crc32(self.path.encode()))
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


_ABSTRACT_CACHE = {}


def abstract_params(model: Model) -> dict:
  """Boxed ShapeDtypeStructs (with logical names) of a model's base params.

  Memoised per (model class, config): methods call this while tracing.
  """
  try:
    key = (type(model), model.config)
    hash(key)
  except TypeError:
    return sharding.abstract_params(model, **hf.dummy_inputs(model.config))
  if key not in _ABSTRACT_CACHE:
    _ABSTRACT_CACHE[key] = sharding.abstract_params(
        model, **hf.dummy_inputs(model.config))
  return _ABSTRACT_CACHE[key]


def _key_name(k):
  return str(getattr(k, "key", getattr(k, "name", k)))


def linear_modules(boxed_abstract: dict) -> dict:
  """{'/'-joined module path: Target} for every module owning a 2-D 'kernel'."""
  out = {}
  leaves = jax.tree_util.tree_flatten_with_path(
      boxed_abstract, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))[0]
  for path, leaf in leaves:
    keys = [_key_name(k) for k in path]
    if keys[-1] != "kernel":
      continue
    value = leaf.value if isinstance(leaf, nn.LogicallyPartitioned) else leaf
    names = (leaf.names if isinstance(leaf, nn.LogicallyPartitioned)
             else (None,) * len(value.shape))
    if len(value.shape) != 2:
      raise ValueError(
          f"{'/'.join(keys)} has a {len(value.shape)}-D kernel; methods expect "
          "per-layer 2-D layers.Linear kernels (scanned layers are not "
          "supported by path interception)")
    out["/".join(keys[:-1])] = Target("/".join(keys[:-1]), tuple(value.shape),
                                      tuple(names))
  return out


def match_patterns(paths: Sequence[str], patterns: Union[str, Sequence[str]],
                   what: str = "module") -> list:
  """Paths fully matched by any regex; raises naming patterns matching nothing."""
  if isinstance(patterns, str):
    patterns = [patterns]
  if not patterns:
    raise ValueError(f"no target {what} patterns given")
  chosen, unmatched = [], []
  compiled = [(p, re.compile(p)) for p in patterns]
  for p, c in compiled:
    hits = [path for path in paths if c.fullmatch(path)]
    if not hits:
      unmatched.append(p)
    chosen.extend(h for h in hits if h not in chosen)
  if unmatched:
    sample = ", ".join(sorted(paths)[:12])
    raise ValueError(
        f"target pattern(s) {unmatched} match no {what} path. Patterns are "
        f"regexes fully matched against '/'-joined paths such as: {sample} ...")
  return sorted(chosen)


def resolve_targets(model: Model, patterns: Union[str, Sequence[str]],
                    boxed_abstract: Optional[dict] = None) -> dict:
  """{path: Target} of the Linear modules whose path matches `patterns`."""
  mods = linear_modules(abstract_params(model) if boxed_abstract is None
                        else boxed_abstract)
  return {p: mods[p] for p in match_patterns(list(mods), patterns, "Linear")}


def nest(flat: dict) -> dict:
  """{'a/b/c': v} -> {'a': {'b': {'c': v}}}."""
  out = {}
  for path, value in flat.items():
    node = out
    parts = path.split("/")
    for p in parts[:-1]:
      node = node.setdefault(p, {})
    node[parts[-1]] = value
  return out


def flatten(tree: Any, sep: str = "/") -> dict:
  """{'a': {'b': v}} -> {'a/b': v} for leaves (arrays)."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    out[sep.join(_key_name(k) for k in path)] = leaf
  return out


def lookup(tree: dict, path: Sequence[str]) -> Any:
  """The subtree at module path ('decoder', 'layers_0', ...) or None."""
  node = tree
  for p in path:
    if not isinstance(node, dict) or p not in node:
      return None
    node = node[p]
  return node


def boxed(value: jax.Array,
          names: Sequence[Optional[str]]) -> nn.LogicallyPartitioned:
  """Leaf with logical axis names, as `nn.with_logical_partitioning` makes."""
  return nn.LogicallyPartitioned(value, tuple(names))


def linear_interceptor(tree: dict, hook: Callable,
                       adapter_index: Optional[jax.Array] = None,
                       rng: Optional[jax.Array] = None,
                       deterministic: bool = True) -> Callable:
  """Interceptor calling hook(next_fun, x, leaf, ctx) on targeted Linear calls.

  `tree` is nested by module path; a Linear call is targeted iff its path leads
  to a dict in `tree` (holding the method's params for that module).
  """
  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__" or not isinstance(module, layers.Linear):
      return next_fun(*args, **kwargs)
    leaf = lookup(tree, module.path)
    if leaf is None:
      return next_fun(*args, **kwargs)
    ctx = HookContext("/".join(module.path), module, adapter_index, rng,
                      deterministic)
    return hook(lambda x: next_fun(x, **kwargs), args[0], leaf, ctx)
  return interceptor


def check_adapter_index(param: jax.Array,
                        adapter_index: Optional[jax.Array]) -> None:
  """Raises unless a library param (E, ..) comes with inputs' adapter_index."""
  if adapter_index is None:
    raise ValueError(
        f"method params have a leading expert axis of size {param.shape[0]} "
        "but inputs carry no 'adapter_index' (B,) int32 choosing one per example")


def select(param: jax.Array, adapter_index: Optional[jax.Array],
           batch_ndim: int) -> jax.Array:
  """Per-example parameter for mixed-adapter batches (a copy per example).

  param: (..) for one adapter or (E, ..) with `batch_ndim`+1 dims for a library;
  returns param unchanged, or param[adapter_index] of shape (B, ..). LoRA and
  (IA)3 apply libraries through mtjax.methods.grouped instead (Punica-style
  kernels shared with routing); prompt tuning selects its prompts here.
  """
  if param.ndim == batch_ndim:
    return param
  check_adapter_index(param, adapter_index)
  return jnp.take(param, adapter_index, axis=0)


def apply_model(model: Model, base_params: dict, kwargs: dict, *,
                method: Union[str, Callable, None] = None,
                decode: Optional[str] = None, cache: Optional[dict] = None,
                **apply_kwargs: Any) -> Any:
  """model.apply(kwargs), plain or with the 'cache' collection.

  decode None: the logits. decode PREFILL/STEP: (logits, cache); `cache`
  None creates the collection (see the module docstring).
  """
  if check_decode(decode) is None:
    if cache is not None:
      raise ValueError("a cache is only read with decode='prefill'/'step'")
    return model.apply({"params": base_params}, **kwargs, method=method,
                       **apply_kwargs)
  variables = {"params": base_params}
  if cache is not None:
    variables["cache"] = cache
  out, mutated = model.apply(variables, **kwargs, method=method, decode=True,
                             mutable=["cache"], **apply_kwargs)
  return out, mutated["cache"]


def run(model: Model, base_params: dict, inputs: dict,
        interceptors: Sequence[Callable], *, rng: Optional[jax.Array] = None,
        deterministic: bool = True,
        method: Union[str, Callable, None] = None,
        decode: Optional[str] = None,
        cache: Optional[dict] = None) -> Any:
  """model.apply on `inputs` (model kwargs) under the given interceptors.

  decode/cache: incremental decoding (see the module docstring); then
  returns (logits, cache) instead of logits.
  """
  kwargs = {k: v for k, v in inputs.items() if k != "adapter_index"}
  rngs = {"dropout": rng} if (rng is not None and not deterministic) else None
  with contextlib.ExitStack() as stack:
    for f in interceptors:
      stack.enter_context(nn.intercept_methods(f))
    return apply_model(model, base_params, kwargs, method=method,
                       decode=decode, cache=cache,
                       deterministic=deterministic, rngs=rngs)


def model_kwargs(inputs: dict) -> dict:
  """Drops non-model keys a trainer may pass along (task ids, targets)."""
  allowed = {"input_ids", "attention_mask", "decoder_input_ids",
             "decoder_attention_mask", "encoder_segment_ids",
             "decoder_segment_ids", "encoder_positions", "decoder_positions",
             "positions", "segment_ids", "adapter_index",
             "encoded"}  # T5.decode's encoder output (method='decode')
  return {k: v for k, v in inputs.items() if k in allowed}
