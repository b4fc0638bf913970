"""KV-cached greedy generation through every method equals recomputation.

Evaluation decodes a method with the KV cache when it declares
`cached_decoding` (mtjax.methods.transform): the prompt is prefilled through
`method.apply(decode='prefill')` and each token is one cached step. The
reference is the same evaluation greedy function with `cached=False`, which
reruns the method's whole forward over the filled buffer at every step. On a
tiny random Llama (and T5) with non-trivial method parameters, for a batch of
prompts of different lengths (right-padded in the evaluation buffer,
left-padded in the cached prefill), both paths must choose the same tokens and
agree on every step's logits within 1e-4.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtjax.models
from mtjax.evaluation import evaluate
from mtjax.methods import full, ia3, lora, prompt_tuning, transform
from mtjax.methods import soft_injection as si
from mtjax.models import decoder, t5
from mtjax.routing import baselines
from mtjax.routing import routed as routed_lib

V = 64
NEW = 5
LENGTHS = {"inputs": 8, "targets": NEW}
# Different lengths, one filling the whole input width (the cached prefill's
# last slot) and one of a single token.
PROMPT_LENGTHS = (3, 8, 1, 6)
TASKS = np.array([0, 1, 1, 0], np.int32)  # adapter_index of the multitask rows


# Compiled without LLVM optimisations: halves the compile time that
# dominates this file (the decoding itself runs in milliseconds).
FAST_COMPILE = {"xla_backend_optimization_level": 0,
                "xla_llvm_disable_expensive_passes": True}


def _fast(fn, *args):
  """fn(*args), jitted and compiled with FAST_COMPILE."""
  return jax.jit(fn).lower(*args).compile(compiler_options=FAST_COMPILE)(*args)


def _random(shapes, seed, scale=0.45, offset=0.0, which=None, vectors=None):
  """Random arrays shaped like `shapes` (a pytree of ShapeDtypeStructs).

  Leaves whose path contains `which` (every leaf if None) are offset +
  N(0, scale); with `vectors`, 1-D leaves are `vectors` (norm scales); other
  leaves are zeros. Drawn with numpy: nothing to compile.
  """
  rng = np.random.RandomState(seed)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(nn.unbox(shapes))
  out = []
  for path, x in leaves:
    if vectors is not None and len(x.shape) == 1:
      out.append(np.full(x.shape, vectors, np.float32))
    elif which is None or which in jax.tree_util.keystr(path):
      out.append((offset + scale * rng.randn(*x.shape)).astype(np.float32))
    else:
      out.append(np.zeros(x.shape, np.float32))
  return jax.tree.unflatten(treedef, out)


@functools.lru_cache(maxsize=None)
def _model(arch):
  """A tiny model with large random weights (greedy decoding does not
  collapse into one token)."""
  ids = jnp.zeros((1, 4), jnp.int32)
  if arch == "llama":
    model = decoder.Model(decoder.DecoderConfig(
        model_type="llama", vocab_size=V, hidden_size=32, intermediate_size=48,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        pad_token_id=0, eos_token_id=1))
    init = lambda k: model.init(k, ids)  # noqa: E731
  else:
    model = t5.Model(t5.T5Config(
        vocab_size=V, d_model=32, d_kv=8, d_ff=48, num_layers=1,
        num_decoder_layers=1, num_heads=4, feed_forward_proj="gated-gelu",
        tie_word_embeddings=False, dropout_rate=0.0))
    init = lambda k: model.init(k, ids, decoder_input_ids=ids)  # noqa: E731
  shapes = jax.eval_shape(init, jax.random.key(0))["params"]
  return model, _random(shapes, 0, vectors=1.0)


def _method_params(method, model, base, seed, **kwargs):
  """Random params shaped like method.init's (`_random(..., **kwargs)`)."""
  shapes = jax.eval_shape(lambda: method.init(jax.random.key(0), model, base))
  return _random(shapes, seed, **kwargs)


def _library(model, lo, num_experts):
  """Stacked LoRA library {path: {lora_a (E,d,r), lora_b (E,r,o), gate (E,d)}}."""
  rng = np.random.RandomState(7)
  flat = {}
  for path, t in sorted(lo._targets(model).items()):
    d, o = t.shape
    for leaf, shape in (("lora_a", (d, lo.rank)), ("lora_b", (lo.rank, o)),
                        ("gate", (d,))):
      flat[f"{path}/{leaf}"] = rng.randn(num_experts, *shape).astype(np.float32)
  return transform.nest(flat)


class _Recording(full.FullFineTuning):
  """Full fine-tuning that records the `decode` mode of each traced call."""

  def __init__(self):
    self.modes = []

  def apply(self, model, params, inputs, **kwargs):
    self.modes.append(kwargs.get("decode"))
    return super().apply(model, params, inputs, **kwargs)


@functools.lru_cache(maxsize=None)
def _case(arch, name):
  """(method, params, extra batch entries) with non-trivial method params."""
  model, base = _model(arch)
  seed = sum(map(ord, name))
  decoder_only = arch == "llama"
  if name == "full":
    return full.FullFineTuning(), {"base": base}, {}
  if name == "lora":  # random A and B (a fresh LoRA's B is zero)
    targets = ([r".*self_attn/(q_proj|v_proj|o_proj)", r".*mlp/down_proj"]
               if decoder_only else [r".*(SelfAttention|EncDecAttention)/(q|k|v)"])
    m = lora.LoRA(rank=4, alpha=8.0, targets=targets)
    return m, {"base": base, **_method_params(m, model, base, seed)}, {}
  if name == "ia3":  # scales around one
    m = ia3.IA3()
    return m, {"base": base, **_method_params(m, model, base, seed, scale=0.5,
                                              offset=1.0)}, {}
  if name == "prompt_tuning":
    m = prompt_tuning.PromptTuning(length=3)
    return m, {"base": base, **_method_params(m, model, base, seed,
                                              scale=1.0)}, {}
  if name == "multitask_prompt":  # rows of two tasks (adapter_index)
    m = prompt_tuning.MultitaskPromptTuning(num_tasks=2, length=3)
    mp = _method_params(m, model, base, seed, scale=0.5, offset=1.0)
    return m, {"base": base, **mp}, {"adapter_index": TASKS}
  if name in ("phatgoose", "arrow"):  # per-token top-2 of 3 experts
    lo = lora.LoRA(rank=2, alpha=4.0, targets=(
        [r".*self_attn/(q_proj|v_proj)", r".*mlp/up_proj"] if decoder_only
        else [r".*(SelfAttention|EncDecAttention)/(q|v)"]))
    # 'dense' compiles fastest; the kernels agree (tests/test_routing.py).
    m = routed_lib.build_router(name, lo, top_k=2, impl="dense")
    return m, routed_lib.routed_params(base, _library(model, lo, 3), m), {}
  if name == "soft_injection":  # random task embedding and per-head alpha
    cfg = model.config
    heads = cfg.num_attention_heads if decoder_only else cfg.num_heads
    layers = (cfg.num_hidden_layers if decoder_only
              else cfg.num_decoder_layers)
    dim = cfg.head_dim if decoder_only else cfg.d_kv
    rng = np.random.RandomState(seed)
    m = si.SoftInjection(3.0 * rng.randn(layers, heads, dim),
                         alpha_logits=rng.randn(layers, heads))
    return m, {"base": base, "soft_injection": {
        "alpha_logits": m.alpha_logits, "embedding": m.embeddings}}, {}
  raise ValueError(name)


@functools.lru_cache(maxsize=None)
def _greedy(arch, name, cached):
  """The evaluation's greedy function of a case, compiled for `_prompts()`."""
  model, _ = _model(arch)
  _, params, extra = _case(arch, name)
  feats, start = _batch(arch, extra)
  fn = evaluate.make_greedy(_case(arch, name)[0], model, NEW, cached=cached,
                            return_logits=True)
  return fn.lower(params, feats, start).compile(compiler_options=FAST_COMPILE)


def _batch(arch, extra, **batch_kwargs):
  kind = "decoder" if arch == "llama" else "encoder_decoder"
  feats, start = evaluate.generation_batch(_prompts(), kind, LENGTHS, NEW,
                                           **batch_kwargs)
  return {**feats, **extra}, start


def _prompts(seed=3):
  r = np.random.RandomState(seed)
  return [r.randint(3, V, n).tolist() for n in PROMPT_LENGTHS]


def _run(arch, name, cached, **batch_kwargs):
  """(ids, logits) of the evaluation's greedy decoding of `_prompts()`."""
  _, params, extra = _case(arch, name)
  feats, start = _batch(arch, extra, **batch_kwargs)
  ids, logits = _greedy(arch, name, cached)(params, feats, start)
  return np.asarray(ids), np.asarray(logits)


DECODER_METHODS = ("full", "lora", "ia3", "prompt_tuning", "multitask_prompt",
                   "phatgoose", "arrow", "soft_injection")
T5_METHODS = ("lora", "prompt_tuning", "phatgoose", "soft_injection")


@pytest.mark.parametrize("arch,name",
                         [("llama", n) for n in DECODER_METHODS]
                         + [("t5", n) for n in T5_METHODS])
def test_cached_greedy_equals_recomputation(arch, name):
  method = _case(arch, name)[0]
  assert transform.cached_decoding(method)
  ids, logits = _run(arch, name, cached=True)
  want_ids, want_logits = _run(arch, name, cached=False)
  np.testing.assert_array_equal(ids, want_ids)
  np.testing.assert_allclose(logits, want_logits, rtol=1e-4, atol=1e-4)
  # The tokens are the argmax of the logits, and the decoding is not trivial.
  np.testing.assert_array_equal(ids, logits.argmax(-1))
  assert len(np.unique(ids)) > 3, ids
  if name != "full":  # the method's parameters change the generation
    assert (_run(arch, "full", cached=True)[0] != ids).any()
  elif arch == "llama":  # an LM vocabulary's layout: pad id 2, start slot out
    lm = dict(pad_id=2, lm=True)
    ids, logits = _run(arch, name, cached=True, **lm)
    want_ids, want_logits = _run(arch, name, cached=False, **lm)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(logits, want_logits, rtol=1e-4, atol=1e-4)


def test_cached_path_goes_through_method_apply():
  """The cached greedy traces method.apply with decode='prefill'/'step', the
  recomputation without a cache (traced only, not compiled)."""
  model, base = _model("llama")
  feats, start = evaluate.generation_batch(_prompts(), "decoder", LENGTHS, NEW)
  for cached, modes in ((True, {"prefill", "step"}), (False, {None})):
    method = _Recording()
    evaluate.make_greedy(method, model, NEW, cached=cached).lower(
        {"base": base}, feats, start)
    assert set(method.modes) == modes, method.modes


def test_methods_without_cached_decoding_recompute():
  """A method without the flag (e.g. retrieval routing, whose expert choice
  reads the generated tokens) is decoded by recomputation, explicitly."""
  model, _ = _model("llama")
  lo = lora.LoRA(rank=2, targets=[r".*self_attn/q_proj"])
  retrieval = baselines.RetrievalRouting(lo)
  assert not transform.cached_decoding(retrieval)
  with pytest.raises(ValueError, match="cached_decoding"):
    evaluate.make_greedy(retrieval, model, NEW, cached=True)

  class Custom:  # a third-party method: no flag, no decode argument
    def apply(self, model, params, inputs, *, rng=None, deterministic=True,
              method=None):
      return full.FullFineTuning().apply(model, params, inputs, rng=rng,
                                         deterministic=deterministic,
                                         method=method)

  model, base = _model("llama")
  feats, start = evaluate.generation_batch(_prompts(), "decoder", LENGTHS, NEW)
  ids = _fast(evaluate.make_greedy(Custom(), model, NEW), {"base": base},
              feats, start)
  np.testing.assert_array_equal(ids, _run("llama", "full", cached=True)[0])


def test_public_logits_are_jitted_and_eager_under_interceptors():
  model, base = _model("llama")
  ids = np.array(_prompts()[1:2], np.int32)
  eager = mtjax.models.logits(model, base, ids, jit=False)
  jitted = mtjax.models.logits(model, base, ids)
  np.testing.assert_allclose(jitted, eager, rtol=1e-5, atol=1e-5)
  before = mtjax.models._jitted_logits._cache_size()
  mtjax.models.logits(model, base, ids + 1, np.ones_like(ids))
  mtjax.models.logits(model, base, ids + 2, np.ones_like(ids))
  assert mtjax.models._jitted_logits._cache_size() == before + 1  # one compile

  def zero_lm_head(next_fun, args, kwargs, ctx):
    out = next_fun(*args, **kwargs)
    return out * 0 if ctx.module.name == "lm_head" else out

  # Under an interceptor the call runs eagerly, so the interceptor acts.
  with nn.intercept_methods(zero_lm_head):
    assert not np.asarray(mtjax.models.logits(model, base, ids)).any()
  with pytest.raises(ValueError, match="decoder-only"):
    mtjax.models.logits(model, base, ids, decoder_input_ids=ids)
