"""Decoder-only base models: Llama/Mistral, Qwen2/Qwen3, Gemma/Gemma 3 and BLOOM.

Llama: Touvron et al. 2023, "Llama 2: Open Foundation and Fine-Tuned Chat
Models" (RMSNorm, SwiGLU, rotary embeddings of Su et al. 2021 "RoFormer", and
grouped-query attention of Ainslie et al. 2023 "GQA"); Llama 3: Grattafiori et
al. 2024 "The Llama 3 Herd of Models" (rope_type "llama3": low frequencies
divided by `factor`, a smooth ramp between low_freq_factor and
high_freq_factor). Qwen2: Yang et al. 2024 "Qwen2 Technical Report" (Llama plus
q/k/v biases). Qwen3: Yang et al. 2025 "Qwen3 Technical Report" (per-head
RMSNorm of queries and keys before rotary, q_norm/k_norm). Gemma: Gemma Team
2024 "Gemma: Open Models Based on Gemini Research and Technology" (scaled tied
embeddings, (1 + w) RMSNorm, GeGLU). Gemma 3: Gemma Team 2025 "Gemma 3
Technical Report" (Gemma plus q/k norms, norms before and after attention and
MLP, query_pre_attn_scalar, interleaved sliding-window and global layers with
their own rotary bases, optional tanh soft-capping of the final logits).
BLOOM: BigScience 2022 "BLOOM: A 176B-Parameter Open-Access Multilingual
Language Model" (ALiBi of Press et al. 2022 "Train Short, Test Long", embedding
LayerNorm, fused QKV).

Module paths mirror Hugging Face's state-dict names, so `layers.default_hf_key`
maps every parameter with no per-architecture table:
  llama/mistral/qwen2/qwen3/gemma/gemma3_text: model/embed_tokens,
      model/layers_i/self_attn/{q,k,v,o}_proj (+ q_norm, k_norm: qwen3, gemma3),
      model/layers_i/mlp/{gate,up,down}_proj,
      model/layers_i/{input,post_attention}_layernorm
      (+ {pre,post}_feedforward_layernorm: gemma3), model/norm, lm_head
  bloom: transformer/word_embeddings, transformer/word_embeddings_layernorm,
      transformer/h_i/{input_layernorm, self_attention/{query_key_value,dense},
      post_attention_layernorm, mlp/{dense_h_to_4h,dense_4h_to_h}}, transformer/ln_f

Sliding windows (Mistral: every layer; Gemma 3: the "sliding_attention" entries
of `layer_types`) follow HF: key slot k is visible from query slot q iff
0 <= q - k < window, counted in slots, so left padding takes room in the window.

Call: Model(config).apply({'params': p}, input_ids (B,T), attention_mask (B,T)
1=token 0=pad, positions (B,T), segment_ids (B,T)) -> f32 logits (B,T,V).
Incremental decoding keeps keys/values in the 'cache' collection (`decode=True`);
`generate` runs `prefill` and `decode_step` through `decoding.decode` (jitted).
"""
import dataclasses
import functools
import math
from typing import Callable, Optional, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from mtjax.models import decoding, layers

ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma3_text", "bloom")
ROPE_TYPES = ("default", "linear", "llama3")  # HF rope_type values mtjax computes
LAYER_TYPES = ("full_attention", "sliding_attention")
NEG_INF = -1e30  # finite: rows with no visible key (pads) stay NaN-free

ACTIVATIONS = {
    "silu": nn.silu, "swish": nn.silu, "relu": nn.relu,
    "gelu": functools.partial(nn.gelu, approximate=False),
    "gelu_pytorch_tanh": functools.partial(nn.gelu, approximate=True),
    "gelu_new": functools.partial(nn.gelu, approximate=True),
    "gelu_fast": functools.partial(nn.gelu, approximate=True),
}


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """Hyper-parameters of a decoder-only model (HF names where they exist)."""
  model_type: str = "llama"
  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_hidden_layers: int = 32
  num_attention_heads: int = 32
  num_key_value_heads: Optional[int] = None  # None: = num_attention_heads
  head_dim: Optional[int] = None  # None: hidden_size // num_attention_heads
  rope_theta: float = 10000.0
  # Rotary frequencies of global layers (HF rope_parameters; see rope_inv_freq).
  rope_type: str = "default"  # one of ROPE_TYPES
  rope_factor: float = 1.0  # linear and llama3
  rope_low_freq_factor: float = 1.0  # llama3
  rope_high_freq_factor: float = 4.0  # llama3
  rope_original_max_position_embeddings: int = 8192  # llama3
  rope_local_theta: Optional[float] = None  # sliding layers' base (Gemma 3)
  norm_eps: float = 1e-6  # HF rms_norm_eps (RMSNorm) or layer_norm_epsilon (BLOOM)
  tie_word_embeddings: bool = False
  attention_bias: bool = False  # q/k/v biases (Qwen2; Llama's attention_bias)
  o_proj_bias: bool = False  # Llama's attention_bias also adds one to o_proj
  mlp_bias: bool = False
  max_position_embeddings: int = 2048
  hidden_act: str = "silu"
  sliding_window: Optional[int] = None  # key visible iff q - k < window (slots)
  # Per layer "full_attention" | "sliding_attention" (Gemma 3); None: every
  # layer uses sliding_window (Mistral) or none (the others).
  layer_types: Optional[Tuple[str, ...]] = None
  query_pre_attn_scalar: Optional[float] = None  # scale**-2; None: head_dim
  final_logit_softcapping: Optional[float] = None  # cap * tanh(logits / cap)
  attention_dropout: float = 0.0
  hidden_dropout: float = 0.0  # on residual branches (BLOOM's hidden_dropout)
  apply_residual_connection_post_layernorm: bool = False  # BLOOM
  pad_token_id: Optional[int] = None
  bos_token_id: Optional[int] = None
  eos_token_id: Optional[Union[int, Tuple[int, ...]]] = None
  dtype: str = "float32"  # compute dtype; parameters are always f32
  # Gradient checkpointing per block: 'none' | 'full' | 'dots'
  # (layers.REMAT_POLICIES); not an HF field, set by the trainer (with_remat).
  remat: str = "none"

  def __post_init__(self) -> None:
    if self.model_type not in ARCHS:
      raise ValueError(f"model_type {self.model_type!r} is not one of {ARCHS}")
    if self.num_key_value_heads is None:
      object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
    if self.head_dim is None:
      object.__setattr__(self, "head_dim",
                         self.hidden_size // self.num_attention_heads)
    if isinstance(self.eos_token_id, list):
      object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
    if self.layer_types is not None:
      object.__setattr__(self, "layer_types", tuple(self.layer_types))
      if len(self.layer_types) != self.num_hidden_layers:
        raise ValueError(
            f"layer_types has {len(self.layer_types)} entries for "
            f"num_hidden_layers={self.num_hidden_layers}")
      if not set(self.layer_types) <= set(LAYER_TYPES):
        raise ValueError(f"layer_types {sorted(set(self.layer_types))} must be "
                         f"in {LAYER_TYPES}")
    if self.rope_type not in ROPE_TYPES:
      raise ValueError(f"rope_type {self.rope_type!r} is not supported by mtjax; "
                       f"supported: {ROPE_TYPES}")
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(
          f"num_attention_heads={self.num_attention_heads} is not a multiple of "
          f"num_key_value_heads={self.num_key_value_heads}")
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f"hidden_act {self.hidden_act!r} is not one of "
                       f"{sorted(ACTIVATIONS)}")
    layers.dtype_of(self.dtype)  # validates
    layers.check_remat(self.remat)

  @property
  def is_encoder_decoder(self) -> bool:
    return False

  @property
  def is_bloom(self) -> bool:
    return self.model_type == "bloom"

  @property
  def is_gemma3(self) -> bool:
    return self.model_type == "gemma3_text"

  @property
  def qk_norm(self) -> bool:
    """Per-head RMSNorm of queries and keys before rotary (Qwen3, Gemma 3)."""
    return self.model_type in ("qwen3", "gemma3_text")

  @property
  def norm_offset(self) -> float:
    """1 for Gemma's (1 + w) RMSNorm (weights stored around 0), else 0."""
    return 1.0 if self.model_type in ("gemma", "gemma3_text") else 0.0

  def is_sliding(self, layer: int) -> bool:
    """Whether layer `layer` attends within `sliding_window` (when set)."""
    if self.layer_types is None:
      return self.sliding_window is not None
    return self.layer_types[layer] == "sliding_attention"

  def layer_window(self, layer: int) -> Optional[int]:
    return self.sliding_window if self.is_sliding(layer) else None

  def inv_freq(self, layer: int) -> np.ndarray:
    """Rotary inverse frequencies (head_dim / 2,) f32 of layer `layer`."""
    if self.rope_local_theta is not None and self.is_sliding(layer):
      return rope_inv_freq(self.head_dim, self.rope_local_theta)
    return rope_inv_freq(
        self.head_dim, self.rope_theta, self.rope_type, self.rope_factor,
        self.rope_low_freq_factor, self.rope_high_freq_factor,
        self.rope_original_max_position_embeddings)


# ----------------------------------------------------------------------------
# Positions, masks, rotary and ALiBi.


def default_positions(attention_mask: jax.Array,
                      segment_ids: Optional[jax.Array] = None,
                      offset: Optional[jax.Array] = None) -> jax.Array:
  """HF's positions: cumsum(mask) - 1 clipped at 0 (restarting per segment).

  attention_mask, segment_ids: (B,T); offset: (B,) first position (decoding).
  """
  mask = attention_mask.astype(jnp.int32)
  if segment_ids is not None:
    t = jnp.arange(mask.shape[1])[None, :]
    new = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool),
                           segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    start = jax.lax.cummax(jnp.where(new, t, 0), axis=1)
    csum = jnp.cumsum(mask, axis=1)
    before = jnp.take_along_axis(csum - mask, start, axis=1)
    pos = csum - before - 1
  else:
    pos = jnp.cumsum(mask, axis=1) - 1
  if offset is not None:
    pos = pos + offset[:, None]
  return jnp.maximum(pos, 0).astype(jnp.int32)


def rope_inv_freq(head_dim: int, theta: float, rope_type: str = "default",
                  factor: float = 1.0, low_freq_factor: float = 1.0,
                  high_freq_factor: float = 4.0,
                  original_max_position_embeddings: int = 8192) -> np.ndarray:
  """HF's rotary inverse frequencies (head_dim / 2,) in f32, op for op.

  default: theta ** -(2i / head_dim). linear: default / factor. llama3
  (transformers' _compute_llama3_parameters): wavelengths longer than
  original_max_position_embeddings / low_freq_factor are divided by `factor`,
  those shorter than .../ high_freq_factor kept, those in between
  interpolated. theta ** x is taken in f64 and rounded (numpy's f32 pow is
  less accurate than torch's), so entries agree with transformers' to 1 ulp.
  """
  if rope_type not in ROPE_TYPES:
    raise ValueError(f"rope type {rope_type!r} is not supported by mtjax; "
                     f"supported: {ROPE_TYPES}")
  exponent = np.arange(0, head_dim, 2).astype(np.float32) / np.float32(head_dim)
  inv = np.float32(1.0) / (np.float64(theta) ** exponent.astype(np.float64)
                           ).astype(np.float32)
  if rope_type == "linear":
    inv = inv / np.float32(factor)
  elif rope_type == "llama3":
    old = original_max_position_embeddings
    low_wavelen, high_wavelen = old / low_freq_factor, old / high_freq_factor
    wavelen = np.float32(2 * math.pi) / inv
    scaled = np.where(wavelen > low_wavelen, inv / np.float32(factor), inv)
    smooth = ((old / wavelen - low_freq_factor)
              / np.float32(high_freq_factor - low_freq_factor))
    smoothed = (1 - smooth) * scaled / np.float32(factor) + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    inv = np.where(medium, smoothed, scaled)
  return inv.astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array,
               inv_freq: ArrayLike) -> jax.Array:
  """HF rotate_half rotary embedding. x: (B,T,N,D); positions: (B,T);
  inv_freq: (D/2,) from `rope_inv_freq`."""
  d = x.shape[-1]
  inv_freq = jnp.asarray(inv_freq, jnp.float32)
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # (B,T,D/2)
  emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
  cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
  x1, x2 = x[..., :d // 2], x[..., d // 2:]
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return x * cos + rotated * sin


def alibi_slopes(num_heads: int) -> np.ndarray:
  """HF BLOOM's ALiBi slopes (H,), including non-power-of-2 head counts."""
  closest = 2 ** math.floor(math.log2(num_heads))
  base = 2.0 ** (-(2.0 ** -(math.log2(closest) - 3)))
  slopes = [base ** p for p in range(1, closest + 1)]
  if closest != num_heads:
    extra = 2.0 ** (-(2.0 ** -(math.log2(2 * closest) - 3)))
    slopes += [extra ** p for p in range(1, 1 + 2 * min(
        closest, num_heads - closest), 2)]
  return np.asarray(slopes, np.float32)


def attention_mask_4d(q_slots: jax.Array, k_slots: jax.Array,
                      key_valid: jax.Array,
                      q_segments: Optional[jax.Array] = None,
                      k_segments: Optional[jax.Array] = None,
                      sliding_window: Optional[int] = None) -> jax.Array:
  """Boolean (B,1,T,S): causal over slots, valid keys, same segment, window."""
  mask = (k_slots[None, :] <= q_slots[:, None])[None, None]
  mask = mask & key_valid[:, None, None, :].astype(bool)
  if q_segments is not None:
    mask = mask & (q_segments[:, None, :, None] == k_segments[:, None, None, :])
  if sliding_window is not None:
    mask = mask & (q_slots[:, None] - k_slots[None, :] < sliding_window)[None, None]
  return mask


def dot_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                  bias: Optional[jax.Array] = None,
                  dropout: Optional[Callable[[jax.Array], jax.Array]] = None,
                  scale: Optional[float] = None) -> jax.Array:
  """Grouped-query attention. q (B,T,H,D), k/v (B,S,K,D), mask (B,1,T,S).

  bias: optional (B,H,1,S) (ALiBi). scale: score multiplier (None: D**-0.5).
  Returns (B,T,H*D) head-major, H = K*G with query head h reading key head
  h // G (HF's repeat_kv).
  """
  b, t, h, d = q.shape
  kh = k.shape[2]
  g = h // kh
  q = q.reshape(b, t, kh, g, d)
  scores = jnp.einsum("btkgd,bskd->bkgts", q, k,
                      preferred_element_type=jnp.float32)
  scale = d ** -0.5 if scale is None else scale
  scores = scores.reshape(b, h, t, -1).astype(jnp.float32) * scale
  if bias is not None:
    scores = scores + bias
  scores = jnp.where(mask, scores, NEG_INF)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  if dropout is not None:
    probs = dropout(probs)
  out = jnp.einsum("bkgts,bskd->btkgd", probs.reshape(b, kh, g, t, -1), v)
  return out.reshape(b, t, h * d)


# ----------------------------------------------------------------------------
# Modules.


class Attention(nn.Module):
  """Self-attention with HF names (q/k/v/o_proj, or BLOOM's fused QKV + dense).

  `layer` (its index) selects the rotary frequencies (Gemma 3's sliding layers
  have their own base); the caller passes the matching mask.
  """
  config: DecoderConfig
  layer: int = 0

  def setup(self) -> None:
    c = self.config
    dt = layers.dtype_of(c.dtype)
    nq, nk = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    if c.is_bloom:
      self.query_key_value = layers.Linear(3 * nq, ("embed", "heads"), True, dt)
      self.dense = layers.Linear(c.hidden_size, ("heads", "embed"), True, dt)
    else:
      self.q_proj = layers.Linear(nq, ("embed", "heads"), c.attention_bias, dt)
      self.k_proj = layers.Linear(nk, ("embed", "heads"), c.attention_bias, dt)
      self.v_proj = layers.Linear(nk, ("embed", "heads"), c.attention_bias, dt)
      self.o_proj = layers.Linear(c.hidden_size, ("heads", "embed"),
                                  c.o_proj_bias, dt)
      if c.qk_norm:  # over head_dim, shared by all heads
        self.q_norm = layers.RMSNorm(c.norm_eps, dt, offset=c.norm_offset)
        self.k_norm = layers.RMSNorm(c.norm_eps, dt, offset=c.norm_offset)
    self.attn_dropout = nn.Dropout(c.attention_dropout)

  @nn.compact
  def _cache(self, k, v, start):
    """Writes k/v (B,T,K,D) at slot `start`; returns the whole cache (B,L,K,D)."""
    ck = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
    cv = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
    ck.value = jax.lax.dynamic_update_slice(ck.value, k, (0, start, 0, 0))
    cv.value = jax.lax.dynamic_update_slice(cv.value, v, (0, start, 0, 0))
    return ck.value, cv.value

  def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array,
               bias: Optional[jax.Array],
               cache_start: Optional[Union[int, jax.Array]],
               deterministic: bool) -> jax.Array:
    c = self.config
    b, t, _ = x.shape
    hd = c.head_dim
    if c.is_bloom:  # HF's fused layout: (heads, 3, head_dim)
      qkv = self.query_key_value(x).reshape(b, t, c.num_attention_heads, 3, hd)
      q, k, v = qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]
    else:
      q = self.q_proj(x).reshape(b, t, c.num_attention_heads, hd)
      k = self.k_proj(x).reshape(b, t, c.num_key_value_heads, hd)
      v = self.v_proj(x).reshape(b, t, c.num_key_value_heads, hd)
      if c.qk_norm:
        q, k = self.q_norm(q), self.k_norm(k)
      inv_freq = c.inv_freq(self.layer)
      q = apply_rope(q, positions, inv_freq)
      k = apply_rope(k, positions, inv_freq)
    q = layers.constrain(q, ("batch", "length", "act_heads", "act_kv"))
    if cache_start is not None:
      k, v = self._cache(k, v, cache_start)
    drop = None
    if c.attention_dropout > 0 and not deterministic:
      drop = functools.partial(self.attn_dropout, deterministic=False)
    scale = (None if c.query_pre_attn_scalar is None
             else c.query_pre_attn_scalar ** -0.5)
    out = dot_attention(q, k, v, mask, bias, drop, scale)
    out = layers.constrain(out, ("batch", "length", "act_heads"))
    return self.dense(out) if c.is_bloom else self.o_proj(out)


class MLP(nn.Module):
  """Gated MLP (SwiGLU/GeGLU: gate/up/down_proj) or BLOOM's dense_h_to_4h/4h_to_h."""
  config: DecoderConfig

  def setup(self) -> None:
    c = self.config
    dt = layers.dtype_of(c.dtype)
    if c.is_bloom:
      self.dense_h_to_4h = layers.Linear(c.intermediate_size, ("embed", "mlp"),
                                         True, dt)
      self.dense_4h_to_h = layers.Linear(c.hidden_size, ("mlp", "embed"), True, dt)
    else:
      self.gate_proj = layers.Linear(c.intermediate_size, ("embed", "mlp"),
                                     c.mlp_bias, dt)
      self.up_proj = layers.Linear(c.intermediate_size, ("embed", "mlp"),
                                   c.mlp_bias, dt)
      self.down_proj = layers.Linear(c.hidden_size, ("mlp", "embed"),
                                     c.mlp_bias, dt)

  def __call__(self, x: jax.Array) -> jax.Array:
    act = ACTIVATIONS[self.config.hidden_act]
    names = ("batch", "length", "act_mlp")
    if self.config.is_bloom:
      return self.dense_4h_to_h(layers.constrain(act(self.dense_h_to_4h(x)), names))
    h = act(self.gate_proj(x)) * self.up_proj(x)
    return self.down_proj(layers.constrain(h, names))


class Block(nn.Module):
  """Pre-norm transformer layer (HF names for norms, attention and MLP).

  Gemma 3 also normalizes each branch's output before the residual sum:
  x + post_attention_layernorm(attn(input_layernorm(x))), then
  x + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(x))).
  """
  config: DecoderConfig
  layer: int = 0

  def setup(self) -> None:
    c = self.config
    dt = layers.dtype_of(c.dtype)
    if c.is_bloom:
      norm = functools.partial(layers.LayerNorm, eps=c.norm_eps, dtype=dt)
      self.self_attention = Attention(c, self.layer)
    else:
      norm = functools.partial(layers.RMSNorm, eps=c.norm_eps, dtype=dt,
                               offset=c.norm_offset)
      self.self_attn = Attention(c, self.layer)
    self.input_layernorm = norm()
    self.post_attention_layernorm = norm()
    if c.is_gemma3:
      self.pre_feedforward_layernorm = norm()
      self.post_feedforward_layernorm = norm()
    self.mlp = MLP(c)
    self.dropout = nn.Dropout(c.hidden_dropout)

  def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array,
               bias: Optional[jax.Array],
               cache_start: Optional[Union[int, jax.Array]],
               deterministic: bool) -> jax.Array:
    c = self.config
    attn = self.self_attention if c.is_bloom else self.self_attn
    if c.is_gemma3:
      y = attn(self.input_layernorm(x), positions, mask, bias, cache_start,
               deterministic)
      y = self.post_attention_layernorm(y)
      x = x + self.dropout(y, deterministic=deterministic)
      y = self.post_feedforward_layernorm(
          self.mlp(self.pre_feedforward_layernorm(x)))
      x = x + self.dropout(y, deterministic=deterministic)
      return layers.constrain(x, ("batch", "length", "act_embed"))
    post_ln = c.apply_residual_connection_post_layernorm
    h = self.input_layernorm(x)
    y = attn(h, positions, mask, bias, cache_start, deterministic)
    x = (h if post_ln else x) + self.dropout(y, deterministic=deterministic)
    h = self.post_attention_layernorm(x)
    y = self.mlp(h)
    x = (h if post_ln else x) + self.dropout(y, deterministic=deterministic)
    return layers.constrain(x, ("batch", "length", "act_embed"))


class Body(nn.Module):
  """HF's LlamaModel / BloomModel: embeddings, layers, final norm -> hidden."""
  config: DecoderConfig

  def setup(self) -> None:
    c = self.config
    dt = layers.dtype_of(c.dtype)
    embed = layers.Embed(c.vocab_size, c.hidden_size, dt,
                         embedding_init=nn.initializers.normal(0.02))
    # deterministic (argument 6, counting self) selects code paths: static.
    block = layers.remat_block(Block, c.remat, static_argnums=(6,))
    blocks = [block(c, i) for i in range(c.num_hidden_layers)]
    if c.is_bloom:
      self.word_embeddings = embed
      self.word_embeddings_layernorm = layers.LayerNorm(c.norm_eps, dt)
      self.h = blocks
      self.ln_f = layers.LayerNorm(c.norm_eps, dt)
    else:
      self.embed_tokens = embed
      self.layers = blocks
      self.norm = layers.RMSNorm(c.norm_eps, dt, offset=c.norm_offset)

  def attend(self, x: jax.Array) -> jax.Array:
    """Tied output logits (B,T,V) in the compute dtype."""
    return (self.word_embeddings if self.config.is_bloom
            else self.embed_tokens).attend(x)

  @nn.compact
  def _decode_state(self, attention_mask, positions, segment_ids):
    """Cache bookkeeping -> (ready, start, key_valid, positions, key_positions).

    The cache is as long as the input of the call that creates it (see
    `init_cache`; ready=False then and the call acts as a plain forward);
    later calls write their T tokens at slot `cache_index`.
    """
    if segment_ids is not None:
      raise ValueError("segment_ids (packing) cannot be combined with decode=True")
    b, t = attention_mask.shape
    ready = self.has_variable("cache", "cache_index")
    index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
    valid = self.variable("cache", "key_valid", jnp.zeros, (b, t), jnp.int32)
    kpos = self.variable("cache", "key_positions", jnp.zeros, (b, t), jnp.int32)
    nxt = self.variable("cache", "next_position", jnp.zeros, (b,), jnp.int32)
    if not ready:
      return False, 0, attention_mask, positions, positions
    start = index.value
    if positions is None:
      positions = default_positions(attention_mask, offset=nxt.value)
    valid.value = jax.lax.dynamic_update_slice(
        valid.value, attention_mask.astype(jnp.int32), (0, start))
    kpos.value = jax.lax.dynamic_update_slice(kpos.value, positions, (0, start))
    index.value = start + t
    nxt.value = positions[:, -1] + 1
    return True, start, valid.value, positions, kpos.value

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array,
               positions: Optional[jax.Array], segment_ids: Optional[jax.Array],
               deterministic: bool, decode: bool) -> jax.Array:
    c = self.config
    t = input_ids.shape[1]
    cache_start = None
    if decode:  # the creation pass (ready=False) fills the cache like a forward
      ready, cache_start, key_valid, positions, key_positions = (
          self._decode_state(attention_mask, positions, segment_ids))
    if not decode or not ready:
      if positions is None:
        positions = default_positions(attention_mask, segment_ids)
      key_valid, key_positions = attention_mask, positions
    start = 0 if cache_start is None else cache_start
    q_slots = start + jnp.arange(t)
    k_slots = jnp.arange(key_valid.shape[1])
    windows = {c.layer_window(i) for i in range(c.num_hidden_layers)}
    masks = {w: attention_mask_4d(q_slots, k_slots, key_valid, segment_ids,
                                  segment_ids, w) for w in windows}
    bias = None
    if c.is_bloom:  # HF adds slope * key position; softmax ignores the query's
      kp = (key_positions * key_valid).astype(jnp.float32)[:, None, None, :]
      bias = alibi_slopes(c.num_attention_heads)[None, :, None, None] * kp

    embed = self.word_embeddings if c.is_bloom else self.embed_tokens
    x = embed(input_ids)
    if c.is_bloom:
      x = self.word_embeddings_layernorm(x)
    if c.model_type == "gemma":  # HF rounds the normalizer to the compute dtype
      x = x * jnp.asarray(c.hidden_size ** 0.5, x.dtype)
    elif c.is_gemma3:  # ... via an f32 buffer (Gemma3TextScaledWordEmbedding)
      x = x * jnp.asarray(np.float32(c.hidden_size ** 0.5), x.dtype)
    x = layers.constrain(x, ("batch", "length", "act_embed"))
    for i, block in enumerate(self.h if c.is_bloom else self.layers):
      x = block(x, positions, masks[c.layer_window(i)], bias, cache_start,
                deterministic)
    return (self.ln_f if c.is_bloom else self.norm)(x)


class Model(nn.Module):
  """Causal LM: HF's *ForCausalLM. Returns f32 logits (B,T,V)."""
  config: DecoderConfig

  def setup(self) -> None:
    c = self.config
    if c.is_bloom:
      self.transformer = Body(c)
    else:
      self.model = Body(c)
      if not c.tie_word_embeddings:
        self.lm_head = layers.Linear(c.vocab_size, ("embed", "vocab"), False,
                                     layers.dtype_of(c.dtype))

  def __call__(self, input_ids: ArrayLike,
               attention_mask: Optional[ArrayLike] = None,
               positions: Optional[ArrayLike] = None,
               segment_ids: Optional[ArrayLike] = None,
               deterministic: bool = True, decode: bool = False) -> jax.Array:
    """input_ids (B,T); attention_mask (B,T) 1=token 0=pad; positions (B,T);
    segment_ids (B,T) packed-segment ids (attention stays within a segment,
    0 marks padding when attention_mask is None). decode=True reads/writes the
    'cache' collection (pass mutable=['cache'])."""
    input_ids = jnp.asarray(input_ids, jnp.int32)
    if attention_mask is None:
      attention_mask = (jnp.ones_like(input_ids) if segment_ids is None
                        else (jnp.asarray(segment_ids) != 0).astype(jnp.int32))
    attention_mask = jnp.asarray(attention_mask, jnp.int32)
    if positions is not None:
      positions = jnp.asarray(positions, jnp.int32)
    if segment_ids is not None:
      segment_ids = jnp.asarray(segment_ids, jnp.int32)
    c = self.config
    body = self.transformer if c.is_bloom else self.model
    h = body(input_ids, attention_mask, positions, segment_ids, deterministic,
             decode)
    if c.is_bloom or c.tie_word_embeddings:
      logits = body.attend(h)
    else:
      logits = self.lm_head(h)
    cap = c.final_logit_softcapping
    if cap is not None:  # in the compute dtype, like HF
      logits = jnp.tanh(logits / cap) * cap
    logits = layers.constrain(logits, ("batch", "length", "act_vocab"))
    return logits.astype(jnp.float32)


# ----------------------------------------------------------------------------
# Generation.


def init_cache(model: Model, params: dict, batch_size: int,
               max_length: int) -> dict:
  """Zero 'cache' collection for `batch_size` rows of up to `max_length` tokens."""
  ids = jnp.zeros((batch_size, max_length), jnp.int32)
  shapes = jax.eval_shape(lambda p: model.apply(
      {"params": p}, ids, decode=True, mutable=["cache"])[1]["cache"], params)
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def prefill(model: Model, params: dict, input_ids: jax.Array,
            attention_mask: jax.Array,
            max_new_tokens: int) -> Tuple[jax.Array, dict]:
  """Cached prefill of left-padded prompts -> (last logits (B, V), cache).

  The cache holds the prompt and room for `max_new_tokens` more tokens.
  """
  b, p = input_ids.shape
  cache = init_cache(model, params, b, p + max_new_tokens)
  logits, mut = model.apply({"params": params, "cache": cache}, input_ids,
                            attention_mask, decode=True, mutable=["cache"])
  return logits[:, -1], mut["cache"]


def decode_step(model: Model, params: dict) -> decoding.Step:
  """step(cache, tokens (B,)) -> (logits (B, V), cache) for decoding.decode."""

  def step(cache, tokens):
    logits, mut = model.apply({"params": params, "cache": cache},
                              tokens[:, None], jnp.ones_like(tokens)[:, None],
                              decode=True, mutable=["cache"])
    return logits[:, -1], mut["cache"]

  return step


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens",
                                             "greedy", "eos_ids", "pad_id"))
def _generate(model, params, input_ids, attention_mask, rng, temperature,
              max_new_tokens, greedy, eos_ids, pad_id):
  return decoding.decode(
      lambda: prefill(model, params, input_ids, attention_mask, max_new_tokens),
      decode_step(model, params), max_new_tokens,
      temperature=0.0 if greedy else temperature, rng=rng, eos_ids=eos_ids,
      pad_id=pad_id)


def generate(model: Model, params: dict, input_ids: ArrayLike,
             attention_mask: Optional[ArrayLike] = None, max_new_tokens: int = 16,
             temperature: float = 0.0, rng: Optional[jax.Array] = None,
             eos_id: decoding.EosIds = None) -> jax.Array:
  """Continuations (B, max_new_tokens) int32 of left-padded prompts.

  Greedy when temperature == 0, else samples from softmax(logits / T) with
  `rng`. After a row emits `eos_id` (an int or several) it emits the pad id
  (config.pad_token_id, else the eos id), like HF generate. The loop is
  `decoding.decode` over the KV cache; it is jitted with the model static, so
  it refuses to run inside `nn.intercept_methods` (see decoding.py).
  """
  decoding.no_interceptors("decoder.generate")
  input_ids = np.asarray(input_ids, np.int32)
  if attention_mask is None:
    attention_mask = np.ones_like(input_ids)
  attention_mask = np.asarray(attention_mask, np.int32)
  if (attention_mask[:, -1] == 0).any():
    raise ValueError("generate needs left-padded prompts: the last column of "
                     "attention_mask must be 1 for every row")
  if temperature < 0:
    raise ValueError(f"temperature must be >= 0, got {temperature}")
  if temperature > 0 and rng is None:
    raise ValueError("sampling (temperature > 0) needs rng=jax.random.key(...)")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  rng = jax.random.key(0) if rng is None else rng
  eos_ids = decoding.eos_tuple(eos_id)
  pad_id = model.config.pad_token_id
  if pad_id is None:
    pad_id = eos_ids[0] if eos_ids else 0
  return _generate(model, params, input_ids, attention_mask, rng,
                   jnp.float32(temperature), max_new_tokens=int(max_new_tokens),
                   greedy=temperature == 0, eos_ids=eos_ids, pad_id=int(pad_id))


# ----------------------------------------------------------------------------
# Hugging Face config conversion (hf.py hooks).

_HF_CLASS = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
             "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
             "gemma": "GemmaForCausalLM", "gemma3_text": "Gemma3ForCausalLM",
             "bloom": "BloomForCausalLM"}

# transformers' defaults for keys a config.json may leave out, where they differ
# from DecoderConfig's (e.g. Qwen3Config.head_dim is 128, not hidden / heads).
_HF_DEFAULTS = {
    "qwen3": dict(head_dim=128, num_key_value_heads=32,
                  max_position_embeddings=32768),
    "gemma3_text": dict(head_dim=256, num_key_value_heads=4, pad_token_id=0,
                        eos_token_id=1, bos_token_id=2,
                        max_position_embeddings=131072, query_pre_attn_scalar=256,
                        sliding_window=4096, tie_word_embeddings=True),
}
_GEMMA3_THETA = {"full_attention": 1_000_000.0, "sliding_attention": 10_000.0}


def _rope_fields(rope: dict, d: dict, where: str = "") -> dict:
  """One HF rope dict (rope_theta filled in) -> DecoderConfig rope fields."""
  kind = rope.get("rope_type", rope.get("type", "default"))
  if kind not in ROPE_TYPES:
    raise ValueError(f"rope type {kind!r}{where} in config.json is not supported "
                     f"by mtjax; supported rope types: {', '.join(ROPE_TYPES)}")
  partial = rope.get("partial_rotary_factor", d.get("partial_rotary_factor"))
  if partial not in (None, 1, 1.0):
    raise ValueError(f"partial_rotary_factor={partial} in config.json is not "
                     "supported by mtjax (rotary over the whole head only)")

  def need(key):
    if rope.get(key) is None:
      raise ValueError(f"rope type {kind!r}{where} needs {key!r} in "
                       "config.json's rope_parameters")
    return rope[key]

  out = dict(rope_theta=float(rope["rope_theta"]), rope_type=kind)
  if kind in ("linear", "llama3"):
    out["rope_factor"] = float(need("factor"))
  if kind == "llama3":  # a top-level original_max_position_embeddings wins (HF)
    old = d.get("original_max_position_embeddings",
                rope.get("original_max_position_embeddings",
                         d.get("max_position_embeddings", 2048)))
    out.update(rope_low_freq_factor=float(need("low_freq_factor")),
               rope_high_freq_factor=float(need("high_freq_factor")),
               rope_original_max_position_embeddings=int(old))
  return out


def _rope(d: dict) -> dict:
  # HF's convert_rope_params_to_dict: legacy rope_scaling wins over
  # rope_parameters; rope_theta inside the dict wins over the top-level one.
  rope = dict(d.get("rope_scaling") or d.get("rope_parameters") or {})
  if rope.get("rope_theta") is None:
    rope["rope_theta"] = d.get("rope_theta", 10000.0)
  return _rope_fields(rope, d)


def _gemma3_rope(d: dict) -> dict:
  """Gemma3TextConfig's rope_parameters keyed by layer type (or legacy keys:
  rope_theta and rope_scaling for global layers, rope_local_base_freq)."""
  nested = d.get("rope_parameters") or {}
  full = dict(nested.get("full_attention") or {"rope_type": "default"})
  full.update(d.get("rope_scaling") or {})
  if full.get("rope_theta") is None:
    full["rope_theta"] = d.get("rope_theta", _GEMMA3_THETA["full_attention"])
  local = dict(nested.get("sliding_attention") or {"rope_type": "default"})
  if local.get("rope_theta") is None:
    local["rope_theta"] = d.get("rope_local_base_freq",
                                _GEMMA3_THETA["sliding_attention"])
  kind = local.get("rope_type", local.get("type", "default"))
  if kind != "default":
    raise ValueError(
        f"rope type {kind!r} of Gemma 3's sliding_attention layers is not "
        "supported by mtjax; supported there: 'default' (full_attention "
        f"layers: {', '.join(ROPE_TYPES)})")
  return dict(_rope_fields(full, d, " (full_attention layers)"),
              rope_local_theta=float(local["rope_theta"]))


def _opt_float(x: Optional[float]) -> Optional[float]:
  return None if x is None else float(x)


def config_from_hf(d: dict, dtype: str = "float32") -> DecoderConfig:
  """HF config.json dict -> DecoderConfig (compute dtype `dtype`)."""
  mt = d.get("model_type")
  d = {**_HF_DEFAULTS.get(mt, {}), **d}
  common = dict(model_type=mt, vocab_size=d["vocab_size"],
                pad_token_id=d.get("pad_token_id"),
                bos_token_id=d.get("bos_token_id"),
                eos_token_id=d.get("eos_token_id"), dtype=dtype)
  if mt == "bloom":
    hidden = d.get("hidden_size", d.get("n_embed"))
    return DecoderConfig(
        **common, hidden_size=hidden, intermediate_size=4 * hidden,
        num_hidden_layers=d.get("n_layer", d.get("num_hidden_layers")),
        num_attention_heads=d.get("n_head", d.get("num_attention_heads")),
        norm_eps=d.get("layer_norm_epsilon", 1e-5), tie_word_embeddings=True,
        hidden_act="gelu_pytorch_tanh", max_position_embeddings=d.get(
            "seq_length", 2048),
        attention_dropout=d.get("attention_dropout", 0.0),
        hidden_dropout=d.get("hidden_dropout", 0.0),
        apply_residual_connection_post_layernorm=d.get(
            "apply_residual_connection_post_layernorm", False))
  if mt not in ARCHS:
    raise ValueError(f"decoder.config_from_hf: unsupported model_type {mt!r}; "
                     f"supported: {ARCHS}")
  if mt in ("qwen2", "qwen3") and d.get("use_sliding_window"):
    raise ValueError(f"{mt} with use_sliding_window=true is not supported by "
                     "mtjax (only full attention in every layer)")
  if mt == "qwen3" and "sliding_attention" in (d.get("layer_types") or ()):
    raise ValueError("qwen3 layer_types with 'sliding_attention' layers are not "
                     "supported by mtjax (only full attention in every layer)")
  bias = d.get("attention_bias", False)
  act = d.get("hidden_act", "silu")
  if mt == "gemma" and act in ("gelu", None):
    act = "gelu_pytorch_tanh"  # HF's documented fix of legacy Gemma configs
  extra = dict(sliding_window=d.get("sliding_window") if mt == "mistral" else None)
  if mt == "gemma3_text":
    if d.get("use_bidirectional_attention"):
      raise ValueError("gemma3_text with use_bidirectional_attention=true is not "
                       "supported by mtjax (causal attention only)")
    if d.get("attn_logit_softcapping") is not None:
      raise ValueError(
          f"gemma3_text with attn_logit_softcapping="
          f"{d['attn_logit_softcapping']} is not supported: transformers' Gemma3 "
          "attention ignores it (Gemma 3 uses q/k norms instead), so its "
          "meaning for these weights is unclear; set it to null")
    types = d.get("layer_types")
    if types is None:  # HF: every `sliding_window_pattern`-th layer is global
      pattern = d.get("sliding_window_pattern", 6)
      types = ["sliding_attention" if (i + 1) % pattern else "full_attention"
               for i in range(d["num_hidden_layers"])]
    act = d.get("hidden_activation") or "gelu_pytorch_tanh"
    extra = dict(
        _gemma3_rope(d), layer_types=tuple(types),
        sliding_window=d.get("sliding_window"),
        query_pre_attn_scalar=d.get("query_pre_attn_scalar"),
        final_logit_softcapping=_opt_float(d.get("final_logit_softcapping")))
  else:
    extra.update(_rope(d))
  return DecoderConfig(
      **common, **extra, hidden_size=d["hidden_size"],
      intermediate_size=d["intermediate_size"],
      num_hidden_layers=d["num_hidden_layers"],
      num_attention_heads=d["num_attention_heads"],
      num_key_value_heads=d.get("num_key_value_heads"),
      head_dim=d.get("head_dim"),
      norm_eps=d.get("rms_norm_eps", 1e-6),
      tie_word_embeddings=d.get("tie_word_embeddings", mt == "gemma"),
      attention_bias=True if mt == "qwen2" else bias,
      o_proj_bias=bias if mt in ("llama", "qwen3", "gemma", "gemma3_text")
      else False,
      mlp_bias=d.get("mlp_bias", False),
      max_position_embeddings=d.get("max_position_embeddings", 2048),
      hidden_act=act, attention_dropout=d.get("attention_dropout", 0.0))


def _rope_dict(cfg: DecoderConfig) -> dict:
  rope = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta}
  if cfg.rope_type in ("linear", "llama3"):
    rope["factor"] = cfg.rope_factor
  if cfg.rope_type == "llama3":
    rope.update(low_freq_factor=cfg.rope_low_freq_factor,
                high_freq_factor=cfg.rope_high_freq_factor,
                original_max_position_embeddings=(
                    cfg.rope_original_max_position_embeddings))
  return rope


def config_to_hf(cfg: DecoderConfig) -> dict:
  """DecoderConfig -> config.json dict that transformers loads."""
  common = dict(model_type=cfg.model_type,
                architectures=[_HF_CLASS[cfg.model_type]],
                vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                pad_token_id=cfg.pad_token_id, bos_token_id=cfg.bos_token_id,
                eos_token_id=(list(cfg.eos_token_id) if isinstance(
                    cfg.eos_token_id, tuple) else cfg.eos_token_id),
                tie_word_embeddings=cfg.tie_word_embeddings, torch_dtype="float32",
                attention_dropout=cfg.attention_dropout)
  if not cfg.is_gemma3:
    only_gemma3 = dict(layer_types=cfg.layer_types,
                       rope_local_theta=cfg.rope_local_theta,
                       query_pre_attn_scalar=cfg.query_pre_attn_scalar,
                       final_logit_softcapping=cfg.final_logit_softcapping)
    bad = [k for k, v in only_gemma3.items() if v is not None]
    if bad:
      raise ValueError(f"{bad} cannot be written into a {cfg.model_type} "
                       "config.json (only gemma3_text has them)")
  if cfg.is_bloom:
    if cfg.intermediate_size != 4 * cfg.hidden_size:
      raise ValueError("BLOOM's MLP is 4 * hidden_size wide")
    return dict(common, n_layer=cfg.num_hidden_layers,
                n_head=cfg.num_attention_heads, layer_norm_epsilon=cfg.norm_eps,
                hidden_dropout=cfg.hidden_dropout,
                apply_residual_connection_post_layernorm=(
                    cfg.apply_residual_connection_post_layernorm))
  out = dict(common, intermediate_size=cfg.intermediate_size,
             num_hidden_layers=cfg.num_hidden_layers,
             num_attention_heads=cfg.num_attention_heads,
             num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
             hidden_act=cfg.hidden_act,
             max_position_embeddings=cfg.max_position_embeddings,
             rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
             rope_parameters=_rope_dict(cfg))
  mt = cfg.model_type
  if mt in ("llama", "qwen3", "gemma", "gemma3_text"):
    if cfg.attention_bias != cfg.o_proj_bias:
      raise ValueError(f"{mt}'s attention_bias covers q/k/v and o_proj together")
    out.update(attention_bias=cfg.attention_bias)
  if mt == "llama":
    out.update(mlp_bias=cfg.mlp_bias)
  elif mt == "mistral":
    out.update(sliding_window=cfg.sliding_window)
  elif mt == "qwen2":
    out.update(use_sliding_window=False)
  elif mt == "qwen3":
    if cfg.sliding_window is not None:
      raise ValueError("qwen3 with a sliding window cannot be written (mtjax "
                       "reads qwen3 with full attention only)")
    out.update(use_sliding_window=False, sliding_window=None,
               max_window_layers=cfg.num_hidden_layers,
               layer_types=["full_attention"] * cfg.num_hidden_layers)
  elif mt == "gemma3_text":
    del out["rope_theta"], out["hidden_act"]
    scalar = cfg.query_pre_attn_scalar
    if scalar is None:
      scalar = cfg.head_dim
    if float(scalar).is_integer():
      scalar = int(scalar)  # Gemma3TextConfig (strict) declares an int
    local = cfg.rope_theta if cfg.rope_local_theta is None else cfg.rope_local_theta
    out.update(
        hidden_activation=cfg.hidden_act, query_pre_attn_scalar=scalar,
        sliding_window=cfg.sliding_window,
        layer_types=["sliding_attention" if cfg.is_sliding(i) else "full_attention"
                     for i in range(cfg.num_hidden_layers)],
        rope_parameters={"full_attention": _rope_dict(cfg),
                         "sliding_attention": {"rope_type": "default",
                                               "rope_theta": local}},
        attn_logit_softcapping=None,
        final_logit_softcapping=cfg.final_logit_softcapping,
        use_bidirectional_attention=False)
  return out


def hf_key(path: Tuple[str, ...], cfg: DecoderConfig) -> str:
  """Param path -> HF tensor name; module paths already mirror HF's names."""
  del cfg
  return layers.default_hf_key(path)
