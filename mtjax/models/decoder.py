"""Decoder-only base models: Llama/Mistral, Qwen2, Gemma and BLOOM, with HF parity.

Llama: Touvron et al. 2023, "Llama 2: Open Foundation and Fine-Tuned Chat
Models" (RMSNorm, SwiGLU, rotary embeddings of Su et al. 2021 "RoFormer", and
grouped-query attention of Ainslie et al. 2023 "GQA"). Qwen2: Yang et al. 2024
"Qwen2 Technical Report" (Llama plus q/k/v biases). Gemma: Gemma Team 2024
"Gemma: Open Models Based on Gemini Research and Technology" (scaled tied
embeddings, (1 + w) RMSNorm, GeGLU). BLOOM: BigScience 2022 "BLOOM: A 176B-
Parameter Open-Access Multilingual Language Model" (ALiBi of Press et al. 2022
"Train Short, Test Long", embedding LayerNorm, fused QKV).

Module paths mirror Hugging Face's state-dict names, so `layers.default_hf_key`
maps every parameter with no per-architecture table:
  llama/qwen2/gemma/mistral: model/embed_tokens, model/layers_i/self_attn/
      {q,k,v,o}_proj, model/layers_i/mlp/{gate,up,down}_proj,
      model/layers_i/{input,post_attention}_layernorm, model/norm, lm_head
  bloom: transformer/word_embeddings, transformer/word_embeddings_layernorm,
      transformer/h_i/{input_layernorm, self_attention/{query_key_value,dense},
      post_attention_layernorm, mlp/{dense_h_to_4h,dense_4h_to_h}}, transformer/ln_f

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

ARCHS = ("llama", "mistral", "qwen2", "gemma", "bloom")
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
  norm_eps: float = 1e-6  # HF rms_norm_eps (RMSNorm) or layer_norm_epsilon (BLOOM)
  tie_word_embeddings: bool = False
  attention_bias: bool = False  # q/k/v biases (Qwen2; Llama's attention_bias)
  o_proj_bias: bool = False  # Llama's attention_bias also adds one to o_proj
  mlp_bias: bool = False
  max_position_embeddings: int = 2048
  hidden_act: str = "silu"
  sliding_window: Optional[int] = None  # Mistral: key visible iff q - k < window
  attention_dropout: float = 0.0
  hidden_dropout: float = 0.0  # on residual branches (BLOOM's hidden_dropout)
  apply_residual_connection_post_layernorm: bool = False  # BLOOM
  pad_token_id: Optional[int] = None
  bos_token_id: Optional[int] = None
  eos_token_id: Optional[Union[int, Tuple[int, ...]]] = None
  dtype: str = "float32"  # compute dtype; parameters are always f32

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
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(
          f"num_attention_heads={self.num_attention_heads} is not a multiple of "
          f"num_key_value_heads={self.num_key_value_heads}")
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f"hidden_act {self.hidden_act!r} is not one of "
                       f"{sorted(ACTIVATIONS)}")
    layers.dtype_of(self.dtype)  # validates

  @property
  def is_encoder_decoder(self) -> bool:
    return False

  @property
  def is_bloom(self) -> bool:
    return self.model_type == "bloom"


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


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """HF rotate_half rotary embedding. x: (B,T,N,D); positions: (B,T)."""
  d = x.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
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
                  dropout: Optional[Callable[[jax.Array], jax.Array]] = None
                  ) -> jax.Array:
  """Grouped-query attention. q (B,T,H,D), k/v (B,S,K,D), mask (B,1,T,S).

  bias: optional (B,H,1,S) (ALiBi). Returns (B,T,H*D) head-major, H = K*G with
  query head h reading key head h // G (HF's repeat_kv).
  """
  b, t, h, d = q.shape
  kh = k.shape[2]
  g = h // kh
  q = q.reshape(b, t, kh, g, d)
  scores = jnp.einsum("btkgd,bskd->bkgts", q, k,
                      preferred_element_type=jnp.float32)
  scores = scores.reshape(b, h, t, -1).astype(jnp.float32) * (d ** -0.5)
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
  """Self-attention with HF names (q/k/v/o_proj, or BLOOM's fused QKV + dense)."""
  config: DecoderConfig

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
      q = apply_rope(q, positions, c.rope_theta)
      k = apply_rope(k, positions, c.rope_theta)
    q = layers.constrain(q, ("batch", "length", "act_heads", "act_kv"))
    if cache_start is not None:
      k, v = self._cache(k, v, cache_start)
    drop = None
    if c.attention_dropout > 0 and not deterministic:
      drop = functools.partial(self.attn_dropout, deterministic=False)
    out = dot_attention(q, k, v, mask, bias, drop)
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
  """Pre-norm transformer layer (HF names for norms, attention and MLP)."""
  config: DecoderConfig

  def setup(self) -> None:
    c = self.config
    dt = layers.dtype_of(c.dtype)
    if c.is_bloom:
      norm = functools.partial(layers.LayerNorm, eps=c.norm_eps, dtype=dt)
      self.self_attention = Attention(c)
    else:
      norm = functools.partial(layers.RMSNorm, eps=c.norm_eps, dtype=dt,
                               offset=1.0 if c.model_type == "gemma" else 0.0)
      self.self_attn = Attention(c)
    self.input_layernorm = norm()
    self.post_attention_layernorm = norm()
    self.mlp = MLP(c)
    self.dropout = nn.Dropout(c.hidden_dropout)

  def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array,
               bias: Optional[jax.Array],
               cache_start: Optional[Union[int, jax.Array]],
               deterministic: bool) -> jax.Array:
    c = self.config
    attn = self.self_attention if c.is_bloom else self.self_attn
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
    blocks = [Block(c) for _ in range(c.num_hidden_layers)]
    if c.is_bloom:
      self.word_embeddings = embed
      self.word_embeddings_layernorm = layers.LayerNorm(c.norm_eps, dt)
      self.h = blocks
      self.ln_f = layers.LayerNorm(c.norm_eps, dt)
    else:
      self.embed_tokens = embed
      self.layers = blocks
      self.norm = layers.RMSNorm(c.norm_eps, dt,
                                 offset=1.0 if c.model_type == "gemma" else 0.0)

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
    mask = attention_mask_4d(q_slots, k_slots, key_valid, segment_ids,
                             segment_ids, c.sliding_window)
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
    x = layers.constrain(x, ("batch", "length", "act_embed"))
    for block in (self.h if c.is_bloom else self.layers):
      x = block(x, positions, mask, bias, cache_start, deterministic)
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
             "qwen2": "Qwen2ForCausalLM", "gemma": "GemmaForCausalLM",
             "bloom": "BloomForCausalLM"}


def _rope_theta(d):
  rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
  kind = rope.get("rope_type", rope.get("type", "default"))
  if kind != "default":
    raise ValueError(f"rope type {kind!r} in config.json is not supported by "
                     "mtjax (only the default rotary embedding)")
  return float(rope.get("rope_theta", d.get("rope_theta", 10000.0)))


def config_from_hf(d: dict, dtype: str = "float32") -> DecoderConfig:
  """HF config.json dict -> DecoderConfig (compute dtype `dtype`)."""
  mt = d.get("model_type")
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
  if mt not in ("llama", "mistral", "qwen2", "gemma"):
    raise ValueError(f"decoder.config_from_hf: unsupported model_type {mt!r}; "
                     f"supported: {ARCHS}")
  if mt == "qwen2" and d.get("use_sliding_window"):
    raise ValueError("Qwen2 with use_sliding_window=true is not supported")
  bias = d.get("attention_bias", False)
  act = d.get("hidden_act", "silu")
  if mt == "gemma" and act in ("gelu", None):
    act = "gelu_pytorch_tanh"  # HF's documented fix of legacy Gemma configs
  return DecoderConfig(
      **common, hidden_size=d["hidden_size"],
      intermediate_size=d["intermediate_size"],
      num_hidden_layers=d["num_hidden_layers"],
      num_attention_heads=d["num_attention_heads"],
      num_key_value_heads=d.get("num_key_value_heads"),
      head_dim=d.get("head_dim"), rope_theta=_rope_theta(d),
      norm_eps=d.get("rms_norm_eps", 1e-6),
      tie_word_embeddings=d.get("tie_word_embeddings", mt == "gemma"),
      attention_bias=True if mt == "qwen2" else bias,
      o_proj_bias=bias if mt in ("llama",) else False,
      mlp_bias=d.get("mlp_bias", False),
      max_position_embeddings=d.get("max_position_embeddings", 2048),
      hidden_act=act,
      sliding_window=d.get("sliding_window") if mt == "mistral" else None,
      attention_dropout=d.get("attention_dropout", 0.0))


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
             rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta})
  if cfg.model_type == "llama":
    if cfg.attention_bias != cfg.o_proj_bias:
      raise ValueError("Llama's attention_bias covers q/k/v and o_proj together")
    out.update(attention_bias=cfg.attention_bias, mlp_bias=cfg.mlp_bias)
  elif cfg.model_type == "mistral":
    out.update(sliding_window=cfg.sliding_window)
  elif cfg.model_type == "qwen2":
    out.update(use_sliding_window=False)
  elif cfg.model_type == "gemma":
    out.update(attention_bias=cfg.attention_bias)
  return out


def hf_key(path: Tuple[str, ...], cfg: DecoderConfig) -> str:
  """Param path -> HF tensor name; module paths already mirror HF's names."""
  del cfg
  return layers.default_hf_key(path)
