"""Prompt tuning through the embedding interceptor, without the model knowing."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtjax import methods
from mtjax.methods import prompt_tuning
from test_lora import init_base, jitted, model_inputs, tiny_llama, tiny_t5

P = 4
TOKENS = np.asarray([5, 9, 17, 33])  # the prompt equals these tokens' embeddings


@pytest.mark.parametrize("make", [tiny_llama, tiny_t5])
def test_zero_length_prompt_is_identity(make):
  model = make()
  inputs = model_inputs(model)
  base = init_base(model, inputs)
  method = methods.build({"name": "prompt_tuning", "length": 0})
  params = nn.unbox(method.init(jax.random.key(0), model, base))
  want = jax.jit(lambda p, x: model.apply({"params": p}, **x))(base, inputs)
  got = jitted(method, model)({"base": base, **params}, inputs)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("make", [tiny_llama, tiny_t5])
def test_prompt_equals_prepended_tokens(make):
  """A prompt holding token embeddings == those tokens prepended to the input.

  For T5 the decoder input has the same length as the prompted encoder input,
  so prompting the decoder's call to the shared embedding would show up.
  """
  model = make()
  inputs = model_inputs(model, batch=2, length=7)
  if model.config.is_encoder_decoder:
    inputs["decoder_input_ids"] = jnp.asarray(
        np.random.RandomState(3).randint(2, 64, (2, 7 + P)))
  inputs["attention_mask"] = inputs["attention_mask"].at[1, 5:].set(0)
  base = init_base(model, inputs)
  table = prompt_tuning.embedding_table(model, base)
  method = prompt_tuning.PromptTuning(length=P, init_from=table[TOKENS])
  params = nn.unbox(method.init(None, model, base))
  got = jitted(method, model)({"base": base, **params}, inputs)
  ids = jnp.concatenate([jnp.broadcast_to(TOKENS, (2, P)),
                         inputs["input_ids"]], 1)
  mask = jnp.concatenate([jnp.ones((2, P), jnp.int32),
                          inputs["attention_mask"]], 1)
  want = jax.jit(lambda p, x: model.apply({"params": p}, **x))(
      base, dict(inputs, input_ids=ids, attention_mask=mask))
  if not model.config.is_encoder_decoder:
    want = want[:, P:]
  assert got.shape == want.shape
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


def test_label_init_and_packing_error():
  model = tiny_llama()
  inputs = model_inputs(model)
  base = init_base(model, inputs)
  method = methods.build({"name": "prompt_tuning", "length": 6,
                          "init": "labels", "label_ids": [7, 8]})
  prompt = nn.unbox(method.init(jax.random.key(0), model, base))
  table = prompt_tuning.embedding_table(model, base)
  np.testing.assert_array_equal(prompt["prompt"]["embedding"][:2], table[jnp.asarray([7, 8])])
  with pytest.raises(ValueError, match="packed"):
    method.apply(model, {"base": base, **prompt},
                 dict(inputs, segment_ids=jnp.ones_like(inputs["input_ids"])))


@pytest.mark.parametrize("composition", ["multiplicative", "additive"])
def test_multitask_prompt_selects_per_example(composition):
  model = tiny_t5()
  inputs = model_inputs(model, batch=3)
  base = init_base(model, inputs)
  method = prompt_tuning.MultitaskPromptTuning(
      num_tasks=3, composition=composition, length=P)
  params = nn.unbox(method.init(jax.random.key(0), model, base))
  rs = np.random.RandomState(0)
  params = jax.tree.map(
      lambda v: jnp.asarray(v + rs.normal(0, 0.3, v.shape), jnp.float32),
      params)
  index = jnp.asarray([2, 0, 2])
  got = jitted(method, model)({"base": base, **params},
                              dict(inputs, adapter_index=index))
  tree = params["prompt"]
  single = jitted(prompt_tuning.PromptTuning(length=P), model)
  for row, t in enumerate(np.asarray(index)):
    prompt = (tree["shared"] * jnp.outer(tree["u"][t], tree["v"][t])
              if composition == "multiplicative"
              else tree["shared"] + tree["delta"][t])
    want = single({"base": base, "prompt": {"embedding": prompt}},
                  {k: v[row:row + 1] for k, v in inputs.items()})
    np.testing.assert_allclose(np.asarray(got[row:row + 1]), np.asarray(want),
                               atol=1e-5)
