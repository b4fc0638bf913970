"""Hugging Face checkpoint folders <-> (model, params).

`load(path, dtype, param_dtype, mesh)` reads `config.json` and `*.safetensors`
(single file or sharded with `model.safetensors.index.json`) lazily: one tensor
at a time is read, converted to `param_dtype` and placed on `mesh` with the
NamedSharding its logical axes imply, so the host never holds more than about
one tensor (not the model). `save(model, params, path)` writes a folder that
`transformers` loads. Pickle files are never read.

Each architecture module (t5.py, decoder.py) provides:
  config_from_hf(hf_config: dict) -> Config
  config_to_hf(config) -> dict
  Model: the linen module class, built as Model(config)
  hf_key(path: tuple[str, ...], config) -> str | None   (see `layers.default_hf_key`)
  hf_from_param / param_from_hf (optional): per-tensor layout fixes, e.g.
     BLOOM's fused QKV or tied embeddings. param_from_hf(keys, hf_name,
     tensors, config) gets `tensors` as a Mapping that reads a tensor when it
     is indexed (`LazyTensors`): index only the tensors the parameter needs.
The conversion walks the *expected* parameter tree (from jax.eval_shape), so a
missing tensor or a wrong shape is reported by name with the expected shape.
"""
import json
import os
import struct
from collections.abc import Iterator, Mapping
from types import ModuleType
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import ml_dtypes
import numpy as np
from jax.sharding import Mesh, Sharding
from safetensors import safe_open
from safetensors.numpy import save_file

from mtjax.models import decoder, layers, sharding, t5

Model = Any  # a flax linen module (t5.Model or decoder.Model)

# model_type -> the module under mtjax.models that implements it.
_ARCHS = {
    "t5": t5, "mt5": t5, "umt5": None,
    "llama": decoder, "qwen2": decoder, "bloom": decoder,
    "gemma": decoder, "mistral": decoder, "qwen3": decoder,
    "gemma3_text": decoder,
}


def arch_module(model_type: Optional[str]) -> ModuleType:
  if _ARCHS.get(model_type) is None:
    supported = sorted(k for k, v in _ARCHS.items() if v is not None)
    raise ValueError(
        f"unsupported model_type {model_type!r} in config.json; mtjax loads "
        f"{supported}. Convert the checkpoint to one of these or add the "
        "architecture to mtjax/models/hf.py.")
  return _ARCHS[model_type]


def safetensors_files(path: str) -> list[str]:
  """The folder's safetensors files (those of its index when it has one)."""
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
  return [os.path.join(path, f) for f in files]


# safetensors dtypes numpy has no name for; read as raw bytes via ml_dtypes.
_RAW_DTYPES = {"BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn,
               "F8_E5M2": ml_dtypes.float8_e5m2}


def _read_raw(file: str, name: str) -> np.ndarray:
  """One tensor of a dtype numpy cannot name, read from the file's header."""
  with open(file, "rb") as f:
    (size,) = struct.unpack("<Q", f.read(8))
    info = json.loads(f.read(size))[name]
    dtype = np.dtype(_RAW_DTYPES[info["dtype"]])
    start, end = info["data_offsets"]
    f.seek(8 + size + start)
    value = np.fromfile(f, dtype=dtype, count=(end - start) // dtype.itemsize)
  return value.reshape(info["shape"])


class LazyTensors(Mapping):
  """{HF name: np.ndarray} over a folder's safetensors files, read on access.

  Only the file headers are read up front. Each `tensors[name]` opens the
  file holding `name`, copies that one tensor out and closes the file again:
  an open `safe_open` keeps every page it has touched mapped (and counted in
  the process's RSS), so a long-lived handle would grow to the file's size.
  Use it wherever a `{name: array}` dict of a checkpoint is expected.
  """

  def __init__(self, path: str) -> None:
    self.path = path
    self._file: dict[str, str] = {}
    for file in safetensors_files(path):
      with safe_open(file, framework="numpy") as f:
        for name in f.keys():
          self._file.setdefault(name, file)

  def __getitem__(self, name: str) -> np.ndarray:
    if name not in self._file:
      raise KeyError(name)
    file = self._file[name]
    with safe_open(file, framework="numpy") as f:
      if f.get_slice(name).get_dtype() not in _RAW_DTYPES:
        return f.get_tensor(name)
    return _read_raw(file, name)

  def __contains__(self, name: object) -> bool:
    return name in self._file

  def __iter__(self) -> Iterator[str]:
    return iter(self._file)

  def __len__(self) -> int:
    return len(self._file)

  def shape(self, name: str) -> tuple[int, ...]:
    """The tensor's shape, from the header (nothing is read)."""
    with safe_open(self._file[name], framework="numpy") as f:
      return tuple(f.get_slice(name).get_shape())


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """All tensors of a folder's safetensors files as {name: np.ndarray}.

  Eager: holds the whole checkpoint in host memory. `load` does not use it;
  `LazyTensors(path)` is the same mapping read one tensor at a time.
  """
  return dict(LazyTensors(path))


def dummy_inputs(config: Any) -> dict[str, np.ndarray]:
  ids = np.zeros((1, 2), np.int32)
  if getattr(config, "is_encoder_decoder", False):
    return dict(input_ids=ids, decoder_input_ids=ids)
  return dict(input_ids=ids)


def _convert(tensors: Mapping[str, np.ndarray], model: Model, path_hint: str,
             finish: Callable[[np.ndarray, Any], Any],
             mesh: Optional[Mesh] = None) -> dict:
  """The param tree of `model`, one leaf at a time: finish(value, sharding).

  `value` is the HF tensor in mtjax's layout (kernels transposed) with the
  expected shape; `sharding` is the leaf's NamedSharding on `mesh` (None
  without a mesh). Each tensor is read, finished and dropped before the next.
  """
  config = model.config
  arch = arch_module(config.model_type)
  boxed = sharding.abstract_params(model, **dummy_inputs(config))
  expected = nn.unbox(boxed)
  to_param = getattr(arch, "param_from_hf", None)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(expected)
  targets = ([None] * len(leaves) if mesh is None else
             treedef.flatten_up_to(sharding.tree_shardings(boxed, mesh)))

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
    return value

  out = [finish(one(path, leaf), target)
         for (path, leaf), target in zip(leaves, targets, strict=True)]
  return jax.tree_util.tree_unflatten(treedef, out)


def params_from_tensors(tensors: Mapping[str, np.ndarray], model: Model,
                        path_hint: str = "checkpoint",
                        param_dtype: str = "float32") -> dict:
  """The param tree of `model` as host numpy arrays from an HF state dict.

  `tensors` is any {name: array} mapping (a dict, or `LazyTensors` to read
  on demand); the result holds the whole model on the host. `place_params`
  builds the same tree on devices without that host copy.
  """
  np_dtype = layers.dtype_of(param_dtype)
  return _convert(tensors, model, path_hint,
                  lambda value, _: np.asarray(value, dtype=np_dtype))


def place_params(tensors: Mapping[str, np.ndarray], model: Model,
                 path_hint: str = "checkpoint", param_dtype: str = "float32",
                 mesh: Optional[Mesh] = None) -> dict:
  """The param tree of `model` on devices, built one tensor at a time.

  Each tensor is read from `tensors` (e.g. `LazyTensors`), converted to
  `param_dtype` and placed with the NamedSharding of its logical axes on
  `mesh` (each process copies only its own devices' shards), or on the
  default device without a mesh; then it is dropped, so the host holds about
  one tensor at a time.
  """
  np_dtype = layers.dtype_of(param_dtype)

  def finish(value: np.ndarray, target: Optional[Sharding]) -> jax.Array:
    value = np.ascontiguousarray(value, dtype=np_dtype)
    if target is None:
      return jax.device_put(value)
    return jax.make_array_from_callback(value.shape, target,
                                        lambda index: value[index])

  return _convert(tensors, model, path_hint, finish, mesh)


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


def load(path: str, dtype: str = "float32", param_dtype: str = "float32",
         mesh: Optional[Mesh] = None) -> tuple[Model, dict]:
  """Local HF folder -> (model, params on devices), read one tensor at a time.

  `dtype` is the compute dtype, `param_dtype` the dtype the parameters are
  stored in (each tensor is converted as it is read, so bf16 parameters never
  pass through an f32 copy of the model). With a `mesh` every parameter is
  placed with the NamedSharding of its logical axes (sharding.RULES); without
  one, on the default device.
  """
  cfg_file = os.path.join(path, "config.json")
  if not os.path.exists(cfg_file):
    raise FileNotFoundError(f"{cfg_file} not found: a Hugging Face model folder "
                            "needs config.json and *.safetensors")
  with open(cfg_file) as f:
    hf_config = json.load(f)
  model_type = hf_config.get("model_type")
  arch = arch_module(model_type)
  layers.dtype_of(param_dtype)  # validates before anything is read
  config = arch.config_from_hf(hf_config, dtype=dtype)
  model = arch.Model(config)
  params = place_params(LazyTensors(path), model, path_hint=path,
                        param_dtype=param_dtype, mesh=mesh)
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
