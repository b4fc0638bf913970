"""Soft injection of task embeddings (mtjax/methods/soft_injection.py).

Exactness checks run on a tiny random Llama-style decoder; the behavioural
checks run on a small decoder trained here, once per module, on the bundled
suite in MetaICL format (mtjax.experiments.soft_injection.train_testbed).
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtjax import data, methods
from mtjax.data import suite
from mtjax.evaluation import analysis
from mtjax.experiments import soft_injection as sa
from mtjax.methods import soft_injection as si
from mtjax.models import decoder, t5

HELD_OUT = ("is_palindrome", "add_compare")
SEED = 1     # test bed init and batches, embedding prompts, alpha batches
SHOTS = 3
MAX_LEN = 96
# The trained test bed (~30-50 s on 2 CPU cores): see `bed` and
# test_fitted_soft_injection_lowers_held_out_first_token_loss for what it
# reliably shows and the measurements behind the margins.
TESTBED = dict(steps=300, batch_size=16, max_len=MAX_LEN, max_shots=SHOTS,
               remap_prob=0.5, learning_rate=3e-3, seed=SEED,
               model_kwargs=dict(hidden=64, layers_=3, heads=4, mlp=128))
ALPHA = dict(steps=100, learning_rate=0.2, batch_size=4, eval_every=10,
             seed=SEED)
INJECTION_MARGIN = 0.05  # zero-shot - fitted injection; measured min 0.096
FIT_MARGIN = 0.035       # alpha 0.5 - fitted injection; measured min 0.072


def _tiny():
  cfg = decoder.DecoderConfig(vocab_size=40, hidden_size=32,
                              intermediate_size=64, num_hidden_layers=3,
                              num_attention_heads=4, num_key_value_heads=2,
                              pad_token_id=0)
  model = decoder.Model(cfg)
  ids = jax.random.randint(jax.random.key(0), (3, 9), 3, 40)
  mask = jnp.asarray([[1] * 9, [0, 0] + [1] * 7, [0] * 5 + [1] * 4])
  params = model.init(jax.random.key(1), ids, mask)["params"]
  return model, params, {"input_ids": ids, "attention_mask": mask}


def _record(model, params, inputs, outer=None):
  """Every o-proj input split by head: {layer: (B, T, H, D)}, optionally
  under an outer (injecting) interceptor, which runs first."""
  seen = {}

  def edit(layer, heads):
    seen[layer] = heads
    return heads

  hook = si.head_hook(si.DECODER_PATTERN, model.config.num_attention_heads, edit)
  if outer is None:
    with nn.intercept_methods(hook):
      logits = model.apply({"params": params}, **inputs)
  else:
    with nn.intercept_methods(outer), nn.intercept_methods(hook):
      logits = model.apply({"params": params}, **inputs)
  return logits, seen


def test_alpha_zero_is_exact_and_alpha_one_replaces_one_head_only():
  model, params, inputs = _tiny()
  base, base_heads = _record(model, params, inputs)
  emb = jax.random.normal(jax.random.key(2), (3, 4, 8)) * 3.0
  out = si.apply_injected(model, params, inputs, emb, jnp.zeros((3, 4)))
  assert bool((out == base).all())

  layer, head = 1, 2
  alpha = jnp.zeros((3, 4)).at[layer, head].set(1.0)
  pos = si.last_positions(inputs["attention_mask"])
  np.testing.assert_array_equal(pos, [8, 8, 8])
  outer = si.head_hook(si.DECODER_PATTERN, 4, si.inject_edit(
      si.select(emb, None, 3), si.select(alpha, None, 3), pos))
  logits, heads = _record(model, params, inputs, outer)
  assert not np.allclose(logits, base)
  for l in range(3):
    got, ref = np.asarray(heads[l]), np.asarray(base_heads[l])
    if l < layer:
      np.testing.assert_array_equal(got, ref)
    elif l == layer:
      np.testing.assert_array_equal(got[:, 8, head], np.broadcast_to(
          np.asarray(emb[layer, head]), (3, 8)))
      keep = np.ones(got.shape, bool)
      keep[:, 8, head] = False
      np.testing.assert_array_equal(got[keep], ref[keep])
      assert not np.allclose(got[:, 8, head], ref[:, 8, head])
    else:  # causal: earlier real positions of later layers see no change
      # (padding rows attend uniformly to every key, so they are skipped)
      real = np.asarray(inputs["attention_mask"][:, :8]) == 1
      np.testing.assert_array_equal(got[:, :8][real], ref[:, :8][real])


def test_injection_position_follows_right_padding():
  model, params, inputs = _tiny()
  mask = jnp.asarray([[1] * 9, [1] * 6 + [0] * 3, [1] * 4 + [0] * 5])
  np.testing.assert_array_equal(si.last_positions(mask), [8, 5, 3])
  inputs = dict(inputs, attention_mask=mask)
  _, heads = si.capture(model, params, inputs)
  _, full = _record(model, params, inputs)
  for b, p in enumerate([8, 5, 3]):
    np.testing.assert_allclose(heads[b, 0], full[0][b, p], rtol=0, atol=0)


def test_task_embedding_is_mean_head_output_at_last_prompt_token():
  model, params, _ = _tiny()
  a = jnp.asarray([[5, 6, 7, 8, 9, 10, 11]])
  b = jnp.asarray([[12, 13, 14, 15]])
  prompts = {"input_ids": jnp.asarray([[5, 6, 7, 8, 9, 10, 11],
                                       [0, 0, 0, 12, 13, 14, 15]]),
             "attention_mask": jnp.asarray([[1] * 7, [0, 0, 0, 1, 1, 1, 1]])}
  emb = si.task_embedding(model, params, prompts, batch_size=1)
  assert emb.shape == (3, 4, 8)
  manual = []
  for ids in (a, b):  # unpadded, one prompt at a time
    _, heads = _record(model, params, {"input_ids": ids})
    manual.append(np.stack([np.asarray(heads[l][0, -1]) for l in range(3)]))
  np.testing.assert_allclose(emb, (manual[0] + manual[1]) / 2, atol=1e-6)


def test_method_object_save_load_and_bad_pattern(tmp_path):
  model, params, inputs = _tiny()
  emb = np.random.default_rng(0).normal(size=(2, 3, 4, 8)).astype(np.float32)
  method = si.SoftInjection(emb)
  tree = nn.unbox(method.init(jax.random.key(0), model, params))
  assert tree["soft_injection"]["alpha_logits"].shape == (2, 3, 4)
  idx = jnp.asarray([1, 0, 1])
  got = method.apply(model, {"base": params, **tree},
                     dict(inputs, adapter_index=idx))
  want = si.apply_injected(model, params, inputs, emb, jnp.full((2, 3, 4), 0.5),
                           task_index=idx)
  np.testing.assert_allclose(got, want, atol=1e-6)
  path = si.save(str(tmp_path), "t", emb[0], np.zeros((3, 4)), num_shots=3)
  e, a, meta = si.load(str(tmp_path), "t")
  np.testing.assert_array_equal(e, emb[0])
  assert a.shape == (3, 4) and meta["num_shots"] == 3 and path.endswith("t")
  si.save(str(tmp_path), "u", emb[1], np.ones((3, 4)))
  built = methods.build({"name": "soft_injection", "library": str(tmp_path),
                         "tasks": ["u", "t"]})
  np.testing.assert_array_equal(built.embeddings, emb[::-1])
  np.testing.assert_array_equal(built.alpha_logits[0], np.ones((3, 4)))
  with pytest.raises(ValueError, match="matches"):
    si.capture(model, params, inputs, pattern=r".*/nothing")


def test_first_token_loss_is_the_injected_first_target_cross_entropy():
  """The Fitter loss of fit_alpha: per row, -log p(first target) read at the
  prompt's last real token with the embedding injected there (alpha_of(0) =
  0.5 everywhere), as (B, 1) arrays with unit weights."""
  model, params, inputs = _tiny()
  emb = jax.random.normal(jax.random.key(2), (3, 4, 8))
  method = si.SoftInjection(emb)
  tree = nn.unbox(method.init(jax.random.key(0), model, params))
  mask = jnp.asarray([[1] * 9, [1] * 6 + [0] * 3, [0] * 5 + [1] * 4])
  batch = dict(inputs, attention_mask=mask, first_target=jnp.asarray([5, 6, 7]),
               task_index=jnp.zeros((3,), jnp.int32))
  nll, correct, weights = si.first_token_loss(
      method, model, "decoder", {"base": params, **tree}, batch, None)
  assert nll.shape == correct.shape == weights.shape == (3, 1)
  logits = si.apply_injected(model, params, dict(inputs, attention_mask=mask),
                             emb, jnp.full((3, 4), 0.5))
  last = jax.nn.log_softmax(logits[jnp.arange(3), jnp.asarray([8, 5, 8])])
  np.testing.assert_allclose(nll[:, 0], -last[jnp.arange(3), [5, 6, 7]],
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(weights, 1.0)


# ----------------------------------------------------------- trained test bed --


@pytest.fixture(scope="module")
def bed():
  """Test bed + per held-out task: (embedding, alpha fit) from train examples
  (embedding: the first 200; alpha fitted on 64, validated on the last 32).
  Every random choice is seeded (SEED)."""
  vocab = data.vocabulary("byte")
  tb = sa.train_testbed(vocab, **TESTBED)
  fitted = {}
  for task in HELD_OUT:
    train = suite.examples(task, "train")
    emb = si.task_embedding(tb.model, tb.params, sa.embedding_prompts(
        train[:200], 16, SHOTS, SEED, vocab.encode, MAX_LEN), batch_size=16)
    fit = sa.fit_alpha(
        tb.model, tb.params, emb,
        sa.first_token_batch(train[-96:-32], vocab.encode, MAX_LEN),
        sa.first_token_batch(train[-32:], vocab.encode, MAX_LEN), **ALPHA)
    fitted[task] = (emb, fit)
  return tb, fitted


def first_token_ce(logit_fn, prompts, evals, encode):
  """Mean cross-entropy of the first target token after each prompt."""
  batch = sa.scoring_batch(prompts, evals, encode)
  logits = np.asarray(jax.jit(logit_fn)(
      batch["input_ids"], batch["attention_mask"], batch["position"]),
                      np.float64)
  r, pos = np.arange(len(evals)), batch["position"]
  last = logits[r, pos]
  logp = last - np.logaddexp.reduce(last, axis=-1, keepdims=True)
  return float(-logp[r, batch["input_ids"][r, pos + 1]].mean())


def test_fitted_soft_injection_lowers_held_out_first_token_loss(bed):
  """Soft injection with alpha fitted on a held-out task's train rows lowers
  the first-answer-token cross-entropy on its validation rows (never fitted
  or used for selection), below zero-shot and below the same injection at
  the initial alpha (0.5 on every head); means over both yes/no tasks.

  What the test bed shows on CPU, as means over the two tasks, for this
  configuration in 16 runs: seeds 0-4 exactly as here (8 fake devices),
  seeds 0-2 also on 1 device and with alpha fitted 200/300 steps or scored
  on 200 validation rows (1 vs 8 devices and
  XLA_FLAGS=--xla_cpu_enable_fast_math=false move them by < 0.005):
    zero-shot - fitted injection   0.096 .. 0.21  (here, seed 1: 0.145)
    alpha 0.5 - fitted injection   0.072 .. 0.25  (here, seed 1: 0.075)
    zero-shot - 3-shot ICL        -0.21 .. 0.18   (not asserted: this small,
                                   briefly trained model does not reliably
                                   learn in context; nor does a task's own
                                   embedding reliably beat another task's)
  Per task the gains vary with the seed (0.001 .. 0.36), so only the means
  are asserted, each with about half of its smallest measured value as
  margin. A 500-step, 128-token test bed (the old one, 3x the time) gave
  0.21-0.37 and 0.20-0.25 over seeds 0-2.
  (The old version of this test asserted ICL < zero-shot and failed on
  another machine: float summation order there acts like another seed.)
  """
  tb, fitted = bed
  model, params, enc = tb.model, tb.params, tb.vocab.encode
  plain = lambda i, m, p: model.apply({"params": params}, i, m)

  def injected(emb, alpha):
    return lambda i, m, p: si.apply_injected(
        model, params, {"input_ids": i, "attention_mask": m}, emb, alpha,
        positions=p)

  zero, half, fitted_ce = [], [], []
  for task in HELD_OUT:
    emb, fit = fitted[task]
    train = suite.examples(task, "train")
    evals = suite.examples(task, "validation", max_examples=100)
    z = sa.few_shot_prompts(train, evals, 0, SEED, enc, MAX_LEN)
    alpha = si.alpha_of(fit.value)
    zero.append(first_token_ce(plain, z, evals, enc))
    half.append(first_token_ce(injected(emb, jnp.full_like(alpha, 0.5)), z,
                               evals, enc))
    fitted_ce.append(first_token_ce(injected(emb, alpha), z, evals, enc))
    print(f"{task}: first-token CE zero-shot {zero[-1]:.3f}, injected at "
          f"alpha 0.5 {half[-1]:.3f}, at fitted alpha {fitted_ce[-1]:.3f} "
          f"(best step {fit.best_step})")
  assert np.mean(zero) - np.mean(fitted_ce) > INJECTION_MARGIN, (zero,
                                                                  fitted_ce)
  assert np.mean(half) - np.mean(fitted_ce) > FIT_MARGIN, (half, fitted_ce)


def test_cached_injected_generation_equals_recomputation(bed):
  tb, fitted = bed
  emb, fit = fitted[HELD_OUT[0]]
  enc = tb.vocab.encode
  evals = suite.examples(HELD_OUT[0], "validation", max_examples=4)
  ids, mask = sa.left_pad([enc(ex["inputs"] + "\n") for ex in evals])
  alpha = si.alpha_of(fit.value)
  cached = si.generate(tb.model, tb.params, ids, mask, emb, alpha, 6)
  again = si.generate_uncached(tb.model, tb.params, ids, mask, emb, alpha, 6)
  np.testing.assert_array_equal(cached, again)
  plain = si.generate_plain(tb.model, tb.params, ids, mask, 6)
  np.testing.assert_array_equal(
      plain, decoder.generate(tb.model, tb.params, ids, mask, 6))
  # The injection reaches the generated tokens: not the plain model's.
  assert (np.asarray(cached) != np.asarray(plain)).any()


def test_prompt_tuning_kv_cost_counts_the_soft_prompt(bed):
  """generation_row's KV-cache column counts every cached position: a soft
  prompt of P vectors adds P positions to the prompt's tokens."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  tb, _ = bed
  lm = sa.LM(tb.model, tb.params, tb.vocab, {})
  evals = suite.examples(HELD_OUT[0], "validation", max_examples=4)
  fmt = sa.byte_format(tb.vocab.encode, tb.vocab)
  td = sa.TaskData(fmt, [], [], [], evals)
  prompts = [fmt.prompt([], ex) for ex in evals]
  cfg = ml_collections.ConfigDict(dict(max_new_tokens=4, eval_batch_size=4))
  plain = sa.generation_row(lm, td, prompts, si.plain_prefill, None, cfg)
  soft = jnp.zeros((5, tb.model.config.hidden_size))
  tuned = sa.generation_row(lm, td, prompts, sa.prompt_prefill, (soft,), cfg,
                            virtual_tokens=5)
  assert tuned["tokens"] == plain["tokens"]
  np.testing.assert_allclose(
      tuned["kv_mb"] - plain["kv_mb"], sa.kv_cache_mb(tb.model.config, 5))


def test_batched_per_example_injection_equals_separate_runs(bed):
  tb, fitted = bed
  enc = tb.vocab.encode
  (e0, f0), (e1, f1) = fitted[HELD_OUT[0]], fitted[HELD_OUT[1]]
  bank = jnp.stack([e0, e1])
  alphas = jnp.stack([si.alpha_of(f0.value),
                      si.alpha_of(f1.value)])
  evals = suite.examples(HELD_OUT[0], "validation", max_examples=4)
  ids, mask = sa.left_pad([enc(ex["inputs"] + "\n") for ex in evals])
  index = jnp.asarray([1, 0, 0, 1])
  inputs = {"input_ids": ids, "attention_mask": mask}
  logits = si.apply_injected(tb.model, tb.params, inputs, bank, alphas,
                             task_index=index)
  tokens = si.generate(tb.model, tb.params, ids, mask, bank, alphas, 5,
                       task_index=index)
  for b in range(4):
    one = {k: v[b:b + 1] for k, v in inputs.items()}
    t = int(index[b])
    np.testing.assert_allclose(
        logits[b:b + 1], si.apply_injected(tb.model, tb.params, one, bank[t],
                                           alphas[t]), atol=1e-5)
    np.testing.assert_array_equal(
        tokens[b:b + 1], si.generate(tb.model, tb.params, one["input_ids"],
                                     one["attention_mask"], bank[t], alphas[t], 5))


def test_heatmap_and_overlap(bed, tmp_path):
  _, fitted = bed
  alphas = {t: np.asarray(si.alpha_of(f.value))
            for t, (_, f) in fitted.items()}
  alphas["x"] = alphas[HELD_OUT[0]]
  png, text = analysis.write_analysis(alphas, str(tmp_path), k=3)
  assert (tmp_path / "alpha_heatmap.png").stat().st_size > 1000
  tasks, mat = analysis.jaccard_matrix(alphas, 3)
  assert mat[tasks.index("x"), tasks.index(HELD_OUT[0])] == 1.0
  assert "Jaccard" in text and png.endswith(".png")


def test_t5_decoder_self_attention_injection_at_step_zero():
  cfg = t5.T5Config(vocab_size=40, d_model=32, d_kv=8, num_heads=4, d_ff=64,
                    num_layers=2, num_decoder_layers=3, dropout_rate=0.0)
  model = t5.Model(cfg)
  ids = jax.random.randint(jax.random.key(0), (2, 6), 3, 40)
  inputs = {"input_ids": ids, "decoder_input_ids": jnp.zeros((2, 3), jnp.int32)}
  params = model.init(jax.random.key(1), **inputs)["params"]
  base = model.apply({"params": params}, **inputs)
  logits, heads = si.capture(model, params, inputs)  # decoder layers only
  assert heads.shape == (2, 3, 4, 8)
  np.testing.assert_array_equal(logits, base)
  emb = jax.random.normal(jax.random.key(2), (3, 4, 8))
  out = si.apply_injected(model, params, inputs, emb, jnp.zeros((3, 4)))
  assert bool((out == base).all())
  alpha = jnp.zeros((3, 4)).at[2, 1].set(1.0)
  outer = si.head_hook(si.T5_PATTERN, 4, si.inject_edit(
      si.select(emb, None, 2), si.select(alpha, None, 2),
      jnp.zeros((2,), jnp.int32)))
  with nn.intercept_methods(outer):
    _, got = si.capture(model, params, inputs)
  np.testing.assert_array_equal(got[:, 2, 1], np.broadcast_to(emb[2, 1], (2, 8)))
  np.testing.assert_array_equal(got[:, :2], heads[:, :2])
