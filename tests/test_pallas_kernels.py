"""Pallas grouped-LoRA kernels (mtjax.methods.pallas_kernels) against dense.

SGMV, BGMV and the megablox path run here through Pallas' interpreter
(interpret=True): values and gradients w.r.t. h, a, b and w, for skewed loads
(every token on the same k experts, one segment of several tiles), empty
experts, E in {1, 8, 256} and k in {1, 2}, and dimensions that are not powers
of two (rank 6 is padded; d = 48, o = 40 are walked in blocks).

Tolerance: 1e-5 of the largest entry. Everything is f32; the kernels sum
the blocks of d and o, and an adapter's rows (for its gradient), in another
order than XLA's einsums, so results differ by float rounding (measured
~5e-6 at most).

The GPU and TPU code paths cannot run here. What is checked instead: the
forward and backward lower for 'cuda' (cross-platform lowering, nothing
compiled) and every Triton module they make parses and passes MLIR
verification (Triton's op verifiers, power-of-two tensor sizes); megablox
lowers for 'tpu' with Mosaic's block-shape rules. Triton's and Mosaic's own
compilation and the numbers on a device are untested here: on a GPU or TPU,
`test_compiled_kernels_on_a_device` runs the compiled kernels against dense
(skipped on CPU).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.lib.mlir import ir
from jax._src.pallas.triton import lowering as triton_lowering

from mtjax.methods import grouped, pallas_kernels

# Compiled without LLVM optimisations: compilation dominates interpret mode.
FAST_COMPILE = {"xla_backend_optimization_level": 0,
                "xla_llvm_disable_expensive_passes": True}
TOL = 1e-5


def _case(num_e, k, kind, n=24, d=32, r=4, o=16, seed=0):
  """Random h, a, b, idx, w (numpy: eager jax ops would each compile)."""
  rs = np.random.RandomState(seed + 100 * num_e + k)
  h = rs.normal(size=(n, d))
  a = rs.normal(size=(num_e, d, r)) / np.sqrt(d)
  b = rs.normal(size=(num_e, r, o))
  if kind == "one_expert":    # all tokens on experts 0..k-1, the rest empty
    idx = np.broadcast_to(np.arange(k), (n, k))
  else:                       # distinct experts per token, as top-k gives
    idx = np.stack([rs.permutation(num_e)[:k] for _ in range(n)])
  w = rs.uniform(0.1, 1.0, size=(n, k))
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  return f32(h), f32(a), f32(b), jnp.asarray(idx, jnp.int32), f32(w)


def _value_and_grads(fn, h, a, b, idx, w):
  """(out, grads w.r.t. h, a, b, w) of sum(sin(out)), compiled fast."""
  def loss(h, a, b, w):
    out = fn(h, a, b, idx, w)
    return jnp.sum(jnp.sin(out)), out
  vg = jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)
  (_, out), grads = jax.jit(vg).lower(h, a, b, w).compile(FAST_COMPILE)(
      h, a, b, w)
  return out, grads


def _rel(x, y):
  return float(jnp.max(jnp.abs(x - y)) / jnp.max(jnp.abs(y)))


def _check_against_dense(impl, num_e, k, kind, **shape):
  h, a, b, idx, w = _case(num_e, k, kind, **shape)
  got, grads = _value_and_grads(
      lambda *x: grouped.apply_experts(*x, impl=impl, interpret=True),
      h, a, b, idx, w)
  want, want_grads = _value_and_grads(grouped.apply_dense, h, a, b, idx, w)
  assert _rel(got, want) < TOL
  for name, g, ref in zip("habw", grads, want_grads, strict=True):
    assert _rel(g, ref) < TOL, (name, _rel(g, ref))
  counts = np.bincount(np.asarray(idx).ravel(), minlength=num_e)
  empty = counts == 0
  # empty experts get exactly zero gradient (not just small)
  assert np.all(np.asarray(grads[1])[empty] == 0)
  assert np.all(np.asarray(grads[2])[empty] == 0)
  return counts


CASES = [  # (E, k, load, shape overrides)
    (1, 1, "random", dict(d=48, r=6, o=40)),   # blocks of d, o; rank padded
    (8, 2, "one_expert", {}),                  # 24 rows on each: 2 tiles
    (256, 2, "random", {}),                    # most experts empty
]


@pytest.mark.parametrize("num_e,k,kind,shape", CASES)
def test_sgmv_values_and_gradients_equal_dense(num_e, k, kind, shape):
  counts = _check_against_dense("sgmv", num_e, k, kind, **shape)
  if kind == "one_expert":
    assert counts[0] > pallas_kernels.TILE      # a segment of several tiles
  if num_e == 256:
    assert (counts == 0).sum() > 200


@pytest.mark.parametrize("num_e,k,kind,shape", CASES)
def test_bgmv_values_and_gradients_equal_dense(num_e, k, kind, shape):
  _check_against_dense("bgmv", num_e, k, kind, **shape)


def test_megablox_values_and_gradients_equal_dense():
  """The TPU path (megablox gmm/tgmm with this module's VJP), interpreted."""
  _check_against_dense("megablox", 8, 2, "one_expert")


@pytest.mark.parametrize("impl", ["sgmv", "bgmv", "megablox"])
def test_compiled_kernels_on_a_device(impl):
  """On a GPU (sgmv, bgmv: Triton) or TPU (megablox: Mosaic) the compiled
  kernels, not the interpreter, against dense; skipped on CPU."""
  backend = jax.default_backend()
  wants = {"sgmv": "gpu", "bgmv": "gpu", "megablox": "tpu"}[impl]
  if backend != wants:
    pytest.skip(f"{impl} compiles for {wants}; this backend is {backend}")
  for num_e, k, kind, shape in CASES:
    h, a, b, idx, w = _case(num_e, k, kind, **shape)
    got, grads = _value_and_grads(
        lambda *x: grouped.apply_experts(*x, impl=impl, interpret=False),
        h, a, b, idx, w)
    want, want_grads = _value_and_grads(grouped.apply_dense, h, a, b, idx, w)
    assert _rel(got, want) < TOL
    for name, g, ref in zip("habw", grads, want_grads, strict=True):
      assert _rel(g, ref) < TOL, (name, _rel(g, ref))


def test_segment_tiles_cover_each_segment_once():
  counts = jnp.asarray([20, 0, 5, 33, 0], jnp.int32)
  starts = jnp.cumsum(counts) - counts
  meta = np.asarray(jax.jit(pallas_kernels.segment_tiles, static_argnums=(
      2, 3))(counts, starts, 58, 16))
  assert meta.shape == (3, -(-58 // 16) + 5)
  rows = [(e, s + i) for e, s, n in meta.T for i in range(n)]
  want = [(e, int(starts[e]) + i) for e in range(5) for i in range(counts[e])]
  assert sorted(rows) == want and len(rows) == len(set(rows))
  assert all(n <= 16 for n in meta[2])


# ------------------------------------------------------ device lowerings

def _triton_modules(lowered):
  """The Triton modules (parsed) of a lowered computation's custom calls."""
  found = []

  def walk(op):
    for region in op.regions:
      for block in region.blocks:
        for child in block.operations:
          attrs = child.operation.attributes
          if (child.operation.name == "stablehlo.custom_call"
              and "triton" in str(attrs["call_target_name"])):
            cfg = ir.DictAttr(attrs["mhlo.backend_config"])
            found.append(ir.StringAttr(cfg["ir"]).value_bytes)
          walk(child.operation)
  walk(lowered.compiler_ir("stablehlo").operation)
  out = []
  for code in found:
    with triton_lowering._new_ir_context():   # pylint: disable=protected-access
      module = ir.Module.parse(code)
      out.append((module.operation.verify(), str(module)))
  return out


def _lower(impl, platform, d, r, o, n=40, num_e=8, k=2):
  h, a, b = jnp.ones((n, d)), jnp.ones((num_e, d, r)), jnp.ones((num_e, r, o))
  idx, w = jnp.zeros((n, k), jnp.int32), jnp.ones((n, k))
  vg = jax.value_and_grad(lambda *x: jnp.sum(grouped.apply_experts(
      x[0], x[1], x[2], idx, x[3], impl=impl, interpret=False)),
      argnums=(0, 1, 2, 3))
  return jax.jit(vg).trace(h, a, b, w).lower(lowering_platforms=(platform,))


@pytest.mark.parametrize("impl,calls", [("sgmv", 4), ("bgmv", 2)])
def test_gpu_kernels_lower_to_valid_triton(impl, calls):
  """Forward + backward lower for CUDA; each Triton module verifies. With
  d = 48 (blocks of 16), r = 16, o = 40 (blocks of 8) SGMV has products of
  both kinds: tl.dot (all sides >= 16) and the broadcast product."""
  modules = _triton_modules(_lower(impl, "cuda", 48, 16, 40))
  assert len(modules) == calls
  assert all(ok for ok, _ in modules)
  text = "".join(t for _, t in modules)
  assert ("tt.dot" in text) == (impl == "sgmv")
  assert "tt.reduce" in text


def test_megablox_lowers_for_tpu():
  """Mosaic's block rules (8 x 128 multiples or whole axes) hold for the
  forward and the backward's transposed gmm / tgmm tilings: a T5-small-sized
  module (d 512, o 2048, r 16), M = 600 rows in tiles of 128."""
  text = _lower("megablox", "tpu", 512, 16, 2048, n=300).as_text()
  assert text.count("tpu_custom_call") == 6


def test_auto_per_backend():
  """Many tokens: grouped / sgmv / megablox; decoding (N*k <= E): gather on
  CPU and TPU, bgmv on GPU."""
  want = {"cpu": ("grouped", "gather"), "gpu": ("sgmv", "bgmv"),
          "tpu": ("megablox", "gather")}
  for backend, (many, few) in want.items():
    assert grouped.default_impl(5120, 256, backend) == many
    assert grouped.default_impl(64, 256, backend) == few
    assert grouped.default_impl(backend=backend) == many
  assert grouped.per_example_impl(32 * 160, 32, "cpu") == "gather"
  assert grouped.per_example_impl(32 * 160, 32, "gpu") == "sgmv"
  assert grouped.per_example_impl(32, 32, "gpu") == "bgmv"
