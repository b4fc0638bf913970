"""hf.load at scale: lazy sharded reads, bf16 params, placement on a mesh."""
import glob
import json
import os
import re

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding
from safetensors.numpy import load_file, save_file

from mtjax.methods import full
from mtjax.models import decoder, hf, sharding
from mtjax.training import trainer

CONFIG = decoder.DecoderConfig(
    model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    bos_token_id=1, eos_token_id=2, pad_token_id=0)
IDS = np.array([[1, 5, 9, 33, 2, 60, 7, 11], [3, 3, 40, 17, 8, 1, 0, 63]])


def save_sharded(tensors, path, per_file=4):
  """{name: array} as model-0000k-of-0000n.safetensors + the HF index."""
  names = sorted(tensors)
  chunks = [names[i:i + per_file] for i in range(0, len(names), per_file)]
  weight_map = {}
  for k, chunk in enumerate(chunks):
    file = f"model-{k + 1:05d}-of-{len(chunks):05d}.safetensors"
    save_file({n: tensors[n] for n in chunk}, os.path.join(path, file),
              metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(chunk, file))
  with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": sum(
        x.nbytes for x in tensors.values())}, "weight_map": weight_map}, f)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """A tiny random Llama (every weight perturbed) in several shards."""
  model = decoder.Model(CONFIG)
  params = nn.unbox(jax.jit(lambda r: model.init(r, IDS[:1]))(
      jax.random.key(0))["params"])
  rng = np.random.default_rng(0)
  params = jax.tree.map(
      lambda x: np.asarray(x) + 0.1 * rng.standard_normal(x.shape, np.float32),
      params)
  path = str(tmp_path_factory.mktemp("llama"))
  hf.save(model, params, path)
  tensors = load_file(os.path.join(path, "model.safetensors"))
  os.remove(os.path.join(path, "model.safetensors"))
  save_sharded(tensors, path)
  return path


def eager_params(path, model):
  """The old path: every tensor in one host dict, then the param tree."""
  tensors = {}
  for file in glob.glob(os.path.join(path, "*.safetensors")):
    tensors.update(load_file(file))
  return hf.params_from_tensors(tensors, model, path_hint=path)


def logits(model, params):
  return np.asarray(jax.jit(model.apply)({"params": params}, IDS))


def test_sharded_folder_loads_lazily_like_eager(folder, monkeypatch):
  assert os.path.exists(os.path.join(folder, "model.safetensors.index.json"))
  assert len(glob.glob(os.path.join(folder, "*.safetensors"))) >= 3
  reads = []
  get = hf.LazyTensors.__getitem__
  monkeypatch.setattr(hf.LazyTensors, "__getitem__",
                      lambda self, name: reads.append(name) or get(self, name))
  model, params = hf.load(folder)
  expected = eager_params(folder, model)
  leaves = jax.tree.leaves(params)
  assert len(reads) == len(set(reads)) == len(leaves)  # each tensor read once
  assert all(isinstance(x, jax.Array) and x.dtype == np.float32
             for x in leaves)
  jax.tree.map(np.testing.assert_array_equal, params, expected)


def test_bf16_params_come_out_bf16_with_close_logits(folder):
  model, p32 = hf.load(folder)
  model16, p16 = hf.load(folder, param_dtype="bfloat16")
  assert model16.config == model.config  # the compute dtype stays float32
  assert all(x.dtype == jax.numpy.bfloat16 for x in jax.tree.leaves(p16))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(
      np.asarray(a), np.asarray(b, jax.numpy.bfloat16)), p16, p32)
  ref, out = logits(model, p32), logits(model16, p16)
  assert out.dtype == np.float32
  np.testing.assert_allclose(out, ref, atol=2e-2 * np.abs(ref).max())


def test_bf16_checkpoint_reads(folder, tmp_path):
  """A bf16 file (numpy has no bf16: read raw via ml_dtypes) loads in f32."""
  model, p32 = hf.load(folder)
  with open(os.path.join(folder, "config.json")) as f, \
       open(tmp_path / "config.json", "w") as g:
    g.write(f.read())
  save_sharded({k: np.asarray(v, jax.numpy.bfloat16) for k, v in
                hf.read_safetensors(folder).items()}, str(tmp_path))
  assert hf.LazyTensors(str(tmp_path))[
      "model.norm.weight"].dtype == jax.numpy.bfloat16
  _, loaded = hf.load(str(tmp_path))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(
      a, np.asarray(np.asarray(b, jax.numpy.bfloat16), np.float32)),
               loaded, p32)


@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 8, 1)])
def test_params_placed_with_their_logical_sharding(folder, shape):
  assert len(jax.devices()) == 8
  mesh = sharding.make_mesh(shape)
  model, params = hf.load(folder, param_dtype="bfloat16", mesh=mesh)
  boxed = sharding.abstract_params(model, **hf.dummy_inputs(model.config))
  want = sharding.tree_shardings(boxed, mesh)
  split = 0
  for (path, x), s in zip(jax.tree_util.tree_leaves_with_path(params),
                          jax.tree.leaves(want), strict=True):
    assert isinstance(x.sharding, NamedSharding), path
    assert x.sharding == s, (jax.tree_util.keystr(path), x.sharding, s)
    split += x.addressable_shards[0].data.size < x.size
  assert split >= 10  # kernels and embeddings really are split
  q = params["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
  assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  assert q.addressable_shards[0].data.shape == (32 // shape[1], 32 // shape[2])
  _, p16 = hf.load(folder, param_dtype="bfloat16")
  jax.tree.map(np.testing.assert_array_equal, params, p16)


def test_build_model_bf16_base_trains_f32_copies(folder):
  mesh = sharding.make_mesh((2, 2, 2))
  cfg = ml_collections.ConfigDict(dict(hf_path=folder, dtype="float32",
                                       param_dtype="bfloat16"))
  model, base = trainer.build_model(cfg, jax.random.key(0), mesh)
  assert all(x.dtype == jax.numpy.bfloat16 for x in jax.tree.leaves(base))
  method = full.FullFineTuning()
  flat, sh = trainer.init_params(model, method, jax.random.key(1), mesh, base)
  params, _ = trainer.split_trainable(flat, method.trainable)
  tx, _ = trainer.make_optimizer(ml_collections.ConfigDict(dict(
      name="adamw", learning_rate=1e-3)), 10)
  state, _ = trainer.init_state(tx, params, {k: sh[k] for k in params}, mesh)
  floats = [x for x in jax.tree.leaves(state)
            if jax.numpy.issubdtype(x.dtype, jax.numpy.floating)]
  assert len(floats) == 3 * len(params)  # params, Adam's mu and nu
  assert all(x.dtype == np.float32 for x in floats)


def _edit_shard(folder, name, edit):
  """Rewrites the shard holding `name` with edit(tensors) applied."""
  with open(os.path.join(folder, "model.safetensors.index.json")) as f:
    file = os.path.join(folder, json.load(f)["weight_map"][name])
  tensors = load_file(file)
  edit(tensors)
  save_file(tensors, file, metadata={"format": "pt"})


@pytest.fixture
def copy(folder, tmp_path):
  for file in os.listdir(folder):
    with open(os.path.join(folder, file), "rb") as src, \
         open(tmp_path / file, "wb") as dst:
      dst.write(src.read())
  return str(tmp_path)


def test_missing_tensor_in_a_shard_names_it(copy):
  name = "model.layers.1.self_attn.k_proj.weight"
  _edit_shard(copy, name, lambda t: t.pop(name))
  with pytest.raises(KeyError, match=re.escape(name)) as err:
    hf.load(copy, mesh=sharding.make_mesh((1, 8, 1)))
  assert "(16, 32)" in str(err.value)  # HF (out, in): 2 KV heads x 8 dims


def test_wrong_shape_in_a_shard_names_it(copy):
  name = "model.layers.0.mlp.up_proj.weight"
  _edit_shard(copy, name, lambda t: t.update(
      {name: np.zeros((65, 32), np.float32)}))
  with pytest.raises(ValueError, match=re.escape(name)) as err:
    hf.load(copy, param_dtype="bfloat16")
  assert "(65, 32)" in str(err.value) and "(64, 32)" in str(err.value)


def test_bad_param_dtype_is_refused_before_reading(folder):
  with pytest.raises(ValueError, match="float8"):
    hf.load(folder, param_dtype="float8")


def test_lazy_mapping_reads_headers_only(folder):
  tensors = hf.LazyTensors(folder)
  name = "model.layers.0.mlp.up_proj.weight"
  assert name in tensors and "nope" not in tensors
  assert tensors.shape(name) == (64, 32)
  assert tensors[name].shape == (64, 32)
  assert set(tensors) == set(hf.read_safetensors(folder))
  with pytest.raises(KeyError):
    tensors["nope"]  # noqa: B018 (the lookup is the test)
