"""Static merges of task vectors: pure, jit-able functions over pytrees.

A task vector is what fine-tuning added to a base, tau = theta_task -
theta_base (Ilharco et al. 2023, "Editing Models with Task Arithmetic",
arXiv:2212.04089), or for a LoRA module its update dW = A B * alpha / r
(mtjax.merging.lora_merge). Every merge here takes T task vectors of one
structure and returns one of that structure:

  task_arithmetic(tvs, weights)              sum_t w_t tau_t
  magnitude_prune(tvs, weights, density)     sum_t w_t trim(tau_t)
  ties(tvs, weights, density, majority_sign_method)
      TIES-Merging (Yadav et al. 2023, "TIES-Merging: Resolving Interference
      When Merging Models", arXiv:2306.01708): trim each tau_t to its top
      `density` magnitudes, elect a sign per entry, average the weighted
      entries that agree with it (disjoint mean)
  dare_linear(tvs, weights, density, rng)
  dare_ties(tvs, weights, density, rng, majority_sign_method)
      DARE (Yu et al. 2024, "Language Models are Super Mario: Absorbing
      Abilities from Homologous Models as a Free Lunch", arXiv:2311.03099):
      drop each entry with probability 1 - density and rescale the rest by
      1 / density, then a weighted sum (linear) or TIES's election and
      disjoint mean (ties)

`tvs` is a list of arrays, of pytrees of one structure (e.g. param dicts) or
of `TaskVector`s (a pytree with its base's fingerprint); the result has the
same kind. `weights` (T,) may be traced; `density`, `majority_sign_method`
and `trim` are static (jit with functools.partial or static_argnames).

The numbers are those of `peft.utils.merge_utils` (PEFT 0.21), so a user
moving from PEFT gets the same merge:
  - density >= 1 prunes nothing (the tensor is used as it is); magnitude
    trimming keeps exactly k = int(density * n) entries (ties at the k-th
    magnitude, which torch.topk breaks arbitrarily, go to the first indices);
  - the majority sign is elected from the trimmed, *unweighted* task vectors:
    'total' by the sign of sum_t tau_t, 'frequency' by the sign of
    sum_t sign(tau_t), a zero sum electing +;
  - the disjoint mean divides the sum of the weighted entries whose sign is
    the elected one by their count (at least 1).
`trim='tensor'` (default, PEFT's) trims each tensor of a task vector on its
own; `trim='global'` ranks all entries of a task vector together, as the
TIES paper does. The k-th largest magnitude is found by bisection on the
float bit patterns (exact; about 3x faster than sorting on CPU).

Merges are registered by name in `MERGES` with their options, so a config
lists them like routers:

  merge = MERGES.build({'name': 'ties', 'density': 0.2})
  merged = merge(tvs, weights)           # rng=key for the DARE merges

Bad input raises ValueError naming the problem and the fix: an empty list,
task vectors of different structures or shapes, task vectors of different
bases (fingerprints), density outside (0, 1], a wrong number of weights.
"""
import dataclasses
from typing import Any, Callable, NamedTuple, Optional, Sequence

import flax.struct
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from mtjax.methods import adapters
from mtjax.registry import Registry

# Every merge (static and learned) registers itself here by name.
MERGES = Registry("merge")

PyTree = Any
SIGN_METHODS = ("total", "frequency")
TRIMS = ("tensor", "global")


@flax.struct.dataclass
class TaskVector:
  """tau = theta_task - theta_base (a pytree), with the base's fingerprint.

  `base` is `adapters.fingerprint(base_params)` (a short sha256 of the
  base's names, shapes and bytes) or None when unknown; merges refuse task
  vectors with different fingerprints. A pytree (the fingerprint is static
  aux data), so it passes through jit.
  """
  delta: PyTree
  base: Optional[str] = flax.struct.field(pytree_node=False, default=None)


def _key_name(k: Any) -> str:
  return str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))


def leaf_paths(tree: PyTree) -> list:
  """'/'-joined paths of a pytree's leaves, in flatten order."""
  return ["/".join(_key_name(k) for k in path)
          for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def task_vector(finetuned: PyTree, base: PyTree, *,
                base_fingerprint: Optional[str] = None) -> TaskVector:
  """tau = finetuned - base over the leaves of `finetuned`.

  finetuned: params of a fine-tuned model, the whole tree or a subtree of
    `base` holding only the leaves that were trained (same nesting);
  base: the base params; `base_fingerprint` (adapters.fingerprint(base))
    saves hashing it again when many task vectors share one base.
  """
  fp = base_fingerprint or adapters.fingerprint(base)
  flat_base = dict(zip(leaf_paths(base), jax.tree.leaves(base), strict=True))
  paths = leaf_paths(finetuned)
  missing = [p for p in paths if p not in flat_base]
  if missing:
    raise ValueError(f"task_vector: the fine-tuned params have leaves the base "
                     f"lacks ({missing[:4]}); pass params of the same model")
  leaves, treedef = jax.tree.flatten(finetuned)
  out = []
  for p, x in zip(paths, leaves, strict=True):
    b = flat_base[p]
    if tuple(jnp.shape(x)) != tuple(jnp.shape(b)):
      raise ValueError(f"task_vector: {p} has shape {jnp.shape(x)} but the base "
                       f"has {jnp.shape(b)}; pass params of the same model")
    out.append(jnp.asarray(x) - jnp.asarray(b))
  return TaskVector(jax.tree.unflatten(treedef, out), fp)


def apply_task_vector(base: PyTree, tv: Any, scale: ArrayLike = 1.0, *,
                      check_base: bool = True) -> PyTree:
  """base + scale * tau on the leaves tau covers (a tree or a TaskVector).

  A TaskVector with a fingerprint is checked against `base` (hashing its
  bytes: pass check_base=False under jit, where they are not known).
  """
  delta = tv
  if isinstance(tv, TaskVector):
    delta = tv.delta
    if check_base and tv.base is not None:
      if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(base)):
        raise ValueError("apply_task_vector cannot fingerprint traced base "
                         "params; pass check_base=False under jit")
      fp = adapters.fingerprint(base)
      if fp != tv.base:
        raise ValueError(f"the task vector was computed from a different base "
                         f"(fingerprint {tv.base}) than the one given ({fp}); "
                         "apply it to the base it was computed from")
  flat = dict(zip(leaf_paths(delta), jax.tree.leaves(delta), strict=True))
  paths = leaf_paths(base)
  unknown = sorted(set(flat) - set(paths))
  if unknown:
    raise ValueError(f"the task vector has leaves the base lacks ({unknown[:4]}"
                     "); apply it to params of the model it came from")
  leaves, treedef = jax.tree.flatten(base)
  out = [x if p not in flat else
         (x + scale * flat[p]).astype(jnp.result_type(x))
         for p, x in zip(paths, leaves, strict=True)]
  return jax.tree.unflatten(treedef, out)


# ------------------------------------------------------------ validation

class Tasks(NamedTuple):
  """T task vectors, stacked per leaf: the form the merges compute on."""
  stacked: list          # per leaf: (T, *leaf shape)
  treedef: Any           # of one task vector
  paths: list            # '/'-joined leaf paths
  kind: str              # 'array' | 'tree' | 'task_vector'
  base: Optional[str]    # the common base fingerprint (None if unknown)

  @property
  def num(self) -> int:
    return self.stacked[0].shape[0]


def check_density(density: float) -> float:
  """Density (the fraction of entries kept) must be in (0, 1]."""
  if isinstance(density, jax.core.Tracer):
    raise ValueError("density must be a Python float (static under jit: "
                     "functools.partial or static_argnames)")
  if not 0.0 < float(density) <= 1.0:
    raise ValueError(f"density={density}: it is the fraction of entries kept "
                     "and must be in (0, 1] (1 keeps everything); e.g. 0.2 "
                     "keeps the top 20% (TIES) or each entry with p=0.2 (DARE)")
  return float(density)


def check_same_base(fingerprints: Sequence[Optional[str]],
                    what: str = "task vectors") -> Optional[str]:
  """The common fingerprint of those given (None entries are unknown)."""
  known = [(i, f) for i, f in enumerate(fingerprints) if f is not None]
  if not known:
    return None
  i0, f0 = known[0]
  for j, f in known[1:]:
    if f != f0:
      raise ValueError(
          f"{what} {i0} and {j} come from different base models (fingerprints "
          f"{f0} and {f}): merge only {what} computed against the same base "
          "params (e.g. task_vector(finetuned, base) with one base)")
  return f0


def gather(task_vectors: Sequence[Any], what: str = "task vectors") -> Tasks:
  """Validates T task vectors of one structure and stacks them per leaf."""
  if not isinstance(task_vectors, (list, tuple)):
    raise ValueError(f"pass the {what} as a list (one entry per task), got "
                     f"{type(task_vectors).__name__}")
  if len(task_vectors) == 0:
    raise ValueError(f"no {what} to merge: pass a non-empty list")
  is_tv = [isinstance(t, TaskVector) for t in task_vectors]
  if any(is_tv) and not all(is_tv):
    raise ValueError(f"mix of TaskVector and plain {what}: wrap all of them "
                     "with task_vector(...) or none")
  base = check_same_base([t.base for t in task_vectors], what) if all(
      is_tv) else None
  trees = [t.delta if isinstance(t, TaskVector) else t for t in task_vectors]
  kind = "task_vector" if all(is_tv) else (
      "array" if all(hasattr(t, "shape") and not isinstance(t, dict)
                     for t in trees) else "tree")
  leaves0, treedef = jax.tree.flatten(trees[0])
  paths = leaf_paths(trees[0])
  if not leaves0:
    raise ValueError(f"{what} 0 has no array leaves")
  per_task = [leaves0]
  for i, t in enumerate(trees[1:], 1):
    leaves, td = jax.tree.flatten(t)
    if td != treedef:
      other = set(leaf_paths(t))
      missing = sorted(set(paths) - other)[:3]
      extra = sorted(other - set(paths))[:3]
      raise ValueError(
          f"{what} 0 and {i} have different structures (only in 0: {missing}, "
          f"only in {i}: {extra}): merge {what} of the same parameters (the "
          "same model, method and targets)")
    for p, a, b in zip(paths, leaves0, leaves, strict=True):
      if jnp.shape(a) != jnp.shape(b):
        where = f" at {p}" if p else ""
        raise ValueError(f"{what} 0 and {i} differ in shape{where}: "
                         f"{jnp.shape(a)} vs {jnp.shape(b)}; merge {what} of "
                         "the same model (and LoRA rank)")
    per_task.append(leaves)
  stacked = [jnp.stack([jnp.asarray(leaves[j]) for leaves in per_task])
             for j in range(len(leaves0))]
  return Tasks(stacked, treedef, paths, kind, base)


def check_weights(weights: Optional[ArrayLike], num: int) -> jax.Array:
  """(T,) weights; None: ones (every task vector as it is)."""
  if weights is None:
    return jnp.ones((num,), jnp.float32)
  w = jnp.asarray(weights, jnp.float32)
  if w.shape != (num,):
    raise ValueError(f"weights have shape {w.shape} for {num} task vectors: "
                     f"give one weight per task vector, shape ({num},)")
  return w


def finish(tasks: Tasks, leaves: Sequence[jax.Array]) -> Any:
  """Merged leaves back in the form the task vectors came in."""
  leaves = [x.astype(s.dtype) for x, s in zip(leaves, tasks.stacked,
                                                strict=True)]
  tree = jax.tree.unflatten(tasks.treedef, leaves)
  if tasks.kind == "task_vector":
    return TaskVector(tree, tasks.base)
  return tree


def _check_choice(value: str, choices: tuple, name: str) -> str:
  if value not in choices:
    raise ValueError(f"{name}={value!r}: use one of {list(choices)}")
  return value


# ------------------------------------------------------------ primitives

def sum_over_tasks(fn: Callable, *stacked: jax.Array) -> Any:
  """sum_t fn(stacked[0][t], stacked[1][t], ...) (a pytree), in task order.

  A scan over the task axis: XLA on CPU reduces a leading axis slowly
  (x.sum(0) of a (100, 576, 576) array takes seconds), while adding
  contiguous per-task slices is some 30x faster.
  """
  shapes = jax.eval_shape(fn, *[x[0] for x in stacked])
  init = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

  def body(acc, slices):
    return jax.tree.map(jnp.add, acc, fn(*slices)), None

  out, _ = jax.lax.scan(body, init, tuple(stacked))
  return out


# Entries counted per float32 partial sum: exact (< 2**24), and XLA on CPU
# sums floats several times faster than ints or bools.
_CHUNK = 4096


def _chunked(bits: jax.Array) -> jax.Array:
  """(T, n) -> (T, m, c), padded with -1 (below every threshold >= 0)."""
  t, n = bits.shape
  c = min(_CHUNK, n)
  bits = jnp.pad(bits, ((0, 0), (0, -n % c)), constant_values=-1)
  return bits.reshape(t, -1, c)


def _count(chunked: Sequence[jax.Array], pred: Callable) -> jax.Array:
  """(T,) int32: per task, the entries over all leaves where pred holds."""
  return sum(jnp.sum(jnp.sum(jnp.where(pred(b), 1.0, 0.0), axis=2).astype(
      jnp.int32), axis=1) for b in chunked)


def _kth_largest_bits(chunked: Sequence[jax.Array], k: int) -> jax.Array:
  """Per task, the bit pattern of the k-th largest |entry| over the leaves.

  chunked: int32 views of non-negative floats (monotone in the value), each
  (T, m, c) (`_chunked`); k >= 1. Bisection keeps count(>= lo) >= k >
  count(>= hi); 32 steps cover the int32 range exactly.
  """
  t = chunked[0].shape[0]
  lo = jnp.zeros((t,), jnp.int32)
  hi = jnp.full((t,), 0x7F800001, jnp.int32)   # above +inf

  def body(_, carry):
    lo, hi = carry
    mid = lo + (hi - lo) // 2
    ok = _count(chunked, lambda b: b >= mid[:, None, None]) >= k
    return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

  lo, _ = jax.lax.fori_loop(0, 32, body, (lo, hi))
  return lo


def _top_k_masks(xs: Sequence[jax.Array], k: int) -> list:
  """Masks keeping exactly the k largest |entries| of each task over xs.

  xs: leaves (T, ...); ties at the k-th magnitude are kept in flatten order
  (leaf by leaf, then by index) until k entries are kept.
  """
  if k <= 0:
    return [jnp.zeros(x.shape, bool) for x in xs]
  t = xs[0].shape[0]
  bits = [jax.lax.bitcast_convert_type(
      jnp.abs(x.reshape(t, -1)).astype(jnp.float32), jnp.int32) for x in xs]
  chunked = [_chunked(b) for b in bits]
  thr = _kth_largest_bits(chunked, k)
  room = k - _count(chunked, lambda b: b > thr[:, None, None])   # (T,)
  ties = _count(chunked, lambda b: b == thr[:, None, None])
  thr = thr[:, None]

  def all_ties(_):     # the usual case: one entry (or all ties) at thr
    return [b >= thr for b in bits]

  def first_ties(_):   # more entries equal the k-th magnitude than fit
    masks, before = [], jnp.zeros((t,), jnp.int32)
    for b in bits:
      eq = b == thr
      rank = jnp.cumsum(eq, axis=1, dtype=jnp.int32) + before[:, None]
      masks.append((b > thr) | (eq & (rank <= room[:, None])))
      before = before + jnp.sum(eq, axis=1, dtype=jnp.int32)
    return masks

  masks = jax.lax.cond(jnp.any(ties > room), first_ties, all_ties, None)
  return [m.reshape(x.shape) for m, x in zip(masks, xs, strict=True)]


def magnitude_trim(stacked: Sequence[jax.Array], density: float,
                   trim: str = "tensor") -> list:
  """Each task's top-`density` magnitudes kept, the rest zeroed.

  stacked: leaves (T, ...). trim='tensor': k = int(density * n) per leaf
  (PEFT's magnitude_based_pruning); 'global': k = int(density * N) over all
  N entries of a task vector (the TIES paper). density >= 1: unchanged.
  """
  _check_choice(trim, TRIMS, "trim")
  if density >= 1:
    return list(stacked)
  if trim == "tensor":
    masks = [_top_k_masks([x], int(density * (x.size // x.shape[0])))[0]
             for x in stacked]
  else:
    total = sum(x.size // x.shape[0] for x in stacked)
    masks = _top_k_masks(stacked, int(density * total))
  return [x * m.astype(x.dtype) for x, m in zip(stacked, masks, strict=True)]


def random_drop(stacked: Sequence[jax.Array], density: float,
                rng: jax.Array) -> list:
  """DARE: each entry kept with probability `density`, kept ones / density.

  The mask of leaf j is bernoulli(fold_in(rng, j), density, (T, ...)): one
  independent draw per task and entry. density >= 1: unchanged.
  """
  if density >= 1:
    return list(stacked)
  if rng is None:
    raise ValueError("DARE drops entries at random: pass rng=jax.random.key(..)")
  out = []
  for j, x in enumerate(stacked):
    keep = jax.random.bernoulli(jax.random.fold_in(rng, j), density, x.shape)
    out.append(x * keep.astype(x.dtype) / jnp.asarray(density, x.dtype))
  return out


def elect_sign(x: jax.Array, method: str = "total") -> jax.Array:
  """The elected sign (+1 / -1) per entry of T task vectors x (T, ...):
  that of sum_t x_t ('total') or of sum_t sign(x_t) ('frequency'), + for 0
  (peft's calculate_majority_sign_mask)."""
  _check_choice(method, SIGN_METHODS, "majority_sign_method")
  magnitude = sum_over_tasks(jnp.sign if method == "frequency" else
                             (lambda a: a), x)
  return jnp.where(magnitude >= 0, 1, -1).astype(x.dtype)


def disjoint_merge(x: jax.Array, weights: jax.Array,
                   sign: jax.Array) -> jax.Array:
  """sum_t w_t x_t [sign(x_t) = sign] / #{t: sign(x_t) = sign} (at least 1):
  the mean of the weighted entries that agree with the elected sign."""
  def agree(a, w):
    keep = (jnp.sign(a) == sign).astype(a.dtype)
    return a * w * keep, keep
  total, count = sum_over_tasks(agree, x, weights)
  return total / jnp.maximum(count, 1.0)


def _linear(stacked, w):
  return [sum_over_tasks(lambda a, wt: a * wt, x, w) for x in stacked]


def _ties_merge(stacked, w, method):
  return [disjoint_merge(x, w, elect_sign(x, method)) for x in stacked]


# ---------------------------------------------------------------- merges

def task_arithmetic(task_vectors: Sequence[Any],
                    weights: Optional[ArrayLike] = None) -> Any:
  """sum_t w_t tau_t (Ilharco et al. 2023), leaf by leaf.

  task_vectors: T arrays / pytrees / TaskVectors of one structure;
  weights: (T,), default ones. Returns one of that structure.
  """
  tasks = gather(task_vectors)
  return finish(tasks, _linear(tasks.stacked, check_weights(weights,
                                                            tasks.num)))


def magnitude_prune(task_vectors: Sequence[Any],
                    weights: Optional[ArrayLike], density: float, *,
                    trim: str = "tensor") -> Any:
  """sum_t w_t trim(tau_t): each task vector keeps its top-`density`
  magnitudes (per tensor or over the whole vector, `trim`)."""
  density = check_density(density)
  tasks = gather(task_vectors)
  w = check_weights(weights, tasks.num)
  return finish(tasks, _linear(magnitude_trim(tasks.stacked, density, trim),
                               w))


def ties(task_vectors: Sequence[Any], weights: Optional[ArrayLike],
         density: float, majority_sign_method: str = "total", *,
         trim: str = "tensor") -> Any:
  """TIES-Merging: trim, elect sign, disjoint mean (see module docstring).

  task_vectors: T of one structure; weights (T,); density in (0, 1];
  majority_sign_method 'total' | 'frequency'; trim 'tensor' | 'global'.
  """
  density = check_density(density)
  _check_choice(majority_sign_method, SIGN_METHODS, "majority_sign_method")
  tasks = gather(task_vectors)
  w = check_weights(weights, tasks.num)
  trimmed = magnitude_trim(tasks.stacked, density, trim)
  return finish(tasks, _ties_merge(trimmed, w, majority_sign_method))


def dare_linear(task_vectors: Sequence[Any], weights: Optional[ArrayLike],
                density: float, rng: Optional[jax.Array] = None) -> Any:
  """DARE then task arithmetic: drop with p = 1 - density, rescale by
  1 / density, sum_t w_t. density 1 is task_arithmetic (rng unused)."""
  density = check_density(density)
  tasks = gather(task_vectors)
  w = check_weights(weights, tasks.num)
  return finish(tasks, _linear(random_drop(tasks.stacked, density, rng), w))


def dare_ties(task_vectors: Sequence[Any], weights: Optional[ArrayLike],
              density: float, rng: Optional[jax.Array] = None,
              majority_sign_method: str = "total") -> Any:
  """DARE then TIES's sign election and disjoint mean. density 1 is ties
  at density 1 (rng unused)."""
  density = check_density(density)
  _check_choice(majority_sign_method, SIGN_METHODS, "majority_sign_method")
  tasks = gather(task_vectors)
  w = check_weights(weights, tasks.num)
  dropped = random_drop(tasks.stacked, density, rng)
  return finish(tasks, _ties_merge(dropped, w, majority_sign_method))


# -------------------------------------------------------------- registry

@dataclasses.dataclass(frozen=True)
class StaticMerge:
  """A configured static merge: merge(task_vectors, weights=None, rng=None).

  `stacked(leaves, weights, rng)` merges pre-stacked leaves (T, ...) with
  per-tensor trimming (what lora_merge uses, module by module).
  """
  uses_rng = False

  def __call__(self, task_vectors: Sequence[Any],
               weights: Optional[ArrayLike] = None,
               rng: Optional[jax.Array] = None) -> Any:
    tasks = gather(task_vectors)
    w = check_weights(weights, tasks.num)
    return finish(tasks, self.stacked(tasks.stacked, w, rng))

  def stacked(self, leaves: Sequence[jax.Array], weights: jax.Array,
              rng: Optional[jax.Array] = None) -> list:
    raise NotImplementedError

  def check_rng(self, rng: Optional[jax.Array]) -> None:
    if self.uses_rng and rng is None and getattr(self, "density", 1.0) < 1:
      raise ValueError(f"{type(self).__name__} drops entries at random: pass "
                       "rng=jax.random.key(...)")


@MERGES.register("task_arithmetic")
@dataclasses.dataclass(frozen=True)
class TaskArithmetic(StaticMerge):
  """sum_t w_t tau_t."""

  def stacked(self, leaves, weights, rng=None):
    del rng
    return _linear(leaves, weights)


@MERGES.register("magnitude_prune")
@dataclasses.dataclass(frozen=True)
class MagnitudePrune(StaticMerge):
  """sum_t w_t trim(tau_t) (see `magnitude_prune`)."""
  density: float
  trim: str = "tensor"

  def __post_init__(self):
    check_density(self.density)
    _check_choice(self.trim, TRIMS, "trim")

  def stacked(self, leaves, weights, rng=None):
    del rng
    return _linear(magnitude_trim(leaves, self.density, self.trim), weights)


@MERGES.register("ties")
@dataclasses.dataclass(frozen=True)
class Ties(StaticMerge):
  """TIES-Merging (see `ties`)."""
  density: float
  majority_sign_method: str = "total"
  trim: str = "tensor"

  def __post_init__(self):
    check_density(self.density)
    _check_choice(self.trim, TRIMS, "trim")
    _check_choice(self.majority_sign_method, SIGN_METHODS,
                  "majority_sign_method")

  def stacked(self, leaves, weights, rng=None):
    del rng
    return _ties_merge(magnitude_trim(leaves, self.density, self.trim),
                       weights, self.majority_sign_method)


@MERGES.register("dare_linear")
@dataclasses.dataclass(frozen=True)
class DareLinear(StaticMerge):
  """DARE + task arithmetic (see `dare_linear`)."""
  density: float
  uses_rng = True

  def __post_init__(self):
    check_density(self.density)

  def stacked(self, leaves, weights, rng=None):
    self.check_rng(rng)
    return _linear(random_drop(leaves, self.density, rng), weights)


@MERGES.register("dare_ties")
@dataclasses.dataclass(frozen=True)
class DareTies(StaticMerge):
  """DARE + TIES election and disjoint mean (see `dare_ties`)."""
  density: float
  majority_sign_method: str = "total"
  uses_rng = True

  def __post_init__(self):
    check_density(self.density)
    _check_choice(self.majority_sign_method, SIGN_METHODS,
                  "majority_sign_method")

  def stacked(self, leaves, weights, rng=None):
    self.check_rng(rng)
    return _ties_merge(random_drop(leaves, self.density, rng), weights,
                       self.majority_sign_method)
