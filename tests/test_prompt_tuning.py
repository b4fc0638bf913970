"""Prompt tuning through the embedding interceptor, without the model knowing."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtjax import methods
from mtjax.methods import adapters, prompt_tuning
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
  np.testing.assert_array_equal(prompt["prompt"]["embedding"][:2],
                                table[jnp.asarray([7, 8])])
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


def _config(name):
  import importlib.util  # pylint: disable=g-import-not-at-top
  import pathlib  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(__file__).resolve().parents[1] / "configs" / f"{name}.py"
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def train_losses(config, workdir, steps, every=5):
  """Loss after each `every` steps through mtjax.training (no eval)."""
  from mtjax import data  # pylint: disable=g-import-not-at-top
  from mtjax.models import sharding  # pylint: disable=g-import-not-at-top
  from mtjax.experiments import train  # pylint: disable=g-import-not-at-top
  from mtjax.training import trainer  # pylint: disable=g-import-not-at-top
  vocab = data.vocabulary(config.data.vocab)
  reg = data.register(vocab)
  name = reg.seqio_name(config.data.mixture)
  s = train.setup(config, workdir, num_tasks=len(data.task_names(name, vocab)))
  batches = data.train_batches(
      name, vocab, {"inputs": config.data.inputs_length,
                    "targets": config.data.targets_length}, config.batch_size,
      trainer.model_kind(s["model"]), seed=config.data.seed)
  key = (config.method.get("adapter_index_from") or "")
  losses, window = [], []

  def prepare(host):
    if key:
      host["adapter_index"] = host[key]
    return host

  def on_step(done, state, m):
    window.append(float(m["loss"]))
    if done % every == 0:
      losses.append(float(np.mean(window)))
      window.clear()
  with sharding.use_mesh(s["mesh"]):
    state, _ = s["fitter"].run(s["state"], s["frozen"], batches, stop=steps,
                               prepare=prepare, on_step=on_step)
  params = trainer.unflatten({**state["params"], **s["frozen"]})
  return losses, params


def test_prompt_transfer_converges_faster_than_vocab_init(tmp_path):
  """Multitask prompt transfer (configs/prompt_transfer.py, shrunk).

  Setup (seed 0): byte-level T5 (d_model 64, 2+2 layers) with a random frozen
  base; prompts of 8 vectors, AdamW lr 0.1, batch 16. Source: multitask
  prompt (shared S x per-task rank-1) on the held_in mixture, 60 steps.
  Target: held-out 'reverse_uppercase', 30 steps from S (transfer) or from
  sampled vocabulary embeddings. Margin: the transfer run reaches the vocab
  run's final loss (mean of its last 5 steps) within half as many steps.
  """
  from mtjax.methods import library  # pylint: disable=g-import-not-at-top
  c = _config("prompt_transfer")
  with c.unlocked():
    c.model.update(d_model=64, d_kv=16, d_ff=128)
    c.batch_size = 16
    c.optimizer.update(learning_rate=0.1, warmup_steps=0)
    c.method.length = 8
    c.transfer.source_method.update(length=8, num_tasks=11)
  src = c.copy_and_resolve_references()
  with src.unlocked():
    src.method = c.transfer.source_method
    src.data.mixture = "held_in"
  _, source = train_losses(src, str(tmp_path / "source"), 60)
  adapters.save_adapter(tmp_path / "source_prompt", source)
  curves = {}
  for init in ("vocab", "transfer"):
    t = c.copy_and_resolve_references()
    with t.unlocked():
      t.data.mixture = "reverse_uppercase"
      if init == "transfer":
        t.method.init_from = str(tmp_path / "source_prompt")
    curves[init], _ = train_losses(t, str(tmp_path / init), 30)
  print({k: np.round(v, 2).tolist() for k, v in curves.items()})
  target = curves["vocab"][-1]
  reached = next(5 * (i + 1) for i, loss in enumerate(curves["transfer"] + [0])
                 if loss <= target)
  print(f"transfer reaches the vocab-init loss after 30 steps "
        f"({target:.2f}) in {reached} steps")
  assert reached <= 15
