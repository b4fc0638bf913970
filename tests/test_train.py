"""Trainer: frozen leaves, mesh independence, grad accumulation, suite learning."""
import jax
import ml_collections
import numpy as np
import pytest

from mtjax.models import sharding
from mtjax.methods import full
from mtjax.training import fit, trainer

TINY_T5 = dict(hf_path="", arch="t5", dtype="float32", vocab_size=259,
               d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2,
               num_decoder_layers=2, feed_forward_proj="gated-gelu",
               dropout_rate=0.0)
TINY_LLAMA = dict(hf_path="", arch="llama", dtype="float32", vocab_size=259,
                  hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2,
                  pad_token_id=0, eos_token_id=1, bos_token_id=1)


def _batch(kind, seed, b=8, li=12, lt=6):
  """A random feature-converter batch with ragged padding."""
  r = np.random.default_rng(seed)
  def ragged(length):
    x = r.integers(3, 259, (b, length)).astype(np.int32)
    n = r.integers(length // 2, length + 1, b)
    return np.where(np.arange(length) < n[:, None], x, 0).astype(np.int32)
  tgt = ragged(lt if kind == "encoder_decoder" else li + lt)
  out = {"decoder_target_tokens": tgt,
         "decoder_input_tokens": np.pad(tgt[:, :-1], ((0, 0), (1, 0))),
         "decoder_loss_weights": (tgt > 0).astype(np.int32),
         "task_index": r.integers(0, 3, b).astype(np.int32)}
  if kind == "encoder_decoder":
    out["encoder_input_tokens"] = ragged(li)
  else:
    out["decoder_causal_attention"] = np.zeros_like(tgt)
  return out


def _setup(model_cfg, mesh, pattern=None, opt="adamw", grad_accum=1):
  model, base = trainer.build_model(ml_collections.ConfigDict(model_cfg),
                                    jax.random.key(0), mesh)
  method = full.FullFineTuning()
  flat, sh = trainer.init_params(model, method, jax.random.key(1), mesh, base)
  params, frozen = trainer.split_trainable(flat, pattern or method.trainable)
  tx, _ = trainer.make_optimizer(ml_collections.ConfigDict(dict(
      name=opt, learning_rate=1e-2, warmup_steps=2, decay="cosine",
      grad_clip=1.0)), 10)
  state, state_sh = trainer.init_state(tx, params, {k: sh[k] for k in params},
                                       mesh)
  step = trainer.jit_train_step(
      trainer.make_train_step(method, model, tx, 3, grad_accum=grad_accum),
      state_sh, {k: sh[k] for k in frozen}, mesh)
  return model, state, frozen, step


def _run(model_cfg, mesh, steps=3, **kw):
  model, state, frozen, step = _setup(model_cfg, mesh, **kw)
  kind = trainer.model_kind(model)
  losses = []
  with sharding.use_mesh(mesh):
    for i in range(steps):
      state, m = step(state, frozen, trainer.put_batch(_batch(kind, i), mesh))
      losses.append(float(m["loss"]))
  return state, frozen, losses, m


@pytest.mark.parametrize("opt", ["adamw", "adafactor"])
def test_frozen_leaves_bit_identical_and_without_optimizer_state(opt):
  mesh = sharding.make_mesh((-1, 1, 1))
  pattern = r"base/decoder/.*"
  _, state0, frozen0, _ = _setup(TINY_T5, mesh, pattern=pattern, opt=opt)
  before = {k: np.asarray(v) for k, v in frozen0.items()}
  trained0 = {k: np.asarray(v) for k, v in state0["params"].items()}
  state, frozen, _, _ = _run(TINY_T5, mesh, pattern=pattern, opt=opt)
  assert frozen and all(k.startswith("base/decoder/") for k in state["params"])
  assert not any(k.startswith("base/decoder/") for k in frozen)
  for k, v in frozen.items():
    np.testing.assert_array_equal(np.asarray(v), before[k], err_msg=k)
  # The trainable part did move, so the freeze is not vacuous.
  assert any(not np.array_equal(np.asarray(v), trained0[k])
             for k, v in state["params"].items())
  # No optimizer state anywhere for a frozen path.
  opt_paths = {jax.tree_util.keystr(p) for p, _ in
               jax.tree_util.tree_leaves_with_path(state["opt_state"])}
  for k in frozen:
    assert not any(k in p for p in opt_paths), k
  assert any("base/decoder/" in p for p in opt_paths)


def test_trainable_regex_matching_nothing_is_an_error():
  with pytest.raises(ValueError, match="matches no parameter"):
    trainer.split_trainable({"base/a/kernel": 0}, "lora/.*")


@pytest.mark.parametrize("model_cfg", [TINY_T5, TINY_LLAMA],
                         ids=["t5", "llama"])
def test_2x2x2_mesh_matches_one_device(model_cfg):
  """8 fake devices (data 2, fsdp 2, tensor 2) vs mesh (1,1,1) on one device.

  Same init, same batches: the per-step losses agree to 1e-5 relative (f32;
  only the summation order of sharded reductions differs).
  """
  assert jax.device_count() == 8, "tests/conftest.py sets 8 CPU devices"
  one = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  eight = sharding.make_mesh((2, 2, 2))
  s1, _, l1, _ = _run(model_cfg, one)
  s8, _, l8, _ = _run(model_cfg, eight)
  np.testing.assert_allclose(l8, l1, rtol=1e-5)
  specs = {str(v.sharding.spec) for v in s8["params"].values()}
  assert any("tensor" in s for s in specs) and any("fsdp" in s for s in specs)
  for k in s1["params"]:
    np.testing.assert_allclose(np.asarray(s8["params"][k]),
                               np.asarray(s1["params"][k]), atol=2e-5,
                               err_msg=k)


def test_grad_accumulation_matches_full_batch():
  mesh = sharding.make_mesh((2, 1, 1), devices=jax.devices()[:2])
  s1, _, l1, _ = _run(TINY_T5, mesh, grad_accum=1)
  s4, _, l4, _ = _run(TINY_T5, mesh, grad_accum=4)
  np.testing.assert_allclose(l4, l1, rtol=1e-5)
  for k in s1["params"]:
    np.testing.assert_allclose(np.asarray(s4["params"][k]),
                               np.asarray(s1["params"][k]), atol=2e-5)


def test_per_task_metrics_sum_to_totals():
  mesh = sharding.make_mesh((-1, 1, 1))
  _, _, losses, m = _run(TINY_T5, mesh, steps=1)
  tokens = np.asarray(m["tokens"])
  assert tokens.shape == (3,) and tokens.sum() > 0
  np.testing.assert_allclose(np.asarray(m["nll"]).sum() / tokens.sum(),
                             losses[-1], rtol=1e-5)


def test_schedule_warmup_then_decay():
  sched = trainer.make_schedule(ml_collections.ConfigDict(dict(
      learning_rate=1.0, warmup_steps=10, decay="cosine", end_factor=0.1)),
                                110)
  assert float(sched(0)) == 0.0 and abs(float(sched(10)) - 1.0) < 1e-6
  assert abs(float(sched(110)) - 0.1) < 1e-6
  assert float(sched(60)) < 1.0


def test_suite_training_learns():
  """Held-in mixture loss falls well below its start; then a rank task is learned.

  Measured in stand-alone runs of the same set-up (d_model 64, batch 32, AdamW
  3e-3): held-in loss 5.62 -> 2.23 (mean of the first vs last 10 of 100
  steps); sentiment rank-classification accuracy 0.70 after 100 steps on that
  task from scratch (chance 0.5; with 100 examples 0.65 is 3 standard errors
  above chance).
  """
  from mtjax import data  # pylint: disable=g-import-not-at-top
  from mtjax.evaluation import evaluate  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  cfg = dict(TINY_T5, d_model=64, d_kv=16, d_ff=128, tie_word_embeddings=True)
  model, base = trainer.build_model(ml_collections.ConfigDict(cfg),
                                    jax.random.key(0), mesh)
  method = full.FullFineTuning()
  flat, sh = trainer.init_params(model, method, jax.random.key(1), mesh, base)
  params, frozen_params = trainer.split_trainable(flat, method.trainable)
  vocab = data.vocabulary("byte")
  data.register(vocab)
  lengths = {"inputs": 64, "targets": 16}

  def train(state_params, mixture, steps):
    batches = data.train_batches(mixture, vocab, lengths, 32,
                                 "encoder_decoder", seed=0)
    fitter = fit.Fitter(method, model, mesh, ml_collections.ConfigDict(dict(
        name="adamw", learning_rate=3e-3, warmup_steps=20, decay="cosine",
        end_factor=0.1, b2=0.98, grad_clip=1.0)), steps,
                        num_tasks=len(batches.task_names))
    losses = []
    with sharding.use_mesh(mesh):
      state, frozen = fitter.init({**state_params, **frozen_params}, sh)
      state, _ = fitter.run(state, frozen, batches, on_step=lambda d, s, m:
                            losses.append(float(m["loss"])))
    return state["params"], losses

  params, losses = train(params, "held_in", 100)
  first, last = np.mean(losses[:10]), np.mean(losses[-10:])
  assert last < 0.5 * first, (first, last)
  params, _ = train(params, "sentiment", 100)
  examples = data.eval_examples("sentiment", vocab, max_examples=100)
  with sharding.use_mesh(mesh):
    metrics, _ = evaluate.rank_classification(
        evaluate.make_scorer(method, model), model, trainer.unflatten(params),
        examples, lengths, 64, mesh)
  assert metrics["accuracy"] >= 0.65, metrics
