"""Decoder forward passes under data x fsdp x tensor meshes on 8 fake devices."""
import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from mtjax.models import decoder, sharding

MESHES = [(8, 1, 1), (2, 2, 2), (1, 4, 2)]

CONFIGS = {
    "llama": decoder.DecoderConfig(  # GQA: 4 query heads over 2 KV heads
        model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2),
    "bloom": decoder.DecoderConfig(
        model_type="bloom", vocab_size=64, hidden_size=32, intermediate_size=128,
        num_hidden_layers=1, num_attention_heads=4, tie_word_embeddings=True,
        norm_eps=1e-5, hidden_act="gelu_pytorch_tanh"),
}


def batch():
  rng = np.random.RandomState(0)
  ids = rng.randint(0, 64, (8, 10))
  mask = np.ones_like(ids)
  mask[1, :4] = 0
  return ids, mask


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def setup(request):
  """(arch, model, unsharded params, unsharded logits)."""
  model = decoder.Model(CONFIGS[request.param])
  ids, mask = batch()
  init = jax.jit(lambda r: model.init(r, ids[:1])["params"])
  params = jax.device_get(nn.unbox(init(jax.random.key(0))))
  logits = np.asarray(jax.jit(model.apply)({"params": params}, ids, mask))
  return request.param, model, params, logits


@pytest.mark.parametrize("shape", MESHES)
def test_sharded_forward_matches_unsharded(setup, shape):
  arch, model, params, expected = setup
  assert len(jax.devices()) == 8
  mesh = sharding.make_mesh(shape)
  ids, mask = batch()
  abstract = sharding.abstract_params(model, input_ids=ids[:1])
  placed = sharding.shard_params(params, abstract, mesh)
  with sharding.use_mesh(mesh):
    logits = jax.jit(model.apply)({"params": placed}, ids, mask)
  diff = np.abs(np.asarray(logits) - expected).max()
  print(f"{arch} mesh {shape}: max |sharded - unsharded| = {diff:.1e}")
  assert diff < 1e-5

  # Parameters are really split: spec from the logical rules, smaller shards.
  _, fsdp, tensor = shape
  body = placed["transformer" if arch == "bloom" else "model"]
  layer = body["h_0"] if arch == "bloom" else body["layers_0"]
  attn = layer["self_attention"] if arch == "bloom" else layer["self_attn"]
  qkv = attn["query_key_value"] if arch == "bloom" else attn["q_proj"]
  out = attn["dense"] if arch == "bloom" else attn["o_proj"]
  up = layer["mlp"]["dense_h_to_4h" if arch == "bloom" else "up_proj"]
  emb = body["word_embeddings" if arch == "bloom" else "embed_tokens"]
  for arr, axes in [(qkv["kernel"], ("fsdp", "tensor")),
                    (out["kernel"], ("tensor", "fsdp")),
                    (up["kernel"], ("fsdp", "tensor")),
                    (emb["embedding"], ("tensor", "fsdp"))]:
    assert arr.sharding.spec == P(*axes), (arr.sharding, axes)
    want = tuple(n // mesh.shape[a] for n, a in zip(arr.shape, axes))
    assert arr.addressable_shards[0].data.shape == want
  if fsdp * tensor > 1:
    assert qkv["kernel"].addressable_shards[0].data.size < qkv["kernel"].size


def test_init_sharded_creates_sharded_params(setup):
  arch, model, params, _ = setup
  mesh = sharding.make_mesh((2, 2, 2))
  ids, _ = batch()
  sharded = sharding.init_sharded(model, jax.random.key(0), mesh,
                                  input_ids=ids[:1])
  abstract = sharding.abstract_params(model, input_ids=ids[:1])
  shardings = sharding.tree_shardings(abstract, mesh)
  flat, _ = jax.tree_util.tree_flatten_with_path(sharded)
  split = 0
  for (path, arr), want in zip(flat, jax.tree.leaves(
      shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))):
    assert arr.sharding.is_equivalent_to(want, arr.ndim), (path, arr.sharding)
    split += arr.addressable_shards[0].data.size < arr.size
  assert split >= 4 * CONFIGS[arch].num_hidden_layers  # kernels really split
  # Same values as an unsharded init with the same key (up to jit's rounding).
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b,
                                                       rtol=1e-6, atol=1e-7),
               sharded, params)


@pytest.mark.parametrize("setup", ["llama"], indirect=True)  # cache is shared
def test_generate_under_mesh_matches_unsharded(setup):
  _, model, params, _ = setup
  ids, mask = batch()
  expected = np.asarray(decoder.generate(model, params, ids, mask, 6))
  mesh = sharding.make_mesh((2, 2, 2))
  placed = sharding.shard_params(
      params, sharding.abstract_params(model, input_ids=ids[:1]), mesh)
  with sharding.use_mesh(mesh):
    out = np.asarray(decoder.generate(model, placed, ids, mask, 6))
  np.testing.assert_array_equal(out, expected)
