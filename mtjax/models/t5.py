"""T5 family encoder-decoder (T5, T5 v1.1, LM-adapted T5, mT5, mT0, Flan-T5).

Raffel et al., "Exploring the Limits of Transfer Learning with a Unified
Text-to-Text Transformer", JMLR 2020 (arXiv:1910.10683); Xue et al., "mT5",
NAACL 2021 (arXiv:2010.11934). The computation matches Hugging Face's
`T5ForConditionalGeneration` term by term:
  * RMS layer norm before every sub-layer (pre-norm), residual after dropout;
  * no 1/sqrt(d) attention scaling (T5 folds it into the query init);
  * relative position buckets (bidirectional in the encoder, causal in the
    decoder), one bias table in block_0's self-attention shared by all blocks;
    cross-attention has no position bias;
  * feed-forward 'relu' (original T5) or 'gated-gelu' (v1.1 / mT5, with HF's
    tanh approximation `gelu_new`);
  * tied embeddings scale the decoder output by d_model**-0.5 before the
    shared-embedding logits (original T5); untied models have an `lm_head`.

Module paths mirror HF's state-dict names: 'shared',
'encoder/block_0/layer_0/SelfAttention/q', 'decoder/block_1/layer_1/
EncDecAttention/o', '.../layer_1/DenseReluDense/wi_0',
'decoder/final_layer_norm', 'lm_head'.

Packing: `*_segment_ids` (B, T) int, 0 = padding, restrict attention to the
same segment (cross-attention: decoder segment s sees encoder segment s);
`*_positions` (B, T) give the positions the relative buckets are computed
from (default: the index, which within a segment gives the same distances).

Incremental decoding keeps, per decoder layer, the self-attention keys/values
in the flax 'cache' collection and the cross-attention keys/values computed
once from the encoder output (see `generate`).
"""
import dataclasses
import functools
import math
import re
from typing import Callable, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from mtjax.models import decoding, layers

# Activation names as HF's ACT2FN; 'gated-gelu' means gated gelu_new (HF quirk).
ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "silu": jax.nn.silu,
}
MODEL_TYPES = ("t5", "mt5")


@dataclasses.dataclass(frozen=True)
class T5Config:
  """Hyper-parameters, named as in HF's T5Config.

  tie_word_embeddings: True is original T5 (logits from the shared embedding,
  decoder output scaled by d_model**-0.5); False is v1.1 / mT5 / Flan (a
  separate lm_head, no scaling).
  """
  vocab_size: int = 32128
  d_model: int = 512
  d_kv: int = 64
  d_ff: int = 2048
  num_layers: int = 6
  num_decoder_layers: Optional[int] = None  # None: same as num_layers
  num_heads: int = 8
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  dropout_rate: float = 0.1
  layer_norm_epsilon: float = 1e-6
  feed_forward_proj: str = "relu"
  tie_word_embeddings: bool = True
  model_type: str = "t5"
  pad_token_id: int = 0
  eos_token_id: int = 1
  decoder_start_token_id: int = 0
  dtype: str = "float32"
  # Gradient checkpointing per block: 'none' | 'full' | 'dots'
  # (layers.REMAT_POLICIES); not an HF field, set by the trainer (with_remat).
  remat: str = "none"

  def __post_init__(self) -> None:
    if self.num_decoder_layers is None:
      object.__setattr__(self, "num_decoder_layers", self.num_layers)
    if self.model_type not in MODEL_TYPES:
      raise ValueError(f"T5Config.model_type {self.model_type!r} is not one of "
                       f"{MODEL_TYPES}")
    if self.model_type == "mt5" and self.tie_word_embeddings:
      raise ValueError(
          "mt5 with tie_word_embeddings=True: mT5/mT0 checkpoints have a "
          "separate lm_head and transformers' MT5 never scales the decoder "
          "output; set tie_word_embeddings=False (or model_type='t5')")
    _ = self.activation  # validates feed_forward_proj
    layers.dtype_of(self.dtype)
    layers.check_remat(self.remat)

  @property
  def is_encoder_decoder(self) -> bool:
    return True

  @property
  def is_gated(self) -> bool:
    return self.feed_forward_proj.startswith("gated-")

  @property
  def activation(self) -> Callable[[jax.Array], jax.Array]:
    name = self.feed_forward_proj.removeprefix("gated-")
    if self.feed_forward_proj == "gated-gelu":
      name = "gelu_new"
    if name not in ACTIVATIONS:
      raise ValueError(
          f"feed_forward_proj {self.feed_forward_proj!r} is not supported; use "
          f"one of {sorted(ACTIVATIONS)} optionally prefixed with 'gated-' "
          "(T5: 'relu', T5 v1.1 / mT5: 'gated-gelu')")
    return ACTIVATIONS[name]


def relative_position_bucket(relative_position: ArrayLike, bidirectional: bool,
                             num_buckets: int, max_distance: int) -> jax.Array:
  """Bucket of (key position - query position), exactly as Mesh TF / HF.

  Half the buckets are exact small distances, the rest log-spaced up to
  max_distance; bidirectional splits the buckets between the two signs.
  Float ops are f32 like HF so that boundaries land in the same bucket.
  """
  rel = jnp.asarray(relative_position, jnp.int32)
  buckets = jnp.zeros_like(rel)
  if bidirectional:
    num_buckets //= 2
    buckets = buckets + (rel > 0).astype(jnp.int32) * num_buckets
    rel = jnp.abs(rel)
  else:
    rel = -jnp.minimum(rel, 0)
  max_exact = num_buckets // 2
  is_small = rel < max_exact
  # max(rel, 1) only avoids log(0) on entries `is_small` selects away anyway.
  scaled = (jnp.log(jnp.maximum(rel, 1).astype(jnp.float32) / max_exact)
            / math.log(max_distance / max_exact) * (num_buckets - max_exact))
  large = jnp.minimum(max_exact + scaled.astype(jnp.int32), num_buckets - 1)
  return buckets + jnp.where(is_small, rel, large)


def make_mask(q_index: jax.Array, k_index: jax.Array, causal: bool,
              q_segments: Optional[ArrayLike] = None,
              k_segments: Optional[ArrayLike] = None,
              k_valid: Optional[jax.Array] = None) -> jax.Array:
  """Boolean (B|1, 1, Q, K) mask: True where query may attend to key.

  q_index (Q,), k_index (K,): token indices (causality); q_segments (B, Q),
  k_segments (B, K): packing ids; k_valid (B, K): 1 for real keys.
  """
  mask = jnp.ones((1, 1, q_index.shape[0], k_index.shape[0]), bool)
  if causal:
    mask = mask & (q_index[:, None] >= k_index[None, :])[None, None]
  if q_segments is not None and k_segments is not None:
    mask = mask & (q_segments[:, None, :, None] == k_segments[:, None, None, :])
  if k_valid is not None:
    mask = mask & (k_valid[:, None, None, :] > 0)
  return mask


def _kernel_init(std):
  return nn.initializers.normal(stddev=std)


class Attention(nn.Module):
  """T5 multi-head attention; `has_relative_bias` only in block_0 self-attn.

  Returns (output (B, Q, d_model), position bias (B|1, H, Q, K) or None) so
  block_0's bias is shared by later blocks, as in HF.
  """
  config: T5Config
  causal: bool = False
  has_relative_bias: bool = False
  cross: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, kv: jax.Array, mask: Optional[jax.Array],
               bias: Optional[jax.Array], q_pos: Optional[jax.Array],
               k_pos: Optional[jax.Array], deterministic: bool = True,
               decode: bool = False) -> Tuple[jax.Array, Optional[jax.Array]]:
    cfg = self.config
    dtype = layers.dtype_of(cfg.dtype)
    heads, d_kv, inner = cfg.num_heads, cfg.d_kv, cfg.num_heads * cfg.d_kv
    proj = functools.partial(layers.Linear, inner, ("embed", "heads"),
                             dtype=dtype)
    q_proj = proj(kernel_init=_kernel_init((cfg.d_model * d_kv) ** -0.5),
                  name="q")
    k_proj = proj(kernel_init=_kernel_init(cfg.d_model ** -0.5), name="k")
    v_proj = proj(kernel_init=_kernel_init(cfg.d_model ** -0.5), name="v")
    split = lambda t: layers.constrain(  # noqa: E731
        t.reshape(t.shape[:2] + (heads, d_kv)),
        ("batch", "length", "act_heads", "act_kv"))

    q = split(q_proj(x))
    if self.cross and decode:
      # Keys/values of the encoder output, computed at cache creation only.
      k = self.variable("cache", "cross_key", lambda: split(k_proj(kv))).value
      v = self.variable("cache", "cross_value", lambda: split(v_proj(kv))).value
    else:
      k, v = split(k_proj(kv)), split(v_proj(kv))

    if decode and not self.cross:
      k, v, mask, q_pos, k_pos = self._update_cache(k, v, mask, q_pos, k_pos)

    if self.has_relative_bias and bias is None:
      bias = self._position_bias(q_pos, k_pos)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)
    if bias is not None:
      scores = scores + bias
    if mask is not None:
      scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    probs = nn.Dropout(cfg.dropout_rate)(probs, deterministic=deterministic)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
    out = out.reshape(out.shape[:2] + (inner,))  # head-major, as HF
    out = layers.Linear(cfg.d_model, ("heads", "embed"), dtype=dtype,
                        kernel_init=_kernel_init(inner ** -0.5), name="o")(out)
    return out, bias

  def _update_cache(self, k, v, mask, q_pos, k_pos):
    """Writes this step's k/v at cache_index; returns the full cached k/v."""
    initialized = self.has_variable("cache", "cached_key")
    cached_k = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
    cached_v = self.variable("cache", "cached_value", jnp.zeros, v.shape,
                             v.dtype)
    index = self.variable("cache", "cache_index",
                          lambda: jnp.array(0, jnp.int32))
    if not initialized:  # cache creation: a plain causal pass
      return k, v, mask, q_pos, k_pos
    start = index.value
    steps = k.shape[1]
    cached_k.value = jax.lax.dynamic_update_slice(cached_k.value, k,
                                                  (0, start, 0, 0))
    cached_v.value = jax.lax.dynamic_update_slice(cached_v.value, v,
                                                  (0, start, 0, 0))
    index.value = start + steps
    q_index = start + jnp.arange(steps)
    k_index = jnp.arange(cached_k.value.shape[1])
    mask = make_mask(q_index, k_index, causal=True)
    return (cached_k.value, cached_v.value, mask, q_index[None],
            k_index[None])

  def _position_bias(self, q_pos, k_pos):
    """(B|1, Q), (B|1, K) positions -> f32 bias (B|1, H, Q, K)."""
    cfg = self.config
    buckets = relative_position_bucket(
        k_pos[:, None, :] - q_pos[:, :, None], bidirectional=not self.causal,
        num_buckets=cfg.relative_attention_num_buckets,
        max_distance=cfg.relative_attention_max_distance)
    table = layers.Embed(cfg.relative_attention_num_buckets, cfg.num_heads,
                         dtype=jnp.float32, axes=("relpos_buckets", "heads"),
                         embedding_init=_kernel_init(cfg.d_model ** -0.5),
                         name="relative_attention_bias")
    return jnp.transpose(table(buckets), (0, 3, 1, 2))


class DenseReluDense(nn.Module):
  """T5 feed-forward: wo(act(wi x)) or wo(act(wi_0 x) * wi_1 x)."""
  config: T5Config

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    cfg = self.config
    dtype = layers.dtype_of(cfg.dtype)
    wi = functools.partial(layers.Linear, cfg.d_ff, ("embed", "mlp"),
                           dtype=dtype,
                           kernel_init=_kernel_init(cfg.d_model ** -0.5))
    if cfg.is_gated:
      h = cfg.activation(wi(name="wi_0")(x)) * wi(name="wi_1")(x)
    else:
      h = cfg.activation(wi(name="wi")(x))
    h = layers.constrain(h, ("batch", "length", "act_mlp"))
    h = nn.Dropout(cfg.dropout_rate)(h, deterministic=deterministic)
    return layers.Linear(cfg.d_model, ("mlp", "embed"), dtype=dtype,
                         kernel_init=_kernel_init(cfg.d_ff ** -0.5),
                         name="wo")(h)


def _norm(cfg, name="layer_norm"):
  return layers.RMSNorm(eps=cfg.layer_norm_epsilon,
                        dtype=layers.dtype_of(cfg.dtype), name=name)


class AttentionLayer(nn.Module):
  """HF T5LayerSelfAttention / T5LayerCrossAttention: x + drop(attn(norm x))."""
  config: T5Config
  causal: bool = False
  has_relative_bias: bool = False
  cross: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, kv: Optional[jax.Array], mask: Optional[jax.Array],
               bias: Optional[jax.Array], q_pos: Optional[jax.Array],
               k_pos: Optional[jax.Array], deterministic: bool = True,
               decode: bool = False) -> Tuple[jax.Array, Optional[jax.Array]]:
    h = _norm(self.config)(x)
    attn = Attention(self.config, causal=self.causal,
                     has_relative_bias=self.has_relative_bias, cross=self.cross,
                     name="EncDecAttention" if self.cross else "SelfAttention")
    h, bias = attn(h, h if kv is None else kv, mask, bias, q_pos, k_pos,
                   deterministic=deterministic, decode=decode)
    h = nn.Dropout(self.config.dropout_rate)(h, deterministic=deterministic)
    return x + h, bias


class FeedForwardLayer(nn.Module):
  """HF T5LayerFF: x + drop(DenseReluDense(norm x))."""
  config: T5Config

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    h = _norm(self.config)(x)
    h = DenseReluDense(self.config, name="DenseReluDense")(h, deterministic)
    h = nn.Dropout(self.config.dropout_rate)(h, deterministic=deterministic)
    return x + h


class Block(nn.Module):
  """HF T5Block: layer_0 self-attention, [layer_1 cross-attention], FF last."""
  config: T5Config
  is_decoder: bool = False
  has_relative_bias: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, self_mask: Optional[jax.Array],
               bias: Optional[jax.Array], positions: jax.Array,
               encoded: Optional[jax.Array] = None,
               cross_mask: Optional[jax.Array] = None, deterministic: bool = True,
               decode: bool = False) -> Tuple[jax.Array, Optional[jax.Array]]:
    cfg = self.config
    act = ("batch", "length", "act_embed")
    x, bias = AttentionLayer(
        cfg, causal=self.is_decoder, has_relative_bias=self.has_relative_bias,
        name="layer_0")(x, None, self_mask, bias, positions, positions,
                        deterministic, decode)
    x = layers.constrain(x, act)
    if self.is_decoder:
      x, _ = AttentionLayer(cfg, cross=True, name="layer_1")(
          x, encoded, cross_mask, None, None, None, deterministic, decode)
      x = layers.constrain(x, act)
    ff = FeedForwardLayer(cfg, name=f"layer_{2 if self.is_decoder else 1}")
    return layers.constrain(ff(x, deterministic), act), bias


class Stack(nn.Module):
  """HF T5Stack without the embedding: blocks + final_layer_norm.

  x (B, T, E) embedded tokens; decoder also `encoded` (B, S, E).
  `self_mask` / `cross_mask`: boolean (B|1, 1, Q, K) or None; positions
  (B|1, T) for the relative position bias.
  """
  config: T5Config
  is_decoder: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, self_mask: Optional[jax.Array],
               positions: jax.Array, encoded: Optional[jax.Array] = None,
               cross_mask: Optional[jax.Array] = None, deterministic: bool = True,
               decode: bool = False) -> jax.Array:
    cfg = self.config
    x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
    x = layers.constrain(x, ("batch", "length", "act_embed"))
    bias = None  # computed by block_0, shared by the others
    n = cfg.num_decoder_layers if self.is_decoder else cfg.num_layers
    # deterministic and decode (arguments 7 and 8, counting self): static.
    block = layers.remat_block(Block, cfg.remat, static_argnums=(7, 8))
    for i in range(n):
      x, bias = block(cfg, self.is_decoder, has_relative_bias=i == 0,
                      name=f"block_{i}")(x, self_mask, bias, positions, encoded,
                                         cross_mask, deterministic, decode)
    x = _norm(cfg, "final_layer_norm")(x)
    return nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)


def _key_valid(attention_mask, segment_ids):
  """(B, T) 1 for real tokens from the HF mask and/or packing ids (0 = pad)."""
  valid = None if attention_mask is None else jnp.asarray(attention_mask) > 0
  if segment_ids is not None:
    seg = jnp.asarray(segment_ids) != 0
    valid = seg if valid is None else valid & seg
  return valid


def _check_ids(name, ids):
  if ids.ndim != 2:
    raise ValueError(f"{name} must be (batch, length) token ids, got shape "
                     f"{ids.shape}")


class T5(nn.Module):
  """T5ForConditionalGeneration. Logits are f32 (B, T_decoder, vocab)."""
  config: T5Config

  def setup(self) -> None:
    cfg = self.config
    dtype = layers.dtype_of(cfg.dtype)
    self.shared = layers.Embed(cfg.vocab_size, cfg.d_model, dtype=dtype,
                               embedding_init=_kernel_init(1.0))
    self.encoder = Stack(cfg, is_decoder=False)
    self.decoder = Stack(cfg, is_decoder=True)
    if not cfg.tie_word_embeddings:
      self.lm_head = layers.Linear(cfg.vocab_size, ("embed", "vocab"),
                                   dtype=dtype, kernel_init=_kernel_init(1.0))

  def encode(self, input_ids: ArrayLike,
             attention_mask: Optional[ArrayLike] = None,
             segment_ids: Optional[ArrayLike] = None,
             positions: Optional[ArrayLike] = None,
             deterministic: bool = True) -> jax.Array:
    """input_ids (B, S) -> encoder output (B, S, d_model) in compute dtype."""
    _check_ids("input_ids", input_ids)
    index = jnp.arange(input_ids.shape[1])
    mask = make_mask(index, index, causal=False, q_segments=segment_ids,
                          k_segments=segment_ids,
                          k_valid=_key_valid(attention_mask, segment_ids))
    positions = index[None] if positions is None else positions
    return self.encoder(self.shared(input_ids), mask, positions,
                        deterministic=deterministic)

  def decode(self, decoder_input_ids: ArrayLike, encoded: jax.Array,
             attention_mask: Optional[ArrayLike] = None,
             decoder_attention_mask: Optional[ArrayLike] = None,
             encoder_segment_ids: Optional[ArrayLike] = None,
             decoder_segment_ids: Optional[ArrayLike] = None,
             decoder_positions: Optional[ArrayLike] = None,
             deterministic: bool = True, decode: bool = False) -> jax.Array:
    """decoder_input_ids (B, T), encoded (B, S, E) -> f32 logits (B, T, V).

    attention_mask is the encoder's (B, S) padding mask. decode=True uses and
    updates the 'cache' collection (see `init_cache`, `generate`): the step's
    tokens attend causally to everything cached so far, so the decoder mask,
    segment ids and positions only apply when the cache is created.
    """
    _check_ids("decoder_input_ids", decoder_input_ids)
    q_index = jnp.arange(decoder_input_ids.shape[1])
    self_mask = make_mask(
        q_index, q_index, causal=True, q_segments=decoder_segment_ids,
        k_segments=decoder_segment_ids,
        k_valid=_key_valid(decoder_attention_mask, decoder_segment_ids))
    cross_mask = make_mask(
        q_index, jnp.arange(encoded.shape[1]), causal=False,
        q_segments=decoder_segment_ids, k_segments=encoder_segment_ids,
        k_valid=_key_valid(attention_mask, encoder_segment_ids))
    positions = (q_index[None] if decoder_positions is None
                 else decoder_positions)
    h = self.decoder(self.shared(decoder_input_ids), self_mask, positions,
                     encoded, cross_mask, deterministic=deterministic,
                     decode=decode)
    return self.logits_from_hidden(h)

  def logits_from_hidden(self, h: jax.Array) -> jax.Array:
    """Final decoder hidden (B, T, E) -> f32 logits (B, T, V)."""
    if self.config.tie_word_embeddings:
      logits = self.shared.attend(h * self.config.d_model ** -0.5)
    else:
      logits = self.lm_head(h)
    logits = layers.constrain(logits, ("batch", "length", "act_vocab"))
    return logits.astype(jnp.float32)

  def __call__(self, input_ids: ArrayLike,
               attention_mask: Optional[ArrayLike] = None,
               decoder_input_ids: Optional[ArrayLike] = None,
               decoder_attention_mask: Optional[ArrayLike] = None,
               encoder_segment_ids: Optional[ArrayLike] = None,
               decoder_segment_ids: Optional[ArrayLike] = None,
               encoder_positions: Optional[ArrayLike] = None,
               decoder_positions: Optional[ArrayLike] = None,
               deterministic: bool = True) -> jax.Array:
    if decoder_input_ids is None:
      raise ValueError(
          "T5 needs decoder_input_ids: the targets shifted right, starting "
          f"with decoder_start_token_id={self.config.decoder_start_token_id}")
    encoded = self.encode(input_ids, attention_mask, encoder_segment_ids,
                          encoder_positions, deterministic)
    return self.decode(decoder_input_ids, encoded, attention_mask,
                       decoder_attention_mask, encoder_segment_ids,
                       decoder_segment_ids, decoder_positions, deterministic)


Model = T5


# ------------------------------------------------------------------ generation


def init_cache(model: T5, params: dict, encoded: jax.Array,
               attention_mask: jax.Array, max_length: int) -> dict:
  """'cache' collection for decoding up to `max_length` tokens.

  One full-length decoder pass (output unused) creates zero self-attention
  keys/values (B, max_length, H, d_kv) per layer and the cross-attention
  keys/values of `encoded` (B, S, d_model), computed here once.
  """
  start = jnp.full((encoded.shape[0], max_length),
                   model.config.decoder_start_token_id, jnp.int32)
  _, variables = model.apply({"params": params}, start, encoded,
                             attention_mask, decode=True, mutable=["cache"],
                             method=T5.decode)
  return variables["cache"]


def decode_step(model: T5, params: dict, encoded: jax.Array,
                attention_mask: jax.Array) -> decoding.Step:
  """step(cache, tokens (B,)) -> (logits (B, V), cache) for decoding.decode."""

  def step(cache, tokens):
    logits, new = model.apply(
        {"params": params, "cache": cache}, tokens[:, None], encoded,
        attention_mask, decode=True, mutable=["cache"], method=T5.decode)
    return logits[:, -1], new["cache"]

  return step


def generate(model: T5, params: dict, input_ids: ArrayLike,
             attention_mask: Optional[ArrayLike] = None, max_new_tokens: int = 16,
             temperature: float = 0.0, rng: Optional[jax.Array] = None,
             eos_id: Optional[int] = None) -> jax.Array:
  """Greedy (temperature 0) or sampled decoding -> (B, max_new_tokens) int32.

  Starts from decoder_start_token_id like HF; after a row emits `eos_id`
  (default config.eos_token_id; negative: never stop) it emits pad_token_id.
  Once every row is finished the remaining steps are skipped (all pad). The
  loop is `decoding.decode` over the KV cache, jitted and cached per (model,
  max_new_tokens, greedy), so it refuses to run inside `nn.intercept_methods`
  (a cached trace would ignore the interceptor; see decoding.py).
  """
  decoding.no_interceptors("t5.generate")
  cfg = model.config
  input_ids = jnp.asarray(input_ids, jnp.int32)
  _check_ids("input_ids", input_ids)
  if attention_mask is None:
    attention_mask = jnp.ones_like(input_ids)
  if temperature < 0:
    raise ValueError(f"temperature must be >= 0, got {temperature}")
  if temperature > 0 and rng is None:
    raise ValueError("sampling (temperature > 0) needs rng=jax.random.key(...)")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  rng = jax.random.key(0) if rng is None else rng
  eos = cfg.eos_token_id if eos_id is None else eos_id
  return _generate_fn(model, int(max_new_tokens), temperature == 0)(
      params, input_ids, jnp.asarray(attention_mask, jnp.int32),
      jnp.float32(temperature), jnp.int32(eos), rng)


@functools.lru_cache(maxsize=32)
def _generate_fn(model, max_new_tokens, greedy):
  """Jitted decoding loop; temperature and eos are traced (one compile)."""
  cfg = model.config

  def run(params, input_ids, mask, temperature, eos, rng):
    batch = input_ids.shape[0]
    encoded = model.apply({"params": params}, input_ids, mask,
                          method=T5.encode)
    step = decode_step(model, params, encoded, mask)

    def prefill():
      cache = init_cache(model, params, encoded, mask, max_new_tokens)
      start = jnp.full((batch,), cfg.decoder_start_token_id, jnp.int32)
      return step(cache, start)

    return decoding.decode(prefill, step, max_new_tokens,
                           temperature=0.0 if greedy else temperature, rng=rng,
                           eos_ids=eos, pad_id=cfg.pad_token_id)

  return jax.jit(run)


# ------------------------------------------------------------- HF conversion


def config_from_hf(d: dict, dtype: str = "float32") -> T5Config:
  """HF config.json dict (T5Config / MT5Config) -> T5Config.

  transformers 5 always ties lm_head to `shared` unless the checkpoint holds a
  different lm_head.weight, and records original T5's logit scaling as
  `scale_decoder_outputs` (older files: tie_word_embeddings). mtjax reads the
  scaling: scaled = original T5 = tied; unscaled = separate lm_head (filled
  from shared.weight when the file has no lm_head.weight). mT5 never scales.
  """
  model_type = d.get("model_type", "t5")
  if model_type not in MODEL_TYPES:
    raise ValueError(f"config model_type {model_type!r} is not one of "
                     f"{MODEL_TYPES}")
  mt5 = model_type == "mt5"
  if "scale_decoder_outputs" in d and d["scale_decoder_outputs"] is not None:
    scaled = bool(d["scale_decoder_outputs"])
  elif mt5:
    scaled = False
  else:
    scaled = bool(d.get("tie_word_embeddings", True))
  eos = d.get("eos_token_id", 1)
  eos = eos[0] if isinstance(eos, (list, tuple)) else eos
  pad = d.get("pad_token_id")
  pad = 0 if pad is None else pad
  start = d.get("decoder_start_token_id")
  num_layers = d.get("num_layers", 8 if mt5 else 6)
  return T5Config(
      vocab_size=d.get("vocab_size", 250112 if mt5 else 32128),
      d_model=d.get("d_model", 512), d_kv=d.get("d_kv", 64),
      d_ff=d.get("d_ff", 1024 if mt5 else 2048), num_layers=num_layers,
      num_decoder_layers=d.get("num_decoder_layers") or num_layers,
      num_heads=d.get("num_heads", 6 if mt5 else 8),
      relative_attention_num_buckets=d.get("relative_attention_num_buckets",
                                           32),
      relative_attention_max_distance=d.get("relative_attention_max_distance",
                                            128),
      dropout_rate=d.get("dropout_rate", 0.1),
      layer_norm_epsilon=d.get("layer_norm_epsilon", 1e-6),
      feed_forward_proj=d.get("feed_forward_proj",
                              "gated-gelu" if mt5 else "relu"),
      tie_word_embeddings=scaled, model_type=model_type, pad_token_id=pad,
      eos_token_id=1 if eos is None else eos,
      decoder_start_token_id=pad if start is None else start, dtype=dtype)


def config_to_hf(cfg: T5Config) -> dict:
  """T5Config -> dict that transformers' T5Config / MT5Config accepts."""
  mt5 = cfg.model_type == "mt5"
  act = cfg.feed_forward_proj.removeprefix("gated-")
  d = {
      "architectures": ["MT5ForConditionalGeneration" if mt5
                        else "T5ForConditionalGeneration"],
      "model_type": cfg.model_type,
      "vocab_size": cfg.vocab_size, "d_model": cfg.d_model, "d_kv": cfg.d_kv,
      "d_ff": cfg.d_ff, "num_layers": cfg.num_layers,
      "num_decoder_layers": cfg.num_decoder_layers, "num_heads": cfg.num_heads,
      "relative_attention_num_buckets": cfg.relative_attention_num_buckets,
      "relative_attention_max_distance": cfg.relative_attention_max_distance,
      "dropout_rate": cfg.dropout_rate,
      "layer_norm_epsilon": cfg.layer_norm_epsilon,
      "initializer_factor": 1.0,
      "feed_forward_proj": cfg.feed_forward_proj,
      "dense_act_fn": "gelu_new" if cfg.feed_forward_proj == "gated-gelu"
                      else act,
      "is_gated_act": cfg.is_gated,
      "tie_word_embeddings": cfg.tie_word_embeddings,
      "is_encoder_decoder": True, "use_cache": True,
      "pad_token_id": cfg.pad_token_id, "eos_token_id": cfg.eos_token_id,
      "decoder_start_token_id": cfg.decoder_start_token_id,
      "dtype": "float32",
  }
  if not mt5:
    d["scale_decoder_outputs"] = cfg.tie_word_embeddings
  return d


def hf_key(path: Tuple[str, ...], config: T5Config) -> str:
  """('encoder', 'block_0', 'layer_1', 'DenseReluDense', 'wi_0', 'kernel')
  -> 'encoder.block.0.layer.1.DenseReluDense.wi_0.weight'."""
  del config
  parts = [re.sub(r"^(block|layer)_(\d+)$", r"\1.\2", p) for p in path[:-1]]
  leaf = {"kernel": "weight", "scale": "weight", "embedding": "weight"}
  if path[-1] not in leaf:
    raise ValueError(f"T5 has no HF name for parameter {'/'.join(path)}")
  return ".".join(parts + [leaf[path[-1]]])


_EMBED_KEYS = ("shared.weight", "encoder.embed_tokens.weight",
               "decoder.embed_tokens.weight")


def _shared(tensors):
  for name in _EMBED_KEYS:
    if name in tensors:
      return tensors[name]
  raise KeyError(f"checkpoint has none of {_EMBED_KEYS} (the token embedding)")


def param_from_hf(keys: Tuple[str, ...], hf_name: str, tensors: dict,
                  config: T5Config) -> np.ndarray:
  """One parameter from an HF state dict (kernels transposed to (in, out))."""
  if keys == ("shared", "embedding"):
    shared = _shared(tensors)
    lm_head = tensors.get("lm_head.weight")
    if (config.tie_word_embeddings and lm_head is not None
        and not np.array_equal(lm_head, shared)):
      raise ValueError(
          "checkpoint has an lm_head.weight different from shared.weight but "
          "its config scales the decoder output like tied original T5; mtjax "
          "cannot represent scaled logits with a separate lm_head")
    return shared
  if keys[0] == "lm_head":
    # transformers ties lm_head to shared when the file has no lm_head.weight.
    value = tensors.get("lm_head.weight")
    return (_shared(tensors) if value is None else value).T
  if hf_name not in tensors:
    raise KeyError(f"checkpoint is missing tensor {hf_name!r} for parameter "
                   f"{'/'.join(keys)}")
  value = tensors[hf_name]
  return value.T if keys[-1] == "kernel" else value
