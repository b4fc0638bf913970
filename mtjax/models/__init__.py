"""Base models: T5 family (t5.py) and decoder-only Llama/Qwen2/Gemma/BLOOM (decoder.py).

The contract every model follows (so methods and the trainer stay generic):
  model = Model(config)          # linen module; config is a frozen dataclass with
                                 # .model_type (HF name), .is_encoder_decoder,
                                 # .vocab_size, .dtype ('float32'|'bfloat16')
  model.apply({'params': p}, input_ids, attention_mask=None,
              decoder_input_ids=None, decoder_attention_mask=None)
      -> logits (batch, length, vocab) in f32; decoder positions for
         encoder-decoder models, input positions for decoder-only ones.
  arch.generate(model, params, input_ids, attention_mask, max_new_tokens,
                temperature=0.0, rng=None, eos_id=None) -> (batch, max_new_tokens)
      (every generator runs the one loop `decoding.decode(prefill, step, ...)`)
Parameters carry logical axis names (see sharding.py); every linear map is a
layers.Linear whose path mirrors Hugging Face's module names.
"""
import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from mtjax.models import decoding, hf, sharding  # noqa: F401

Model = Any  # a flax linen module (decoder.Model or t5.T5)


def _arch(model):
  return hf.arch_module(model.config.model_type)


def logits(model: Model, params: dict, input_ids: ArrayLike,
           attention_mask: Optional[ArrayLike] = None,
           decoder_input_ids: Optional[ArrayLike] = None,
           decoder_attention_mask: Optional[ArrayLike] = None,
           jit: bool = True) -> jax.Array:
  """Logits (batch, length, vocab) f32 for any loaded model; HF argument names.

  jit=True (default) runs one `jax.jit` compilation per model and input
  shapes (the model static, reused by later calls); jit=False runs the model
  op by op. Inside `flax.linen.intercept_methods` the call always runs
  eagerly (jit or not): a cached trace made without the interceptor would
  silently ignore it (see decoding.py), while the eager call goes through it.
  """
  if decoder_input_ids is not None and not model.config.is_encoder_decoder:
    raise ValueError(f"{model.config.model_type} is decoder-only: "
                     "decoder_input_ids is for encoder-decoder models")
  if model.config.is_encoder_decoder and decoder_input_ids is None:
    raise ValueError("encoder-decoder models need decoder_input_ids")
  kwargs = dict(attention_mask=None if attention_mask is None
                else jnp.asarray(attention_mask))
  if model.config.is_encoder_decoder:
    kwargs.update(decoder_input_ids=jnp.asarray(decoder_input_ids),
                  decoder_attention_mask=None if decoder_attention_mask is None
                  else jnp.asarray(decoder_attention_mask))
  if not jit or decoding.interceptors_active():
    return model.apply({"params": params}, jnp.asarray(input_ids), **kwargs)
  return _jitted_logits(model, params, jnp.asarray(input_ids), kwargs)


@functools.partial(jax.jit, static_argnames=("model",))
def _jitted_logits(model, params, input_ids, kwargs):
  return model.apply({"params": params}, input_ids, **kwargs)


def generate(model: Model, params: dict, input_ids: ArrayLike,
             attention_mask: Optional[ArrayLike] = None, max_new_tokens: int = 16,
             temperature: float = 0.0, rng: Optional[jax.Array] = None,
             eos_id: decoding.EosIds = None) -> jax.Array:
  """Greedy (temperature 0) or sampled continuation ids (batch, max_new_tokens)."""
  return _arch(model).generate(model, params, input_ids, attention_mask,
                               max_new_tokens, temperature=temperature,
                               rng=rng, eos_id=eos_id)
