"""Mixed-adapter batches: each example its own LoRA or (IA)3 adapter.

Through the user path: `methods.build` with num_experts = E, the trainer's
loss (`trainer.loss_and_metrics`, what its step differentiates) and
evaluation's KV-cached greedy decoding (`evaluate.make_greedy`, the loop of
mtjax.models.decoding). A batch whose rows use adapters [3, 0, 3, 1] of 5
must equal running each row alone with its own single adapter: loss,
gradients of the stacked adapters (unused adapters 2 and 4 get exactly
zero), logits and generated tokens.

Tolerance 1e-5 of the largest entry: f32; the mixed batch sums a module's
rows in other groupings than a one-row batch (and 'grouped' / the Pallas
kernels in another order than the single adapter's two matmuls).
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtjax import methods
from mtjax.evaluation import evaluate
from mtjax.models import decoder
from mtjax.training import trainer

INDEX = np.array([3, 0, 3, 1], np.int32)
NUM_E = 5
TARGETS = (r".*self_attn/(q_proj|v_proj)", r".*mlp/down_proj")
TOL = 1e-5


def _config(name, num_e=0, **extra):
  if name == "lora":
    return dict(name="lora", rank=4, alpha=8.0, targets=TARGETS,
                num_experts=num_e, **extra)
  return dict(name="ia3", num_experts=num_e)


# Compiled without LLVM optimisations: compilation dominates these tests.
FAST_COMPILE = {"xla_backend_optimization_level": 0,
                "xla_llvm_disable_expensive_passes": True}


def _fast(fn, *args):
  """fn (jitted) compiled with FAST_COMPILE for args."""
  return fn.lower(*args).compile(compiler_options=FAST_COMPILE)


def _model():
  """A one-layer Llama (compilation dominates: one layer halves it)."""
  return decoder.Model(decoder.config_from_hf(dict(
      model_type="llama", vocab_size=64, hidden_size=32,
      intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
      num_key_value_heads=2, pad_token_id=0, eos_token_id=1)))


def _normal(rs, shapes, offset=0.0):
  """Random f32 leaves shaped like `shapes`: numpy, nothing to compile."""
  return jax.tree.map(lambda v: jnp.asarray(
      offset + rs.normal(0, 0.3, v.shape), jnp.float32), shapes)


@functools.lru_cache(maxsize=None)
def _setup(name):
  """(model, base, stacked adapter params, batch), random: norm scales and
  (IA)3 vectors around 1, weights and LoRA factors around 0."""
  model = _model()
  rs = np.random.RandomState(0)
  tokens = rs.randint(2, 64, (len(INDEX), 8)).astype(np.int32)
  batch = dict(decoder_input_tokens=tokens,
               decoder_target_tokens=np.roll(tokens, -1, axis=1),
               decoder_loss_weights=np.ones_like(tokens, np.float32),
               task_index=np.zeros(len(INDEX), np.int32),
               adapter_index=INDEX)
  shapes = jax.eval_shape(lambda: nn.unbox(model.init(
      jax.random.key(0), input_ids=tokens)["params"]))
  base = jax.tree.map(lambda v: jnp.asarray(
      (v.ndim == 1) + rs.normal(0, 0.3, v.shape), jnp.float32), shapes)
  stacked = methods.build(_config(name, NUM_E))
  shapes = jax.eval_shape(lambda: nn.unbox(stacked.init(None, model)))
  params = _normal(rs, shapes, 1.0 if name == "ia3" else 0.0)
  return model, base, params, batch


def _loss_grads(method, model, base, params, batch):
  """(summed token NLL, its gradient) by the trainer's loss, jitted."""
  flat = trainer.flatten({"base": base, **params})
  trainable, frozen = trainer.split_trainable(flat, method.trainable)
  fn = jax.jit(jax.value_and_grad(lambda t, b: trainer.loss_and_metrics(
      method, model, "decoder", 1, t, frozen, b, None)[0]))
  return _fast(fn, trainable, batch), trainable, frozen


def _rel(x, y):
  return float(np.max(np.abs(np.asarray(x) - np.asarray(y)))
               / max(np.max(np.abs(np.asarray(y))), 1e-30))


def _row(batch, i):
  return {k: v[i:i + 1] for k, v in batch.items() if k != "adapter_index"}


@pytest.mark.parametrize("name", ["lora", "ia3"])
def test_mixed_batch_loss_and_gradients_equal_separate_runs(name):
  """impl 'auto' (LoRA: a per-example gather on CPU); the other impls'
  gradients: tests/test_pallas_kernels.py, tests/test_routing.py."""
  model, base, params, batch = _setup(name)
  mixed = methods.build(_config(name, NUM_E))
  single = methods.build(_config(name))
  fn, trainable, frozen = _loss_grads(mixed, model, base, params, batch)
  loss, grads = fn(trainable, batch)
  one_fn = None
  want_loss, want = 0.0, jax.tree.map(np.zeros_like, trainable)
  for i, e in enumerate(INDEX):
    own = jax.tree.map(lambda x, e=e: np.asarray(x)[e], params)
    if one_fn is None:
      one_fn, _, _ = _loss_grads(single, model, base, own, _row(batch, i))
    one = trainer.split_trainable(trainer.flatten(own), single.trainable)[0]
    l_i, g_i = one_fn(one, _row(batch, i))
    want_loss += float(l_i)
    for k, g in g_i.items():
      want[k][e] += np.asarray(g)
  assert abs(float(loss) - want_loss) <= TOL * abs(want_loss)
  for k in grads:
    assert _rel(grads[k], want[k]) < TOL, k
    assert np.all(np.asarray(grads[k])[[2, 4]] == 0), k   # unused adapters


def test_mixed_lora_logits_across_impls():
  """The kernels through LoRA's mixed-adapter path ('sgmv', 'bgmv' are the
  GPU kernels, interpreted here; 'gather', the CPU default, is tested with
  gradients above) give the logits of the dense reference."""
  model, base, params, batch = _setup("lora")
  inputs = dict(input_ids=batch["decoder_input_tokens"], adapter_index=INDEX)

  def logits(impl):
    method = methods.build(_config("lora", NUM_E, impl=impl))
    fn = jax.jit(lambda p: method.apply(model, p, inputs))
    return _fast(fn, {"base": base, **params})({"base": base, **params})
  want = logits("dense")
  for impl in ("grouped", "sgmv", "bgmv"):
    assert _rel(logits(impl), want) < TOL, impl


@pytest.mark.parametrize("name", ["lora", "ia3"])
def test_mixed_batch_generation_equals_separate_runs(name):
  """KV-cached greedy decoding of a mixed batch (prefill: all prompt tokens;
  steps: one token per row, routed per example) = each row alone."""
  model, base, params, _ = _setup(name)
  rs = np.random.RandomState(3)
  prompts = [rs.randint(3, 64, n).tolist() for n in (3, 8, 1, 6)]
  feats, start = evaluate.generation_batch(
      prompts, "decoder", {"inputs": 8, "targets": 5}, 5)
  mixed = methods.build(_config(name, NUM_E))
  args = ({"base": base, **params}, {**feats, "adapter_index": INDEX}, start)
  ids, logits = _fast(evaluate.make_greedy(
      mixed, model, 5, cached=True, return_logits=True), *args)(*args)
  single = methods.build(_config(name))
  one_fn = None
  for i, e in enumerate(INDEX):
    own = jax.tree.map(lambda x, e=e: np.asarray(x)[e], params)
    args = ({"base": base, **own}, {k: v[i:i + 1] for k, v in feats.items()},
            start[i:i + 1])
    one_fn = one_fn or _fast(evaluate.make_greedy(
        single, model, 5, cached=True, return_logits=True), *args)
    want_ids, want_logits = one_fn(*args)
    np.testing.assert_array_equal(np.asarray(ids[i]), np.asarray(want_ids[0]))
    assert _rel(logits[i], want_logits[0]) < TOL
  assert len({tuple(np.asarray(r)) for r in ids}) > 1   # adapters differ
