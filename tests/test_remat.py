"""Gradient checkpointing (config `remat`) composes with method interception:
LoRA gradients and Fitter steps are the same with and without it, and the
rematerialisation is really in the traced step."""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mtjax import methods
from mtjax.evaluation import evaluate
from mtjax.models import sharding
from mtjax.training import fit, trainer
from tests.test_lora import init_base, model_inputs, randomize_b, tiny_llama, tiny_t5


def _batch(model, seed=0, rows=4):
  rs = np.random.RandomState(seed)
  n = rows
  rows = [(list(rs.randint(2, 64, 6)), list(rs.randint(2, 64, 3)))
          for _ in range(n)]
  batch = evaluate.score_rows(rows, trainer.model_kind(model),
                             {"inputs": 8, "targets": 4})
  batch["task_index"] = np.zeros(n, np.int32)
  return {k: jnp.asarray(v) for k, v in batch.items()}


def _grads(method, model, params, batch):
  kind = trainer.model_kind(model)
  flat = trainer.flatten(params)
  train, frozen = trainer.split_trainable(flat, method.trainable)
  fn = jax.grad(lambda t: trainer.loss_and_metrics(
      method, model, kind, 1, t, frozen, batch, None)[0])
  return fn, train


@pytest.mark.parametrize("make", [tiny_llama, tiny_t5])
@pytest.mark.parametrize("policy", ["full", "dots"])
def test_lora_gradients_equal_with_and_without_remat(make, policy):
  model = make()
  lora = methods.build({"name": "lora", "rank": 4, "alpha": 8})
  base = init_base(model, model_inputs(model))
  params = {"base": base, **randomize_b(nn.unbox(
      lora.init(jax.random.key(1), model, base)))}
  batch = _batch(model)
  plain_fn, train = _grads(lora, model, params, batch)
  remat_model = trainer.with_remat(model, policy)
  remat_fn, _ = _grads(lora, remat_model, params, batch)
  # The checkpointed blocks are in the traced gradient, not optimised away.
  # (jax names the primitive 'checkpoint', 'remat2' once differentiated.)
  remat_prim = re.compile(r"\b(checkpoint|remat2?)\[")
  assert remat_prim.search(str(jax.make_jaxpr(remat_fn)(train)))
  assert not remat_prim.search(str(jax.make_jaxpr(plain_fn)(train)))
  g0, g1 = jax.jit(plain_fn)(train), jax.jit(remat_fn)(train)
  assert set(g0) == set(g1) and all(k.startswith("lora/") for k in g0)
  for k in g0:
    scale = float(jnp.abs(g0[k]).max())
    assert scale > 0, k
    # Recomputation may reorder float sums: agreement relative to the
    # tensor's scale, far below any effect of a wrong gradient.
    np.testing.assert_allclose(g1[k], g0[k], rtol=0, atol=1e-5 * scale,
                               err_msg=k)


def test_fitter_steps_equal_with_remat():
  model = tiny_llama()
  mesh = sharding.make_mesh((-1, 1, 1))
  lora = methods.build({"name": "lora", "rank": 4, "alpha": 8})
  base = init_base(model, model_inputs(model))
  opt = ml_collections.ConfigDict(dict(
      name="adamw", learning_rate=1e-2, warmup_steps=0, decay="constant",
      b1=0.9, b2=0.98, eps=1e-8, weight_decay=0.0, grad_clip=1.0))
  out = {}
  for policy in ("none", "full"):
    flat, flat_sh = trainer.init_params(model, lora, jax.random.key(1), mesh,
                                        base)
    fitter = fit.Fitter(lora, model, mesh, opt, 3, remat=policy)
    # 8 rows: one per (fake) device of the test mesh.
    batches = iter([_batch(model, s, rows=8) for s in range(3)])
    out[policy], _ = fitter.fit(flat, flat_sh, batches)
  a, b = trainer.flatten(out["none"]), trainer.flatten(out["full"])
  moved = [k for k in a if k.startswith("lora/")
           and not np.allclose(a[k], trainer.flatten(base).get(k, 0 * a[k]))]
  assert moved
  for k in a:
    np.testing.assert_allclose(b[k], a[k], rtol=0,
                               atol=1e-5 * (1 + float(np.abs(a[k]).max())),
                               err_msg=k)


def test_unknown_remat_policy_is_a_clear_error():
  with pytest.raises(ValueError, match="remat 'everything' is not one of"):
    trainer.with_remat(tiny_llama(), "everything")
