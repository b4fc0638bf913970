"""Adapter files: method params on disk, apart from the base model.

  to_flat_numpy(tree) / from_flat(flat)   nested params <-> {'/'-path: array}
  fingerprint(base_params)                short sha256 of a base's weights
  read_peft(folder, model)                a PEFT LoRA folder -> (its
                                          adapter_config.json, {'lora': tree})
  save_adapter(folder, params) / load_adapter(path, model=None)
      orbax checkpoint of method params only; `load_adapter` also reads expert
      folders (mtjax.methods.library), PEFT folders and trainer workdirs
      (whose checkpoints hold only the trainable leaves), so a run can start
      from any base plus any adapter (method config `init_from`).
  source_prompt(path)                     (P, d) prompt of a saved prompt adapter

PEFT names tensors 'base_model.model.<hf module>.lora_A.weight' with lora_A
(r, in) = our lora_a.T and lora_B (out, r) = our lora_b.T; its scale is
lora_alpha / r (lora_alpha / sqrt(r) with use_rslora, converted on read).

Folders may be gs:// URLs (mtjax.paths); orbax gets them unchanged.
"""
import hashlib
import json
import math
import re
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp

from mtjax import paths
from mtjax.methods import transform
from mtjax.models import hf

EXPERT_JSON = "expert.json"
WEIGHTS = "weights.safetensors"

Model = Any  # a flax linen module (mtjax.models)


def to_flat_numpy(tree: dict) -> dict:
  """Nested method params -> {'/'-joined path: np.ndarray f32}."""
  return {k: np.ascontiguousarray(np.asarray(jax.device_get(v)))
          for k, v in transform.flatten(nn.unbox(tree)).items()}


def from_flat(flat: Mapping[str, Any]) -> dict:
  return transform.nest(dict(flat))


def fingerprint(params: dict) -> str:
  """Short sha256 over the base params' names, shapes and bytes."""
  h = hashlib.sha256()
  for k, v in sorted(to_flat_numpy(params).items()):
    h.update(k.encode())
    h.update(str(v.shape).encode())
    h.update(np.ascontiguousarray(v, np.float32).tobytes())
  return h.hexdigest()[:16]



def jsonable(x: Any) -> Any:
  return json.loads(json.dumps(x, default=lambda o: (
      o.tolist() if hasattr(o, "tolist") else str(o))))



# --------------------------------------------------------------------- PEFT

def module_maps(model: Model) -> tuple:
  """({mtjax module path: hf module name}, same reversed) for Linear modules."""
  arch = hf.arch_module(model.config.model_type)
  to_hf = {}
  for path in transform.linear_modules(transform.abstract_params(model)):
    name = arch.hf_key(tuple(path.split("/")) + ("kernel",), model.config)
    if name is None or not name.endswith(".weight"):
      continue
    to_hf[path] = name[:-len(".weight")]
  return to_hf, {v: k for k, v in to_hf.items()}


def read_peft(folder: str, model: Model) -> tuple:
  """(LoRA options {rank, alpha, dropout, targets}, {'lora': params}) of a PEFT
  LoRA adapter folder."""
  cfg_file = paths.join(folder, "adapter_config.json")
  weights = paths.join(folder, "adapter_model.safetensors")
  for f in (cfg_file, weights):
    if not paths.exists(f):
      raise FileNotFoundError(
          f"{f} not found: a PEFT adapter folder holds adapter_config.json and "
          "adapter_model.safetensors (save with safe_serialization=True)")
  cfg = paths.read_json(cfg_file)
  if cfg.get("peft_type") != "LORA":
    raise ValueError(f"{cfg_file}: peft_type {cfg.get('peft_type')!r}; only "
                     "LORA adapters import")
  for key, ok in (("fan_in_fan_out", False), ("use_dora", False),
                  ("bias", "none")):
    if cfg.get(key, ok) != ok:
      raise ValueError(f"{cfg_file}: {key}={cfg[key]!r} is not supported "
                       f"(only {key}={ok!r})")
  for key in ("rank_pattern", "alpha_pattern", "modules_to_save"):
    if cfg.get(key):
      raise ValueError(f"{cfg_file}: {key} is not supported; re-save the "
                       "adapter with one rank/alpha and no modules_to_save")
  r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
  if cfg.get("use_rslora"):
    alpha = alpha * math.sqrt(r)   # alpha/sqrt(r) == (alpha sqrt(r)) / r
  _, from_hf = module_maps(model)
  tensors = paths.read_safetensors(weights)
  flat = {}
  pattern = re.compile(
      r"base_model\.model\.(.+)\.lora_(A|B)(?:\.[A-Za-z0-9_]+)?\.weight")
  for key, value in tensors.items():
    m = pattern.fullmatch(key)
    if not m:
      raise ValueError(f"{weights}: unexpected tensor {key!r} (expected "
                       "'base_model.model.<module>.lora_A/B.weight')")
    module, which = m.groups()
    if module not in from_hf:
      raise ValueError(f"{weights}: module {module!r} is not a linear layer "
                       f"of this {model.config.model_type} model")
    path = from_hf[module]
    leaf = "lora_a" if which == "A" else "lora_b"
    flat[f"{path}/{leaf}"] = np.asarray(value, np.float32).T
  modules = sorted({k.rsplit("/", 1)[0] for k in flat})
  for p in modules:
    if f"{p}/lora_a" not in flat or f"{p}/lora_b" not in flat:
      raise ValueError(f"{weights}: {p} lacks lora_A or lora_B")
  options = {"rank": r, "alpha": alpha,
             "dropout": float(cfg.get("lora_dropout", 0.0)),
             "targets": tuple(re.escape(p) for p in modules)}
  return options, {"lora": transform.nest(flat)}


# --------------------------------------------------- adapter checkpoints

def save_adapter(folder: str, params: dict,
                 method_config: Optional[Mapping[str, Any]] = None) -> None:
  """Orbax checkpoint of method params only (no base), plus method.json."""
  folder = paths.absolute(folder)
  tree = {k: v for k, v in nn.unbox(params).items() if k != "base"}
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(paths.join(folder, "params"), tree)
  ckpt.wait_until_finished()
  if method_config is not None:
    cfg = (method_config.to_dict() if hasattr(method_config, "to_dict")
           else dict(method_config))
    paths.write_json(paths.join(folder, "method.json"), jsonable(cfg),
                     indent=1)


def load_adapter(path: str, model: Optional[Model] = None) -> dict:
  """Method params {'lora': ...} from an orbax adapter checkpoint, an expert
  folder, a PEFT folder (needs `model`), or a trainer workdir (latest step).

  Host numpy arrays; safe to call while a method's init is being traced.
  """
  with jax.ensure_compile_time_eval():
    return jax.tree.map(np.asarray, _load_adapter(paths.absolute(path), model))


def read_weights(folder: str, name: str = "") -> dict:
  """Nested params of an expert folder's weights file."""
  path = paths.join(folder, WEIGHTS)
  if not paths.exists(path):
    raise FileNotFoundError(f"expert {name or folder!r} has no {WEIGHTS} in "
                            f"{folder}")
  try:
    return from_flat(paths.read_safetensors(path))
  except Exception as e:  # noqa: BLE001 (safetensors raises its own types)
    raise ValueError(f"expert {name or folder!r}: cannot read {path} ({e})") \
        from e


def _load_adapter(path, model):
  if paths.exists(paths.join(path, EXPERT_JSON)):
    return read_weights(path)
  if paths.exists(paths.join(path, "adapter_config.json")):
    if model is None:
      raise ValueError(f"{path} is a PEFT adapter: pass the model to map its "
                       "module names")
    return read_peft(path, model)[1]
  if paths.isdir(paths.join(path, "params")):
    return jax.tree.map(np.asarray,
                        ocp.StandardCheckpointer().restore(
                            paths.join(path, "params")))
  steps_dir = paths.join(path, "checkpoints")
  if paths.isdir(steps_dir):
    # Finalized steps only: on an object store an unfinished save is a
    # '<step>' folder without its commit file.
    steps = [n for n in paths.listdir(steps_dir) if n.isdigit() and
             ocp.path.step.is_path_finalized(paths.join(steps_dir, n))]
    steps = sorted(int(n) for n in steps)
    if steps:
      restored = ocp.StandardCheckpointer().restore(
          paths.join(steps_dir, str(steps[-1]), "state"))
      flat = restored["params"]
      return transform.nest({k: np.asarray(v) for k, v in flat.items()
                             if not k.startswith("base/")})
  raise FileNotFoundError(
      f"{path} holds no adapter: expected an expert folder ({EXPERT_JSON}), a "
      "PEFT folder (adapter_config.json), an orbax adapter (params/) or a "
      "trainer workdir (checkpoints/<step>/state)")


def source_prompt(path: str) -> np.ndarray:
  """(P, d) prompt from a saved prompt-tuning / multitask-prompt adapter.

  Multitask prompts give their shared prompt S (the transferable part).
  """
  tree = load_adapter(path)
  if "prompt" not in tree:
    raise ValueError(f"{path} holds {sorted(tree)} params, not a prompt")
  p = tree["prompt"]
  if "shared" in p:
    return np.asarray(p["shared"])
  emb = np.asarray(p["embedding"])
  return emb if emb.ndim == 2 else emb.mean(0)
