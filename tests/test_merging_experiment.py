"""Merges as rows of the PHATGOOSE experiment (experiments.phatgoose
merge_step): static and learned merges of the library's experts go through
the same path as the routers (library -> Fitter -> evaluate), and keep their
defining properties there."""
import flax.linen as nn
import jax
import numpy as np
import pytest

from configs import merging_smollm2
from mtjax import merging
from mtjax.experiments import phatgoose as pg
from mtjax.models import sharding
from mtjax.routing import experts as ex
from mtjax.training import trainer
from tests.test_phatgoose import _config


@pytest.fixture(scope="module")
def run():
  """test_phatgoose's tiny T5 with a library of two experts, evaluated on
  rank-classification tasks only: every row shares one compiled scorer (no
  greedy decoder to compile). Gates stay at their init (gate_steps=0): a
  merge reads only the experts' LoRA factors (expert_lora_trees). The base
  and the weight-0 merge are evaluated on every task; the other merges, as
  in configs/merging_smollm2.py, on the held-out task (held_in_rows)."""
  cfg = _config()
  cfg.held_in = ("sentiment", "parity")
  cfg.held_out = ("add_compare",)
  cfg.expert_steps, cfg.gate_steps = 10, 0
  cfg.eval.max_examples = 16
  cfg.held_in_rows = ("base", "ta0")
  r = pg.setup(cfg)
  with sharding.use_mesh(r.mesh):
    r.stacked = ex.stack_library(pg.train_library(r, jax.random.key(1)))
  return r


def _row(run, **entry):
  entry = {"kind": "merge", **entry}
  with sharding.use_mesh(run.mesh):
    return pg.run_entries(run, [entry])[0][entry["name"]]


# Steps of each learned merge; AdaMerging's row is also the entropy test's.
LEARNED_STEPS = {"adamerging": 6}


@pytest.fixture(scope="module")
def learned(run):
  """learned(name) -> the row of a learned merge, fitted once per module
  (run.trained['merge NAME'] holds (merge, fitted params))."""
  rows = {}

  def fit(name):
    if name not in rows:
      rows[name] = _row(run, name=name, merge={"name": name},
                        steps=LEARNED_STEPS.get(name, 3), lr=5e-2)
    return rows[name]
  return fit


def test_static_merges_run_and_weight_zero_is_the_base(run):
  base = _row(run, name="base", kind="base")
  zero = _row(run, name="ta0", merge={"name": "task_arithmetic"}, weights=0.0)
  assert set(base) == set(zero) == set(run.tasks)
  for t in base:
    np.testing.assert_array_equal(run.correct["ta0"][t],
                                  run.correct["base"][t])
  ties = _row(run, name="ties", merge={"name": "ties", "density": 0.2})
  dare = _row(run, name="dare", merge={"name": "dare_ties", "density": 0.5})
  assert set(ties) == set(dare) == set(run.eval_tasks("ties")) == set(
      run.held_out)


def test_task_vectors_are_the_experts_updates(run):
  tvs = pg.expert_task_vectors(run)
  assert len(tvs) == run.num_experts
  trees = pg.expert_lora_trees(run)
  flat = trainer.flatten(trees[1])
  path = sorted(k for k in flat if k.endswith("/lora_a"))[0][:-len("/lora_a")]
  want = flat[path + "/lora_a"] @ flat[path + "/lora_b"] * run.lora.scale
  got = trainer.flatten(tvs[1].delta)[path + "/kernel"]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  assert tvs[0].base == tvs[1].base is not None


@pytest.mark.parametrize("name", ["adamerging", "atlas", "self_positioning",
                                  "scalearn"])
def test_learned_merges_train_only_their_coefficients(run, learned, name):
  res = learned(name)
  assert set(res) == set(run.eval_tasks(name))
  merge, fitted = run.trained[f"merge {name}"]
  init = trainer.flatten(nn.unbox(
      merge.init(jax.random.key(0), run.model, run.base)))
  got = trainer.flatten(fitted)
  moved = [k for k in init if not np.allclose(got[k], init[k])]
  assert moved and all(k.startswith(merge.trainable.split("/")[0] + "/")
                       for k in moved), moved
  assert all(np.isfinite(np.asarray(got[k])).all() for k in moved)
  base = trainer.flatten({"base": run.base})
  for k in base:   # the base is frozen
    np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(base[k]))


def test_adamerging_lowers_the_entropy_of_unlabeled_held_out_prompts(
    run, learned):
  learned("adamerging")
  merge, fitted = run.trained["merge adamerging"]
  init = merge.init(jax.random.key(0), run.model, run.base)
  init = {"base": run.base, **nn.unbox(init)}
  batch = next(pg.unlabeled_prompt_batches(run, run.held_out, 99))
  loss = merging.entropy_loss(trainer.target_token_loss)

  @jax.jit   # one compiled forward instead of op-by-op dispatch
  def entropy(p, b):
    ent, _, w = loss(merge, run.model, run.kind, p, b, None)
    return (ent * w).sum() / w.sum()

  def mean_entropy(p):
    return float(entropy(p, {k: np.asarray(v) for k, v in batch.items()}))
  before, after = mean_entropy(init), mean_entropy(fitted)
  print(f"\n[adamerging] answer-position entropy {before:.4f} -> {after:.4f}")
  assert after < before, (before, after)


def test_merging_config_only_reuses_a_library(tmp_path):
  cfg = merging_smollm2.get_config("cpu")
  cfg.library_dir = str(tmp_path / "no_library")
  with pytest.raises(FileNotFoundError, match="require_library"):
    pg.run(cfg, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()
  assert [e["kind"] for e in cfg.methods[:7]] == ["merge"] * 7


def test_merge_data_is_checked_before_anything_trains():
  with pytest.raises(ValueError, match=r"data='held_out'; use one of"):
    pg.step_for({"name": "ada", "kind": "merge", "merge": {"name": "ada"},
                 "data": "held_out"})
  for data in pg.MERGE_DATA:
    assert pg.step_for({"name": "ada", "kind": "merge", "data": data})


def test_words_variant_scores_every_row_on_its_experts_tasks():
  """configs/merging_smollm2.py:words is the merging benchmarks' protocol:
  it trains its own experts on the held-in word-choice tasks, and every row
  (base, the per-task experts, merges, PHATGOOSE) is scored on them."""
  cfg = merging_smollm2.get_config("words")
  assert cfg.held_in_rows is None and not cfg.require_library
  assert all(t.startswith("si_") for t in cfg.held_in + cfg.held_out)
  rows = {e["name"]: e for e in cfg.methods}
  assert {"base", "oracle", "merged", "phatgoose", "arrow", "uniform"} <= set(
      rows)
  assert {m["name"] for m in merging_smollm2.MERGES} <= set(rows)
  assert rows["adamerging"]["data"] == "eval_prompts"
  for entry in cfg.methods:
    pg.step_for(entry)


def test_merge_select_picks_the_best_validation_candidate(run):
  """merge_select (experiments.phatgoose_rows) scores each candidate on the
  held-in validation examples, keeps the best, and its row is exactly the
  static merge with that value."""
  with run.config.unlocked():
    run.config.valid_split = run.config.eval.split
    run.config.valid_examples = 8
  row = _row(run, name="ta_sel", kind="merge_select",
             merge={"name": "task_arithmetic"}, weights=(0.0, 1.0))
  diag = run.diagnostics["ta_sel"]
  assert diag["grid"] == "weights" and set(diag["validation"]) == {"0.0",
                                                                   "1.0"}
  best = max((0.0, 1.0), key=lambda v: diag["validation"][str(v)])
  assert diag["selected"] == best
  fixed = _row(run, name="ta_fixed", merge={"name": "task_arithmetic"},
               weights=best)
  assert set(row) == set(fixed)
  for t in row:
    np.testing.assert_array_equal(run.correct["ta_sel"][t],
                                  run.correct["ta_fixed"][t])
  with pytest.raises(ValueError, match="exactly one of"):
    pg.step_for({"name": "x", "kind": "merge_select"})(
        run, {"name": "x", "kind": "merge_select",
              "merge": {"name": "ties"}})


def test_oracle_chooses_on_validation_examples_and_scores_the_test_ones(run):
  """oracle with select_examples: per held-out dataset, the expert with the
  best score on that many config.valid_split examples, then scored on the
  evaluation examples, exactly as that expert alone."""
  with run.config.unlocked():
    run.config.valid_split = "train"   # disjoint from the scored split
  entry = {"name": "oracle_sel", "kind": "oracle", "select_examples": 8}
  with sharding.use_mesh(run.mesh):
    res = pg.run_entries(run, [entry])[0]["oracle_sel"]
  diag = run.diagnostics["oracle_sel"]["add_compare"]
  assert diag["selection"] == "validation"
  assert set(diag["scores"]) == set(run.experts)
  assert diag["chosen"] == max(run.experts, key=diag["scores"].get)
  assert res["add_compare"]["expert"] == diag["chosen"]
  e = run.experts.index(diag["chosen"])
  router, _ = pg.routed(run, "fixed", {"top_k": 1},
                        weights=np.ones(run.num_experts))
  alone = pg.routing.routed_params(run.base, run.stacked, router,
                                   weights=pg.rb.one_hot(e, run.num_experts))
  with sharding.use_mesh(run.mesh):
    pg.evaluate_method(run, "alone", router, lambda t: alone,
                       ["add_compare"])
  np.testing.assert_array_equal(run.correct["oracle_sel"]["add_compare"],
                                run.correct["alone"]["add_compare"])
  assert (run.example_ids["oracle_sel"]["add_compare"]
          == run.example_ids["alone"]["add_compare"])
