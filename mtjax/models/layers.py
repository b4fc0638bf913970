"""Building blocks shared by every mtjax model.

Every linear map in every model is a `Linear`, so methods (LoRA, (IA)3,
routing, soft injection) can intercept it by module path with
`nn.intercept_methods` without the models knowing about them. Module names
mirror Hugging Face's state-dict names ('layers.0.self_attn.q_proj' becomes
the path 'layers_0/self_attn/q_proj'), which keeps checkpoint conversion and
PEFT `target_modules` patterns mechanical.

Parameter conventions (all parameters f32 by default, compute dtype by config):
  Linear:    kernel (in, out), bias (out,)     -- HF weight is kernel.T
  Embed:     embedding (vocab, embed)          -- same as HF
  RMSNorm:   scale (features,)                 -- HF 'weight'
  LayerNorm: scale (features,), bias (features,) -- HF 'weight', 'bias'
"""
import re
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
default_kernel_init = nn.initializers.normal(stddev=0.02)


def constrain(x: jax.Array, names: Sequence[Optional[str]]) -> jax.Array:
  """Logical sharding constraint on an activation (no-op without a mesh)."""
  return nn.with_logical_constraint(x, names)


class Linear(nn.Module):
  """y = x @ kernel (+ bias). kernel: (in, out) with logical `axes`."""
  features: int
  axes: Sequence[str] = ("embed", "mlp")
  use_bias: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Any = default_kernel_init

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param(
        "kernel", nn.with_logical_partitioning(self.kernel_init, tuple(self.axes)),
        (x.shape[-1], self.features), self.param_dtype)
    y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(
          nn.initializers.zeros, (self.axes[-1],)), (self.features,),
                        self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


class Embed(nn.Module):
  """Token embedding (vocab, embed); `attend` gives tied output logits."""
  num_embeddings: int
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  axes: Sequence[str] = ("vocab", "embed")
  embedding_init: Any = nn.initializers.normal(stddev=1.0)

  def setup(self) -> None:
    self.embedding = self.param(
        "embedding", nn.with_logical_partitioning(self.embedding_init,
                                                  tuple(self.axes)),
        (self.num_embeddings, self.features), self.param_dtype)

  def __call__(self, ids: jax.Array) -> jax.Array:
    return jnp.take(self.embedding, ids, axis=0).astype(self.dtype)

  def attend(self, x: jax.Array) -> jax.Array:
    """x (..., embed) -> logits (..., vocab) with the transposed embedding."""
    return jnp.dot(x.astype(self.dtype), self.embedding.astype(self.dtype).T)


class RMSNorm(nn.Module):
  """T5/Llama RMS norm computed in f32. `offset`=1 gives Gemma's (1 + scale)."""
  eps: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  offset: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    init = nn.initializers.zeros if self.offset else nn.initializers.ones
    scale = self.param("scale", nn.with_logical_partitioning(init, ("embed",)),
                       (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + self.eps)
    return (x32 * (scale.astype(jnp.float32) + self.offset)).astype(self.dtype)


class LayerNorm(nn.Module):
  """Standard LayerNorm with scale and bias, computed in f32."""
  eps: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    feats = (x.shape[-1],)
    scale = self.param("scale", nn.with_logical_partitioning(
        nn.initializers.ones, ("embed",)), feats, self.param_dtype)
    bias = self.param("bias", nn.with_logical_partitioning(
        nn.initializers.zeros, ("embed",)), feats, self.param_dtype)
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, -1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), -1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    return (y * scale + bias).astype(self.dtype)


def dtype_of(name: str) -> Dtype:
  """'float32' | 'bfloat16' | 'float16' -> jnp dtype, with a clear error."""
  table = {"float32": jnp.float32, "bfloat16": jnp.bfloat16,
           "float16": jnp.float16}
  if name not in table:
    raise ValueError(f"dtype {name!r} is not one of {sorted(table)}")
  return table[name]


# Gradient checkpointing of each transformer block (config field `remat`):
# 'none' stores every activation; 'full' stores only each block's input and
# recomputes the rest in the backward pass; 'dots' also keeps the outputs of
# matmuls without batch dimensions (the projections), recomputing the
# elementwise ops and attention (jax.checkpoint_policies).
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def check_remat(policy: str) -> str:
  if policy not in REMAT_POLICIES:
    raise ValueError(f"remat {policy!r} is not one of {sorted(REMAT_POLICIES)}"
                     " (config.remat)")
  return policy


def remat_block(block_cls: type, policy: str, static_argnums: tuple) -> type:
  """`block_cls` under `nn.remat` with REMAT_POLICIES[policy] ('none': as is).

  static_argnums count `self` as 0 (flax.linen.remat). Parameter paths are
  unchanged, so a checkpoint or method trained with one policy loads in any
  other; method interceptors run inside the rematerialised call as usual.
  """
  if check_remat(policy) == "none":
    return block_cls
  return nn.remat(block_cls, policy=REMAT_POLICIES[policy],
                  static_argnums=static_argnums)


def default_hf_key(path: tuple[str, ...]) -> str:
  """HF state-dict key of a param path.

  ('layers_0', 'self_attn', 'q_proj', 'kernel') -> 'layers.0.self_attn.q_proj.weight'
  """
  parts = [re.sub(r"^(.*)_(\d+)$", r"\1.\2", p) for p in path[:-1]]
  leaf = {"kernel": "weight", "scale": "weight", "embedding": "weight",
          "bias": "bias"}.get(path[-1], path[-1])
  return ".".join(parts + [leaf])
