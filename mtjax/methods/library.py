"""Expert library and PEFT interchange.

Library layout (one folder per expert, e.g. one LoRA per task):
  ROOT/<name>/expert.json          method config, source task, base model id and
                                   fingerprint, training steps, metrics
  ROOT/<name>/weights.safetensors  method params, keys '/'-joined paths
                                   ('lora/model/layers_0/self_attn/q_proj/lora_a')
`Library(root).list()` reads only the small json files; weights are read when
an expert's `.params()` is called, so hundreds of experts list quickly.
`Library.stack(names)` gives the (E, ...) params that serve a mixed-adapter
batch in one forward pass (inputs['adapter_index'] picks the expert).

Hugging Face PEFT interchange (LoRA on T5 and Llama-family models):
  export_peft(model, method, params, folder) -> adapter_config.json +
      adapter_model.safetensors that `peft.PeftModel.from_pretrained` loads;
  import_peft(folder, model) -> (LoRA method, {'lora': ...}).
Adapter files apart from a library (orbax, PEFT folders, trainer workdirs)
are read by mtjax.methods.adapters. Training a library is an experiment
(mtjax.experiments.library). ROOT and export folders may be gs:// URLs
(mtjax.paths).
"""
import dataclasses
import json
import re
import time
from typing import Any, List, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np

from mtjax import paths
from mtjax.methods import adapters, transform
from mtjax.methods import lora as lora_lib
from mtjax.methods.adapters import EXPERT_JSON, WEIGHTS

FORMAT = "mtjax-expert-v1"

Model = Any  # a flax linen module (mtjax.models)


@dataclasses.dataclass
class Expert:
  """One expert's metadata; weights are read only by `params()`."""
  name: str
  folder: str
  info: dict

  @property
  def method(self) -> dict:
    return self.info["method"]

  @property
  def task(self) -> Optional[str]:
    return self.info.get("task")

  def params(self) -> dict:
    return adapters.read_weights(self.folder, self.name)


class Library:
  """A folder of experts (see module docstring)."""

  def __init__(self, root: str) -> None:
    self.root = paths.absolute(root)

  def add(self, name: str, method_config: Mapping[str, Any], params: dict, *,
          task: Optional[str] = None, base_model: Optional[str] = None,
          base_params: Optional[dict] = None, steps: Optional[int] = None,
          metrics: Optional[dict] = None, overwrite: bool = False) -> Expert:
    """Writes one expert; `params` = method trees, e.g. {'lora': {...}}."""
    if not re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
      raise ValueError(f"expert name {name!r}: use letters, digits, '_.-'")
    folder = paths.join(self.root, name)
    if paths.exists(paths.join(folder, EXPERT_JSON)) and not overwrite:
      raise FileExistsError(f"expert {name!r} already exists in {self.root}; "
                            "pass overwrite=True to replace it")
    paths.makedirs(folder)
    cfg = (method_config.to_dict() if hasattr(method_config, "to_dict")
           else dict(method_config))
    info = {"format": FORMAT, "name": name, "method": adapters.jsonable(cfg),
            "task": task, "base_model": {
                "id": base_model,
                "fingerprint": None if base_params is None
                else adapters.fingerprint(base_params)},
            "steps": steps, "metrics": adapters.jsonable(metrics or {}),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    # Weights first, expert.json last: `list` shows only complete experts.
    paths.write_safetensors(paths.join(folder, WEIGHTS),
                            adapters.to_flat_numpy(params))
    paths.write_json(paths.join(folder, EXPERT_JSON), info, indent=1)
    return Expert(name, folder, info)

  # Below this method `list` names it, not the builtin: annotations say List.
  def list(self) -> List[Expert]:
    """All experts (metadata only), sorted by name."""
    if not paths.isdir(self.root):
      raise FileNotFoundError(f"expert library {self.root} does not exist")
    out = []
    for name in paths.listdir(self.root):
      folder = paths.join(self.root, name)
      meta = paths.join(folder, EXPERT_JSON)
      if paths.exists(meta):   # a folder with its expert.json
        out.append(Expert(name, folder, paths.read_json(meta)))
    return out

  def get(self, name: str) -> Expert:
    folder = paths.join(self.root, name)
    meta = paths.join(folder, EXPERT_JSON)
    if not paths.exists(meta):
      raise KeyError(f"no expert {name!r} in {self.root}")
    return Expert(name, folder, paths.read_json(meta))

  def stack(self, names: Sequence[str]) -> tuple:
    """(method_config with num_experts=E, params with a leading E axis)."""
    experts = [self.get(n) for n in names]
    configs = {json.dumps({k: v for k, v in e.method.items()
                           if k != "num_experts"}, sort_keys=True)
               for e in experts}
    if len(configs) != 1:
      raise ValueError(f"experts {list(names)} have different method configs "
                       "and cannot be stacked into one mixed-adapter batch")
    trees = [e.params() for e in experts]
    shapes = {n: jax.tree.map(np.shape, t) for n, t in zip(names, trees, strict=True)}
    if len({json.dumps(s, sort_keys=True, default=str)
            for s in shapes.values()}) != 1:
      raise ValueError(f"experts {list(names)} have differently shaped params")
    stacked = jax.tree.map(lambda *xs: np.stack(xs), *trees)
    return dict(experts[0].method, num_experts=len(names)), stacked


# --------------------------------------------------------------------- PEFT

def export_peft(model: Model, method: lora_lib.LoRA, params: dict, folder: str,
                base_model_name_or_path: Optional[str] = None) -> None:
  """Writes a single LoRA adapter in PEFT's format (see module docstring)."""
  if not isinstance(method, lora_lib.LoRA):
    raise ValueError("PEFT export covers LoRA; got "
                     f"{type(method).__name__}")
  flat = transform.flatten(nn.unbox(params["lora"]))
  to_hf, _ = adapters.module_maps(model)
  tensors, modules = {}, []
  for key, a in flat.items():
    if not key.endswith("/lora_a"):
      continue
    path = key[:-len("/lora_a")]
    a = np.asarray(a, np.float32)
    b = np.asarray(flat[path + "/lora_b"], np.float32)
    if a.ndim != 2:
      raise ValueError("export one adapter at a time, not a stacked library")
    name = to_hf[path]
    modules.append(name)
    tensors[f"base_model.model.{name}.lora_A.weight"] = np.ascontiguousarray(a.T)
    tensors[f"base_model.model.{name}.lora_B.weight"] = np.ascontiguousarray(b.T)
  leaves = sorted({m.split(".")[-1] for m in modules})
  covered = {m for m in to_hf.values() if m.split(".")[-1] in leaves}
  # PEFT: a list matches module-name suffixes; a string is fully matched.
  targets = leaves if covered == set(modules) else (
      "(" + "|".join(re.escape(m) for m in sorted(modules)) + ")")
  config = {
      "peft_type": "LORA",
      "task_type": "SEQ_2_SEQ_LM" if model.config.is_encoder_decoder
                   else "CAUSAL_LM",
      "r": method.rank, "lora_alpha": method.alpha,
      "lora_dropout": method.dropout, "target_modules": targets,
      "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
      "use_dora": False, "inference_mode": True, "modules_to_save": None,
      "init_lora_weights": True, "rank_pattern": {}, "alpha_pattern": {},
      "layers_to_transform": None, "layers_pattern": None,
      "base_model_name_or_path": base_model_name_or_path,
  }
  paths.makedirs(folder)
  paths.write_json(paths.join(folder, "adapter_config.json"), config, indent=2)
  paths.write_safetensors(paths.join(folder, "adapter_model.safetensors"),
                          tensors, metadata={"format": "pt"})


def import_peft(folder: str, model: Model) -> tuple:
  """(LoRA method, {'lora': params}) from a PEFT LoRA adapter folder."""
  options, params = adapters.read_peft(folder, model)
  method = lora_lib.LoRA(**options)
  method.name = "lora"
  return method, params
