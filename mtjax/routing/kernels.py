"""Array-level routing among LoRA experts: scores, top-k, grouped application.

Pure functions used by PHATGOOSE (Muqeeth et al. 2024, "Learning to Route
Among Specialized Experts for Zero-Shot Generalization", arXiv:2402.05859) and
the routing baselines. Shapes: N tokens, d inputs, o outputs, E experts, rank
r, k experts per token.

  a: (E, d, r), b: (E, r, o)       expert LoRA factors (mtjax LoRA layout)
  gates: (E, d)                     one PHATGOOSE gate vector per expert
  idx: (N, k) int32, w: (N, k)      chosen experts and their weights

Per-token top-k must not cost O(E) expert applications. `apply_experts`
(defined in mtjax.methods.grouped, which mixed-adapter batches share, and
re-exported here with the other impls) sorts the N*k (token, expert)
assignments by expert and applies each expert only to its own tokens:
'grouped' (CPU: a capacity layout with an exact overflow loop), 'sgmv' /
'bgmv' (GPU: the Pallas kernels of mtjax.methods.pallas_kernels after
Punica), 'megablox' (TPU: the megablox grouped matmul), and for decoding
steps (N*k <= E) a per-assignment 'gather' (CPU, TPU) or 'bgmv' (GPU) whose
cost grows with k, not E. 'auto' = `default_impl(N*k, E)`; see grouped.py's
docstring for 'blocked', 'ragged' and the 'dense' reference. In a T5 with
random gates a handful of experts often take most tokens: every impl is exact
for any load. Routing scores are O(E*d) per token by nature (one dot product
per expert).
"""
import math
from typing import Optional

import jax
import jax.numpy as jnp

from mtjax.methods import grouped

# Expert application lives in mtjax.methods.grouped (mixed-adapter batches
# use it too); routing's callers keep these names.
IMPLS = grouped.IMPLS
apply_bgmv = grouped.apply_bgmv
apply_blocked = grouped.apply_blocked
apply_dense = grouped.apply_dense
apply_experts = grouped.apply_experts
apply_gather = grouped.apply_gather
apply_grouped = grouped.apply_grouped
apply_megablox = grouped.apply_megablox
apply_ragged = grouped.apply_ragged
apply_sgmv = grouped.apply_sgmv
default_block = grouped.default_block
default_capacity = grouped.default_capacity
default_impl = grouped.default_impl
dense_weights = grouped.dense_weights
sort_assignments = grouped.sort_assignments

LN_EPS = 1e-5   # torch.nn.LayerNorm's default, as in the released PHATGOOSE code


def standardize(x: jax.Array, eps: float = LN_EPS) -> jax.Array:
  """LayerNorm without affine parameters over the last axis, in f32."""
  x = x.astype(jnp.float32)
  mean = jnp.mean(x, -1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), -1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps)


def phatgoose_logits(h: jax.Array, gates: jax.Array) -> jax.Array:
  """PHATGOOSE router scores: <LN(h), LN(v_e)> / sqrt(d).  h (N, d) -> (N, E)."""
  d = h.shape[-1]
  return standardize(h) @ standardize(gates).T / math.sqrt(d)


def arrow_prototypes(a: jax.Array, b: jax.Array) -> jax.Array:
  """Arrow prototypes (Ostapenko et al. 2024): top right singular vector of
  each expert's update.  x @ A @ B moves most along x = u_e, the top left
  singular vector of A B (d, o).  a (E, d, r), b (E, r, o) -> (E, d).

  Computed without forming A B: A = Q R (thin QR), A B = Q (R B), and the top
  left singular vector of the small (r, o) matrix R B is mapped back by Q.
  """
  q, rr = jnp.linalg.qr(a.astype(jnp.float32))        # (E, d, r), (E, r, r)
  u, _, _ = jnp.linalg.svd(rr @ b.astype(jnp.float32), full_matrices=False)
  return jnp.einsum("edr,er->ed", q, u[:, :, 0])


def arrow_logits(h: jax.Array, prototypes: jax.Array) -> jax.Array:
  """|<h, u_e>|: singular vectors have no sign.  h (N, d) -> (N, E)."""
  return jnp.abs(h.astype(jnp.float32) @ prototypes.T)


def top_k(logits: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """Softmax over experts, keep the top k and renormalise.

  Equal to softmax over the k largest logits. Returns idx (N, k) int32 and
  weights (N, k) f32 summing to one.
  """
  if k > logits.shape[-1]:
    raise ValueError(f"top_k={k} exceeds the {logits.shape[-1]} experts")
  vals, idx = jax.lax.top_k(logits.astype(jnp.float32), k)
  return idx.astype(jnp.int32), jax.nn.softmax(vals, axis=-1)


def apply_all_uniform(h: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
  """Mean of all experts' outputs (= the averaged update), O(E r (d + o)).

  h (N, d) -> (N, o): stacks the factors as one rank E*r LoRA.
  """
  num_e, d, r = a.shape
  dt = jnp.promote_types(h.dtype, a.dtype)
  a_cat = jnp.transpose(a, (1, 0, 2)).reshape(d, num_e * r).astype(dt)
  z = h.astype(dt) @ a_cat
  return (z @ b.reshape(num_e * r, -1).astype(dt)).astype(jnp.float32) / num_e


# ------------------------------------------------------------------ diagnostics

def entropy(logits: jax.Array) -> jax.Array:
  """Entropy (nats) of softmax(logits) over the last axis."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def expert_load(idx: jax.Array, num_experts: int,
                mask: Optional[jax.Array] = None) -> jax.Array:
  """Share of routed (token, choice) slots per expert: (E,) summing to 1.

  idx (..., k) int, mask (...) (1 for counted tokens) or None.
  """
  one = jax.nn.one_hot(idx, num_experts, dtype=jnp.float32)   # (..., k, E)
  if mask is not None:
    one = one * mask[..., None, None]
  tot = one.sum(axis=tuple(range(one.ndim - 1)))
  return tot / jnp.maximum(tot.sum(), 1.0)
