"""Pallas kernels that apply many LoRA adapters in one call, with their VJPs.

Shapes: N tokens, d inputs, o outputs, E adapters (experts), rank r, k
adapters per token; a (E, d, r), b (E, r, o); idx (N, k) int32, w (N, k).
Each token gets sum_j w[n, j] * (h[n] @ a[idx[n, j]]) @ b[idx[n, j]].

Two GPU kernels after Punica (Chen et al. 2023, "Punica: Multi-Tenant LoRA
Serving", arXiv:2310.18547), as served by S-LoRA (Sheng et al. 2023,
"S-LoRA: Serving Thousands of Concurrent LoRA Adapters", arXiv:2311.03285):

  * SGMV (`sgmv`, prefill and training): the N*k assignments sorted by
    adapter (mtjax.methods.grouped does the sort and the row gather) form one
    segment per adapter; the grid has one program per `tile` rows of a
    segment, which reads its adapter's factors in place (no per-row copy):
    z = x @ a[e] (rank r, over d in blocks), scaled by each row's weight,
    then y = z @ b[e] stored in blocks of o (masked to the segment's rows).
    Cost: ceil(M/tile) + E programs at most, idle ones return at once.
  * BGMV (`bgmv`, decoding: few tokens, k small): one program per token,
    looping over its k adapters (gathered by index inside the kernel).

Both are `jax.custom_vjp` functions. SGMV's backward is two more kernels:
per row dx = ((dy @ b[e]^T) * w) @ a[e]^T and dw = <x a[e], dy b[e]^T>, then
per adapter the segment sums da[e] = x^T (u w), db[e] = (z w)^T dy, one
program per (adapter, block); BGMV's backward reruns BGMV on the transposed
factors for dh and sums the (few) per-assignment outer products for da, db.

They are written for the Triton lowering (`compiler_params=
pallas.triton.CompilerParams`): every loaded block is a power of two (d and
o are walked in power-of-two blocks that divide them; a rank that is not a
power of two is zero-padded by the caller, see `pad_rank`), factors are
indexed with a scalar read from a metadata array (Triton has no scalar
prefetch), and products whose sides are under 16 use a broadcast-multiply-
sum instead of tl.dot. With `interpret=True` (the default on CPU) they run
through Pallas' interpreter, which is how the tests check them here.

TPU: `gmm_lora` applies the sorted rows with the megablox grouped matmul
(`jax.experimental.pallas.ops.tpu.megablox.gmm`, the MegaBlocks-style
kernel of Gale et al. 2022, "MegaBlocks: Efficient Sparse Training with
Mixture-of-Experts", arXiv:2211.15841), which has its own VJP.
"""
import functools
import importlib
import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

F32 = jnp.float32
TILE = 16      # rows per SGMV program (tl.dot needs >= 16)
BLOCK = 64     # largest block of d or o loaded at once


def interpret_default(interpret: Optional[bool]) -> bool:
  """None -> interpret iff the default backend has no Pallas compiler (CPU)."""
  if interpret is None:
    return jax.default_backend() not in ("gpu", "cuda", "rocm", "tpu")
  return bool(interpret)


def _block(n: int, cap: int = BLOCK) -> int:
  """The largest power of two dividing n, at most cap (a block of n)."""
  return math.gcd(n, cap)


def _is_pow2(n: int) -> bool:
  return n > 0 and n & (n - 1) == 0


def pad_rank(a: jax.Array, b: jax.Array) -> tuple:
  """Zero-pads the rank to a power of two (Triton blocks): exact, and the
  padded part's gradients are cut off by the slice."""
  r = a.shape[-1]
  if _is_pow2(r):
    return a, b
  p = 1 << r.bit_length()
  return (jnp.pad(a, ((0, 0), (0, 0), (0, p - r))),
          jnp.pad(b, ((0, 0), (0, p - r), (0, 0))))


def _mm(x: jax.Array, y: jax.Array, contract: tuple = (1, 0)) -> jax.Array:
  """x @ y in f32 (contracting x's axis contract[0] with y's contract[1]).

  tl.dot needs every side >= 16; smaller products are a broadcast multiply
  and a sum (the lowering of both is checked for Triton in the tests).
  """
  cx, cy = contract
  if min(x.shape + y.shape) >= 16:
    dt = jnp.promote_types(x.dtype, y.dtype)
    return jax.lax.dot_general(x.astype(dt), y.astype(dt),
                               (((cx,), (cy,)), ((), ())),
                               preferred_element_type=F32)
  x = x.astype(F32) if cx == 1 else x.astype(F32).T
  y = y.astype(F32) if cy == 0 else y.astype(F32).T
  return jnp.sum(x[:, :, None] * y[None, :, :], axis=1)


def _fori(n: int, body, init):
  """fori_loop over a static trip count; one trip is just the body."""
  return body(0, init) if n == 1 else jax.lax.fori_loop(0, n, body, init)


def _call(kernel, out_shape, grid, interpret, *args, out_specs=None,
          in_specs=None):
  """pallas_call with whole-array refs (unless given) and Triton params."""
  kw = {} if interpret else {"compiler_params": pltriton.CompilerParams(
      num_warps=4, num_stages=2)}
  if in_specs is not None:
    kw["in_specs"] = in_specs
  if out_specs is not None:
    kw["out_specs"] = out_specs
  return pl.pallas_call(kernel, out_shape=out_shape, grid=grid,
                        interpret=interpret, **kw)(*args)


# ------------------------------------------------------------------ SGMV

def segment_tiles(counts: jax.Array, starts: jax.Array, num_rows: int,
                  tile: int) -> jax.Array:
  """(3, T) int32: adapter, first row and row count of each SGMV program.

  Adapter e's sorted rows starts[e] .. starts[e]+counts[e]-1 are cut into
  tiles of `tile` rows; T = ceil(M/tile) + min(E, M) is the static bound
  (M = num_rows); programs past the real tiles get 0 rows.
  """
  num_e = counts.shape[0]
  per = (counts + tile - 1) // tile
  end = jnp.cumsum(per)
  num_t = -(-num_rows // tile) + min(num_e, num_rows)
  t = jnp.arange(num_t)
  e = jnp.minimum(jnp.searchsorted(end, t, side="right"), num_e - 1)
  j = t - (end - per)[e]
  rows = jnp.clip(counts[e] - j * tile, 0, tile)
  first = jnp.where(rows > 0, starts[e] + j * tile, 0)
  return jnp.stack([e, first, rows]).astype(jnp.int32)


def _sgmv_fwd_kernel(meta, x, w, a, b, y, *, tile, bd, bo):
  """y[rows] = ((x[rows] @ a[e]) * w[rows]) @ b[e] for one tile's rows."""
  t = pl.program_id(0)
  e, s, n = meta[0, t], meta[1, t], meta[2, t]
  mask = jax.lax.broadcasted_iota(jnp.int32, (tile, 1), 0) < n
  d, r, o = a.shape[1], a.shape[2], b.shape[2]

  @pl.when(n > 0)
  def _():
    def z_step(i, z):
      return z + _mm(x[pl.ds(s, tile), pl.ds(i * bd, bd)],
                     a[e, pl.ds(i * bd, bd), :])
    z = _fori(d // bd, z_step, jnp.zeros((tile, r), F32))
    z = (z * w[pl.ds(s, tile)].astype(F32)[:, None]).astype(b.dtype)

    def y_step(i, c):
      pltriton.store(y.at[pl.ds(s, tile), pl.ds(i * bo, bo)],
                     _mm(z, b[e, :, pl.ds(i * bo, bo)]), mask=mask)
      return c
    _fori(o // bo, y_step, 0)


def _sgmv_bwd_kernel(meta, x, w, dy, a, b, dx, dw, zw, uw, *, tile, bd, bo):
  """Per row: z = x a[e], u = dy b[e]^T, dx = (u w) a[e]^T, dw = <z, u>;
  also z w and u w for the per-adapter sums."""
  t = pl.program_id(0)
  e, s, n = meta[0, t], meta[1, t], meta[2, t]
  mask = jax.lax.broadcasted_iota(jnp.int32, (tile, 1), 0) < n
  d, r, o = a.shape[1], a.shape[2], b.shape[2]

  @pl.when(n > 0)
  def _():
    z = _fori(d // bd, lambda i, z: z + _mm(
        x[pl.ds(s, tile), pl.ds(i * bd, bd)], a[e, pl.ds(i * bd, bd), :]),
        jnp.zeros((tile, r), F32))
    u = _fori(o // bo, lambda i, u: u + _mm(
        dy[pl.ds(s, tile), pl.ds(i * bo, bo)], b[e, :, pl.ds(i * bo, bo)],
        (1, 1)), jnp.zeros((tile, r), F32))
    wt = w[pl.ds(s, tile)].astype(F32)[:, None]
    rows = pl.ds(s, tile)
    pltriton.store(dw.at[rows], jnp.sum(z * u, axis=1), mask=mask[:, 0])
    pltriton.store(zw.at[rows, :], z * wt, mask=mask)
    pltriton.store(uw.at[rows, :], u * wt, mask=mask)
    g = (u * wt).astype(a.dtype)

    def dx_step(i, c):
      pltriton.store(dx.at[rows, pl.ds(i * bd, bd)],
                     _mm(g, a[e, pl.ds(i * bd, bd), :], (1, 1)), mask=mask)
      return c
    _fori(d // bd, dx_step, 0)


def _segment_outer_kernel(counts, starts, p, q, out, *, tile, bp, bq):
  """out[e] block = p[rows of e]^T @ q[rows of e], over row tiles."""
  e, i, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  s, c = starts[e], counts[e]

  def step(t, acc):
    rows = jax.lax.broadcasted_iota(jnp.int32, (tile, 1), 0) + t * tile < c
    # rows past the segment: other adapters' rows, or never written
    pv = jnp.where(rows, p[pl.ds(s + t * tile, tile), pl.ds(i * bp, bp)], 0)
    qv = jnp.where(rows, q[pl.ds(s + t * tile, tile), pl.ds(j * bq, bq)], 0)
    return acc + _mm(pv, qv, (0, 0))
  out[...] = jax.lax.fori_loop(0, (c + tile - 1) // tile, step,
                               jnp.zeros((bp, bq), F32)).astype(out.dtype)


def _segment_outer(counts, starts, p, q, num_e, tile, interpret, dtype):
  """(E, P, Q): per adapter e, the sum over its rows of p_row^T q_row."""
  bp, bq = _block(p.shape[1]), _block(q.shape[1])
  grid = (num_e, p.shape[1] // bp, q.shape[1] // bq)
  spec = pl.BlockSpec((None, bp, bq), lambda e, i, j: (e, i, j))
  return _call(functools.partial(_segment_outer_kernel, tile=tile, bp=bp,
                                 bq=bq),
               jax.ShapeDtypeStruct((num_e, p.shape[1], q.shape[1]), dtype),
               grid, interpret, counts, starts, p, q, out_specs=spec,
               in_specs=[pl.no_block_spec] * 4)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _sgmv(x, w, a, b, counts, starts, tile, interpret):
  return _sgmv_fwd(x, w, a, b, counts, starts, tile, interpret)[0]


def _sgmv_fwd(x, w, a, b, counts, starts, tile, interpret):
  meta = segment_tiles(counts, starts, x.shape[0] - tile, tile)
  bd, bo = _block(a.shape[1]), _block(b.shape[2])
  y = _call(functools.partial(_sgmv_fwd_kernel, tile=tile, bd=bd, bo=bo),
            jax.ShapeDtypeStruct((x.shape[0], b.shape[2]), F32),
            (meta.shape[1],), interpret, meta, x, w, a, b)
  return y, (x, w, a, b, counts, starts, meta)


def _sgmv_bwd(tile, interpret, res, dy):
  x, w, a, b, counts, starts, meta = res
  rows, r = x.shape[0], a.shape[2]
  bd, bo = _block(a.shape[1]), _block(b.shape[2])
  shapes = (jax.ShapeDtypeStruct(x.shape, F32),
            jax.ShapeDtypeStruct((rows,), F32),
            jax.ShapeDtypeStruct((rows, r), F32),
            jax.ShapeDtypeStruct((rows, r), F32))
  dx, dw, zw, uw = _call(
      functools.partial(_sgmv_bwd_kernel, tile=tile, bd=bd, bo=bo), shapes,
      (meta.shape[1],), interpret, meta, x, w, dy.astype(b.dtype), a, b)
  live = jnp.arange(rows) < rows - tile     # padding rows: never written
  dx, dw = jnp.where(live[:, None], dx, 0), jnp.where(live, dw, 0)
  num_e = a.shape[0]
  da = _segment_outer(counts, starts, x, uw.astype(x.dtype), num_e, tile,
                      interpret, a.dtype)
  db = _segment_outer(counts, starts, zw.astype(dy.dtype), dy, num_e, tile,
                      interpret, b.dtype)
  return dx.astype(x.dtype), dw.astype(w.dtype), da, db, None, None


_sgmv.defvjp(_sgmv_fwd, _sgmv_bwd)


def sgmv(x: jax.Array, w: jax.Array, a: jax.Array, b: jax.Array,
         counts: jax.Array, starts: jax.Array, tile: int = TILE,
         interpret: Optional[bool] = None) -> jax.Array:
  """Sorted rows through their adapters.  -> (R, o) f32.

  x (R, d): the M = R - tile assignment rows sorted by adapter, then `tile`
  rows of padding (so a tile's window stays inside x); w (R,) row weights;
  counts, starts (E,) int32: each adapter's number of rows and first row.
  Rows >= M of the result are unspecified. Differentiable in x, w, a, b.
  """
  a, b = pad_rank(a, b)
  return _sgmv(x, w, a, b, counts.astype(jnp.int32),
               starts.astype(jnp.int32), int(tile),
               interpret_default(interpret))


# ------------------------------------------------------------------ BGMV

def _bgmv_kernel(idx, w, x, f1, f2, y, z_out, *, k, bp, bq, t1, t2):
  """One token: z_j = x @ f1[e_j] (r,), y = sum_j w_j z_j @ f2[e_j].

  f1[e] is (P, r), or (r, P) when t1; f2[e] is (r, Q), or (Q, r) when t2.
  Vector products are broadcast-multiply-sums (decoding is memory bound).
  """
  n = pl.program_id(0)
  p_dim = f1.shape[2] if t1 else f1.shape[1]
  q_dim = f2.shape[1] if t2 else f2.shape[2]
  r = f1.shape[1] if t1 else f1.shape[2]
  zs, es = [], []
  for j in range(k):
    e = idx[n, j]

    def z_step(i, z, e=e):
      xv = x[n, pl.ds(i * bp, bp)].astype(F32)
      if t1:
        return z + jnp.sum(f1[e, :, pl.ds(i * bp, bp)].astype(F32)
                           * xv[None, :], axis=1)
      return z + jnp.sum(f1[e, pl.ds(i * bp, bp), :].astype(F32)
                         * xv[:, None], axis=0)
    z = _fori(p_dim // bp, z_step, jnp.zeros((r,), F32))
    z_out[n, j, :] = z
    zs.append(z * w[n, j].astype(F32))
    es.append(e)

  def y_step(i, c):
    acc = jnp.zeros((bq,), F32)
    for z, e in zip(zs, es, strict=True):
      if t2:
        acc += jnp.sum(f2[e, pl.ds(i * bq, bq), :].astype(F32) * z[None, :],
                       axis=1)
      else:
        acc += jnp.sum(f2[e, :, pl.ds(i * bq, bq)].astype(F32) * z[:, None],
                       axis=0)
    y[n, pl.ds(i * bq, bq)] = acc
    return c
  _fori(q_dim // bq, y_step, 0)


def _bgmv_call(x, f1, f2, idx, w, t1, t2, interpret):
  """(y (N, Q) f32, z (N, k, r) f32) of `_bgmv_kernel`."""
  n, k = idx.shape
  r = f1.shape[1] if t1 else f1.shape[2]
  q_dim = f2.shape[1] if t2 else f2.shape[2]
  bp, bq = _block(x.shape[1]), _block(q_dim)
  return _call(functools.partial(_bgmv_kernel, k=k, bp=bp, bq=bq, t1=t1,
                                 t2=t2),
               (jax.ShapeDtypeStruct((n, q_dim), F32),
                jax.ShapeDtypeStruct((n, k, r), F32)),
               (n,), interpret, idx, w, x, f1, f2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _bgmv(h, a, b, idx, w, interpret):
  return _bgmv_call(h, a, b, idx, w, False, False, interpret)[0]


def _bgmv_fwd(h, a, b, idx, w, interpret):
  y, z = _bgmv_call(h, a, b, idx, w, False, False, interpret)
  return y, (h, a, b, idx, w, z)


def _bgmv_bwd(interpret, res, dy):
  h, a, b, idx, w, z = res
  dh, u = _bgmv_call(dy.astype(b.dtype), b, a, idx, w, True, True, interpret)
  dw = jnp.sum(z * u, axis=-1)
  wu = (w.astype(F32)[..., None] * u).reshape(-1, u.shape[-1])   # (N*k, r)
  wz = (w.astype(F32)[..., None] * z).reshape(-1, z.shape[-1])
  rep = jnp.repeat(jnp.arange(h.shape[0]), idx.shape[1])
  flat = idx.reshape(-1)
  # N*k is small here (decoding), so the per-assignment outer products are
  # too: (N*k, d, r) and (N*k, r, o), summed into their adapters.
  da = jnp.zeros(a.shape, F32).at[flat].add(
      h.astype(F32)[rep][:, :, None] * wu[:, None, :])
  db = jnp.zeros(b.shape, F32).at[flat].add(
      wz[:, :, None] * dy.astype(F32)[rep][:, None, :])
  return (dh.astype(h.dtype), da.astype(a.dtype), db.astype(b.dtype), None,
          dw.astype(w.dtype))


_bgmv.defvjp(_bgmv_fwd, _bgmv_bwd)


def bgmv(h: jax.Array, a: jax.Array, b: jax.Array, idx: jax.Array,
         w: jax.Array, interpret: Optional[bool] = None) -> jax.Array:
  """Per token, its k adapters gathered inside the kernel.  -> (N, o) f32.

  h (N, d), a (E, d, r), b (E, r, o), idx/w (N, k). Differentiable in h, a,
  b, w. Meant for few tokens (decoding): one program per token.
  """
  a, b = pad_rank(a, b)
  return _bgmv(h, a, b, idx.astype(jnp.int32), w, interpret_default(interpret))


# ------------------------------------------------------------------ TPU

def _megablox():
  """megablox's forward kernels (gmm, tgmm); imported on use: Mosaic TPU.

  By module path: the package's attribute `gmm` is the custom-VJP function.
  """
  return importlib.import_module("jax.experimental.pallas.ops.tpu.megablox.gmm")


def _rows_tile(m: int) -> int:
  """megablox rows per tile: all rows (a multiple of 8) up to 128, else 128
  (tgmm reads rows as its lhs's last axis: 128-multiples or whole)."""
  return -(-m // 8) * 8 if m <= 128 else 128


def _cols_tile(n: int) -> int:
  """A tile of a feature axis: whole up to 2048, else 512 if it divides."""
  return n if n <= 2048 or n % 512 else 512


def _gmm_calls(interpret):
  """(gmm(lhs, rhs, counts, tiling, t), tgmm(lhs^T, rhs, counts, tiling))."""
  mb = _megablox()

  def gmm(lhs, rhs, counts, tiling, transpose_rhs=False):
    return mb.gmm(lhs, rhs, counts, F32, tiling, transpose_rhs=transpose_rhs,
                  interpret=interpret)

  def tgmm(lhs_t, rhs, counts, tiling):
    return mb.tgmm(lhs_t, rhs, counts, F32, tiling, interpret=interpret)
  return gmm, tgmm


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _gmm_lora(x, w, a, b, counts, interpret):
  return _gmm_lora_fwd(x, w, a, b, counts, interpret)[0]


def _gmm_lora_fwd(x, w, a, b, counts, interpret):
  gmm, _ = _gmm_calls(interpret)
  tm, r = _rows_tile(x.shape[0]), a.shape[2]
  z = gmm(x, a, counts, (tm, _cols_tile(a.shape[1]), r))
  live = (jnp.arange(x.shape[0]) < counts.sum())[:, None]   # rows in no group:
  z = jnp.where(live, z, 0)                                  # left unwritten
  zw = (z * w.astype(F32)[:, None]).astype(b.dtype)
  y = gmm(zw, b, counts, (tm, r, _cols_tile(b.shape[2])))
  return y, (x, w, a, b, counts, z, zw)


def _gmm_lora_bwd(interpret, res, dy):
  x, w, a, b, counts, z, zw = res
  gmm, tgmm = _gmm_calls(interpret)
  tm, r = _rows_tile(x.shape[0]), a.shape[2]
  td, to = _cols_tile(a.shape[1]), _cols_tile(b.shape[2])
  dy = dy.astype(b.dtype)
  live = (jnp.arange(x.shape[0]) < counts.sum())[:, None]
  u = jnp.where(live, gmm(dy, b, counts, (tm, to, r), True), 0)  # dy b[e]^T
  g = (u * w.astype(F32)[:, None]).astype(a.dtype)
  dx = gmm(g, a, counts, (tm, r, td), True)                       # g a[e]^T
  da = tgmm(x.T, g, counts, (tm, td, r))
  db = tgmm(zw.T, dy, counts, (tm, r, to))
  return (jnp.where(live, dx, 0).astype(x.dtype),
          jnp.sum(z * u, axis=1).astype(w.dtype), da.astype(a.dtype),
          db.astype(b.dtype), None)


_gmm_lora.defvjp(_gmm_lora_fwd, _gmm_lora_bwd)


def gmm_lora(x: jax.Array, w: jax.Array, a: jax.Array, b: jax.Array,
             counts: jax.Array, interpret: Optional[bool] = None) -> jax.Array:
  """Sorted rows (M, d) through their adapters with megablox.  -> (M, o) f32.

  Two grouped matmuls (x @ a[e], scaled by w (M,), then @ b[e]) and, in the
  VJP, two transposed grouped matmuls (dx, and u = dy b[e]^T) and two tgmm
  segment sums (da, db), each with its own tiling: megablox's own VJP reuses
  the forward tiling with the roles of the axes swapped, which Mosaic
  rejects when r and o differ. Rows are padded to the row tile.
  """
  m = x.shape[0]
  pad = -m % _rows_tile(m)
  y = _gmm_lora(jnp.pad(x, ((0, pad), (0, 0))), jnp.pad(w, (0, pad)), a, b,
                counts.astype(jnp.int32), interpret_default(interpret))
  return y[:m]
