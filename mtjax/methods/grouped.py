"""Many LoRA adapters in one call: sort-and-segment and gather application.

Shared by routing among experts (mtjax.routing: per-token top-k choices)
and mixed-adapter batches (mtjax.methods.lora / ia3: each example its own
adapter, Punica / S-LoRA style): an example's adapter id is an assignment
with k = 1 and weight 1. Shapes: N tokens, d inputs, o outputs, E adapters,
rank r, k adapters per token, M = N*k assignments:

  a: (E, d, r), b: (E, r, o)       stacked LoRA factors (mtjax LoRA layout)
  idx: (N, k) int32, w: (N, k)      chosen adapters and their weights

`apply_experts(h, a, b, idx, w, impl)` gives sum_j w[n, j] * h[n] @
a[idx[n, j]] @ b[idx[n, j]]. No impl but 'dense' costs O(E) per token:
  * 'grouped' (CPU, many tokens): a capacity layout (E, C, d), C about
    1.25 M/E (static, >= 8), filled with each expert's first C assignments;
    one batched matmul per factor reads every expert's weights once, in
    place. Assignments beyond capacity (skewed routing) go through a loop
    over per-expert blocks that skips the trips the actual overflow does not
    need, so the result is exact for any load and gradients flow.
  * 'gather' (decoding: M <= E on CPU and TPU; mixed-adapter batches on
    CPU): every assignment's factors gathered and applied to its rows, a
    batched matvec (BGMV in XLA): O(M r (d + o)), no (E, C, d) buffer.
  * 'sgmv' / 'bgmv' (GPU): the Pallas kernels of pallas_kernels.py
    (Punica's SGMV over adapter-sorted segments for many tokens, BGMV per
    token for decoding), custom VJPs; interpreted on CPU (tests).
  * 'megablox' (TPU, many tokens): the sorted rows through the megablox
    grouped matmul (pallas_kernels.gmm_lora).
  * 'blocked': sorted assignments padded per expert to blocks of `block`
    rows, one batched matmul over blocks (copies factors per block: 2-3x
    slower than 'grouped' on CPU).
  * 'ragged': the sort, then `jax.lax.ragged_dot`. Native on TPU; on CPU
    and (measured, H100, jax 0.11.2) GPU it lowers to a dense masked
    (E, M, d) product: O(E) work.
  * 'dense': every expert on every token, then the weighted sum; the
    reference the others are tested against (O(E) memory and compute).
'auto' is `default_impl(M, E)`: per backend (CPU 'grouped', GPU 'sgmv',
TPU 'megablox'), and below that the decoding choice ('gather', 'bgmv',
'gather') when M <= E, where a per-expert layout would cost more than the
assignments themselves.
"""
import math
from typing import Optional

import jax
import jax.numpy as jnp

from mtjax.methods import pallas_kernels


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


def sort_assignments(idx, num_experts):
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
  order, e_sorted, counts, starts = sort_assignments(idx, num_e)
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
  order, e_sorted, counts, starts = sort_assignments(idx, num_e)
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
  order, _, counts, _ = sort_assignments(idx, a.shape[0])
  dt = jnp.promote_types(h.dtype, a.dtype)
  x = h[order // k].astype(dt)
  z = jax.lax.ragged_dot(x, a.astype(dt), counts)
  y = jax.lax.ragged_dot(z, b.astype(dt), counts).astype(jnp.float32)
  unsorted = jnp.zeros_like(y).at[order].set(y)
  return jnp.einsum("nk,nko->no", w.astype(jnp.float32),
                    unsorted.reshape(n, k, -1))


def apply_gather(h: jax.Array, a: jax.Array, b: jax.Array, idx: jax.Array,
                 w: jax.Array) -> jax.Array:
  """Each assignment's factors gathered and applied to its rows (BGMV in XLA).

  h (N, d) with idx/w (N, k) -> (N, o) f32, or h (N, T, d): the T rows of
  item n share its k assignments (a mixed-adapter example) -> (N, T, o).
  Cost O(N k r (d + o) T) plus the N k gathered factor pairs; no O(E) term.
  """
  rows = h.ndim == 3
  h = h if rows else h[:, None]
  dt = jnp.promote_types(h.dtype, a.dtype)
  z = jnp.einsum("ntd,nkdr->nktr", h.astype(dt), a[idx].astype(dt),
                 preferred_element_type=jnp.float32)
  z = (z * w.astype(jnp.float32)[:, :, None, None]).astype(dt)
  y = jnp.einsum("nktr,nkro->nto", z, b[idx].astype(dt),
                 preferred_element_type=jnp.float32)
  return y if rows else y[:, 0]


def _sorted_rows(h, idx, w, num_experts, pad):
  """Rows of h in adapter order (+ `pad` zero rows), their weights, counts,
  starts and the sorted row of each assignment (N, k)."""
  n, k = idx.shape
  m = n * k
  order, _, counts, starts = sort_assignments(idx, num_experts)
  token = jnp.concatenate([order // k, jnp.full((pad,), n, order.dtype)])
  x = h.at[token].get(mode="fill", fill_value=0)     # token n: zeros
  ws = jnp.concatenate([w.reshape(-1)[order], jnp.zeros((pad,), w.dtype)])
  pos = jnp.zeros((m,), jnp.int32).at[order].set(jnp.arange(m, dtype=jnp.int32))
  return x, ws, counts, starts, pos.reshape(n, k)


def apply_sgmv(h: jax.Array, a: jax.Array, b: jax.Array, idx: jax.Array,
               w: jax.Array, interpret: Optional[bool] = None,
               tile: int = pallas_kernels.TILE) -> jax.Array:
  """Sort-and-segment with the Pallas SGMV kernel.  -> (N, o) f32.

  The routing weights are applied inside the kernel, so going back to token
  order is k row gathers summed. interpret: None = on CPU only.
  """
  x, ws, counts, starts, pos = _sorted_rows(h, idx, w, a.shape[0], tile)
  y = pallas_kernels.sgmv(x, ws, a, b, counts, starts, tile, interpret)
  return sum(y[pos[:, j]] for j in range(idx.shape[1]))


def apply_bgmv(h: jax.Array, a: jax.Array, b: jax.Array, idx: jax.Array,
               w: jax.Array, interpret: Optional[bool] = None) -> jax.Array:
  """Per-token application with the Pallas BGMV kernel.  -> (N, o) f32."""
  return pallas_kernels.bgmv(h, a, b, idx, w, interpret)


def apply_megablox(h: jax.Array, a: jax.Array, b: jax.Array, idx: jax.Array,
                   w: jax.Array, interpret: Optional[bool] = None) -> jax.Array:
  """Sort-and-segment with megablox's grouped matmul (TPU).  -> (N, o) f32."""
  dt = jnp.promote_types(h.dtype, a.dtype)
  x, ws, counts, _, pos = _sorted_rows(h.astype(dt), idx, w, a.shape[0], 0)
  y = pallas_kernels.gmm_lora(x, ws, a.astype(dt), b.astype(dt), counts,
                              interpret)
  return sum(y[pos[:, j]] for j in range(idx.shape[1]))


IMPLS = ("auto", "grouped", "gather", "sgmv", "bgmv", "megablox", "blocked",
         "ragged", "dense")
GPU_BACKENDS = ("gpu", "cuda", "rocm")


def default_impl(num_assignments: Optional[int] = None,
                 num_experts: Optional[int] = None,
                 backend: Optional[str] = None) -> str:
  """What impl='auto' runs for M = N*k assignments among E experts.

  CPU 'grouped', GPU 'sgmv', TPU 'megablox'; when M <= E (decoding steps:
  a few tokens among many experts) 'gather' on CPU and TPU, 'bgmv' on GPU,
  whose cost grows with M, not E. Without sizes: the many-token choice.
  """
  backend = backend or jax.default_backend()
  few = (num_assignments is not None and num_experts is not None
         and num_assignments <= num_experts)
  if backend in GPU_BACKENDS:
    return "bgmv" if few else "sgmv"
  if backend == "tpu":
    return "gather" if few else "megablox"
  return "gather" if few else "grouped"


def apply_experts(h: jax.Array, a: jax.Array, b: jax.Array, idx: jax.Array,
                  w: jax.Array, impl: str = "auto", block: Optional[int] = None,
                  interpret: Optional[bool] = None) -> jax.Array:
  """sum_j w[n, j] * h[n] @ a[idx[n, j]] @ b[idx[n, j]].

  h (N, d), a (E, d, r), b (E, r, o), idx (N, k), w (N, k) -> (N, o) f32.
  impl: one of IMPLS (see module docstring); block: rows per block of
  'blocked' and of 'grouped''s overflow loop; interpret: Pallas impls only
  (None: interpreted on CPU).
  """
  if h.ndim != 2 or a.ndim != 3 or b.ndim != 3 or idx.shape != w.shape:
    raise ValueError(
        f"apply_experts wants h (N, d), a (E, d, r), b (E, r, o), idx/w (N, k);"
        f" got h {h.shape}, a {a.shape}, b {b.shape}, idx {idx.shape}, "
        f"w {w.shape}")
  if impl == "auto":
    impl = default_impl(idx.size, a.shape[0])
  if impl == "grouped":
    return apply_grouped(h, a, b, idx, w, block=block or 64)
  if impl == "gather":
    return apply_gather(h, a, b, idx, w)
  if impl in ("sgmv", "bgmv", "megablox"):
    fn = {"sgmv": apply_sgmv, "bgmv": apply_bgmv,
          "megablox": apply_megablox}[impl]
    return fn(h, a, b, idx, w, interpret=interpret)
  if impl == "blocked":
    return apply_blocked(h, a, b, idx, w, block)
  if impl == "ragged":
    return apply_ragged(h, a, b, idx, w)
  if impl == "dense":
    return apply_dense(h, a, b, idx, w)
  raise ValueError(f"impl {impl!r}: use one of {IMPLS}")


# --------------------------------------------------- mixed-adapter batches

def per_example_impl(num_tokens: int, num_adapters: int,
                     backend: Optional[str] = None) -> str:
  """impl='auto' of a mixed-adapter batch: on CPU 'gather' per example (each
  example's factors gathered once for all its tokens), else default_impl."""
  backend = backend or jax.default_backend()
  if backend in GPU_BACKENDS or backend == "tpu":
    return default_impl(num_tokens, num_adapters, backend)
  return "gather"


def apply_per_example(x: jax.Array, a: jax.Array, b: jax.Array,
                      adapter_index: jax.Array, impl: str = "auto",
                      interpret: Optional[bool] = None) -> jax.Array:
  """Each example through its own adapter.  x (B, ..., d) -> (B, ..., o) f32.

  a (E, d, r), b (E, r, o), adapter_index (B,) int: every token of example
  i is one assignment to adapter adapter_index[i] with weight 1 (k = 1).
  """
  bsz, d, o = x.shape[0], x.shape[-1], b.shape[-1]
  t = math.prod(x.shape[1:-1])
  index = jnp.asarray(adapter_index, jnp.int32)
  if index.shape != (bsz,):
    raise ValueError(f"adapter_index has shape {index.shape}; the batch has "
                     f"{bsz} examples: give one adapter id per example")
  impl = per_example_impl(bsz * t, a.shape[0]) if impl == "auto" else impl
  if impl == "gather":
    y = apply_gather(x.reshape(bsz, t, d), a, b, index[:, None],
                     jnp.ones((bsz, 1), jnp.float32))
  else:
    y = apply_experts(x.reshape(bsz * t, d), a, b,
                      jnp.repeat(index, t)[:, None],
                      jnp.ones((bsz * t, 1), jnp.float32), impl,
                      interpret=interpret)
  return y.reshape(x.shape[:-1] + (o,))


def scale_per_example(x: jax.Array, scales: jax.Array,
                      adapter_index: jax.Array) -> jax.Array:
  """x (B, ..., F) times each example's vector scales[adapter_index] (E, F).

  (IA)3's mixed-adapter form: a rank-free adapter, so the per-example gather
  (B*F numbers, one activation row per example) is the whole application.
  """
  s = jnp.take(scales, jnp.asarray(adapter_index, jnp.int32), axis=0)
  return x * s.reshape(s.shape[:1] + (1,) * (x.ndim - 2)
                       + s.shape[1:]).astype(x.dtype)
