"""The stacked expert library and PHATGOOSE gate training.

Muqeeth, Liu, Liu, Raffel, "Learning to Route Among Specialized Experts for
Zero-Shot Generalization", ICML 2024 (arXiv:2402.05859).

1. Each expert is a LoRA trained on one task (mtjax.methods.lora).
2. Gate training, per expert and post hoc (base and LoRA frozen): every adapted
   module gets a gate vector v (init zeros) and computes
       y = x W + LoRA(x * sigmoid(<x, v>))
   trained on the expert's own task for a few steps (paper: 100). Gates are
   stored with the expert, so adding an expert never touches the others.
3. Routing among the stacked library is mtjax.routing.routed.

A library in memory: {'names': [...], 'experts': [{'lora': tree, 'gate':
tree}]}; stacked for routing: {path: {'lora_a': (E, d, r), 'lora_b': (E, r,
o), 'gate': (E, d)}}. With an 'experts' mesh axis (see `expert_mesh`) the
leading axis is sharded over it by the logical rule ('experts', 'experts').
"""
from typing import Any, Callable, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtjax import paths
from mtjax.methods import adapters, transform
from mtjax.methods import library as disk
from mtjax.models import sharding

LoRAMethod = Any  # a mtjax.methods.lora.LoRA (rank, alpha, targets, scale)
Model = Any  # a flax linen module (mtjax.models)


# ------------------------------------------------------------ gate training

class GateTraining:
  """One frozen LoRA expert plus trainable PHATGOOSE gates (step 2 above).

  params: {'base', 'lora': single-expert LoRA tree, 'gate': {path: {'gate':
  (d,)}}}; only 'gate/.*' is trained.
  """
  trainable = r"gate/.*"
  name = "phatgoose_gates"
  cached_decoding = True  # per-token gates (mtjax.methods.transform)

  def __init__(self, lora: LoRAMethod, expert: Optional[dict] = None) -> None:
    self.lora = lora   # a mtjax.methods.lora.LoRA (rank, alpha, targets)
    self.expert = expert   # the expert's 'lora' tree, for init()

  def init(self, rng: Optional[jax.Array], model: Model,
           base_params: Optional[dict] = None) -> dict:
    """{'lora': the expert (frozen), 'gate': zeros}, boxed like LoRA.init."""
    del rng, base_params
    if self.expert is None:
      raise ValueError("GateTraining.init needs the expert: "
                       "GateTraining(lora, expert=lora_tree)")
    return {"lora": self.expert, "gate": self.init_gates(model)}

  def init_gates(self, model: Model) -> dict:
    """Zero gate per targeted module, with the kernel's input logical axis."""
    flat = {p: {"gate": transform.boxed(jnp.zeros((t.shape[0],), jnp.float32),
                                        (t.in_axis,))}
            for p, t in self.lora._targets(model).items()}
    return transform.nest(flat)

  def hook(self, next_fun: Callable, x: jax.Array, leaf: dict,
           ctx: transform.HookContext) -> jax.Array:
    gate = jax.nn.sigmoid(x.astype(jnp.float32) @ leaf["gate"])[..., None]
    # LoRA's own hook adds the update of the gated input to the base output.
    return self.lora.hook(lambda _: next_fun(x), (x * gate).astype(x.dtype),
                          leaf, ctx)

  def apply(self, model: Model, params: dict, inputs: dict, *,
            rng: Optional[jax.Array] = None, deterministic: bool = True,
            method: Union[str, Callable, None] = None,
            decode: Optional[str] = None, cache: Optional[dict] = None) -> Any:
    """Logits, or (logits, cache) with `decode` (mtjax.methods.transform)."""
    inputs = transform.model_kwargs(inputs)
    tree = merge_leaves(params["lora"], params["gate"])
    icpt = transform.linear_interceptor(tree, self.hook, None, rng,
                                        deterministic)
    return transform.run(model, params["base"], inputs, [icpt], rng=rng,
                         deterministic=deterministic, method=method,
                         decode=decode, cache=cache)


def merge_leaves(*trees: dict) -> dict:
  """Per-module dicts merged: {path: {'lora_a', ...}} + {path: {'gate'}}."""
  out = {}
  for tree in trees:
    for path, leaf in transform.flatten(nn.unbox(tree)).items():
      out[path] = leaf
  return transform.nest(out)


# ----------------------------------------------------------------- library

def new_library() -> dict:
  """An expert library: names and one {'lora': tree, 'gate': tree} per expert."""
  return {"names": [], "experts": []}


def add_expert(library: dict, name: str, lora_tree: dict,
               gate_tree: Optional[dict] = None) -> dict:
  """A new library with one more expert; existing entries are shared as is."""
  if name in library["names"]:
    raise ValueError(f"expert {name!r} is already in the library")
  entry = {"lora": lora_tree}
  if gate_tree is not None:
    entry["gate"] = gate_tree
  return {"names": library["names"] + [name],
          "experts": library["experts"] + [entry]}


def stack_library(library: dict, with_gates: bool = True) -> dict:
  """{path: {'lora_a': (E, d, r), 'lora_b': (E, r, o)[, 'gate': (E, d)]}}."""
  if not library["experts"]:
    raise ValueError("the expert library is empty: add experts first")
  keys = ("lora", "gate") if with_gates else ("lora",)
  flats = []
  for i, e in enumerate(library["experts"]):
    missing = [k for k in keys if k not in e]
    if missing:
      raise ValueError(f"expert {library['names'][i]!r} has no {missing}: train "
                       "its PHATGOOSE gates (train_gates) before routing")
    flats.append(transform.flatten(merge_leaves(*[e[k] for k in keys])))
  paths = sorted(flats[0])
  first = library["names"][0]
  for name, f in zip(library["names"], flats, strict=True):
    if sorted(f) != paths:
      raise ValueError(f"expert {name!r} adapts different modules than "
                       f"{first!r}; all experts need the same LoRA targets "
                       "(train them with one LoRA config)")
    for p in paths:
      if jnp.shape(f[p]) != jnp.shape(flats[0][p]):
        raise ValueError(
            f"expert {name!r} has {p} of shape {jnp.shape(f[p])}, "
            f"{first!r} {jnp.shape(flats[0][p])}: the library mixes LoRA "
            "ranks; stack experts of one rank (or merge to a common rank "
            "with mtjax.merging.merge_lora)")
  return transform.nest({p: jnp.stack([jnp.asarray(f[p]) for f in flats])
                         for p in paths})


def save_library(library: dict, root: str, lora: LoRAMethod,
                 overwrite: bool = False,
                 base_params: Optional[dict] = None) -> str:
  """Writes each expert (LoRA + its gates) as a mtjax.methods.library folder.

  An expert's folder holds {'lora': ..., 'gate': ...}; adding an expert later
  writes one new folder and leaves the others' files untouched. With
  `base_params`, each expert records the base's fingerprint, which
  `load_library` checks. `root` may be a gs:// URL (mtjax.paths).
  """
  lib = disk.Library(root)
  cfg = {"name": "lora", "rank": lora.rank, "alpha": lora.alpha,
         "targets": list(lora.targets or ())}
  have = set(e.name for e in lib.list()) if paths.isdir(root) else set()
  for name, entry in zip(library["names"], library["experts"], strict=True):
    if name not in have or overwrite:   # existing experts are left as they are
      lib.add(name, cfg, entry, task=name, overwrite=overwrite,
              base_params=base_params)
  return root


def load_library(root: str, names: Optional[Sequence[str]] = None,
                 base_params: Optional[dict] = None) -> dict:
  """The in-memory library from expert folders written by `save_library`.

  With `base_params`, an expert that recorded another base's fingerprint is
  refused (its LoRA deltas were learned against other weights).
  """
  lib = disk.Library(root)
  names = names or [e.name for e in lib.list()]
  want = None if base_params is None else adapters.fingerprint(base_params)
  out = new_library()
  for name in names:
    expert = lib.get(name)
    have = (expert.info.get("base_model") or {}).get("fingerprint")
    if want and have and have != want:
      raise ValueError(
          f"expert {name!r} in {root} was trained on a base with fingerprint "
          f"{have}, but this run's base has {want}: its LoRA deltas do not "
          "apply to these weights. Use a library trained from this base (or "
          "this config's base model), or retrain the expert.")
    params = expert.params()
    out = add_expert(out, name, params["lora"], params.get("gate"))
  return out


LOGICAL = {"lora_a": lambda t: ("experts", t.in_axis, "rank"),
           "lora_b": lambda t: ("experts", "rank", t.out_axis),
           "gate": lambda t: ("experts", t.in_axis),
           "proto": lambda t: ("experts", t.in_axis),
           "weights": lambda t: ("experts",)}


def expert_axes(stacked: dict, model: Model) -> dict:
  """Tree of logical axis names for a stacked library (for sharding)."""
  mods = transform.linear_modules(transform.abstract_params(model))
  flat = {}
  for path, _ in transform.flatten(stacked).items():
    mod, leaf = path.rsplit("/", 1)
    flat[path] = LOGICAL[leaf](mods[mod])
  return transform.nest(flat)


def expert_mesh(num_expert_shards: int,
                devices: Optional[Sequence] = None) -> jax.sharding.Mesh:
  """Mesh (data, fsdp, tensor, experts): experts sharded over the last axis.

  Tokens are split over 'data' as usual; each expert shard holds E/n experts
  of every module, and XLA partitions the sorted-assignment gathers over it.
  """
  return sharding.make_mesh((-1, 1, 1, num_expert_shards),
                            sharding.MESH_AXES + ("experts",), devices)


def shard_experts(stacked: dict, model: Model,
                  mesh: jax.sharding.Mesh) -> dict:
  """Places a stacked library by the logical rules ('experts' -> 'experts')."""
  axes = expert_axes(stacked, model)
  return jax.tree.map(
      lambda x, names: jax.device_put(x, jax.sharding.NamedSharding(
          mesh, sharding.logical_to_spec(names, x.shape, mesh))),
      stacked, axes, is_leaf=lambda x: isinstance(x, tuple))


