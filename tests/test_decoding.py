"""The one decoding loop (mtjax.models.decoding) and the generators built on it."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtjax import methods
from mtjax.evaluation import evaluate
from mtjax.methods import full
from mtjax.methods import soft_injection as si
from mtjax.models import decoder, decoding, sharding

V = 64
NEW = 6
LENGTHS = {"inputs": 8, "targets": NEW}


# ------------------------------------------------------------ toy steps --


def _counting(batch=3, calls=None):
  """Row r emits (3 r + i) % V at step i; `calls` records each step call."""
  rows = jnp.arange(batch)

  def logits(count):
    return jax.nn.one_hot((3 * rows + count) % V, V) * 10.0

  def prefill():
    return logits(0), jnp.int32(0)

  def step(count, tok):
    del tok
    if calls is not None:
      jax.debug.callback(lambda: calls.append(1))
    return logits(count + 1), count + 1

  return prefill, step


def test_sampling_is_reproducible_per_key_and_greedy_at_zero():
  table = jax.random.normal(jax.random.key(0), (4, V))
  prefill = lambda: (table, jnp.int32(0))  # noqa: E731
  step = lambda c, tok: (table, c + 1)  # noqa: E731
  # A traced temperature (one compile): 0 is greedy, > 0 samples.
  run = jax.jit(lambda t, k: decoding.decode(
      prefill, step, 12, temperature=t, rng=jax.random.key(k)))
  a, a2, b = (np.asarray(run(1.0, k)) for k in (1, 1, 2))
  np.testing.assert_array_equal(a, a2)
  assert (a != b).any()
  assert a.shape == (4, 12) and a.dtype == np.int32
  assert ((0 <= a) & (a < V)).all() and len(np.unique(a)) > 4
  greedy = np.broadcast_to(np.argmax(table, -1)[:, None], (4, 12))
  np.testing.assert_array_equal(run(0.0, 1), greedy)
  # A Python temperature picks the same tokens without the argmax branch.
  np.testing.assert_array_equal(decoding.decode(
      prefill, step, 12, temperature=1.0, rng=jax.random.key(1)), a)
  np.testing.assert_array_equal(decoding.decode(prefill, step, 12), greedy)
  with pytest.raises(ValueError, match="rng"):
    decoding.decode(prefill, step, 3, temperature=0.5)
  with pytest.raises(ValueError, match="max_new_tokens"):
    decoding.decode(prefill, step, 0)
  assert decoding.decode(prefill, step, 1).shape == (4, 1)


def test_eos_masks_rows_and_a_finished_batch_stops_calling_step():
  # Rows 0 and 1 reach token 5 at steps 5 and 2; row 2 (6, 7, ...) never does.
  prefill, step = _counting(3)
  out = np.asarray(decoding.decode(prefill, step, 10, eos_ids=5, pad_id=99))
  np.testing.assert_array_equal(out[0], [0, 1, 2, 3, 4, 5] + [99] * 4)
  np.testing.assert_array_equal(out[1], [3, 4, 5] + [99] * 7)
  np.testing.assert_array_equal(out[2], np.arange(6, 16))
  # Several EOS ids, given as a traced array.
  got = jax.jit(lambda eos: decoding.decode(prefill, step, 10, eos_ids=eos,
                                            pad_id=99))(jnp.array([4, 9]))
  np.testing.assert_array_equal(got[0], [0, 1, 2, 3, 4] + [99] * 5)
  np.testing.assert_array_equal(got[2], [6, 7, 8, 9] + [99] * 6)
  # Once rows 0 and 1 are the only rows and both ended (step 5), the
  # remaining 4 steps are skipped.
  calls = []
  prefill, step = _counting(2, calls)
  out = np.asarray(decoding.decode(prefill, step, 10, eos_ids=(5,), pad_id=0))
  jax.effects_barrier()
  np.testing.assert_array_equal(out[1], [3, 4, 5] + [0] * 7)
  assert len(calls) == 5
  assert decoding.eos_tuple(None) is None and decoding.eos_tuple(2) == (2,)
  assert decoding.eos_tuple([1, 2]) == (1, 2)


# ---------------------------------------------------- tiny decoder model --


@functools.lru_cache(maxsize=1)
def _tiny():
  cfg = decoder.DecoderConfig(
      model_type="llama", vocab_size=V, hidden_size=32, intermediate_size=48,
      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
      pad_token_id=0, eos_token_id=1)
  model = decoder.Model(cfg)
  params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  # Large weights, so greedy decoding does not collapse into one token.
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  leaves = [x + (0.4 * jax.random.normal(k, x.shape) if x.ndim == 2 else 0.0)
            for x, k in zip(leaves, keys)]
  return model, jax.tree.unflatten(tree, leaves)


def _left_padded(seed=0, length=7):
  r = np.random.RandomState(seed)
  ids = r.randint(3, V, (3, length)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, :2] = 0
  mask[2, :4] = 0
  ids[mask == 0] = 0
  return ids, mask


@functools.partial(jax.jit, static_argnames=("model", "n"))
def _recompute(model, params, ids, mask, n, eos, temperature, key):
  """decoding.decode whose step reruns the whole forward over a buffer.

  eos (k,) and temperature are traced, so every call shares one compile.
  """
  b, p = ids.shape
  seq0 = jnp.concatenate([ids, jnp.zeros((b, n), jnp.int32)], 1)
  m0 = jnp.concatenate([mask, jnp.zeros((b, n), jnp.int32)], 1)

  def at(s, m, t):
    logits = model.apply({"params": params}, s, m)
    return jax.lax.dynamic_index_in_dim(logits, t, 1, keepdims=False)

  def prefill():
    return at(seq0, m0, p - 1), (seq0, m0, jnp.int32(p))

  def step(carry, tok):
    s, m, t = carry
    s = jax.lax.dynamic_update_slice(s, tok[:, None], (0, t))
    m = jax.lax.dynamic_update_slice(m, jnp.ones((b, 1), jnp.int32), (0, t))
    return at(s, m, t), (s, m, t + 1)

  return decoding.decode(prefill, step, n, temperature=temperature, rng=key,
                         eos_ids=eos, pad_id=0)


def test_cached_decoder_equals_recompute_path():
  model, params = _tiny()
  ids, mask = _left_padded()
  recompute = lambda eos=-1, t=0.0, key=jax.random.key(0): np.asarray(  # noqa: E731
      _recompute(model, params, ids, mask, NEW, jnp.array([eos]), t, key))
  cached = np.asarray(decoder.generate(model, params, ids, mask, NEW))
  assert len(np.unique(cached)) > 3, cached
  np.testing.assert_array_equal(cached, recompute())
  # EOS: a token row 0 emits mid-way; pad (0) afterwards, on both paths.
  eos = int(cached[0, 2])
  got = np.asarray(decoder.generate(model, params, ids, mask, NEW, eos_id=eos))
  np.testing.assert_array_equal(got, recompute(eos))
  assert (got[0, 3:] == 0).all()
  # Sampling: the same key gives the same tokens on both paths.
  key = jax.random.key(3)
  hot = np.asarray(decoder.generate(model, params, ids, mask, NEW,
                                    temperature=1.5, rng=key))
  np.testing.assert_array_equal(hot, recompute(t=1.5, key=key))
  assert (hot != cached).any()


def test_jitted_generators_refuse_interceptors():
  model, params = _tiny()
  ids, mask = _left_padded()
  passthrough = lambda next_fun, args, kwargs, ctx: next_fun(*args, **kwargs)  # noqa: E731
  with nn.intercept_methods(passthrough):
    with pytest.raises(RuntimeError, match="intercept_methods"):
      decoder.generate(model, params, ids, mask, NEW)
    with pytest.raises(RuntimeError, match="intercept_methods"):
      si.generate_plain(model, params, ids, mask, NEW)


# --------------------------------------------------- evaluation + LoRA --


@functools.partial(jax.jit, static_argnames=("method", "model"))
def _last_logits(method, model, params, seq, last):
  return method.apply(model, params, {"input_ids": seq})[0, last]


def _manual_greedy(method, model, params, prompt, n):
  """Unbatched argmax loop through method.apply, one row at a time.

  The row sits in a fixed 16-slot buffer (one compile); causal attention
  makes the slots after `last` invisible.
  """
  seq, out = [0] + list(prompt), []  # eval's decoder buffer starts with 0
  for _ in range(n):
    buf = jnp.array([seq + [0] * (16 - len(seq))])
    out.append(int(jnp.argmax(_last_logits(method, model, params, buf,
                                           len(seq) - 1))))
    seq.append(out[-1])
  return out


def test_evaluation_greedy_through_lora():
  model, base = _tiny()
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  lora = methods.build({"name": "lora", "rank": 4, "alpha": 8.0,
                        "targets": [r".*self_attn/(q_proj|v_proj|o_proj)"]})
  lp = nn.unbox(lora.init(jax.random.key(2), model, base))
  leaves, tree = jax.tree_util.tree_flatten_with_path(lp)
  keys = jax.random.split(jax.random.key(5), len(leaves))
  lp = jax.tree.unflatten(tree, [
      jax.random.normal(k, x.shape) if "lora_b" in jax.tree_util.keystr(path)
      else x for (path, x), k in zip(leaves, keys)])
  params = {"base": base, **lp}
  r = np.random.RandomState(7)
  prompts = [r.randint(3, V, r.randint(3, 8)).tolist() for _ in range(3)]

  def run(method, p, eos_id=None):
    greedy = evaluate.make_greedy(method, model, NEW, eos_id=eos_id)
    with sharding.use_mesh(mesh):
      return evaluate.generate_rows(greedy, model, p, prompts, LENGTHS, NEW,
                                    batch_size=4, mesh=mesh,
                                    eos_id=-1 if eos_id is None else eos_id)

  got = run(lora, params)
  plain = run(full.FullFineTuning(), {"base": base})
  assert got != plain, "nonzero LoRA B must change the greedy output"
  want = [_manual_greedy(lora, model, params, p, NEW) for p in prompts]
  assert got == want
  assert plain == [_manual_greedy(full.FullFineTuning(), model,
                                  {"base": base}, p, NEW) for p in prompts]
  # With an EOS (a token row 0 emits mid-way): every row is cut at its first
  # EOS, the same prefix as without one.
  eos = want[0][2]
  cut = [w[:w.index(eos)] if eos in w else w for w in want]
  assert run(lora, params, eos_id=eos) == cut
