"""A router and a method defined here, registered, and run by the PHATGOOSE
experiment (mtjax.main's 'phatgoose' job) with no edit to mtjax."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import phatgoose as phatgoose_config
from mtjax import main
from mtjax.experiments import phatgoose as pg
from mtjax.methods import transform
from mtjax.methods.transform import METHODS
from mtjax.models import sharding
from mtjax.routing import baselines as rb
from mtjax.routing import experts as ex
from mtjax.routing import routed
from mtjax.routing.routed import ROUTERS

# Rank-classification tasks only: no greedy decoder to compile (test time).
HELD_IN = ("sentiment", "parity")


@ROUTERS.register("test_first_expert")
class FirstExpertRouter(routed.RoutedLoRA):
  """Every token to expert 0 (logits put all mass there)."""
  name = "test_first_expert"

  def logits(self, h, leaf):
    num_e = leaf["lora_a"].shape[0]
    return jnp.zeros((h.shape[0], num_e)).at[:, 0].set(30.0)


@METHODS.register("test_output_bias")
class OutputBias:
  """A learned bias added to the output of every targeted Linear."""
  trainable = r"output_bias/.*"

  def __init__(self, targets=(r".*",)):
    self.targets = tuple(targets)

  def init(self, rng, model, base_params=None):
    del rng, base_params
    flat = {p: {"bias": transform.boxed(jnp.zeros((t.shape[-1],)),
                                        (t.out_axis,))}
            for p, t in transform.resolve_targets(model, self.targets).items()}
    return {"output_bias": transform.nest(flat)}

  def apply(self, model, params, inputs, *, rng=None, deterministic=True,
            method=None):
    def hook(next_fun, x, leaf, ctx):
      del ctx
      return next_fun(x) + leaf["bias"].astype(x.dtype)
    icpt = transform.linear_interceptor(params["output_bias"], hook)
    return transform.run(model, params["base"], transform.model_kwargs(inputs),
                         [icpt], rng=rng, deterministic=deterministic,
                         method=method)


def _config():
  c = phatgoose_config.get_config("t5")
  c.model.update(d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=1,
                 num_decoder_layers=1)
  c.held_in = HELD_IN
  c.held_out = ("is_palindrome",)
  c.batch_size = 8
  c.base_steps = 0
  c.expert_steps = 10
  # No row here reads the gates (the toy router's logits are fixed, the fixed
  # router's weights given), so the gate stage runs 0 steps: the library
  # keeps its init gates.
  c.gate_steps = 0
  c.multitask_steps = 10
  c.eval.batch_size = 32   # a task's 16 examples x 2 choices: one batch
  c.eval.max_examples = 16
  c.methods = (dict(name="toy_router", kind="test_first_expert", top_k=1),
               dict(name="toy_method", kind="test_output_bias",
                    targets=(r".*DenseReluDense/wo",), steps=10, lr=1e-2),
               dict(name="base"))
  return c


@pytest.fixture(scope="module")
def job(tmp_path_factory):
  """(output, workdir, Run) of the job run once for this module; the Run is
  the one the job built (pg.setup, wrapped to keep it), so later checks use
  the job's own base, mesh and config."""
  workdir = tmp_path_factory.mktemp("phatgoose") / "run"
  runs, setup = [], pg.setup

  def keep(config):
    runs.append(setup(config))
    return runs[-1]
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(pg, "setup", keep)
    out = main.run_job(_config(), str(workdir))
  (run,) = runs
  return out, workdir, run


def test_registered_router_and_method_run_in_the_phatgoose_experiment(job):
  out, workdir, run = job
  tasks = list(HELD_IN) + ["is_palindrome"]
  assert set(out["results"]) == {"toy_router", "toy_method", "base"}
  for row in out["results"].values():
    assert sorted(row) == sorted(tasks)
  saved = json.loads((workdir / "phatgoose_results.json").read_text())
  assert set(saved["results"]) == set(out["results"])

  # The toy router's defining property: it is the fixed one-hot router on
  # expert 0 (of the library the job saved), so its metrics, and which
  # examples it gets right, equal that router's on every task.
  with sharding.use_mesh(run.mesh):
    library = ex.load_library(str(workdir / "library"), list(HELD_IN))
    stacked = ex.stack_library(library)
    fixed = routed.build_router("fixed", run.lora, top_k=1)
    params = routed.routed_params(run.base, stacked, fixed,
                                  weights=rb.one_hot(0, len(HELD_IN)))
    want = pg.evaluate_method(run, "fixed0", fixed, lambda t: params, tasks)
  assert out["results"]["toy_router"] == want
  for t in tasks:
    np.testing.assert_array_equal(run.correct["toy_router"][t],
                                  run.correct["fixed0"][t])


def test_registered_method_trains_only_its_own_leaves(job):
  run = job[2]
  method = OutputBias(targets=(r".*DenseReluDense/wo",))
  with sharding.use_mesh(run.mesh):
    params, loss = pg.fit_method(run, method, run.base, jax.random.key(0),
                                 1e-2, 5, pg.batches(run, "held_in", 0))
  assert np.isfinite(loss)
  for path, x in transform.flatten(params["base"]).items():
    np.testing.assert_array_equal(
        np.asarray(x), np.asarray(transform.flatten(run.base)[path]))
  biases = transform.flatten(params["output_bias"])
  assert biases and all(np.abs(np.asarray(b)).max() > 0
                        for b in biases.values())
