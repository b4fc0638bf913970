"""Bad Hugging Face folders fail with errors that name the problem."""
import functools
import json
import os
import re

import flax.linen as nn
import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from mtjax.models import decoder, hf

CONFIG = decoder.DecoderConfig(
    model_type="llama", vocab_size=32, hidden_size=16, intermediate_size=24,
    num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)


@functools.lru_cache(maxsize=1)
def _model_and_params():
  model = decoder.Model(CONFIG)
  init = jax.jit(lambda r: model.init(r, np.zeros((1, 2), np.int32)))
  return model, nn.unbox(init(jax.random.key(0))["params"])


@pytest.fixture
def folder(tmp_path):
  """A valid tiny llama folder written by hf.save."""
  hf.save(*_model_and_params(), str(tmp_path))
  return tmp_path


def test_untouched_folder_loads(folder):
  model, params = hf.load(str(folder))
  assert model.config == CONFIG
  assert set(params["model"]) == {"embed_tokens", "layers_0", "norm"}


def rewrite(folder, edit):
  path = os.path.join(folder, "model.safetensors")
  tensors = load_file(path)
  edit(tensors)
  save_file(tensors, path, metadata={"format": "pt"})


def test_missing_tensor_names_it_and_its_shape(folder):
  name = "model.layers.0.self_attn.k_proj.weight"
  rewrite(folder, lambda t: t.pop(name))
  with pytest.raises(KeyError, match=re.escape(name)) as err:
    hf.load(str(folder))
  assert "(8, 16)" in str(err.value)  # HF (out, in) shape: 1 KV head x 8 dims


def test_shape_mismatch_names_the_tensor(folder):
  name = "model.layers.0.mlp.up_proj.weight"
  rewrite(folder, lambda t: t.update({name: np.zeros((25, 16), np.float32)}))
  with pytest.raises(ValueError, match=re.escape(name)) as err:
    hf.load(str(folder))
  assert "(25, 16)" in str(err.value) and "(24, 16)" in str(err.value)


def test_unsupported_model_type_names_it_and_the_supported(folder):
  cfg_path = os.path.join(folder, "config.json")
  with open(cfg_path) as f:
    cfg = json.load(f)
  cfg["model_type"] = "gpt_neox"
  with open(cfg_path, "w") as f:
    json.dump(cfg, f)
  with pytest.raises(ValueError, match="gpt_neox") as err:
    hf.load(str(folder))
  for supported in ("llama", "qwen2", "gemma", "bloom", "t5"):
    assert supported in str(err.value)


def test_pickle_only_folder_is_refused(folder):
  os.remove(os.path.join(folder, "model.safetensors"))
  with open(os.path.join(folder, "pytorch_model.bin"), "wb") as f:
    f.write(b"\x80\x04not-to-be-unpickled")
  with pytest.raises(FileNotFoundError, match="pytorch_model.bin") as err:
    hf.load(str(folder))
  assert "pickle" in str(err.value) and "safetensors" in str(err.value)


def test_unsupported_rope_scaling_is_refused(folder):
  cfg_path = os.path.join(folder, "config.json")
  with open(cfg_path) as f:
    cfg = json.load(f)
  cfg["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 5e5}
  with open(cfg_path, "w") as f:
    json.dump(cfg, f)
  with pytest.raises(ValueError, match="llama3"):
    hf.load(str(folder))
