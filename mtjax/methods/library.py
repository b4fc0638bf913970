"""Expert library, PEFT interchange and adapter-only checkpoints.

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
PEFT names tensors 'base_model.model.<hf module>.lora_A.weight' with lora_A
(r, in) = our lora_a.T and lora_B (out, r) = our lora_b.T; its scale is
lora_alpha / r (lora_alpha / sqrt(r) with use_rslora, converted on import).

Adapter-only checkpoints: save_adapter / load_adapter write and read orbax
checkpoints of method params apart from the base; `load_adapter` also reads
expert folders, PEFT folders and trainer workdirs (whose checkpoints already
hold only the trainable leaves), so a run can start from any base plus any
adapter (method config `init_from`).
"""
import dataclasses
import hashlib
import json
import math
import os
import re
import time

import flax.linen as nn
import jax
import numpy as np
from safetensors.numpy import load_file, save_file

from mtjax.methods import lora as lora_lib
from mtjax.methods import transform
from mtjax.models import hf

EXPERT_JSON = "expert.json"
WEIGHTS = "weights.safetensors"
FORMAT = "mtjax-expert-v1"


# ------------------------------------------------------------ param files

def to_flat_numpy(tree):
  """Nested method params -> {'/'-joined path: np.ndarray f32}."""
  return {k: np.ascontiguousarray(np.asarray(jax.device_get(v)))
          for k, v in transform.flatten(nn.unbox(tree)).items()}


def from_flat(flat):
  return transform.nest(dict(flat))


def fingerprint(params):
  """Short sha256 over the base params' names, shapes and bytes."""
  h = hashlib.sha256()
  for k, v in sorted(to_flat_numpy(params).items()):
    h.update(k.encode())
    h.update(str(v.shape).encode())
    h.update(np.ascontiguousarray(v, np.float32).tobytes())
  return h.hexdigest()[:16]


# ----------------------------------------------------------------- library

@dataclasses.dataclass
class Expert:
  """One expert's metadata; weights are read only by `params()`."""
  name: str
  folder: str
  info: dict

  @property
  def method(self):
    return self.info["method"]

  @property
  def task(self):
    return self.info.get("task")

  def params(self):
    path = os.path.join(self.folder, WEIGHTS)
    if not os.path.exists(path):
      raise FileNotFoundError(f"expert {self.name!r} has no {WEIGHTS} in "
                              f"{self.folder}")
    try:
      return from_flat(load_file(path))
    except Exception as e:  # safetensors raises its own error types
      raise ValueError(f"expert {self.name!r}: cannot read {path} ({e})") from e


class Library:
  """A folder of experts (see module docstring)."""

  def __init__(self, root):
    self.root = os.path.abspath(root)

  def add(self, name, method_config, params, *, task=None, base_model=None,
          base_params=None, steps=None, metrics=None, overwrite=False):
    """Writes one expert; `params` = method trees, e.g. {'lora': {...}}."""
    if not re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
      raise ValueError(f"expert name {name!r}: use letters, digits, '_.-'")
    folder = os.path.join(self.root, name)
    if os.path.exists(os.path.join(folder, EXPERT_JSON)) and not overwrite:
      raise FileExistsError(f"expert {name!r} already exists in {self.root}; "
                            "pass overwrite=True to replace it")
    os.makedirs(folder, exist_ok=True)
    cfg = (method_config.to_dict() if hasattr(method_config, "to_dict")
           else dict(method_config))
    info = {"format": FORMAT, "name": name, "method": _jsonable(cfg),
            "task": task, "base_model": {
                "id": base_model,
                "fingerprint": None if base_params is None
                else fingerprint(base_params)},
            "steps": steps, "metrics": _jsonable(metrics or {}),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    save_file(to_flat_numpy(params), os.path.join(folder, WEIGHTS))
    with open(os.path.join(folder, EXPERT_JSON), "w") as f:
      json.dump(info, f, indent=1)
    return Expert(name, folder, info)

  def list(self):
    """All experts (metadata only), sorted by name."""
    if not os.path.isdir(self.root):
      raise FileNotFoundError(f"expert library {self.root} does not exist")
    out = []
    for entry in sorted(os.scandir(self.root), key=lambda e: e.name):
      meta = os.path.join(entry.path, EXPERT_JSON)
      if entry.is_dir() and os.path.exists(meta):
        with open(meta) as f:
          out.append(Expert(entry.name, entry.path, json.load(f)))
    return out

  def get(self, name):
    meta = os.path.join(self.root, name, EXPERT_JSON)
    if not os.path.exists(meta):
      raise KeyError(f"no expert {name!r} in {self.root}")
    with open(meta) as f:
      return Expert(name, os.path.dirname(meta), json.load(f))

  def stack(self, names):
    """(method_config with num_experts=E, params with a leading E axis)."""
    experts = [self.get(n) for n in names]
    configs = {json.dumps({k: v for k, v in e.method.items()
                           if k != "num_experts"}, sort_keys=True)
               for e in experts}
    if len(configs) != 1:
      raise ValueError(f"experts {list(names)} have different method configs "
                       "and cannot be stacked into one mixed-adapter batch")
    trees = [e.params() for e in experts]
    shapes = {n: jax.tree.map(np.shape, t) for n, t in zip(names, trees)}
    if len({json.dumps(s, sort_keys=True, default=str)
            for s in shapes.values()}) != 1:
      raise ValueError(f"experts {list(names)} have differently shaped params")
    stacked = jax.tree.map(lambda *xs: np.stack(xs), *trees)
    return dict(experts[0].method, num_experts=len(names)), stacked


def _jsonable(x):
  return json.loads(json.dumps(x, default=lambda o: (
      o.tolist() if hasattr(o, "tolist") else str(o))))


# --------------------------------------------------------------------- PEFT

def _module_maps(model):
  """({mtjax module path: hf module name}, same reversed) for Linear modules."""
  arch = hf.arch_module(model.config.model_type)
  to_hf = {}
  for path in transform.linear_modules(transform.abstract_params(model)):
    name = arch.hf_key(tuple(path.split("/")) + ("kernel",), model.config)
    if name is None or not name.endswith(".weight"):
      continue
    to_hf[path] = name[:-len(".weight")]
  return to_hf, {v: k for k, v in to_hf.items()}


def export_peft(model, method, params, folder, base_model_name_or_path=None):
  """Writes a single LoRA adapter in PEFT's format (see module docstring)."""
  if not isinstance(method, lora_lib.LoRA):
    raise ValueError("PEFT export covers LoRA; got "
                     f"{type(method).__name__}")
  flat = transform.flatten(nn.unbox(params["lora"]))
  to_hf, _ = _module_maps(model)
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
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "adapter_config.json"), "w") as f:
    json.dump(config, f, indent=2)
  save_file(tensors, os.path.join(folder, "adapter_model.safetensors"),
            metadata={"format": "pt"})


def import_peft(folder, model):
  """(LoRA method, {'lora': params}) from a PEFT LoRA adapter folder."""
  cfg_file = os.path.join(folder, "adapter_config.json")
  weights = os.path.join(folder, "adapter_model.safetensors")
  for f in (cfg_file, weights):
    if not os.path.exists(f):
      raise FileNotFoundError(
          f"{f} not found: a PEFT adapter folder holds adapter_config.json and "
          "adapter_model.safetensors (save with safe_serialization=True)")
  with open(cfg_file) as f:
    cfg = json.load(f)
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
  _, from_hf = _module_maps(model)
  tensors = load_file(weights)
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
  paths = sorted({k.rsplit("/", 1)[0] for k in flat})
  for p in paths:
    if f"{p}/lora_a" not in flat or f"{p}/lora_b" not in flat:
      raise ValueError(f"{weights}: {p} lacks lora_A or lora_B")
  method = lora_lib.LoRA(rank=r, alpha=alpha,
                         dropout=float(cfg.get("lora_dropout", 0.0)),
                         targets=tuple(re.escape(p) for p in paths))
  method.name = "lora"
  return method, {"lora": transform.nest(flat)}


# --------------------------------------------------- adapter checkpoints

def save_adapter(folder, params, method_config=None):
  """Orbax checkpoint of method params only (no base), plus method.json."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  folder = os.path.abspath(folder)
  tree = {k: v for k, v in nn.unbox(params).items() if k != "base"}
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(os.path.join(folder, "params"), tree)
  ckpt.wait_until_finished()
  if method_config is not None:
    cfg = (method_config.to_dict() if hasattr(method_config, "to_dict")
           else dict(method_config))
    with open(os.path.join(folder, "method.json"), "w") as f:
      json.dump(_jsonable(cfg), f, indent=1)


def load_adapter(path, model=None):
  """Method params {'lora': ...} from an orbax adapter checkpoint, an expert
  folder, a PEFT folder (needs `model`), or a trainer workdir (latest step).

  Host numpy arrays; safe to call while a method's init is being traced.
  """
  with jax.ensure_compile_time_eval():
    return jax.tree.map(np.asarray, _load_adapter(os.path.abspath(path), model))


def _load_adapter(path, model):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  if os.path.exists(os.path.join(path, EXPERT_JSON)):
    return Expert(os.path.basename(path), path, {}).params()
  if os.path.exists(os.path.join(path, "adapter_config.json")):
    if model is None:
      raise ValueError(f"{path} is a PEFT adapter: pass the model to map its "
                       "module names")
    return import_peft(path, model)[1]
  if os.path.isdir(os.path.join(path, "params")):
    return jax.tree.map(np.asarray,
                        ocp.StandardCheckpointer().restore(
                            os.path.join(path, "params")))
  steps_dir = os.path.join(path, "checkpoints")
  if os.path.isdir(steps_dir):
    steps = sorted(int(n) for n in os.listdir(steps_dir) if n.isdigit())
    if steps:
      restored = ocp.StandardCheckpointer().restore(
          os.path.join(steps_dir, str(steps[-1]), "state"))
      flat = restored["params"]
      return transform.nest({k: np.asarray(v) for k, v in flat.items()
                             if not k.startswith("base/")})
  raise FileNotFoundError(
      f"{path} holds no adapter: expected an expert folder ({EXPERT_JSON}), a "
      "PEFT folder (adapter_config.json), an orbax adapter (params/) or a "
      "trainer workdir (checkpoints/<step>/state)")


def source_prompt(path):
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


# ---------------------------------------------------- one expert per task

def _plain_tasks(spec, reg):
  """'held_in' / 'held_out' / 'a,b,c' / a tuple -> plain task names."""
  if isinstance(spec, str):
    if spec in ("held_in", "held_out"):
      return list(getattr(reg, spec))
    spec = [t for t in spec.split(",") if t]
  tasks = list(spec)
  if not tasks:
    raise ValueError("config.library.tasks is empty: name tasks ('a,b'), "
                     "'held_in' or 'held_out'")
  for t in tasks:
    reg.seqio_name(t)  # raises with the known names
  return tasks


def train_library(config, workdir):
  """Trains one expert per task (config.library.tasks) into a library.

  Each task runs the ordinary trainer (mtjax.training.train) on that task
  alone in WORKDIR/runs/<task> (resumable: finished experts are skipped), then
  its adapter-only checkpoint is written to the library with the task's
  evaluation metrics. The base is the same for every expert (config.model
  with config.seed, or config.model.hf_path). Returns the Library.
  """
  import copy  # pylint: disable=g-import-not-at-top
  from mtjax import data  # pylint: disable=g-import-not-at-top
  from mtjax.training import train  # pylint: disable=g-import-not-at-top
  lib_cfg = config.library
  reg = data.register(data.vocabulary(config.data.vocab))
  tasks = _plain_tasks(lib_cfg.tasks, reg)
  lib = Library(lib_cfg.get("root") or os.path.join(workdir, "library"))
  model_cfg = config.model.to_dict()
  base_id = model_cfg.get("hf_path") or "scratch:" + hashlib.sha256(
      json.dumps([model_cfg, config.seed], sort_keys=True,
                 default=str).encode()).hexdigest()[:12]
  done = {e.name for e in lib.list()} if os.path.isdir(lib.root) else set()
  for task in tasks:
    if task in done:
      print(f"library: expert {task!r} exists in {lib.root}, skipped",
            flush=True)
      continue
    cfg = copy.deepcopy(config)
    with cfg.unlocked():
      cfg.data.mixture = task
      cfg.eval.groups = (task,)
    run_dir = os.path.join(workdir, "runs", task)
    results = train.train_and_evaluate(cfg, run_dir)
    params = load_adapter(run_dir)
    lib.add(task, cfg.method, params, task=task, base_model=base_id,
            steps=cfg.num_train_steps, metrics=results.get(task, {}))
    print(f"library: added expert {task!r} to {lib.root}", flush=True)
  return lib


def train_prompt_transfer(config, workdir):
  """Multitask prompt transfer: a source prompt, then target-task prompts.

  Stage 1 (WORKDIR/source): multitask prompt tuning (config.transfer.source
  method, e.g. shared prompt x per-task rank-1) on config.transfer.
  source_mixture. Stage 2 (WORKDIR/targets/<task>): plain prompt tuning on each
  of config.transfer.target_tasks, initialised from the source's shared prompt.
  Returns {task: results} of the target runs.
  """
  import copy  # pylint: disable=g-import-not-at-top
  from mtjax import data  # pylint: disable=g-import-not-at-top
  from mtjax.training import train  # pylint: disable=g-import-not-at-top
  tcfg = config.transfer
  reg = data.register(data.vocabulary(config.data.vocab))
  source_dir = os.path.join(workdir, "source")
  src = copy.deepcopy(config)
  with src.unlocked():
    src.method = copy.deepcopy(tcfg.source_method)
    if src.method.get("num_tasks", 0) == 0:   # one per task of the mixture
      src.method.num_tasks = len(_mixture_tasks(reg.seqio_name(
          tcfg.source_mixture)))
    src.data.mixture = tcfg.source_mixture
    src.num_train_steps = tcfg.source_steps
    src.eval.groups = ()
  train.train_and_evaluate(src, source_dir)
  out = {}
  for task in _plain_tasks(tcfg.target_tasks, reg):
    cfg = copy.deepcopy(config)
    with cfg.unlocked():
      cfg.method.init_from = source_dir
      cfg.data.mixture = task
      cfg.eval.groups = (task,)
    out[task] = train.train_and_evaluate(
        cfg, os.path.join(workdir, "targets", task))
  return out


def _mixture_tasks(seqio_name):
  import seqio  # pylint: disable=g-import-not-at-top
  provider = seqio.get_mixture_or_task(seqio_name)
  return (provider.tasks if isinstance(provider, seqio.Mixture)
          else [provider])


JOBS = {"library": train_library, "prompt_transfer": train_prompt_transfer}


def run_job(config, workdir):
  """Entry for mtjax.main: config.job in JOBS (plain training is the trainer's)."""
  job = config.get("job", "train")
  if job not in JOBS:
    raise ValueError(f"config.job={job!r}: methods run {sorted(JOBS)}; plain "
                     "training is job 'train' (mtjax.training.train)")
  return JOBS[job](config, workdir)
