"""LoRA in, LoRA out: merging LoRA experts into one LoRA of a chosen rank.

An expert's task vector at a targeted module is its update
dW = A B * alpha / r (in, out) (Hu et al. 2021, arXiv:2106.09685; mtjax's
layout, kernels (in, out), see mtjax.methods.lora). `merge_lora` goes module
by module, so only one module's E updates (E, in, out) exist at a time:

  space='delta' (default): dW_e of every expert, merged by a static merge
      (mtjax.merging.static: task_arithmetic, ties, dare_*, magnitude_prune,
      trimming per tensor = per module), then cut back to `rank` by a
      truncated SVD, dW = U S Vh: lora_a = U[:, :rank], lora_b =
      S[:rank] Vh[:rank] (S on the B side, as PEFT), alpha = rank (scale 1).
      With rank >= the merged update's rank the LoRA reproduces it exactly
      (e.g. task arithmetic of E experts at rank = the sum of their ranks).
      These are PEFT's `add_weighted_adapter(combination_type='<merge>_svd',
      svd_rank=rank)` numbers (its 'svd' is task_arithmetic here).
  space='factors': PEFT's `add_weighted_adapter(combination_type='<merge>')`
      without SVD: the A's and the B's are merged separately (all experts of
      one rank) with weights sign(w s) sqrt(|w s|) on A and sqrt(|w s|) on B,
      s = alpha / r; an approximation of the merged update (PEFT's docs say
      so), kept for parity with PEFT.

The result is an ordinary single LoRA: `(LoRA method, {'lora': params})`,
exported to PEFT with `mtjax.methods.library.export_peft`, folded into the
base kernels with `method.merge(model, {'base': base, **params})` and written
as a Hugging Face folder with `save_merged` (mtjax.models.hf.save).

Experts are `LoRAExpert`s (method, params, base fingerprint) or (method,
params) pairs; `experts_from_library` reads them from an expert library,
with the base fingerprint the library recorded. Experts must target the same
modules (same shapes) and come from one base; a stacked library (leading
expert axis) is refused: pass single adapters.
"""
import dataclasses
import functools
import re
from typing import Any, Mapping, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from mtjax import methods, paths
from mtjax.merging import static
from mtjax.methods import adapters, transform
from mtjax.methods import library as library_lib
from mtjax.methods import lora as lora_lib
from mtjax.models import hf

Model = Any  # a flax linen module (mtjax.models)
SPACES = ("delta", "factors")


@dataclasses.dataclass(frozen=True)
class LoRAExpert:
  """One LoRA adapter: its method (rank, alpha, targets), its params
  {'lora': {module path...: {'lora_a': (in, r), 'lora_b': (r, out)}}} and
  the fingerprint of the base it was trained on (None: unknown)."""
  method: lora_lib.LoRA
  params: dict
  base: Optional[str] = None
  name: Optional[str] = None

  @property
  def scale(self) -> float:
    return self.method.scale

  def modules(self) -> dict:
    """{module path: (lora_a (in, r), lora_b (r, out))}."""
    flat = transform.flatten(nn.unbox(self.params["lora"]))
    out = {}
    for key, a in flat.items():
      if key.endswith("/lora_a"):
        path = key[:-len("/lora_a")]
        out[path] = (a, flat[path + "/lora_b"])
    return out


def as_expert(x: Any, i: int = 0) -> LoRAExpert:
  """A LoRAExpert from a LoRAExpert, (method, params) or (method, params,
  base fingerprint)."""
  if isinstance(x, LoRAExpert):
    return x
  if isinstance(x, (tuple, list)) and len(x) in (2, 3):
    return LoRAExpert(*x)
  raise ValueError(f"expert {i} is a {type(x).__name__}: pass LoRAExpert(method,"
                   " params, base_fingerprint) or (method, params) pairs")


def experts_from_library(library: library_lib.Library,
                         names: Sequence[str]) -> list:
  """LoRAExperts of a library's experts, with their recorded base
  fingerprints (mtjax.methods.library writes them with `base_params`)."""
  out = []
  for name in names:
    expert = library.get(name)
    method = methods.build(expert.method)
    if not isinstance(method, lora_lib.LoRA):
      raise ValueError(f"expert {name!r} is a {type(method).__name__}, not a "
                       "LoRA; merge_lora merges LoRA experts")
    fp = (expert.info.get("base_model") or {}).get("fingerprint")
    out.append(LoRAExpert(method, expert.params(), fp, name))
  return out


def check_experts(experts: Sequence[Any], *,
                  base: Union[dict, str, None] = None) -> tuple:
  """(experts as LoRAExperts, {module path: (in, out)}) after checking that
  there is at least one, that all target the same modules with the same
  shapes, that none is a stacked library, and that all come from one base
  (fingerprints; `base` params or fingerprint, when given, must match)."""
  experts, shapes, _ = _checked(experts, base)
  return experts, shapes


def _checked(experts: Sequence[Any], base: Union[dict, str, None]) -> tuple:
  """check_experts, also returning each expert's modules() (computed once:
  flattening 100 experts' trees twice costs more than merging them)."""
  if not isinstance(experts, (list, tuple)):
    raise ValueError("pass the LoRA experts as a list")
  if not experts:
    raise ValueError("no LoRA experts to merge: pass a non-empty list")
  experts = [as_expert(x, i) for i, x in enumerate(experts)]
  for i, e in enumerate(experts):
    if not isinstance(e.method, lora_lib.LoRA):
      raise ValueError(f"expert {i} has a {type(e.method).__name__} method; "
                       "merge_lora merges LoRA experts")
  fps = [e.base for e in experts]
  if base is not None:
    fps.append(base if isinstance(base, str) else adapters.fingerprint(base))
  static.check_same_base(fps, "LoRA experts (the last is the given base)"
                         if base is not None else "LoRA experts")
  mods = [e.modules() for e in experts]
  mods0 = mods[0]
  shapes = {}
  for p, (a, b) in mods0.items():
    if np.ndim(a) != 2:
      raise ValueError(f"expert 0 is a stacked library ({np.shape(a)} at {p}); "
                       "pass single adapters (one LoRAExpert per expert)")
    shapes[p] = (np.shape(a)[0], np.shape(b)[1])
  for i, mods_i in enumerate(mods[1:], 1):
    if set(mods_i) != set(mods0):
      only0 = sorted(set(mods0) - set(mods_i))[:3]
      only_i = sorted(set(mods_i) - set(mods0))[:3]
      raise ValueError(
          f"LoRA experts 0 and {i} target different modules (only in 0: "
          f"{only0}, only in {i}: {only_i}); merge experts trained with the "
          "same targets")
    for p, (a, b) in mods_i.items():
      if np.ndim(a) != 2:
        raise ValueError(f"expert {i} is a stacked library; pass single "
                         "adapters")
      if (np.shape(a)[0], np.shape(b)[1]) != shapes[p]:
        raise ValueError(f"LoRA experts 0 and {i} differ in shape at {p}: "
                         f"{shapes[p]} vs {(np.shape(a)[0], np.shape(b)[1])} "
                         "(in, out); merge experts of the same base model")
  return experts, shapes, mods


def lora_delta(method: lora_lib.LoRA, params: dict) -> dict:
  """The expert's task vector over the base: {module: {'kernel': A B s}}
  nested like the base params (only the targeted kernels)."""
  expert = LoRAExpert(method, params)
  return transform.nest({
      p + "/kernel": jnp.asarray(a, jnp.float32) @ jnp.asarray(b, jnp.float32)
      * expert.scale for p, (a, b) in expert.modules().items()})


def svd_factors(delta: jax.Array, rank: int) -> tuple:
  """(lora_a (in, rank), lora_b (rank, out)) with a @ b the best rank-`rank`
  approximation of delta (in, out); zero-padded beyond min(in, out)."""
  u, s, vh = jnp.linalg.svd(delta, full_matrices=False)
  r = min(rank, s.shape[0])
  a = u[:, :r]
  b = s[:r, None] * vh[:r]
  if r < rank:
    a = jnp.pad(a, ((0, 0), (0, rank - r)))
    b = jnp.pad(b, ((0, rank - r), (0, 0)))
  return a, b


@functools.partial(jax.jit, static_argnames=("merge", "rank"))
def _merge_delta(a: jax.Array, b: jax.Array, scales: jax.Array,
                 weights: jax.Array, rng: Optional[jax.Array],
                 merge: static.StaticMerge, rank: int) -> tuple:
  """One module: a (E, in, r), b (E, r, out) -> merged rank-`rank` factors."""
  delta = jnp.einsum("eir,ero->eio", a, b) * scales[:, None, None]
  merged = merge.stacked([delta], weights, rng)[0]
  return svd_factors(merged, rank)


@functools.partial(jax.jit, static_argnames=("merge",))
def _merge_factors(a: jax.Array, b: jax.Array, scales: jax.Array,
                   weights: jax.Array, rng: Optional[jax.Array],
                   merge: static.StaticMerge) -> tuple:
  """One module, PEFT's non-SVD merge of the A's and of the B's."""
  ws = weights * scales
  root = jnp.sqrt(jnp.abs(ws))
  w_a = jnp.where(ws >= 0, root, -root)
  ra = rb = None
  if rng is not None:
    ra, rb = jax.random.fold_in(rng, 0), jax.random.fold_in(rng, 1)
  return (merge.stacked([a], w_a, ra)[0], merge.stacked([b], root, rb)[0])


def _as_merge(merge: Any) -> static.StaticMerge:
  if isinstance(merge, static.StaticMerge):
    return merge
  if isinstance(merge, str):
    merge = {"name": merge}
  if isinstance(merge, Mapping) or hasattr(merge, "to_dict"):
    built = static.MERGES.build(merge)
    if not isinstance(built, static.StaticMerge):
      raise ValueError(f"merge {merge!r} is not a static merge; merge_lora "
                       "takes task_arithmetic, ties, dare_linear, dare_ties "
                       "or magnitude_prune")
    return built
  raise ValueError(f"merge={merge!r}: pass a config such as {{'name': 'ties', "
                   "'density': 0.2}} or a MERGES-built static merge")


def merge_lora(experts: Sequence[Any],
               merge: Any = "task_arithmetic",
               weights: Optional[ArrayLike] = None, *,
               rank: Optional[int] = None, rng: Optional[jax.Array] = None,
               space: str = "delta",
               base: Union[dict, str, None] = None) -> tuple:
  """E LoRA experts -> (LoRA method, {'lora': params}) (module docstring).

  experts: LoRAExperts or (method, params) pairs of one base and targets;
  merge: a static merge config ({'name': 'ties', 'density': 0.2, ...}), its
    name, or a MERGES-built object; trimming is per module (trim='global'
    would need every module's update at once and is refused);
  weights: (E,), default ones; rng: for the DARE merges (module m uses
    fold_in(rng, m), m in sorted module order);
  rank: of the result (default: the experts' largest rank); space: 'delta'
    (merge the updates, truncated SVD) or 'factors' (PEFT's A/B merge);
  base: base params or their fingerprint, checked against the experts'.
  Returns the merged LoRA (rank, alpha = rank, dropout 0) and its params
  (unboxed f32 arrays), ready for export_peft / method.merge.
  """
  if space not in SPACES:
    raise ValueError(f"space={space!r}: use 'delta' (merge the updates, then "
                     "a truncated SVD) or 'factors' (PEFT's non-SVD merge)")
  merge = _as_merge(merge)
  if getattr(merge, "trim", "tensor") != "tensor":
    raise ValueError("merge_lora trims each module's update on its own: "
                     "trim='global' would need every module's update at once; "
                     "use trim='tensor' (PEFT's choice)")
  experts, shapes, mods = _checked(experts, base)
  w = static.check_weights(weights, len(experts))
  if merge.uses_rng and getattr(merge, "density", 1.0) < 1 and rng is None:
    raise ValueError(f"{type(merge).__name__} drops entries at random: pass "
                     "rng=jax.random.key(...)")
  ranks = [e.method.rank for e in experts]
  scales = jnp.asarray([e.scale for e in experts], jnp.float32)
  if space == "factors":
    if len(set(ranks)) != 1:
      raise ValueError(f"space='factors' merges the A's and B's entry by entry "
                       f"and needs experts of one rank, got ranks {ranks}; use "
                       "space='delta' (truncated SVD) for mixed ranks")
    if rank not in (None, ranks[0]):
      raise ValueError(f"space='factors' keeps the experts' rank {ranks[0]}; "
                       f"rank={rank} needs space='delta'")
  rank = int(rank or max(ranks))
  if rank < 1:
    raise ValueError(f"rank must be >= 1, got {rank}")
  top = max(ranks)
  flat = {}
  for m, path in enumerate(sorted(shapes)):
    key = None if rng is None else jax.random.fold_in(rng, m)
    a = np.stack([pad_rank(np.asarray(x[path][0], np.float32), 1, top)
                  for x in mods])
    b = np.stack([pad_rank(np.asarray(x[path][1], np.float32), 0, top)
                  for x in mods])
    if space == "delta":
      la, lb = _merge_delta(a, b, scales, w, key, merge, rank)
    else:
      la, lb = _merge_factors(a, b, scales, w, key, merge)
    flat[path] = {"lora_a": la, "lora_b": lb}
  targets = {e.method.targets for e in experts}
  targets = (targets.pop() if len(targets) == 1 else
             tuple(re.escape(p) for p in sorted(shapes)))
  method = lora_lib.LoRA(rank=rank, alpha=float(rank), dropout=0.0,
                         targets=targets)
  method.name = "lora"
  return method, {"lora": transform.nest(flat)}


def pad_rank(x: np.ndarray, axis: int, size: int) -> np.ndarray:
  """Zero-pads the rank axis to `size` (zero rank-1 terms add nothing)."""
  if x.shape[axis] == size:
    return x
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, size - x.shape[axis])
  return np.pad(x, pad)


def save_merged(model: Model, method: lora_lib.LoRA, params: dict,
                base: dict, folder: str, overwrite: bool = False) -> dict:
  """Folds the LoRA into the base kernels (LoRA.merge) and writes the result
  as a Hugging Face folder (config.json + model.safetensors, hf.save) that
  transformers loads. Returns the merged base params.

  `folder` may be a gs:// URL: hf.save writes a local staging folder that is
  then uploaded (mtjax.paths.staged_folder)."""
  if paths.is_url(folder) and not overwrite and paths.exists(
      paths.join(folder, "model.safetensors")):
    raise FileExistsError(f"{folder} already holds a checkpoint; pass "
                          "overwrite=True or choose another folder")
  merged = method.merge(model, {"base": base, **params})
  with paths.staged_folder(folder) as local:
    hf.save(model, merged, local, overwrite=overwrite)
  return merged
