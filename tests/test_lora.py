"""LoRA as a pure transform: identity at init, targets, mixed-adapter batches,
sharding by the base rules, frozen-base training and a real quality gain."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtjax import methods
from mtjax.methods import lora, transform
from mtjax.models import decoder, sharding, t5


def tiny_llama(vocab=64):
  return decoder.Model(decoder.config_from_hf(dict(
      model_type="llama", vocab_size=vocab, hidden_size=32,
      intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, pad_token_id=0, eos_token_id=1)))


def tiny_t5(vocab=64):
  return t5.Model(t5.config_from_hf(dict(
      vocab_size=vocab, d_model=32, d_kv=8, d_ff=48, num_layers=2,
      num_heads=4, relative_attention_num_buckets=8,
      relative_attention_max_distance=16, feed_forward_proj="gated-gelu",
      dropout_rate=0.0)))


def model_inputs(model, batch=3, length=7, seed=0):
  rs = np.random.RandomState(seed)
  out = dict(input_ids=jnp.asarray(rs.randint(2, 64, (batch, length))),
             attention_mask=jnp.ones((batch, length), jnp.int32))
  if model.config.is_encoder_decoder:
    out["decoder_input_ids"] = jnp.asarray(rs.randint(2, 64, (batch, 5)))
  return out


def init_base(model, inputs):
  return nn.unbox(model.init(jax.random.key(0), **inputs)["params"])


def jitted(method, model, **kw):
  """jit(method.apply) for this model: eager op-by-op dispatch is slow."""
  return jax.jit(lambda p, x: method.apply(model, p, x, **kw))


def randomize_b(params, seed=1):
  """Nonzero lora_b so the adapter changes the output."""
  flat = transform.flatten(params)
  rs = np.random.RandomState(seed)
  return transform.nest({k: (jnp.asarray(rs.normal(0, 0.2, v.shape),
                                         jnp.float32)
                             if k.endswith("lora_b") else v)
                         for k, v in flat.items()})


@pytest.mark.parametrize("make", [tiny_llama, tiny_t5])
def test_fresh_lora_is_identity(make):
  model = make()
  inputs = model_inputs(model)
  base = init_base(model, inputs)
  method = methods.build({"name": "lora", "rank": 4, "alpha": 8})
  params = nn.unbox(method.init(jax.random.key(1), model, base))
  want = jax.jit(lambda p, x: model.apply({"params": p}, **x))(base, inputs)
  apply = jitted(method, model)
  got = apply({"base": base, **params}, inputs)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  # ... and a nonzero B changes it.
  got = apply({"base": base, **randomize_b(params)}, inputs)
  assert float(jnp.abs(got - want).max()) > 1e-3


def test_default_targets_and_logical_axes():
  model = tiny_t5()
  boxed = methods.build({"name": "lora"}).init(jax.random.key(0), model)
  paths = sorted({k.rsplit("/", 1)[0] for k in
                  transform.flatten(nn.unbox(boxed["lora"]))})
  # q and v of every self- and cross-attention (2 enc + 2*2 dec): 12 modules.
  assert len(paths) == 12, paths
  assert all(p.rsplit("/", 1)[1] in ("q", "v") for p in paths)
  leaves = jax.tree_util.tree_leaves(
      boxed["lora"], is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert {l.names for l in leaves} == {("embed", "rank"), ("rank", "heads")}


def test_unmatched_pattern_is_named():
  model = tiny_llama()
  method = lora.LoRA(targets=(r".*self_attn/q_proj", r".*SelfAttention/q"))
  with pytest.raises(ValueError, match=r"SelfAttention/q.*match no Linear"):
    method.init(jax.random.key(0), model)


@pytest.mark.parametrize("make", [tiny_llama, tiny_t5])
def test_mixed_adapter_batch_equals_per_example(make):
  model = make()
  inputs = model_inputs(model, batch=4)
  base = init_base(model, inputs)
  n = 3
  stacked = lora.LoRA(rank=4, alpha=4, num_experts=n, targets=(
      r".*(q_proj|v_proj|down_proj)" if make is tiny_llama else r".*/(q|v|wo)",))
  params = randomize_b(nn.unbox(stacked.init(jax.random.key(2), model)))
  index = jnp.asarray([2, 0, 1, 2])
  got = jitted(stacked, model)({"base": base, **params},
                                dict(inputs, adapter_index=index))
  single = jitted(lora.LoRA(rank=4, alpha=4, targets=stacked.targets), model)
  for row, e in enumerate(np.asarray(index)):
    one = jax.tree.map(lambda x: x[e], params)
    want = single({"base": base, **one},
                  {k: v[row:row + 1] for k, v in inputs.items()})
    np.testing.assert_allclose(np.asarray(got[row:row + 1]),
                               np.asarray(want), atol=1e-5, rtol=1e-5)
  with pytest.raises(ValueError, match="adapter_index"):
    stacked.apply(model, {"base": base, **params}, inputs)


def test_merge_matches_unmerged():
  model = tiny_llama()
  inputs = model_inputs(model)
  base = init_base(model, inputs)
  method = lora.LoRA(rank=4, alpha=8)
  params = randomize_b(nn.unbox(method.init(jax.random.key(1), model)))
  want = jitted(method, model)({"base": base, **params}, inputs)
  merged = method.merge(model, {"base": base, **params})
  got = jax.jit(lambda p, x: model.apply({"params": p}, **x))(merged, inputs)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


def test_dropout_needs_rng_and_is_deterministic_by_key():
  model = tiny_llama()
  inputs = model_inputs(model)
  base = init_base(model, inputs)
  method = lora.LoRA(rank=4, dropout=0.5)
  params = {"base": base, **randomize_b(nn.unbox(
      method.init(jax.random.key(1), model)))}
  with pytest.raises(ValueError, match="rng"):
    jax.eval_shape(lambda p, x: method.apply(model, p, x, deterministic=False),
                   params, inputs)
  apply = jax.jit(lambda p, x, r: method.apply(model, p, x, rng=r,
                                                deterministic=False))
  a = apply(params, inputs, jax.random.key(3))
  b = apply(params, inputs, jax.random.key(3))
  c = apply(params, inputs, jax.random.key(4))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert float(jnp.abs(a - c).max()) > 0


def test_sharded_under_mesh_like_the_base():
  """Method params shard by the same logical rules; jit output matches."""
  model = tiny_llama()
  inputs = model_inputs(model, batch=8)
  mesh = sharding.make_mesh((2, 2, 2))
  base = sharding.init_sharded(model, jax.random.key(0), mesh, **inputs)
  method = lora.LoRA(rank=4, targets=(r".*(q_proj|down_proj)",))
  boxed = method.init(jax.random.key(1), model)
  shardings = sharding.tree_shardings(boxed, mesh)
  params = jax.tree.map(jax.device_put, randomize_b(nn.unbox(boxed)),
                        nn.unbox(shardings))
  a = params["lora"]["model"]["layers_0"]["mlp"]["down_proj"]["lora_a"]
  q = params["lora"]["model"]["layers_0"]["self_attn"]["q_proj"]["lora_b"]
  assert a.sharding.spec == jax.sharding.PartitionSpec("tensor", None)
  assert q.sharding.spec == jax.sharding.PartitionSpec(None, "tensor")
  with sharding.use_mesh(mesh):
    got = jax.jit(lambda p, x: method.apply(model, p, x))(
        {"base": base, **params}, inputs)
  want = jitted(method, model)(jax.device_get({"base": base, **params}),
                               jax.device_get(inputs))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


def test_trainer_updates_only_lora_and_keeps_no_base_optimizer_state(tmp_path):
  """Through mtjax.training: base bit-identical, Adam moments only for LoRA."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  import pathlib  # pylint: disable=g-import-not-at-top
  from mtjax import data  # pylint: disable=g-import-not-at-top
  from mtjax.experiments import train
  from mtjax.training import trainer  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(__file__).resolve().parents[1] / "configs/lora_expert.py"
  spec = importlib.util.spec_from_file_location("lora_expert", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  with c.unlocked():
    c.model.update(d_model=32, d_kv=8, d_ff=64, num_heads=4)
    c.batch_size = 8
    c.data.mixture = "parity"
  s = train.setup(c, str(tmp_path))
  frozen_before = jax.tree.map(np.array, s["frozen"])
  lora_before = jax.tree.map(np.array, s["state"]["params"])
  assert all(k.startswith("lora/") for k in lora_before)
  assert all(k.startswith("base/") for k in frozen_before)
  vocab = data.vocabulary("byte")
  reg = data.register(vocab)
  batches = data.train_batches(reg.seqio_name("parity"), vocab,
                               {"inputs": 64, "targets": 16}, 8,
                               trainer.model_kind(s["model"]), seed=0)
  with sharding.use_mesh(s["mesh"]):
    state, metrics = s["fitter"].run(s["state"], s["frozen"], batches, stop=2)
  assert np.isfinite(float(metrics["loss"]))
  for k, v in s["frozen"].items():
    np.testing.assert_array_equal(np.asarray(v), frozen_before[k])
  changed = [k for k, v in state["params"].items()
             if not np.array_equal(np.asarray(v), lora_before[k])]
  assert any(k.endswith("lora_b") for k in changed)
  n_lora = sum(v.size for v in lora_before.values())
  moments = [(p, x) for p, x in jax.tree_util.tree_flatten_with_path(
      state["opt_state"])[0] if np.ndim(x) > 0]
  assert all(str(p[-1].key).startswith("lora/") for p, _ in moments)
  assert sum(x.size for _, x in moments) == 2 * n_lora  # Adam mu and nu
