"""Logical-axis sharding: one rules table, meshes, and directly-sharded init.

Every parameter is created with logical axis names (`nn.with_logical_partitioning`)
and the main activations are constrained with `nn.with_logical_constraint`. The
single table `RULES` maps logical names to the mesh axes `data`, `fsdp`,
`tensor` (and `experts` when routing). Nothing here knows how many devices exist:
the mesh shape comes from the config and `-1` takes whatever devices are left.

Usage:
  mesh = make_mesh((-1, 1, 1))                 # data x fsdp x tensor
  params = init_sharded(model, rng, mesh, input_ids=ids)
  with use_mesh(mesh):
    logits = jax.jit(model.apply)({'params': params}, ids)
"""
import contextlib
import math
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

Model = Any  # a flax linen module
PyTree = Any  # a nested dict/list/tuple of arrays

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axes. Parameters: embed/mlp/heads/kv/vocab/layers/...
# Activations use the act_* names so that e.g. a parameter's `embed` (fsdp) and an
# activation's hidden dimension (replicated) can be sharded differently.
RULES = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("layers", None),
    ("relpos_buckets", None),
    ("experts", "experts"),
    ("rank", None),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
    ("act_kv", None),
    ("act_vocab", "tensor"),
)


def make_mesh(shape: Sequence[int] = (-1, 1, 1),
              axis_names: Sequence[str] = MESH_AXES,
              devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A mesh over all (or the given) devices; one entry of `shape` may be -1."""
  devices = jax.devices() if devices is None else devices
  shape = list(shape)
  if shape.count(-1) > 1:
    raise ValueError(f"mesh shape {shape}: at most one entry may be -1")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    shape[shape.index(-1)] = len(devices) // known
  if math.prod(shape) != len(devices):
    raise ValueError(
        f"mesh shape {tuple(shape)} needs {math.prod(shape)} devices but "
        f"{len(devices)} are available; set config.mesh_shape so that the "
        "product matches, or use -1 for one axis.")
  return jax.make_mesh(tuple(shape), tuple(axis_names),
                       axis_types=(AxisType.Auto,) * len(shape), devices=devices)


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Sequence[tuple] = RULES) -> Iterator[None]:
  """Context in which logical constraints inside models bind to `mesh`."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def logical_to_spec(names: Optional[Sequence[Optional[str]]],
                    shape: Sequence[int], mesh: Mesh,
                    rules: Sequence[tuple] = RULES) -> PartitionSpec:
  """PartitionSpec for one array; mesh axes that do not divide a dim are dropped.

  Dropping (replicating that dimension) keeps tiny test models and odd
  vocabularies (e.g. 259 bytes) shardable under any mesh.
  """
  if names is None:
    return PartitionSpec()
  axes = nn.logical_to_mesh_axes(names, rules)
  spec = []
  for dim, ax in zip(shape, axes, strict=True):
    if ax is None:
      spec.append(None)
      continue
    ax_tuple = (ax,) if isinstance(ax, str) else tuple(ax)
    ax_tuple = tuple(a for a in ax_tuple if a in mesh.shape)
    size = math.prod(mesh.shape[a] for a in ax_tuple)
    spec.append((ax_tuple if len(ax_tuple) > 1 else ax_tuple[0])
                if ax_tuple and dim % size == 0 else None)
  return PartitionSpec(*spec)


def _is_boxed(x):
  return isinstance(x, nn.LogicallyPartitioned)


def logical_axes(boxed_tree: PyTree) -> PyTree:
  """Tree of logical-name tuples (None for unannotated leaves)."""
  return jax.tree.map(lambda x: x.names if _is_boxed(x) else None,
                      boxed_tree, is_leaf=_is_boxed)


def tree_shardings(boxed_tree: PyTree, mesh: Mesh,
                   rules: Sequence[tuple] = RULES) -> PyTree:
  """NamedShardings for a tree of (abstract) boxed or plain arrays."""
  def one(x):
    names = x.names if _is_boxed(x) else None
    value = x.value if _is_boxed(x) else x
    return NamedSharding(mesh, logical_to_spec(names, value.shape, mesh, rules))
  return jax.tree.map(one, boxed_tree, is_leaf=_is_boxed)


def init_sharded(model: Model, rng: jax.Array, mesh: Mesh, *args: Any,
                 rules: Sequence[tuple] = RULES,
                 method: Union[Callable, str, None] = None,
                 **kwargs: Any) -> PyTree:
  """Initialises `model` with every parameter created already sharded.

  Returns the unboxed 'params' collection. No full copy of the parameters ever
  lives on one device: init runs under jit with sharded outputs.
  """
  def init(r):
    return model.init(r, *args, method=method, **kwargs)["params"]
  with use_mesh(mesh, rules):
    abstract = jax.eval_shape(init, rng)
    shardings = tree_shardings(abstract, mesh, rules)
    return jax.jit(lambda r: nn.unbox(init(r)), out_shardings=shardings)(rng)


def abstract_params(model: Model, *args: Any,
                    method: Union[Callable, str, None] = None,
                    **kwargs: Any) -> PyTree:
  """Boxed ShapeDtypeStructs of the model's params (with logical names)."""
  return jax.eval_shape(
      lambda: model.init(jax.random.key(0), *args, method=method,
                         **kwargs)["params"])


def shard_params(params: PyTree, boxed_abstract: PyTree, mesh: Mesh,
                 rules: Sequence[tuple] = RULES) -> PyTree:
  """Places a host (numpy) or device param tree according to the rules."""
  shardings = tree_shardings(boxed_abstract, mesh, rules)
  return jax.tree.map(lambda x, s: jax.device_put(np.asarray(x) if not isinstance(
      x, jax.Array) else x, s), params, shardings)
