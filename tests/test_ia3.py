"""(IA)3 as a pure transform: identity at init, the right modules rescaled,
mixed-adapter batches."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtjax import methods
from mtjax.methods import ia3, transform
from test_lora import init_base, jitted, model_inputs, tiny_llama, tiny_t5


def randomize(params, seed=1):
  rs = np.random.RandomState(seed)
  return jax.tree.map(
      lambda v: jnp.asarray(1 + rs.normal(0, 0.3, v.shape), jnp.float32),
      params)


@pytest.mark.parametrize("make", [tiny_llama, tiny_t5])
def test_fresh_ia3_is_identity_and_targets(make):
  model = make()
  inputs = model_inputs(model)
  base = init_base(model, inputs)
  method = methods.build({"name": "ia3"})
  boxed = method.init(jax.random.key(0), model, base)
  flat = transform.flatten(nn.unbox(boxed))
  leaves = {k.rsplit("/", 2)[-2] + "/" + k.rsplit("/", 1)[-1] for k in flat}
  if make is tiny_llama:
    assert leaves == {"k_proj/scale", "v_proj/scale", "down_proj/scale_in"}
  else:
    assert leaves == {"k/scale", "v/scale", "wo/scale_in"}
  names = {l.names for l in jax.tree_util.tree_leaves(
      boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))}
  assert names == {("heads",), ("mlp",)}
  # Eager: x * 1 is exactly x op by op; under jit XLA may fuse the product
  # into the dot and round differently (~1e-7), so exactness is checked eagerly.
  want = model.apply({"params": base}, **inputs)
  got = method.apply(model, {"base": base, **nn.unbox(boxed)}, inputs)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  got = jitted(method, model)({"base": base, **randomize(nn.unbox(boxed))}, inputs)
  assert float(jnp.abs(got - want).max()) > 1e-3


def test_ia3_equals_scaled_kernels():
  """Rescaling k's output / down_proj's input == scaling kernel columns / rows."""
  model = tiny_llama()
  inputs = model_inputs(model)
  base = init_base(model, inputs)
  method = ia3.IA3()
  params = randomize(nn.unbox(method.init(None, model)))
  got = jitted(method, model)({"base": base, **params}, inputs)
  scaled = jax.tree.map(lambda x: x, base)
  for path, vec in transform.flatten(params["ia3"]).items():
    mod, leaf = path.rsplit("/", 1)
    node = transform.lookup(scaled, mod.split("/"))
    node["kernel"] = (node["kernel"] * vec[None, :] if leaf == "scale"
                      else node["kernel"] * vec[:, None])
  want = jax.jit(lambda p, x: model.apply({"params": p}, **x))(scaled, inputs)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


def test_mixed_ia3_batch_equals_per_example():
  model = tiny_t5()
  inputs = model_inputs(model, batch=3)
  base = init_base(model, inputs)
  stacked = ia3.IA3(num_experts=2)
  params = randomize(nn.unbox(stacked.init(None, model)))
  index = jnp.asarray([1, 0, 1])
  got = jitted(stacked, model)({"base": base, **params},
                               dict(inputs, adapter_index=index))
  single = jitted(ia3.IA3(), model)
  for row, e in enumerate(np.asarray(index)):
    want = single({"base": base, **jax.tree.map(lambda x: x[e], params)},
                  {k: v[row:row + 1] for k, v in inputs.items()})
    np.testing.assert_allclose(np.asarray(got[row:row + 1]), np.asarray(want),
                               atol=1e-5, rtol=1e-5)


def test_overlapping_targets_rejected():
  with pytest.raises(ValueError, match="both targets and ff_targets"):
    ia3.IA3(targets=(r".*mlp/down_proj",)).init(None, tiny_llama())
