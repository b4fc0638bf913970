"""Array-level routing among LoRA experts: scores, top-k, grouped application.

Pure functions used by PHATGOOSE (Muqeeth et al. 2024, "Learning to Route
Among Specialized Experts for Zero-Shot Generalization", arXiv:2402.05859) and
the routing baselines. Shapes: N tokens, d inputs, o outputs, E experts, rank
r, k experts per token.

  a: (E, d, r), b: (E, r, o)       expert LoRA factors (mtjax LoRA layout)
  gates: (E, d)                     one PHATGOOSE gate vector per expert
  idx: (N, k) int32, w: (N, k)      chosen experts and their weights

Per-token top-k must not cost O(E) expert applications. `apply_experts`
therefore sorts the N*k (token, expert) assignments by expert and applies each
expert only to its own tokens:
  * 'grouped' (default off TPU): a capacity layout (E, C, d), C about
    1.25 N*k/E (static), filled with each expert's first C assignments; one
    batched matmul per factor reads every expert's weights once, in place.
    Assignments beyond capacity (skewed routing: in a T5 with random gates a
    handful of experts often take most tokens) go through a loop over
    per-expert blocks that skips the trips the actual overflow does not need,
    so the result is exact for any load, balanced loads cost one pass, and
    gradients flow (static loop bounds).
  * 'blocked': the sorted assignments are padded per expert to a multiple of
    `block` rows, so every block of rows belongs to one expert; one batched
    matmul over blocks (gathering that block's expert factors) does all the
    work. Compute grows with k, not E, but copying factors per block makes it
    2-3x slower than 'grouped' on CPU.
  * 'ragged': the same sort followed by `jax.lax.ragged_dot` (grouped matmul).
    It lowers to a native grouped kernel on TPU (`chlo.ragged_dot`). On CPU it
    falls back to `_ragged_dot_general_impl`, which masks a dense (E, M, d)
    copy: O(E) work; measured on an H100 with jax 0.11.2 the GPU lowering is
    that dense form too (a Triton gemm over f32[M, E, d], 64 GiB at E=1024 in
    benchmarks/routing.py; 83x the base forward at E=256 where 'grouped' is
    15x). Hence 'auto' picks 'ragged' on TPU only and 'grouped' elsewhere.
  * 'dense': every expert on every token, then the weighted sum; the
    reference the others are tested against (O(E) memory and compute).
Routing scores are O(E*d) per token by nature (one dot product per expert).
"""
import math
from typing import Optional

import jax
import jax.numpy as jnp

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


def dense_weights(idx: jax.Array, w: jax.Array,
                  num_experts: int) -> jax.Array:
  """(N, k) choices -> (N, E) weight matrix (zeros for unchosen experts)."""
  onehot = jax.nn.one_hot(idx, num_experts, dtype=w.dtype)   # (N, k, E)
  return jnp.einsum("nk,nke->ne", w, onehot)


def apply_dense(h: jax.Array, a: jax.Array, b: jax.Array, idx: jax.Array,
                w: jax.Array) -> jax.Array:
  """Reference: every expert on every token, weighted.  -> (N, o) f32."""
  dt = jnp.promote_types(h.dtype, a.dtype)
  z = jnp.einsum("nd,edr->ner", h.astype(dt), a.astype(dt))
  y = jnp.einsum("ner,ero->neo", z, b.astype(dt))
  return jnp.einsum("ne,neo->no", dense_weights(idx, w, a.shape[0]),
                    y.astype(jnp.float32))


def _sort_assignments(idx, num_experts):
  """Sorts the N*k assignments by expert.

  Returns order (M,) (assignment ids in expert order), expert of each sorted
  assignment (M,), per-expert counts (E,) and each expert's first sorted row.
  """
  flat = idx.reshape(-1)
  order = jnp.argsort(flat, stable=True)
  counts = jnp.bincount(flat, length=num_experts)
  starts = jnp.cumsum(counts) - counts
  return order, flat[order], counts, starts


def default_block(num_assignments: int, num_experts: int) -> int:
  """Rows per block: about half the mean group size, a power of two in [1, 64]."""
  mean = num_assignments / max(num_experts, 1)
  return int(min(64, max(1, 2 ** math.floor(math.log2(max(mean / 2, 1))))))


def apply_blocked(h: jax.Array, a: jax.Array, b: jax.Array, idx: jax.Array,
                  w: jax.Array, block: Optional[int] = None) -> jax.Array:
  """Sort-and-segment expert application in fixed-size blocks.  -> (N, o) f32."""
  n, k = idx.shape
  num_e, d, _ = a.shape
  m = n * k
  block = block or default_block(m, num_e)
  order, e_sorted, counts, starts = _sort_assignments(idx, num_e)
  padded = (counts + block - 1) // block * block
  pends = jnp.cumsum(padded)
  pstarts = pends - padded
  # Row of each sorted assignment inside the padded layout.
  slot = pstarts[e_sorted] + jnp.arange(m) - starts[e_sorted]
  num_blocks = min(m, -(-m // block) + min(num_e, m)) if block > 1 else m
  rows = num_blocks * block
  # Which token fills each padded row (n = an all-zero padding row).
  row_token = jnp.full((rows,), n, jnp.int32).at[slot].set(order // k)
  x = jnp.concatenate([h, jnp.zeros((1, d), h.dtype)])[row_token]
  block_expert = jnp.minimum(
      jnp.searchsorted(pends, jnp.arange(num_blocks) * block, side="right"),
      num_e - 1)
  dt = jnp.promote_types(h.dtype, a.dtype)
  z = jnp.einsum("gbd,gdr->gbr", x.reshape(num_blocks, block, d).astype(dt),
                 a[block_expert].astype(dt))
  y = jnp.einsum("gbr,gro->gbo", z, b[block_expert].astype(dt))
  y = y.reshape(rows, -1).astype(jnp.float32)
  # Back to (token, choice) order: a gather, then the weighted sum over k.
  slot_of_assignment = jnp.zeros((m,), jnp.int32).at[order].set(slot)
  return jnp.einsum("nk,nko->no", w.astype(jnp.float32),
                    y[slot_of_assignment].reshape(n, k, -1))


def default_capacity(num_assignments: int, num_experts: int) -> int:
  """Rows per expert in the grouped layout: 1.25x the mean load, a multiple of 8.

  Larger wastes compute on padding rows; smaller sends more rows to the
  overflow loop. A static function of the shapes (jit needs static shapes).
  """
  mean = num_assignments / max(num_experts, 1)
  return int(min(num_assignments, max(8, -(-int(math.ceil(1.25 * mean)) // 8) * 8)))


def _expert_matmuls(x, a, b, row_w):
  """Batched (x @ a * row_w) @ b over a leading group axis.

  x (G, R, d), a (G, d, r), b (G, r, o), row_w (G, R) -> (G, R, o) f32. The
  routing weight scales the rank-r intermediate (cheaper than the output).
  """
  dt = jnp.promote_types(x.dtype, a.dtype)
  z = jnp.einsum("grd,gdq->grq", x.astype(dt), a.astype(dt),
                 preferred_element_type=jnp.float32)
  z = (z * row_w[..., None]).astype(dt)
  return jnp.einsum("grq,gqo->gro", z, b.astype(dt),
                    preferred_element_type=jnp.float32)


def apply_grouped(h: jax.Array, a: jax.Array, b: jax.Array, idx: jax.Array,
                  w: jax.Array, capacity: Optional[int] = None, block: int = 64,
                  trip_rows: Optional[int] = None) -> jax.Array:
  """Capacity layout with exact overflow handling.  -> (N, o) f32.

  The first `capacity` assignments of each expert fill an (E, C, d) array, so
  one batched matmul reads every expert's factors once, in place (no copies).
  Assignments beyond an expert's capacity (skewed routing) are laid out like
  'blocked' (per-expert blocks of `block` rows, each block with a copy of its
  expert's factors) and processed by a loop, `trip_rows` rows per trip; trips
  beyond the actual overflow are skipped (lax.cond), so balanced loads cost
  one pass, the worst case (every token on one expert) stays exact, and the
  function is reverse-differentiable (static loop bounds).
  """
  n, k = idx.shape
  num_e, d, _ = a.shape
  o = b.shape[-1]
  m = n * k
  cap = capacity or default_capacity(m, num_e)
  order, e_sorted, counts, starts = _sort_assignments(idx, num_e)
  token = order // k                                # token of each sorted row
  w_sorted = w.reshape(-1)[order].astype(jnp.float32)
  pos = jnp.arange(m) - starts[e_sorted]            # rank inside its expert
  fits = pos < cap

  def rows_of_h(tok):   # token n (padding) reads zeros
    return h.at[tok].get(mode="fill", fill_value=0)

  # ---- capacity pass: rows e*C .. e*C+C-1 belong to expert e
  rows = num_e * cap
  slot = jnp.where(fits, e_sorted * cap + pos, rows)   # rows: out of bounds
  row_token = jnp.full((rows,), n, jnp.int32).at[slot].set(token, mode="drop")
  row_w = jnp.zeros((rows,), jnp.float32).at[slot].set(w_sorted, mode="drop")
  y = _expert_matmuls(rows_of_h(row_token).reshape(num_e, cap, d), a, b,
                      row_w.reshape(num_e, cap)).reshape(rows, o)
  soa = jnp.zeros((m,), jnp.int32).at[order].set(slot).reshape(n, k)
  # k row gathers (weights are in y); overflowed assignments (slot == rows)
  # read zeros. (Appending a zero row to y instead is 3x slower on XLA:CPU.)
  out = sum(y.at[soa[:, j]].get(mode="fill", fill_value=0) for j in range(k))
  if cap >= m:
    return out
  # ---- overflow: per-expert blocks of `block` rows, `chunk` blocks per trip
  block = min(block, m - cap)
  trip_rows = trip_rows or max(block, m // 4)
  chunk = -(-trip_rows // block)
  over = jnp.maximum(counts - cap, 0)
  padded = (over + block - 1) // block * block
  pends = jnp.cumsum(padded)
  # An overflowing expert has > cap rows, so at most m // (cap + 1) of them.
  max_blocks = -(-(m - cap) // block) + min(num_e, m // (cap + 1))
  max_blocks = -(-max_blocks // chunk) * chunk
  orows = max_blocks * block
  oslot = jnp.where(fits, orows, pends[e_sorted] - padded[e_sorted] + pos - cap)
  ov_token = jnp.full((orows,), n, jnp.int32).at[oslot].set(token, mode="drop")
  ov_w = jnp.zeros((orows,), jnp.float32).at[oslot].set(w_sorted, mode="drop")
  block_expert = jnp.minimum(
      jnp.searchsorted(pends, jnp.arange(max_blocks) * block, side="right"),
      num_e - 1)
  trips = (pends[-1] // block + chunk - 1) // chunk

  def trip(i, acc):
    tok = jax.lax.dynamic_slice(ov_token, (i * chunk * block,), (chunk * block,))
    wt = jax.lax.dynamic_slice(ov_w, (i * chunk * block,), (chunk * block,))
    ex = jax.lax.dynamic_slice(block_expert, (i * chunk,), (chunk,))
    yo = _expert_matmuls(rows_of_h(tok).reshape(chunk, block, d), a[ex], b[ex],
                         wt.reshape(chunk, block))
    # padding rows have token n: out of bounds, dropped
    return acc.at[tok].add(yo.reshape(-1, o), mode="drop")

  # A loop with static bounds (reverse-differentiable, unlike a while loop
  # with a data-dependent trip count); trips past the actual overflow are
  # skipped by the cond.
  return jax.lax.fori_loop(
      0, max_blocks // chunk,
      lambda i, acc: jax.lax.cond(i < trips, trip, lambda _, x: x, i, acc), out)


def apply_ragged(h: jax.Array, a: jax.Array, b: jax.Array, idx: jax.Array,
                 w: jax.Array) -> jax.Array:
  """Sort-and-segment with jax.lax.ragged_dot (grouped matmul).  -> (N, o)."""
  n, k = idx.shape
  order, _, counts, _ = _sort_assignments(idx, a.shape[0])
  dt = jnp.promote_types(h.dtype, a.dtype)
  x = h[order // k].astype(dt)
  z = jax.lax.ragged_dot(x, a.astype(dt), counts)
  y = jax.lax.ragged_dot(z, b.astype(dt), counts).astype(jnp.float32)
  unsorted = jnp.zeros_like(y).at[order].set(y)
  return jnp.einsum("nk,nko->no", w.astype(jnp.float32),
                    unsorted.reshape(n, k, -1))


IMPLS = ("auto", "grouped", "blocked", "ragged", "dense")


def default_impl() -> str:
  return "ragged" if jax.default_backend() == "tpu" else "grouped"


def apply_experts(h: jax.Array, a: jax.Array, b: jax.Array, idx: jax.Array,
                  w: jax.Array, impl: str = "auto",
                  block: Optional[int] = None) -> jax.Array:
  """sum_j w[n, j] * h[n] @ a[idx[n, j]] @ b[idx[n, j]].

  h (N, d), a (E, d, r), b (E, r, o), idx (N, k), w (N, k) -> (N, o) f32.
  impl: one of IMPLS (see module docstring); block: rows per block of
  'blocked' and of 'grouped''s overflow loop.
  """
  if h.ndim != 2 or a.ndim != 3 or b.ndim != 3 or idx.shape != w.shape:
    raise ValueError(
        f"apply_experts wants h (N, d), a (E, d, r), b (E, r, o), idx/w (N, k);"
        f" got h {h.shape}, a {a.shape}, b {b.shape}, idx {idx.shape}, "
        f"w {w.shape}")
  impl = default_impl() if impl == "auto" else impl
  if impl == "grouped":
    return apply_grouped(h, a, b, idx, w, block=block or 64)
  if impl == "blocked":
    return apply_blocked(h, a, b, idx, w, block)
  if impl == "ragged":
    return apply_ragged(h, a, b, idx, w)
  if impl == "dense":
    return apply_dense(h, a, b, idx, w)
  raise ValueError(f"impl {impl!r}: use one of {IMPLS}")


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
