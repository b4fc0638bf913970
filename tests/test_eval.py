"""Evaluation: rank-classification scores, greedy decoding, results table."""
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import mtjax.models
from mtjax.evaluation import evaluate, results
from mtjax.models import sharding
from mtjax.methods import full
from mtjax.training import trainer

TINY = {
    "t5": dict(hf_path="", arch="t5", dtype="float32", vocab_size=259,
               d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2,
               num_decoder_layers=2, feed_forward_proj="gated-gelu",
               dropout_rate=0.0),
    "llama": dict(hf_path="", arch="llama", dtype="float32", vocab_size=259,
                  hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2,
                  pad_token_id=0, eos_token_id=1, bos_token_id=0),
}
LENGTHS = {"inputs": 12, "targets": 6}


def _model(arch):
  # One device: eval's sharding is exercised by the training tests; the
  # unbatched eager reference below runs much faster unsharded.
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  model, base = trainer.build_model(ml_collections.ConfigDict(TINY[arch]),
                                    jax.random.key(0), mesh)
  return model, {"base": base}, mesh


def _examples(n=5, seed=0):
  r = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    k = int(r.integers(2, 4))
    out.append(dict(
        input_ids=r.integers(3, 259, r.integers(3, 12)).tolist() + [1],
        choice_ids=[r.integers(3, 259, r.integers(1, 5)).tolist() + [1]
                    for _ in range(k)], label=int(r.integers(k))))
  return out


def _reference_loglik(model, params, inputs, target):
  """log p(target | inputs) from one unpadded forward pass."""
  if model.config.is_encoder_decoder:
    logits = model.apply({"params": params["base"]}, jnp.array([inputs]),
                         decoder_input_ids=jnp.array([[0] + target[:-1]]))[0]
    rows = np.arange(len(target))
  else:
    seq = inputs + target
    logits = model.apply({"params": params["base"]},
                         jnp.array([[0] + seq[:-1]]))[0]
    rows = np.arange(len(inputs), len(seq))
  logp = jax.nn.log_softmax(logits)
  return float(logp[rows, np.array(target)].sum())


@pytest.mark.parametrize("arch", ["t5", "llama"])
def test_rank_scores_match_unbatched_reference(arch):
  model, params, mesh = _model(arch)
  exs = _examples(n=4)
  scorer = evaluate.make_scorer(full.FullFineTuning(), model)
  rows = [(e["input_ids"], c) for e in exs for c in e["choice_ids"]]
  kind = trainer.model_kind(model)
  padded = rows
  with sharding.use_mesh(mesh):
    got, counts = scorer(params, trainer.put_batch(
        evaluate.score_rows(padded, kind, LENGTHS), mesh))
    got, counts = got[:len(rows)], counts[:len(rows)]
    metrics, pred = evaluate.rank_classification(
        scorer, model, params, exs, LENGTHS, batch_size=4, mesh=mesh)
  want = [_reference_loglik(model, params, i, t) for i, t in rows]
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(np.asarray(counts), [len(t) for _, t in rows])
  # Predictions are the argmax of the reference scores, summed and normalised.
  start = 0
  for e, p in zip(exs, pred):
    scores = want[start:start + len(e["choice_ids"])]
    start += len(e["choice_ids"])
    assert p == int(np.argmax(scores))
  labels = np.array([e["label"] for e in exs])
  assert metrics["accuracy"] == float(np.mean(np.array(pred) == labels))


@pytest.mark.parametrize("arch", ["t5", "llama"])
def test_greedy_without_cache_matches_kv_cache_generate(arch):
  model, params, mesh = _model(arch)
  exs = _examples(n=3, seed=1)
  greedy = evaluate.make_greedy(full.FullFineTuning(), model, 5)
  with sharding.use_mesh(mesh):
    outs = evaluate.generate_rows(greedy, model, params,
                                  [e["input_ids"] for e in exs], LENGTHS, 5,
                                  batch_size=4, mesh=mesh, eos_id=-1)
  for e, got in zip(exs, outs):
    prompt = e["input_ids"] if model.config.is_encoder_decoder else \
        [0] + e["input_ids"]
    ref = mtjax.models.generate(model, params["base"], np.array([prompt]),
                                np.ones((1, len(prompt)), np.int32),
                                max_new_tokens=5, eos_id=None)
    assert got == np.asarray(ref)[0].tolist()


def test_averages_table_and_json(tmp_path):
  res = {"a": {"accuracy": 0.5, "exact_match": 0.25}, "b": {"accuracy": 1.0},
         "c": {"accuracy": 0.0}}
  groups = {"held_in": ["a", "b"], "held_out": ["c"]}
  full = results.with_averages(res, groups)
  assert full["average/held_in"] == {"accuracy": 0.75, "exact_match": 0.25}
  assert full["average/held_out"] == {"accuracy": 0.0}
  lines = results.table(full, groups).splitlines()
  assert len({len(l.rstrip()) for l in lines[:2]}) == 1
  assert lines[2].split()[:3] == ["a", "held_in", "0.5000"]
  assert lines[-1].split() == ["average/held_out", "held_out", "0.0000", "-"]
  path = results.write_json(full, str(tmp_path))
  assert json.loads(open(path).read()) == full
  results.write_json({"x": {"accuracy": 1.0}}, str(tmp_path))
  assert json.loads((tmp_path / "results.1.json").read_text()) == full
  assert json.loads(open(path).read()) == {"x": {"accuracy": 1.0}}
