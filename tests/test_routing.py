"""Routing core (mtjax.methods.routing) and RoutedLoRA on a tiny T5."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtjax.methods import lora as lora_lib
from mtjax.routing import diagnostics
from mtjax.routing import routed as routed_lib
from mtjax.routing import experts as ex
from mtjax.routing import kernels as routing
from mtjax.models import sharding, t5


def _rand(seed, num_e, n=40, d=24, r=4, o=20):
  ks = jax.random.split(jax.random.key(seed), 4)
  return (jax.random.normal(ks[0], (n, d)), jax.random.normal(ks[1], (num_e, d, r)),
          jax.random.normal(ks[2], (num_e, r, o)),
          jax.random.normal(ks[3], (num_e, d)))


@pytest.mark.parametrize("num_e", [4, 64])
@pytest.mark.parametrize("k", [1, 2])
def test_blocked_and_ragged_equal_dense(num_e, k):
  h, a, b, gates = _rand(num_e * 10 + k, num_e)
  idx, w = routing.top_k(routing.phatgoose_logits(h, gates), k)
  ref = routing.apply_dense(h, a, b, idx, w)
  for impl, block in (("blocked", None), ("blocked", 1), ("blocked", 8),
                      ("ragged", None)):
    out = routing.apply_experts(h, a, b, idx, w, impl=impl, block=block)
    err = float(jnp.max(jnp.abs(out - ref)) / jnp.max(jnp.abs(ref)))
    assert err < 1e-5, (impl, block, err)


def _max_rel_err(out, ref):
  return float(jnp.max(jnp.abs(out - ref)) / jnp.max(jnp.abs(ref)))


@pytest.mark.parametrize("num_e", [4, 64])
@pytest.mark.parametrize("k", [1, 2])
def test_grouped_equals_dense(num_e, k):
  h, a, b, gates = _rand(num_e * 10 + k + 1, num_e)
  idx, w = routing.top_k(routing.phatgoose_logits(h, gates), k)
  ref = routing.apply_dense(h, a, b, idx, w)
  fn = jax.jit(routing.apply_experts, static_argnames=("impl", "block"))
  assert _max_rel_err(fn(h, a, b, idx, w, impl="grouped"), ref) < 1e-5
  if jax.default_backend() == "cpu":
    assert routing.default_impl() == "grouped"


def _skewed(kind, idx, num_e):
  """Adversarial loads: every token on the same k experts, or half unused."""
  k = idx.shape[1]
  if kind == "one_expert":
    return jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32), idx.shape)
  return idx % max(num_e // 2, k)   # top_k ids are distinct, and stay so


@pytest.mark.parametrize("num_e", [4, 64])
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("kind", ["one_expert", "half_unused"])
def test_grouped_exact_under_skew(num_e, k, kind):
  h, a, b, gates = _rand(num_e + 7 * k, num_e, n=256)
  idx, w = routing.top_k(routing.phatgoose_logits(h, gates), k)
  idx = _skewed(kind, idx, num_e)
  counts = np.bincount(np.asarray(idx).reshape(-1), minlength=num_e)
  cap = routing.default_capacity(idx.size, num_e)
  assert counts.max() > cap           # the overflow loop is exercised
  ref = routing.apply_dense(h, a, b, idx, w)
  # default sizes; then tiny capacity, blocks and trips: many loop trips,
  # blocks that straddle the end of an expert's rows
  for kw in ({}, dict(capacity=8, block=4, trip_rows=8),
             dict(capacity=8, block=1, trip_rows=1)):
    out = jax.jit(lambda *x, kw=kw: routing.apply_grouped(*x, **kw))(
        h, a, b, idx, w)
    assert _max_rel_err(out, ref) < 1e-5, kw


@pytest.mark.parametrize("impl", ["grouped", "blocked"])
def test_gradients_through_grouped_application_equal_dense(impl):
  """Training through routing (e.g. fixed weights, routers) needs reverse mode,
  also on the overflow path (tiny capacity: many loop trips)."""
  h, a, b, gates = _rand(5, 8, n=64)
  idx, w = routing.top_k(routing.phatgoose_logits(h, gates), 2)
  idx = _skewed("one_expert", idx, 8)
  kw = dict(capacity=8, block=4, trip_rows=8) if impl == "grouped" else {}
  fn = routing.apply_grouped if impl == "grouped" else routing.apply_blocked
  def loss(f, h, a, b, w):
    return jnp.sum(jnp.sin(f(h, a, b, idx, w)))
  got = jax.jit(jax.grad(lambda *x: loss(lambda *y: fn(*y, **kw), *x),
                         argnums=(0, 1, 2, 3)))(h, a, b, w)
  want = jax.grad(lambda *x: loss(routing.apply_dense, *x),
                  argnums=(0, 1, 2, 3))(h, a, b, w)
  for g, r in zip(got, want):
    assert _max_rel_err(g, r) < 1e-5


def test_grouped_with_experts_sharded_over_8_devices():
  if jax.device_count() < 8:
    pytest.skip("needs 8 (fake) devices: see tests/conftest.py XLA_FLAGS")
  h, a, b, gates = _rand(11, 16, n=64)
  idx, w = routing.top_k(routing.phatgoose_logits(h, gates), 2)
  idx = _skewed("half_unused", idx, 16)
  want = routing.apply_dense(h, a, b, idx, w)
  mesh = ex.expert_mesh(8)
  spec = jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec("experts", None, None))
  a_s, b_s = jax.device_put(a, spec), jax.device_put(b, spec)
  assert a_s.addressable_shards[0].data.shape[0] == 2
  with sharding.use_mesh(mesh):
    got = jax.jit(routing.apply_grouped)(h, a_s, b_s, idx, w)
  assert _max_rel_err(got, want) < 1e-5


def _values(closed):
  """(primitive name, shape) of every value a jaxpr computes, sub-jaxprs too."""
  out = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      out.extend((eqn.primitive.name, tuple(v.aval.shape)) for v in eqn.outvars)
      for p in eqn.params.values():
        for sub in (p if isinstance(p, (tuple, list)) else (p,)):
          inner = getattr(sub, "jaxpr", sub)
          if hasattr(inner, "eqns"):
            walk(inner)
  walk(closed.jaxpr)
  return out


def _feature_rows(closed, dims):
  """Largest row count (all axes but the last) of values whose last axis is
  one of `dims` (the features: d, o)."""
  return max([int(np.prod(s[:-1])) for _, s in _values(closed)
              if len(s) >= 2 and s[-1] in dims] or [0])


@pytest.mark.parametrize("k", [1, 2])
def test_decode_step_routing_costs_k_not_e(k):
  """A decoding step (N*k <= E) is routed per assignment ('gather'): exact,
  and no buffer has more than N*k*r rows of d or o features (the gathered
  b factors, (N, k, r, o)), where the capacity layout ('grouped') has an
  (E, C, d) buffer, C = min(8, N*k) at least, whatever the token count."""
  num_e, n, d, o = 256, 4, 24, 20
  h, a, b, gates = _rand(30 + k, num_e, n=n, d=d, o=o)
  idx, w = routing.top_k(routing.phatgoose_logits(h, gates), k)
  assert routing.default_impl(n * k, num_e) == "gather"
  fn = jax.jit(routing.apply_experts, static_argnames=("impl",))
  want = routing.apply_dense(h, a, b, idx, w)
  assert _max_rel_err(fn(h, a, b, idx, w, impl="auto"), want) < 1e-5
  auto = jax.make_jaxpr(routing.apply_experts)(h, a, b, idx, w)
  assert _feature_rows(auto, (d, o)) <= n * k * a.shape[-1]
  assert not any(name == "sort" for name, _ in _values(auto))
  capacity = jax.make_jaxpr(lambda *x: routing.apply_experts(
      *x, impl="grouped"))(h, a, b, idx, w)
  cap = routing.default_capacity(n * k, num_e)     # min(8, N*k) here
  assert _feature_rows(capacity, (d, o)) >= num_e * cap > n * k * a.shape[-1]


def test_equal_gates_give_uniform_top_k_weights():
  h, _, _, _ = _rand(0, 4)
  gates = jnp.tile(jax.random.normal(jax.random.key(1), (1, 24)), (6, 1))
  for k in (1, 2, 3):
    _, w = routing.top_k(routing.phatgoose_logits(h, gates), k)
    np.testing.assert_allclose(np.asarray(w), 1.0 / k, rtol=1e-6)
  # zero-initialised gates (before training) also route uniformly
  _, w = routing.top_k(routing.phatgoose_logits(h, jnp.zeros((6, 24))), 2)
  np.testing.assert_allclose(np.asarray(w), 0.5, rtol=1e-6)


def test_phatgoose_scores_are_layer_normed_dot_over_sqrt_d():
  h, _, _, gates = _rand(3, 5)
  def ln(x):
    x = np.asarray(x, np.float64)
    return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True)
                                                     + 1e-5)
  want = ln(h) @ ln(gates).T / np.sqrt(h.shape[-1])
  np.testing.assert_allclose(np.asarray(routing.phatgoose_logits(h, gates)),
                             want, rtol=1e-4, atol=1e-5)


def test_arrow_prototype_is_top_singular_vector():
  _, a, b, _ = _rand(5, 3)
  protos = np.asarray(routing.arrow_prototypes(a, b))
  for e in range(3):
    u = np.linalg.svd(np.asarray(a[e] @ b[e]))[0][:, 0]
    assert abs(abs(u @ protos[e]) - 1) < 1e-4


def test_top_k_larger_than_experts_is_a_clear_error():
  with pytest.raises(ValueError, match="exceeds"):
    routing.top_k(jnp.zeros((3, 2)), 3)


# ----------------------------------------------------------- tiny T5 model

@pytest.fixture(scope="module")
def tiny():
  cfg = t5.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                    num_heads=4, dropout_rate=0.0)
  model = t5.Model(cfg)
  rs = np.random.RandomState(0)
  inputs = dict(input_ids=rs.randint(2, 64, (4, 7)).astype(np.int32),
                decoder_input_ids=rs.randint(2, 64, (4, 5)).astype(np.int32))
  base = nn.unbox(model.init(jax.random.key(0), **inputs)["params"])
  lora = lora_lib.LoRA(rank=4, alpha=8.0, targets=(r"(encoder|decoder)/.*",))
  return model, base, lora, inputs


def _library(model, lora, num_e):
  lib = ex.new_library()
  gate_shapes = nn.unbox(ex.GateTraining(lora).init_gates(model))
  for e in range(num_e):
    tree = nn.unbox(lora.init(jax.random.key(e + 1), model))["lora"]
    # trained-looking experts: B is non-zero
    tree = jax.tree.map(lambda x, e=e: x + 0.2 * jax.random.normal(
        jax.random.key(100 + e), x.shape), tree)
    gates = jax.tree.map(lambda x, e=e: jax.random.normal(
        jax.random.key(200 + e), x.shape), gate_shapes)
    lib = ex.add_expert(lib, f"task{e}", tree, gates)
  return lib


def test_one_expert_top1_equals_that_expert(tiny):
  model, base, lora, inputs = tiny
  lib = _library(model, lora, 1)
  routed = routed_lib.build_router("phatgoose", lora, top_k=1)
  params = routed_lib.routed_params(base, ex.stack_library(lib), "phatgoose")
  out = jax.jit(lambda p: routed.apply(model, p, inputs))(params)
  ref = jax.jit(lambda p: lora.apply(model, p, inputs))(
      {"base": base, "lora": lib["experts"][0]["lora"]})
  np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))


def test_fixed_and_per_example_weights_select_experts(tiny):
  model, base, lora, inputs = tiny
  lib = _library(model, lora, 3)
  stacked = ex.stack_library(lib)
  routed = routed_lib.build_router("fixed", lora, top_k=1)
  params = routed_lib.routed_params(base, stacked, "fixed",
                            weights=np.array([0., 1., 0.]))
  per_ex = jnp.eye(3)[jnp.array([2, 1, 0, 2])]
  out = jax.jit(lambda p, w: routed.apply(
      model, p, dict(inputs, expert_weights=w)))(params, per_ex)
  single = jax.jit(lambda p: lora.apply(model, p, inputs))
  for row, e in enumerate([2, 1, 0, 2]):
    ref = single({"base": base, "lora": lib["experts"][e]["lora"]})
    np.testing.assert_allclose(np.asarray(out[row]), np.asarray(ref[row]),
                               atol=1e-5)


def test_routed_model_blocked_equals_dense(tiny):
  model, base, lora, inputs = tiny
  stacked = ex.stack_library(_library(model, lora, 6))
  params = routed_lib.routed_params(base, stacked, "phatgoose")
  outs = [jax.jit(lambda p, m=routed_lib.build_router("phatgoose", lora, top_k=2, impl=impl):
                  m.apply(model, p, inputs))(params)
          for impl in ("blocked", "ragged", "dense")]
  np.testing.assert_allclose(np.asarray(outs[0]), np.asarray(outs[2]),
                             atol=1e-5)
  np.testing.assert_allclose(np.asarray(outs[1]), np.asarray(outs[2]),
                             atol=1e-5)


def test_sharded_routing_over_8_devices_equals_unsharded(tiny):
  if jax.device_count() < 8:
    pytest.skip("needs 8 (fake) devices: see tests/conftest.py XLA_FLAGS")
  model, base, lora, inputs = tiny
  stacked = ex.stack_library(_library(model, lora, 8))
  routed = routed_lib.build_router("phatgoose", lora, top_k=2)
  fn = jax.jit(lambda p: routed.apply(model, p, inputs))
  want = fn(routed_lib.routed_params(base, stacked, "phatgoose"))
  mesh = ex.expert_mesh(8)
  assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1, "experts": 8}
  sharded = ex.shard_experts(stacked, model, mesh)
  a = next(v for k, v in
           __import__("mtjax.methods.transform", fromlist=["x"]).flatten(
               sharded).items() if k.endswith("lora_a"))
  assert a.sharding.spec[0] == "experts"      # 1 expert per device
  assert a.addressable_shards[0].data.shape[0] == 1
  with sharding.use_mesh(mesh):
    got = fn(routed_lib.routed_params(base, sharded, "phatgoose"))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


def test_records_and_diagnostics(tiny):
  model, base, lora, inputs = tiny
  stacked = ex.stack_library(_library(model, lora, 5))
  routed = routed_lib.build_router("phatgoose", lora, top_k=2)
  params = routed_lib.routed_params(base, stacked, "phatgoose")

  def fn(p):
    rec = {}
    routed.apply(model, p, inputs, records=rec)
    return rec
  rec = jax.device_get(jax.jit(fn)(params))
  assert len(rec) == 2 * 4 + 2 * 8 + 4 * 2   # attn q,k,v,o (+cross), wi, wo
  summ = diagnostics.summarize_records(rec, inputs, 5, own_expert=0)
  for row in summ.values():
    assert abs(row["load"].sum() - 1) < 1e-6
    assert 0 <= row["entropy"] <= np.log(5) + 1e-6
  ent = diagnostics.by_layer(summ, "entropy")
  assert list(ent) == ["enc0", "enc1", "dec0", "dec1"]


def test_routed_t5_decode_step_sorts_nothing(tiny):
  """Through RoutedLoRA with the KV cache: the prefill (many tokens) routes
  by sort-and-segment, a step of one token per row (4 rows, k = 2 among 16
  experts) by per-assignment gathers; no buffer in the step has E*C rows."""
  from mtjax.methods import transform   # pylint: disable=g-import-not-at-top
  model, base, lora, inputs = tiny
  # shapes only (traced, never run): 16 experts' LoRA factors and gates
  one = jax.eval_shape(lambda: ex.merge_leaves(
      nn.unbox(lora.init(jax.random.key(0), model))["lora"],
      nn.unbox(ex.GateTraining(lora).init_gates(model))))
  stacked = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct((16,) + x.shape, x.dtype), one)
  params = routed_lib.routed_params(base, stacked, "phatgoose")
  routed = routed_lib.build_router("phatgoose", lora, top_k=2)
  mask, dec = np.ones_like(inputs["input_ids"]), inputs["decoder_input_ids"]
  enc = jax.ShapeDtypeStruct(mask.shape + (32,), jnp.float32)   # the encoding

  def run(p, ids, decode, cache, encoded):
    return routed.apply(model, p, {"encoded": encoded, "attention_mask": mask,
                                   "decoder_input_ids": ids},
                        method="decode", decode=decode, cache=cache)
  prefill, (_, cache) = jax.make_jaxpr(
      lambda p, e: run(p, dec, transform.PREFILL, None, e),
      return_shape=True)(params, enc)
  step = jax.make_jaxpr(lambda p, c, e: run(p, dec[:, :1], transform.STEP, c,
                                            e))(params, cache, enc)
  assert any(name == "sort" for name, _ in _values(prefill))
  assert not any(name == "sort" for name, _ in _values(step))
  assert _feature_rows(step, (32, 64)) < 8 * 16
