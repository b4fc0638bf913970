"""Hugging Face checkpoint folders <-> (model, params).

`load(path)` reads `config.json` and `*.safetensors` (single file or sharded
with `model.safetensors.index.json`); `save(model, params, path)` writes a
folder that `transformers` loads. Pickle files are never read.

Each architecture module (t5.py, decoder.py) provides:
  config_from_hf(hf_config: dict) -> Config
  config_to_hf(config) -> dict
  Model: the linen module class, built as Model(config)
  hf_key(path: tuple[str, ...], config) -> str | None   (see `layers.default_hf_key`)
  hf_from_param / param_from_hf (optional): per-tensor layout fixes, e.g.
     BLOOM's fused QKV or tied embeddings.
The conversion walks the *expected* parameter tree (from jax.eval_shape), so a
missing tensor or a wrong shape is reported by name with the expected shape.
"""
import json
import os
from types import ModuleType
from typing import Any, Optional

import flax.linen as nn
import jax
import numpy as np
from safetensors.numpy import load_file, save_file

from mtjax.models import decoder, sharding, t5

Model = Any  # a flax linen module (t5.Model or decoder.Model)

# model_type -> the module under mtjax.models that implements it.
_ARCHS = {
    "t5": t5, "mt5": t5, "umt5": None,
    "llama": decoder, "qwen2": decoder, "bloom": decoder,
    "gemma": decoder, "mistral": decoder,
}


def arch_module(model_type: Optional[str]) -> ModuleType:
  if _ARCHS.get(model_type) is None:
    supported = sorted(k for k, v in _ARCHS.items() if v is not None)
    raise ValueError(
        f"unsupported model_type {model_type!r} in config.json; mtjax loads "
        f"{supported}. Convert the checkpoint to one of these or add the "
        "architecture to mtjax/models/hf.py.")
  return _ARCHS[model_type]


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """All tensors of a folder's safetensors files as {name: np.ndarray}."""
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.exists(index):
    with open(index) as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
  else:
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
  if not files:
    pickles = [f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth"))]
    hint = "" if not pickles else (
        f" It holds {pickles}: mtjax never loads pickle; convert them with "
        "transformers' save_pretrained(safe_serialization=True).")
    raise FileNotFoundError(f"no *.safetensors files in {path}.{hint}")
  tensors = {}
  for name in files:
    tensors.update(load_file(os.path.join(path, name)))
  return tensors


def _expected(model, config):
  return nn.unbox(sharding.abstract_params(model, **dummy_inputs(config)))


def dummy_inputs(config: Any) -> dict[str, np.ndarray]:
  ids = np.zeros((1, 2), np.int32)
  if getattr(config, "is_encoder_decoder", False):
    return dict(input_ids=ids, decoder_input_ids=ids)
  return dict(input_ids=ids)


def params_from_tensors(tensors: dict[str, np.ndarray], model: Model,
                        path_hint: str = "checkpoint") -> dict:
  """Builds the param tree of `model` from an HF state dict (numpy arrays)."""
  config = model.config
  arch = arch_module(config.model_type)
  expected = _expected(model, config)
  to_param = getattr(arch, "param_from_hf", None)

  def one(path, leaf):
    keys = tuple(getattr(k, "key", getattr(k, "name", k)) for k in path)
    hf_name = arch.hf_key(keys, config)
    if to_param is not None:
      value = to_param(keys, hf_name, tensors, config)
    else:
      if hf_name not in tensors:
        raise KeyError(
            f"{path_hint} is missing tensor {hf_name!r} (expected shape "
            f"{_hf_shape(keys, leaf.shape)}) for parameter {'/'.join(keys)}")
      value = tensors[hf_name]
      if keys[-1] == "kernel":
        value = value.T
    if tuple(value.shape) != tuple(leaf.shape):
      raise ValueError(
          f"{path_hint}: tensor {hf_name!r} has shape "
          f"{_hf_shape(keys, value.shape)}, "
          f"expected {_hf_shape(keys, leaf.shape)} for parameter "
          f"{'/'.join(keys)} (config.json and weights disagree?)")
    return np.asarray(value, dtype=np.float32)

  return jax.tree_util.tree_map_with_path(one, expected)


def _hf_shape(keys, shape):
  return tuple(shape[::-1]) if keys[-1] == "kernel" else tuple(shape)


def params_to_tensors(model: Model, params: dict) -> dict[str, np.ndarray]:
  """HF state dict {name: np.ndarray (f32, contiguous)} of a param tree."""
  config = model.config
  arch = arch_module(config.model_type)
  from_param = getattr(arch, "hf_from_param", None)
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    keys = tuple(getattr(k, "key", getattr(k, "name", k)) for k in path)
    value = np.asarray(jax.device_get(leaf), dtype=np.float32)
    if from_param is not None:
      out.update(from_param(keys, value, config))
    else:
      out[arch.hf_key(keys, config)] = value.T if keys[-1] == "kernel" else value
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


def load(path: str, dtype: str = "float32") -> tuple[Model, dict]:
  """Local HF folder -> (model, params). `dtype` is the compute dtype."""
  cfg_file = os.path.join(path, "config.json")
  if not os.path.exists(cfg_file):
    raise FileNotFoundError(f"{cfg_file} not found: a Hugging Face model folder "
                            "needs config.json and *.safetensors")
  with open(cfg_file) as f:
    hf_config = json.load(f)
  model_type = hf_config.get("model_type")
  arch = arch_module(model_type)
  config = arch.config_from_hf(hf_config, dtype=dtype)
  model = arch.Model(config)
  params = params_from_tensors(read_safetensors(path), model, path_hint=path)
  return model, params


def save(model: Model, params: dict, path: str, overwrite: bool = False) -> None:
  """Writes config.json + model.safetensors that transformers can load."""
  if os.path.exists(os.path.join(path, "model.safetensors")) and not overwrite:
    raise FileExistsError(f"{path} already holds a checkpoint; pass "
                          "overwrite=True or choose another folder")
  os.makedirs(path, exist_ok=True)
  arch = arch_module(model.config.model_type)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(arch.config_to_hf(model.config), f, indent=2)
  save_file(params_to_tensors(model, params),
            os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
