"""Routing baselines (mtjax.routing.baselines) through the path users take.

The method object -> the one fit loop (mtjax.training.fit.Fitter) ->
mtjax.evaluation.evaluate, on a tiny random Llama (1 layer, q/v projections
targeted) so every test runs in seconds:
  task_avg   weights from the prompts alone (gold targets never read);
  retrieval  one expert per example, chosen from its prompt: all answer
             choices of an example and every generated token use it;
  task_gate, Poly/MHR with 100 tasks: every task's row trains;
  Poly/MHR   relaxed-Bernoulli allocation in training, sigmoid in evaluation,
             per-head mixing, MHR-mu = the uniform average of the skills.
"""
import functools
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mtjax.evaluation import evaluate
from mtjax.experiments import phatgoose as pg
from mtjax.methods import lora as lora_lib
from mtjax.methods import transform
from mtjax.models import decoder, sharding
from mtjax.routing import baselines as rb
from mtjax.routing import experts as ex
from mtjax.routing import routed
from mtjax.training import fit

V = 64
LENGTHS = {"inputs": 8, "targets": 4}
LORA = lora_lib.LoRA(rank=2, alpha=4.0,
                     targets=(r".*self_attn/(q_proj|v_proj)",))


def _random(shapes, seed, scale=0.5, vectors=None):
  """numpy N(0, scale) arrays shaped like `shapes` (ShapeDtypeStructs);
  with `vectors`, 1-D leaves (norm scales) are that constant. Nothing to
  compile (after tests/test_cached_generation.py)."""
  r = np.random.RandomState(seed)
  return jax.tree.map(
      lambda x: (np.full(x.shape, vectors, np.float32)
                 if vectors is not None and len(x.shape) == 1 else
                 (scale * r.randn(*x.shape)).astype(np.float32)),
      nn.unbox(shapes))


@functools.lru_cache(maxsize=None)
def _model():
  """(model, base params): a 1-layer Llama with large random weights
  (greedy decoding does not collapse into one token)."""
  model = decoder.Model(decoder.DecoderConfig(
      model_type="llama", vocab_size=V, hidden_size=32, intermediate_size=48,
      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
      pad_token_id=0, eos_token_id=1))
  shapes = jax.eval_shape(lambda k: model.init(
      k, jnp.zeros((1, 4), jnp.int32)), jax.random.key(0))["params"]
  return model, _random(shapes, 0, scale=0.45, vectors=1.0)


def _mesh():
  return sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])


# Compiled without LLVM optimisations (as tests/test_cached_generation.py):
# the compile time dominates these tests.
FAST_COMPILE = {"xla_backend_optimization_level": 0,
                "xla_llvm_disable_expensive_passes": True}


def _fast(jitted):
  """A jitted function compiled with FAST_COMPILE on its first call (the
  tests call each with one set of shapes)."""
  compiled = []

  def call(*args):
    if not compiled:
      compiled.append(jitted.lower(*args).compile(
          compiler_options=FAST_COMPILE))
    return compiled[0](*args)
  return call


@functools.lru_cache(maxsize=None)
def _library(num_e):
  """Stacked library of num_e random experts (non-zero B) with random gates
  (after tests/test_routing.py)."""
  model, _ = _model()
  lib = ex.new_library()
  lora_shapes = jax.eval_shape(lambda: LORA.init(jax.random.key(0), model))
  gate_shapes = jax.eval_shape(
      lambda: ex.GateTraining(LORA).init_gates(model))
  for e in range(num_e):
    lib = ex.add_expert(lib, f"task{e}",
                        _random(lora_shapes, 100 + e)["lora"],
                        _random(gate_shapes, 200 + e, scale=1.0))
  return ex.stack_library(lib)


def _run():
  """What pg.Recorder / pg.input_batches read of a PHATGOOSE run."""
  model, _ = _model()
  config = ml_collections.ConfigDict(dict(
      eval=dict(batch_size=4, split="validation")))
  return types.SimpleNamespace(config=config, vocab=None, model=model,
                               kind="decoder", lengths=LENGTHS,
                               eval_lengths=LENGTHS, mesh=_mesh())


def _examples(seed, n=6):
  r = np.random.RandomState(seed)
  return [dict(input_ids=r.randint(3, V, 2 + i % 4).tolist(),
               target_ids=r.randint(3, V, 2 + i % 3).tolist())
          for i in range(n)]


def _optimizer(lr=1e-2):
  return ml_collections.ConfigDict(dict(name="adamw", learning_rate=lr,
                                        decay="constant"))


# ----------------------------------------------------------------- task_avg

def test_task_avg_weights_use_the_prompts_only():
  model, base = _model()
  stacked, run = _library(4), _run()
  router = routed.build_router("phatgoose", LORA, top_k=2)
  params = routed.routed_params(base, stacked, "phatgoose")
  recorder = pg.Recorder(run, router)
  exs = _examples(0)
  # The same prompts, other gold targets (other tokens and lengths).
  other = [dict(e, target_ids=t["target_ids"] + [5])
           for e, t in zip(exs, _examples(1), strict=True)]
  w = pg.task_avg_weights(recorder, params, exs, 4, 2)
  w_other = pg.task_avg_weights(recorder, params, other, 4, 2)
  assert set(w) == {k.rsplit("/", 1)[0] for k in transform.flatten(stacked)}
  for path, v in w.items():
    np.testing.assert_array_equal(v, w_other[path])
    assert (v > 0).sum() <= 2 and abs(v.sum() - 1) < 1e-5
  # The former recording (teacher-forced with the gold targets) reads them.
  def old(examples):
    recs = recorder.records(params, examples, prompts_only=False)
    return rb.task_level_weights([r for r, _ in recs], [i for _, i in recs],
                                 4, 2)
  before, before_other = old(exs), old(other)
  assert any(not np.array_equal(before[p], before_other[p]) for p in before)
  # Prompt-only rows: the last batch's padding rows are dropped, and the
  # records cover the 6 examples' prompt tokens (+ seqio's start slot).
  recs = recorder.records(params, exs, prompts_only=True)
  assert sum(i["input_ids"].shape[0] for _, i in recs) == 6
  assert sum(int(i["attention_mask"].sum()) for _, i in recs) == sum(
      len(e["input_ids"]) + 1 for e in exs)
  # The weights serve the fixed router, which evaluation scores with.
  fixed = routed.build_router("fixed", LORA, top_k=2)
  fixed_params = routed.routed_params(base, stacked, fixed, weights=w)
  choices = [dict(e, choice_ids=[[5, 6], [7]], label=0) for e in exs]
  scored = evaluate.score_choices(_fast(evaluate.make_scorer(fixed, model)),
                                  model, fixed_params, choices, LENGTHS, 8,
                                  run.mesh)
  assert all(np.isfinite(s).all() for s, _, _ in scored)


# ---------------------------------------------------------------- retrieval

def _retrieval(num_e=3):
  """(router, params): centroids = the embeddings of tokens 10, 20, 30, so a
  row of token 10 + e*10 is nearest expert e."""
  model, base = _model()
  stacked = _library(num_e)
  router = rb.RetrievalRouting(LORA, cached_decoding=True)
  table = base["model"]["embed_tokens"]["embedding"]
  cen = jnp.stack([table[10 * (e + 1)] for e in range(num_e)])
  params = dict(routed.routed_params(base, stacked, router,
                                     weights=np.ones(num_e)),
                retrieval={"centroids": cen})
  return router, params, stacked


def _prompt_expert(router, params, prompt):
  model, _ = _model()
  ids = np.array([prompt], np.int32)
  return int(np.argmax(router.choose(model, params, dict(
      input_ids=ids, attention_mask=np.ones_like(ids)))[0]))


def test_retrieval_routes_every_choice_of_an_example_to_its_prompt_expert():
  model, base = _model()
  router, params, stacked = _retrieval()
  # Long choices made of each expert's centroid token: pooled with the
  # prompt (the former behaviour), choice j goes to expert j.
  prompts = [[20, 5, 7], [30, 9, 30, 4], [10, 3]]
  choices = [[10] * 4, [20] * 4, [30] * 4]
  exs = [dict(input_ids=p, choice_ids=choices, label=0) for p in prompts]
  experts = [_prompt_expert(router, params, p) for p in prompts]
  assert experts == [1, 2, 0]
  # Records over the teacher-forced rows, with and without prompt_end.
  batch = evaluate.score_rows([(p, c) for p in prompts for c in choices],
                              "decoder", LENGTHS)
  inputs = pg.prompt_inputs(_run(), router, batch)
  rec_fn = jax.jit(lambda p, i: (lambda r: (router.apply(
      model, p, i, records=r), r)[1])({}))
  rec = rec_fn(params, inputs)
  idx = np.asarray(next(iter(rec.values()))["idx"])[..., 0]   # (9, T)
  np.testing.assert_array_equal(idx, np.repeat(experts, 3)[:, None]
                                * np.ones_like(idx))
  old = {k: v for k, v in inputs.items() if k != router.prompt_end_input}
  idx_old = np.asarray(next(iter(rec_fn(params, old).values()))["idx"])
  assert sorted(set(idx_old[:3, 0, 0].tolist())) == [0, 1, 2]
  # Through evaluation (token_scores gives prompt_end): the scores equal the
  # fixed router's with each example's prompt expert.
  mesh = _mesh()
  got = evaluate.score_choices(_fast(evaluate.make_scorer(router, model)),
                               model, params, exs, LENGTHS, 4, mesh)
  fixed = routed.build_router("fixed", LORA, top_k=1)
  fixed_score = _fast(evaluate.make_scorer(fixed, model))
  for ex_, e, (s, _, _) in zip(exs, experts, got, strict=True):
    want = evaluate.score_choices(
        fixed_score, model, routed.routed_params(
            base, stacked, fixed, weights=rb.one_hot(e, 3)),
        [ex_], LENGTHS, 4, mesh)[0][0]
    np.testing.assert_allclose(s, want, rtol=1e-5, atol=1e-5)


def test_retrieval_generation_routes_once_from_the_prompt():
  model, base = _model()
  router, params, stacked = _retrieval()
  prompts = [[20, 5, 7], [30, 9, 30, 4], [10, 3], [8, 30]]
  experts = [_prompt_expert(router, params, p) for p in prompts]
  assert sorted(set(experts)) == [0, 1, 2]
  feats, start = evaluate.generation_batch(prompts, "decoder", LENGTHS, 4)
  cached = _fast(evaluate.make_greedy(router, model, 4, cached=True,
                                      return_logits=True))
  ids, logits = cached(params, feats, start)
  ids_r, logits_r = _fast(evaluate.make_greedy(router, model, 4, cached=False,
                                               return_logits=True))(
                                                   params, feats, start)
  np.testing.assert_array_equal(np.asarray(ids), np.asarray(ids_r))
  np.testing.assert_allclose(np.asarray(logits), np.asarray(logits_r),
                             rtol=1e-4, atol=1e-4)
  # Every step of row b uses the expert of b's prompt: the fixed router
  # with that expert generates the same tokens and logits.
  fixed = routed.build_router("fixed", LORA, top_k=1)
  greedy = _fast(evaluate.make_greedy(fixed, model, 4, return_logits=True))
  for b, e in enumerate(experts):
    want_ids, want_logits = greedy(routed.routed_params(
        base, stacked, fixed, weights=rb.one_hot(e, 3)), feats, start)
    np.testing.assert_array_equal(np.asarray(ids)[b], np.asarray(want_ids)[b])
    np.testing.assert_allclose(np.asarray(logits)[b],
                               np.asarray(want_logits)[b], rtol=1e-4,
                               atol=1e-4)
  assert len(np.unique(np.asarray(ids))) > 2
  # Encoder-decoder models keep recomputation (the default).
  assert not rb.RetrievalRouting(LORA).cached_decoding


# ----------------------------------------------------- 100 tasks: every row

NUM_TASKS = 100


def _task_batches(seed=0):
  """Synthetic prefix-LM batches: one row per task 0..99, adapter_index =
  task_index (as pg.fit_method(by_task=True) sets it)."""
  r = np.random.RandomState(seed)
  while True:
    seq = r.randint(3, V, (NUM_TASKS, 8)).astype(np.int32)
    causal = np.zeros_like(seq)
    causal[:, :4] = 1
    weights = 1 - causal
    task = r.permutation(NUM_TASKS).astype(np.int32)
    yield {"decoder_target_tokens": seq,
           "decoder_input_tokens": np.pad(seq[:, :-1], ((0, 0), (1, 0))),
           "decoder_loss_weights": weights,
           "decoder_causal_attention": causal, "task_index": task}


@pytest.mark.parametrize("kind", ["task_gate", "poly"])
def test_tasks_beyond_64_train_their_own_rows(kind):
  model, base = _model()
  mesh = _mesh()
  if kind == "task_gate":
    method = rb.TaskGateRouting(LORA, _library(3), NUM_TASKS, top_k=1)
    leaf = "task_logits"
  else:
    method = rb.PolyLoRA(LORA, NUM_TASKS, num_skills=2, heads=2)
    leaf = "logits"
  fitter = fit.Fitter(method, model, mesh, _optimizer(), 3,
                      num_tasks=NUM_TASKS, dropout=kind == "poly")
  run = types.SimpleNamespace(model=model, mesh=mesh)
  params, loss = pg.fit_method(run, method, base, jax.random.key(1), 1e-2, 3,
                               _task_batches(), by_task=True, fitter=fitter)
  assert np.isfinite(loss)
  rows = [v for k, v in transform.flatten(params).items()
          if k.endswith(leaf) and not k.startswith("alloc_eval")]
  assert rows
  for x in rows:       # initialised at zero: every task's row moved
    x = np.asarray(x).reshape(NUM_TASKS, -1)
    assert (np.abs(x).max(1) > 0).all(), np.where(np.abs(x).max(1) == 0)


# ----------------------------------------------------------------- Poly/MHR

def _poly(heads=1, num_tasks=2, skills=3):
  """(method, params) with random skills (non-zero B) and allocation."""
  model, base = _model()
  method = rb.PolyLoRA(LORA, num_tasks, num_skills=skills, heads=heads)
  shapes = jax.eval_shape(lambda: method.init(jax.random.key(3), model, base))
  return method, {"base": base, **_random(shapes, 3, scale=1.0)}


def _jit_apply(method):
  """jitted (params, inputs) -> method.apply(model, params, inputs)."""
  model, _ = _model()
  return _fast(jax.jit(lambda p, i: method.apply(model, p, i)))


def _inputs(task=None):
  ids = np.random.RandomState(4).randint(3, V, (2, 6)).astype(np.int32)
  out = dict(input_ids=ids, attention_mask=np.ones_like(ids))
  if task is not None:
    out["adapter_index"] = np.asarray(task, np.int32)
  return out


def test_poly_allocation_is_sampled_in_training_only():
  model, _ = _model()
  logits = jax.random.normal(jax.random.key(0), (2, 3, 1))
  det = rb.allocation(logits)
  want = jax.nn.sigmoid(logits)
  np.testing.assert_allclose(det, want / want.sum(1, keepdims=True),
                             rtol=1e-6)
  s1, s2 = (rb.allocation(logits, jax.random.key(k)) for k in (1, 2))
  assert not np.allclose(s1, s2) and not np.allclose(s1, det)
  np.testing.assert_allclose(s1.sum(1), 1.0, rtol=1e-5)
  method, params = _poly()
  inp = _inputs(task=[0, 1])
  train = _fast(jax.jit(lambda p, r: method.apply(
      model, p, inp, rng=r, deterministic=False)))
  k1, k2 = jax.random.key(1), jax.random.key(2)
  train1, train2 = train(params, k1), train(params, k2)
  assert not np.allclose(train1, train2)             # stochastic in training
  np.testing.assert_array_equal(train1, train(params, k1))
  evaluation = _jit_apply(method)(params, inp)        # rng None
  no_sample = _fast(jax.jit(lambda p, r: method.apply(
      model, p, inp, rng=r, deterministic=True)))
  np.testing.assert_allclose(no_sample(params, k1), evaluation, rtol=1e-5,
                             atol=1e-5)


def _mixed_lora(params, w, heads):
  """Hand computation: per row b, A = sum_s w[b,s,h] A_s on the h-th block
  of A's rows, B likewise on the h-th block of B's columns; a LoRA with one
  'expert' per row (adapter_index = row)."""
  out = {}
  for path, x in transform.flatten(params["skills"]).items():
    mod, leaf = path.rsplit("/", 1)
    wm = np.asarray(w[mod])                            # (B, S, H)
    x = np.asarray(x)
    if leaf == "lora_a":                               # (S, d, r)
      s, d, r = x.shape
      blocks = x.reshape(s, heads, d // heads, r)
      out[path] = np.einsum("bsh,shnr->bhnr", wm, blocks).reshape(-1, d, r)
    else:                                              # (S, r, o)
      s, r, o = x.shape
      blocks = x.reshape(s, r, heads, o // heads)
      out[path] = np.einsum("bsh,srhn->brhn", wm, blocks).reshape(-1, r, o)
  return transform.nest(out)


@pytest.mark.parametrize("heads", [1, 2])
def test_poly_and_mhr_mix_skills_per_head(heads):
  model, base = _model()
  method, params = _poly(heads=heads)
  task = np.array([1, 0], np.int32)
  got = _jit_apply(method)(params, _inputs(task))
  w = {k.rsplit("/", 1)[0]: rb.allocation(np.asarray(v)[task])
       for k, v in transform.flatten(params["alloc"]).items()}
  for v in w.values():
    assert v.shape == (2, 3, heads)
  per_row = lora_lib.LoRA(rank=2, alpha=4.0, targets=LORA.targets,
                          num_experts=2)
  lora_fn = _jit_apply(per_row)
  want = lora_fn({"base": base, "lora": _mixed_lora(params, w, heads)},
                 _inputs(np.arange(2)))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  if heads == 2:   # heads mix differently: not a single-head mixture
    single = {k: jnp.broadcast_to(v[..., :1], v.shape) for k, v in w.items()}
    other = lora_fn({"base": base, "lora": _mixed_lora(params, single, heads)},
                    _inputs(np.arange(2)))
    assert not np.allclose(got, other, atol=1e-3)


def test_mhr_mu_is_the_uniform_average_of_the_skills():
  _, base = _model()
  method, params = _poly(heads=2)
  fn = _jit_apply(method)
  got = fn(rb.poly_eval_params(params, None), _inputs())
  mean = jax.tree.map(lambda x: x.mean(0), params["skills"])
  want = _jit_apply(LORA)({"base": base, "lora": mean}, _inputs())
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  # A task's row: its learned allocation, deterministic.
  one = fn(rb.poly_eval_params(params, 1), _inputs())
  np.testing.assert_allclose(one, _jit_apply(method)(params, _inputs([1, 1])),
                             rtol=1e-5, atol=1e-5)
