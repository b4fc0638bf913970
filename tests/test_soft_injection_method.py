"""Soft injection as a method in the generic trainer and evaluation paths.

The user path: methods.build({'name': 'soft_injection', 'embeddings': ...})
-> trainer.init_params -> fit.Fitter (target_token_loss) and
evaluate.make_scorer / make_greedy / generate_rows on a tiny random Llama.
In every path the embedding must land on each row's last prompt token
(trainer.prompt_ends in training and scoring, the prompt end slot in greedy
decoding), never on a target token.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from mtjax import data, methods
from mtjax.data import pipeline
from mtjax.evaluation import evaluate
from mtjax.methods import soft_injection as si
from mtjax.models import sharding
from mtjax.training import fit, trainer

V = 64
LAYERS, HEADS, HEAD_DIM = 2, 4, 8
TINY_LLAMA = dict(hf_path="", arch="llama", dtype="float32", vocab_size=V,
                  hidden_size=HEADS * HEAD_DIM, intermediate_size=64,
                  num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                  num_key_value_heads=2, pad_token_id=0, eos_token_id=1,
                  bos_token_id=1)
LENGTHS = {"inputs": 8, "targets": 4}
# (prompt, target) rows of different lengths, one prompt filling the width.
ROWS = [([5, 9, 17], [20, 21]), ([33, 7, 12, 40, 41, 8, 9, 10], [3, 4, 5]),
        ([11], [30, 31, 32, 33]), ([6, 7, 8, 9, 10, 11], [12])]
ON = (1, 2)     # the (layer, head) injected at alpha = 1
BIG = 1e4       # sigmoid(+-BIG) is exactly 1 / 0 in float32


@pytest.fixture(scope="module")
def setup():
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  model, base = trainer.build_model(ml_collections.ConfigDict(TINY_LLAMA),
                                    jax.random.key(0), mesh)
  emb = np.asarray(jax.random.normal(jax.random.key(2),
                                     (LAYERS, HEADS, HEAD_DIM))) * 3.0
  method = methods.build({"name": "soft_injection", "embeddings": emb})
  flat, sh = trainer.init_params(model, method, jax.random.key(1), mesh, base)
  return mesh, model, base, emb, method, flat, sh


def _one_head(flat):
  """flat params with alpha = 1 on head ON only (0 everywhere else)."""
  logits = np.full((1, LAYERS, HEADS), -BIG, np.float32)
  logits[(0,) + ON] = BIG
  return {**flat, "soft_injection/alpha_logits": jnp.asarray(logits)}


def _batch(lm=False):
  out = evaluate.score_rows(ROWS, "decoder", LENGTHS, lm=lm)
  out["task_index"] = np.zeros(len(ROWS), np.int32)
  return out


def _prompt_ends():
  return np.array([len(i) for i, _ in ROWS], np.int32)


def _record_innermost(seen):
  """Interceptor recording every o-proj input split by head {layer: (B, T,
  H, D)} as the projection receives it: installed when the root module is
  called, so it runs after (inside) the method's own injecting interceptor."""
  hook = si.head_hook(si.DECODER_PATTERN, HEADS,
                      lambda layer, h: seen.setdefault(layer, h))

  def outer(next_fun, args, kwargs, context):
    if not context.module.path and context.method_name == "__call__":
      with nn.intercept_methods(hook):
        return next_fun(*args, **kwargs)
    return next_fun(*args, **kwargs)
  return outer


def test_prompt_end_is_where_the_first_target_is_predicted():
  """In seqio's prefix-LM layout (the pipeline's converter) and in the
  evaluation rows (score_rows, both vocab layouts), the last 1 of
  decoder_causal_attention indexes the last prompt token in input_ids, and
  its logits are scored against the first target token."""
  method = si.SoftInjection(np.zeros((1, 1, 1), np.float32))
  ex = {"inputs": [9, 4, 6, 3], "targets": [7, 8, 5], "task_ids": [2, 2, 2]}
  ds = tf.data.Dataset.from_tensors({k: tf.constant(v, tf.int32)
                                     for k, v in ex.items()})
  conv = pipeline.feature_converter("decoder", pack=False)(
      ds, task_feature_lengths={"inputs": 6, "targets": 4, "task_ids": 4})
  batches = [{k: v[None] for k, v in next(conv.as_numpy_iterator()).items()}]
  batches += [evaluate.score_rows([(ex["inputs"], ex["targets"])], "decoder",
                                  LENGTHS, lm=lm) for lm in (False, True)]
  for b in batches:
    end = int(trainer.prompt_ends(method, b)[0])
    assert end == len(ex["inputs"])
    assert b["decoder_input_tokens"][0, end] == ex["inputs"][-1]
    assert b["decoder_target_tokens"][0, end] == ex["targets"][0]
    assert np.argmax(b["decoder_loss_weights"][0]) == end
  packed = dict(batches[0], decoder_segment_ids=np.ones((1, 10), np.int32))
  with pytest.raises(ValueError, match="pack=False"):
    trainer.prompt_ends(method, packed)


def test_alpha_one_replaces_exactly_the_prompt_end_head(setup):
  """Scoring/training path (trainer.token_scores): in the injected layer
  exactly one (position, head) slice per row differs from the base model's
  o-proj input, at the row's last prompt token, and it equals the embedding;
  earlier layers are unchanged."""
  _, model, base, emb, method, flat, _ = setup
  params = trainer.unflatten(_one_head(flat))
  batch = jax.tree.map(jnp.asarray, _batch())
  inputs = data.model_inputs(batch, "decoder")

  @jax.jit
  def record(params, batch):
    plain, injected = {}, {}
    with nn.intercept_methods(_record_innermost(plain)):
      model.apply({"params": params["base"]}, **inputs)
    with nn.intercept_methods(_record_innermost(injected)):
      trainer.token_scores(method, model, params, batch, "decoder")
    return plain, injected
  plain, injected = record(params, batch)
  layer, head = ON
  ends = _prompt_ends()
  for lay in range(layer):
    np.testing.assert_array_equal(injected[lay], plain[lay])
  got, ref = np.asarray(injected[layer]), np.asarray(plain[layer])
  differs = np.argwhere((got != ref).any(-1))   # (row, position, head)
  np.testing.assert_array_equal(
      differs, [(b, e, head) for b, e in enumerate(ends)])
  for b, e in enumerate(ends):
    np.testing.assert_array_equal(got[b, e, head], emb[layer, head])


def test_scores_are_the_injection_at_the_prompt_end(setup):
  """make_scorer's target log-likelihoods equal those of apply_injected at
  positions = each row's last prompt token, and differ from the base model
  and from an injection at the last target token (the old behaviour)."""
  mesh, model, base, emb, method, flat, _ = setup
  params = trainer.unflatten(flat)              # alpha 0.5 on every head
  batch = _batch()
  with sharding.use_mesh(mesh):
    scores, counts = evaluate.make_scorer(method, model)(
        params, trainer.put_global_batch(batch, mesh))
  inputs = data.model_inputs(batch, "decoder")
  w = batch["decoder_loss_weights"]
  np.testing.assert_array_equal(counts, w.sum(-1))

  def target_logp(logits):
    logp = jax.nn.log_softmax(logits)
    tok = jnp.take_along_axis(logp, batch["decoder_target_tokens"][..., None],
                              -1)
    return (tok[..., 0] * w).sum(-1)

  @jax.jit
  def references(base):
    alpha = jnp.full((LAYERS, HEADS), 0.5)
    return [target_logp(x) for x in (
        si.apply_injected(model, base, inputs, emb, alpha,
                          positions=jnp.asarray(_prompt_ends())),
        model.apply({"params": base}, **inputs),
        si.apply_injected(model, base, inputs, emb, alpha))]
  want, plain, last = references(base)
  np.testing.assert_allclose(scores, want, rtol=1e-5, atol=1e-5)
  # Every row differs by far more than the 1e-5 agreement above (the
  # smallest gap was 9e-4 over three seeds: a random embedding can move one
  # row's score only a little).
  assert np.abs(scores - plain).min() > 1e-4
  assert np.abs(scores - last).min() > 1e-4


def test_greedy_generation_through_evaluate_equals_generate(setup):
  """evaluate.make_greedy/generate_rows (the prompt end slot passed as
  prompt_end_input; KV-cached, which tests/test_cached_generation.py checks
  against recomputation) gives soft_injection.generate's tokens, which
  differ from the plain model's."""
  mesh, model, base, emb, method, flat, _ = setup
  params = trainer.unflatten(flat)
  prompts = [i for i, _ in ROWS]
  new = 5
  greedy = evaluate.make_greedy(method, model, new)
  with sharding.use_mesh(mesh):
    got = evaluate.generate_rows(greedy, model, params, prompts, LENGTHS, new,
                                 len(prompts), mesh, eos_id=None, lm=True)
  width = max(len(p) for p in prompts)
  ids = np.array([[0] * (width - len(p)) + p for p in prompts], np.int32)
  mask = np.array([[0] * (width - len(p)) + [1] * len(p) for p in prompts],
                  np.int32)
  want = si.generate(model, base, ids, mask, emb,
                     jnp.full((LAYERS, HEADS), 0.5), new)
  np.testing.assert_array_equal(np.array(got), np.asarray(want))
  plain = si.generate_plain(model, base, ids, mask, new)
  assert (np.asarray(plain) != np.asarray(want)).any()


def test_trained_alpha_gets_the_prompt_end_gradient(setup):
  """target_token_loss's gradient w.r.t. alpha_logits equals that of the
  target NLL with the injection at the prompt end; a few Fitter steps move
  alpha."""
  mesh, model, base, emb, method, flat, sh = setup
  batch = _batch()
  inputs = data.model_inputs(batch, "decoder")
  w = jnp.asarray(batch["decoder_loss_weights"], jnp.float32)

  def loss(logits_param):
    params = trainer.unflatten({**flat,
                                "soft_injection/alpha_logits": logits_param})
    nll, _, weights = trainer.target_token_loss(method, model, "decoder",
                                                params, batch, None)
    return (nll * weights).sum()

  def reference(logits_param):
    logits = si.apply_injected(model, base, inputs, emb,
                               si.alpha_of(logits_param[0]),
                               positions=jnp.asarray(_prompt_ends()))
    logp = jax.nn.log_softmax(logits)
    tok = jnp.take_along_axis(logp, batch["decoder_target_tokens"][..., None],
                              -1)[..., 0]
    return -(tok * w).sum()
  start = flat["soft_injection/alpha_logits"]
  np.testing.assert_allclose(jax.jit(jax.grad(loss))(start),
                             jax.jit(jax.grad(reference))(start),
                             rtol=1e-4, atol=1e-6)

  fitter = fit.Fitter(method, model, mesh, ml_collections.ConfigDict(dict(
      name="adamw", learning_rate=0.1, decay="constant")), 3)
  losses = []
  with sharding.use_mesh(mesh):
    state, frozen = fitter.init(flat, sh)
    state, _ = fitter.run(state, frozen, iter([batch] * 3),
                          on_step=lambda d, s, m: losses.append(
                              float(m["loss"])))
  trained = np.asarray(state["params"]["soft_injection/alpha_logits"])
  assert np.abs(trained - np.asarray(start)).min() > 0.05
  assert losses[-1] < losses[0], losses


def test_a_bank_of_tasks_needs_each_rows_task(setup):
  """A bank of K > 1 task embeddings is never scored with task 0's for every
  row: without 'adapter_index' the scorer refuses; with it, each row scores
  as the single-task method of its own task."""
  mesh, model, base, emb, _, _, _ = setup
  other = emb[::-1] * -1.0
  bank = methods.build({"name": "soft_injection",
                        "embeddings": np.stack([emb, other])})
  flat, _ = trainer.init_params(model, bank, jax.random.key(1), mesh, base)
  params = trainer.unflatten(flat)
  batch = _batch()
  scorer = evaluate.make_scorer(bank, model)
  with sharding.use_mesh(mesh), pytest.raises(ValueError,
                                              match="adapter_index"):
    scorer(params, trainer.put_global_batch(batch, mesh))
  rows = np.array([1, 0, 1, 0], np.int32)
  with sharding.use_mesh(mesh):
    got, _ = scorer(params, trainer.put_global_batch(
        dict(batch, adapter_index=rows), mesh))
  for task, e in ((0, emb), (1, other)):
    single = methods.build({"name": "soft_injection", "embeddings": e})
    f, _ = trainer.init_params(model, single, jax.random.key(1), mesh, base)
    with sharding.use_mesh(mesh):
      want, _ = evaluate.make_scorer(single, model)(
          trainer.unflatten(f), trainer.put_global_batch(batch, mesh))
    np.testing.assert_allclose(np.asarray(got)[rows == task],
                               np.asarray(want)[rows == task], rtol=1e-5,
                               atol=1e-5)
