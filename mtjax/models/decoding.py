"""The one decoding loop: greedy or temperature sampling, batched, EOS-aware.

Every generator in mtjax (decoder.generate, t5.generate, soft injection's
prefill-swappable loop, evaluation's method-agnostic greedy decoding) is a
pair of functions handed to `decode`:

  prefill()              -> (logits (B, V) for the first new token, carry)
  step(carry, tokens (B,)) -> (logits (B, V) for the next token, carry)

`carry` is whatever the generator needs between tokens: a KV cache ('cache'
collection) for the cached models, or the filled token buffer for decoders
that recompute the forward pass. `decode` owns everything else: the token
choice (argmax, or softmax(logits / temperature) sampling with an explicit
key), EOS bookkeeping (a row emits `pad_id` after its first EOS), and the
`lax.scan` over new tokens. It only traces; callers wrap it in `jax.jit`.

Jitted generators that close over a model (the model static, parameters
traced) must be called outside `flax.linen.intercept_methods`: jax reuses a
trace made without the interceptor, silently running the base model. Their
Python entry points call `no_interceptors` to refuse that loudly (the jitted
`mtjax.models.logits` runs eagerly there instead); methods that rely on
interceptors (LoRA, IA3, routing, ...) decode through a loop whose jit
contains the method's apply (mtjax.evaluation.evaluate.make_greedy, with the
KV cache through `method.apply(decode=...)`, see mtjax.methods.transform).
"""
from typing import Any, Callable, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Carry = Any  # whatever a generator keeps between tokens (KV cache, buffer)
Prefill = Callable[[], Tuple[jax.Array, Carry]]
Step = Callable[[Carry, jax.Array], Tuple[jax.Array, Carry]]
EosIds = Union[None, int, Sequence[int], jax.Array]


def interceptors_active() -> bool:
  """Whether a flax `nn.intercept_methods` interceptor is active here."""
  stack = getattr(getattr(nn, "module", None), "_global_interceptor_stack", ())
  return bool(len(stack))


def no_interceptors(what: str) -> None:
  """Raises if a flax method interceptor is active (see the module docstring)."""
  if interceptors_active():
    raise RuntimeError(
        f"{what} runs a jitted model trace that may have been made without "
        "the active nn.intercept_methods interceptor (e.g. a LoRA, IA3 or "
        "routing method), which would be silently ignored. Decode through the "
        "method instead (mtjax.evaluation.evaluate.make_greedy), or build the "
        "loop with mtjax.models.decoding.decode inside your own jit.")


def eos_tuple(eos_id: EosIds) -> Optional[Tuple[int, ...]]:
  """None, an int or several ints -> a tuple of ints or None (hashable)."""
  if eos_id is None:
    return None
  ids = tuple(int(e) for e in np.atleast_1d(eos_id).tolist())
  return ids or None


def choose(logits: jax.Array, temperature: Union[float, jax.Array] = 0.0,
           key: Optional[jax.Array] = None) -> jax.Array:
  """Next tokens (B,) int32 from logits (B, V).

  temperature: a Python number (0: argmax, > 0: sampling) or a traced scalar
  (argmax where it is <= 0, sampling otherwise; both are computed).
  """
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  if isinstance(temperature, (int, float)) and temperature == 0:
    return greedy
  if key is None:
    raise ValueError("sampling (temperature > 0) needs a key")
  if isinstance(temperature, (int, float)):
    return jax.random.categorical(key, logits / temperature).astype(jnp.int32)
  t = jnp.asarray(temperature, jnp.float32)
  sampled = jax.random.categorical(key, logits / jnp.maximum(t, 1e-6))
  return jnp.where(t > 0, sampled.astype(jnp.int32), greedy)


def decode(prefill: Prefill, step: Step, max_new_tokens: int, *,
           temperature: Union[float, jax.Array] = 0.0,
           rng: Optional[jax.Array] = None, eos_ids: EosIds = None,
           pad_id: int = 0, return_logits: bool = False
           ) -> Union[jax.Array, Tuple[jax.Array, jax.Array]]:
  """Generated ids (B, max_new_tokens) int32.

  prefill() -> (logits (B, V), carry); step(carry, tokens (B,)) -> (logits
  (B, V), carry): see the module docstring. temperature 0 is greedy; > 0
  samples with `rng` (token i uses the i-th of jax.random.split(rng,
  max_new_tokens)). eos_ids: None (never stop), an int, a tuple, or an int
  array (may be traced; negative ids never match). After a row emits an EOS
  it emits `pad_id`; once every row has, the remaining steps skip `step`
  (lax.cond), so a finished batch costs no more model calls.
  return_logits: also return the logits (B, max_new_tokens, V) f32 that each
  token was chosen from (zeros for the steps skipped after every row ended).
  """
  max_new_tokens = int(max_new_tokens)
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  greedy = isinstance(temperature, (int, float)) and temperature == 0
  if not greedy and isinstance(temperature, (int, float)) and temperature < 0:
    raise ValueError(f"temperature must be >= 0, got {temperature}")
  if not greedy and rng is None:
    raise ValueError("sampling (temperature > 0) needs rng=jax.random.key(...)")
  keys = (jax.random.split(rng, max_new_tokens) if not greedy
          else jnp.zeros((max_new_tokens,), jnp.uint32))
  eos = None if eos_ids is None else jnp.atleast_1d(
      jnp.asarray(eos_ids, jnp.int32))

  def pick(logits, key, done):
    tok = choose(logits, temperature, None if greedy else key)
    tok = jnp.where(done, jnp.int32(pad_id), tok)
    if eos is not None:
      done = done | jnp.isin(tok, eos)
    return tok, done

  logits, carry = prefill()
  tok, done = pick(logits, keys[0], jnp.zeros(logits.shape[:1], bool))
  first = logits.astype(jnp.float32)

  def live(carry, tok, done, key):
    logits, carry = step(carry, tok)
    new, done = pick(logits, key, done)
    return carry, new, done, (logits.astype(jnp.float32) if return_logits
                              else None)

  def finished(carry, tok, done, key):
    del key
    return carry, jnp.full_like(tok, pad_id), done, (
        jnp.zeros_like(first) if return_logits else None)

  def body(state, key):
    carry, tok, done = state
    if eos is None:  # rows never finish: no branch
      *state, logits = live(carry, tok, done, key)
    else:
      *state, logits = jax.lax.cond(jnp.all(done), finished, live, carry, tok,
                                    done, key)
    return tuple(state), (state[1], logits)

  if max_new_tokens == 1:
    ids, all_logits = tok[:, None], first[:, None]
  else:
    _, (rest, later) = jax.lax.scan(body, (carry, tok, done), keys[1:])
    ids = jnp.concatenate([tok[:, None], rest.T], axis=1)
    all_logits = (jnp.concatenate([first[:, None], jnp.swapaxes(later, 0, 1)],
                                  axis=1) if return_logits else None)
  return (ids, all_logits) if return_logits else ids
