"""Llama-3 rope scaling, Qwen3 and Gemma 3 against transformers (tiny random models).

Each architecture is checked three ways: logits of a left- and right-padded
batch (real tokens only), greedy generation of a left-padded batch through the
KV cache, and hf.save -> transformers from_pretrained -> same logits.
"""
import functools
import json

import jax
import numpy as np
import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from mtjax.models import decoder, hf

torch.set_num_threads(1)  # tiny models: threads only contend with XLA

VOCAB = 96
LENGTH = 10  # prompt length: longer than Gemma 3's test window
NEW = 16  # generated tokens
WINDOW = 4  # Gemma 3 sliding window
ARCHS = ("llama3", "qwen3", "gemma3")
LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=10000.0, factor=4.0,
                   low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=64)


def hf_config(arch):
  common = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                hidden_size=64, intermediate_size=96, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16)  # GQA: 2 query heads per KV
  if arch == "llama3":  # wavelengths > 16 slots are stretched or interpolated
    return transformers.LlamaConfig(**common, num_hidden_layers=2,
                                    max_position_embeddings=128,
                                    rope_parameters=dict(LLAMA3_ROPE))
  if arch == "qwen3":  # q/k norms; head_dim 24 != hidden / heads
    return transformers.Qwen3Config(**dict(common, head_dim=24),
                                    num_hidden_layers=2, rope_parameters=dict(
                                        rope_type="default", rope_theta=1e5))
  # Gemma 3: sliding (window 4 < LENGTH) and global layers with their own rope
  # (global: linear scaling), query_pre_attn_scalar != head_dim, final-logit
  # softcapping (attn_logit_softcapping is refused: HF's Gemma3 ignores it).
  return transformers.Gemma3TextConfig(
      **common, num_hidden_layers=4, sliding_window=WINDOW,
      layer_types=["sliding_attention", "full_attention", "sliding_attention",
                   "full_attention"],
      rope_parameters={
          "full_attention": {"rope_type": "linear", "factor": 2.0,
                             "rope_theta": 1e5},
          "sliding_attention": {"rope_type": "default", "rope_theta": 1e3}},
      query_pre_attn_scalar=24, final_logit_softcapping=3.0)


HF_CLASS = {"llama3": transformers.LlamaForCausalLM,
            "qwen3": transformers.Qwen3ForCausalLM,
            "gemma3": transformers.Gemma3ForCausalLM}


def hf_tiny(arch):
  """A tiny random f32 transformers model; weights (norms too) perturbed.

  Embeddings keep their N(0, 0.02) init: larger ones make Gemma's scaled tied
  embeddings dominate and greedy decoding repeat one token forever.
  """
  torch.manual_seed(0)
  # eager: the reference implementation.
  config = hf_config(arch)
  config._attn_implementation = "eager"
  model = HF_CLASS[arch](config)
  # Large enough weights that greedy decoding does not collapse into repeating
  # one token (which would make generation comparisons weak).
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "embed" not in name:
        p.add_((0.4 if p.ndim == 2 else 0.1) * torch.randn_like(p))
  return model.eval()


@pytest.fixture(scope="module", params=ARCHS)
def pair(request, tmp_path_factory):
  """(arch, HF torch model, mtjax model, params) loaded via hf.load."""
  arch = request.param
  ref = hf_tiny(arch)
  path = str(tmp_path_factory.mktemp(arch))
  ref.save_pretrained(path, safe_serialization=True)
  model, params = hf.load(path)
  return arch, ref, model, params


@functools.partial(jax.jit, static_argnames="model")
def _forward(model, params, ids, mask):
  return model.apply({"params": params}, ids, mask)


def forward(model, params, ids, mask):
  return np.asarray(_forward(model, params, ids, mask))


def padded_batch(seed, right=True):
  """(ids, mask) (4, LENGTH): full, two left-padded and one right-padded row."""
  rng = np.random.RandomState(seed)
  ids = rng.randint(3, VOCAB, (4, LENGTH)).astype(np.int64)
  mask = np.ones_like(ids)
  mask[1, :2] = 0
  mask[2, :5] = 0
  if right:
    mask[3, -3:] = 0
  else:
    mask[3, :1] = 0
  ids[mask == 0] = 0
  return ids, mask


def hf_logits(ref, ids, mask):
  positions = np.maximum(np.cumsum(mask, 1) - 1, 0)  # what HF generate passes
  with torch.no_grad():
    return ref(torch.tensor(ids), attention_mask=torch.tensor(mask),
               position_ids=torch.tensor(positions)).logits.float().numpy()


def max_diff_real(ours, theirs, mask):
  # HF's pad-query rows attend to nothing meaningful: compare real tokens.
  return np.abs(ours - theirs)[mask.astype(bool)].max()


def test_logits_match_hf(pair):
  arch, ref, model, params = pair
  ids, mask = padded_batch(0)
  diff = max_diff_real(forward(model, params, ids, mask),
                       hf_logits(ref, ids, mask), mask)
  print(f"{arch}: max |logits - HF| over real tokens = {diff:.2e}")
  assert diff < 1e-4


def test_greedy_generation_matches_hf(pair):
  arch, ref, model, params = pair
  ids, mask = padded_batch(1, right=False)
  ours = np.asarray(decoder.generate(model, params, ids, mask, NEW))
  with torch.no_grad():
    out = ref.generate(torch.tensor(ids), attention_mask=torch.tensor(mask),
                       max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                       eos_token_id=None, pad_token_id=0)
  theirs = out[:, ids.shape[1]:].numpy()
  print(f"{arch}: ours {ours[0].tolist()} HF {theirs[0].tolist()}")
  assert len(set(theirs[0].tolist())) > 3  # not a collapsed, weak comparison
  np.testing.assert_array_equal(ours, theirs)


def test_save_then_transformers_load(pair, tmp_path):
  arch, _, model, params = pair
  hf.save(model, params, str(tmp_path))
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(
      str(tmp_path), attn_implementation="eager").eval()
  assert type(reloaded) is HF_CLASS[arch]
  ids, mask = padded_batch(2)
  diff = max_diff_real(forward(model, params, ids, mask),
                       hf_logits(reloaded, ids, mask), mask)
  print(f"{arch}: saved -> transformers max diff = {diff:.2e}")
  assert diff < 1e-4
  model2, params2 = hf.load(str(tmp_path))
  assert model2.config == model.config
  jax.tree.map(np.testing.assert_array_equal, params, params2)


def test_config_fields_reach_the_model(pair):
  arch, _, model, _ = pair
  c = model.config
  if arch == "llama3":
    assert (c.rope_type, c.rope_factor, c.rope_original_max_position_embeddings
            ) == ("llama3", 4.0, 64)
  elif arch == "qwen3":
    assert c.qk_norm and c.head_dim == 24 and c.rope_theta == 1e5
  else:
    assert [c.layer_window(i) for i in range(4)] == [WINDOW, None, WINDOW, None]
    assert (c.rope_type, c.rope_factor, c.rope_theta, c.rope_local_theta) == (
        "linear", 2.0, 1e5, 1e3)
    assert (c.query_pre_attn_scalar, c.final_logit_softcapping,
            c.tie_word_embeddings) == (24, 3.0, True)


@pytest.mark.parametrize("rope", [
    LLAMA3_ROPE,
    # Llama 3.1's own values (head_dim 128).
    dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
         high_freq_factor=4.0, original_max_position_embeddings=8192),
    dict(rope_type="linear", rope_theta=1e6, factor=8.0),
])
def test_inv_freq_equals_transformers(rope):
  head_dim = 16 if rope is LLAMA3_ROPE else 128
  config = transformers.LlamaConfig(
      hidden_size=4 * head_dim, num_attention_heads=4, head_dim=head_dim,
      max_position_embeddings=4 * rope.get("original_max_position_embeddings", 64),
      rope_parameters=dict(rope))
  theirs, scaling = ROPE_INIT_FUNCTIONS[rope["rope_type"]](config)
  assert scaling == 1.0
  cfg = decoder.config_from_hf(dict(config.to_dict(), model_type="llama"))
  ours = cfg.inv_freq(0)
  # theta ** x rounds differently in rare entries (torch's powf): <= 1 ulp.
  np.testing.assert_allclose(ours, theirs.numpy(), rtol=1.2e-7, atol=0)
  default = decoder.rope_inv_freq(head_dim, rope["rope_theta"])
  assert (ours != default).any()


def test_legacy_config_keys_read_like_transformers():
  # Gemma 3 as first released: sliding_window_pattern, rope_local_base_freq,
  # rope_theta and rope_scaling (global layers) instead of rope_parameters.
  legacy = dict(model_type="gemma3_text", vocab_size=VOCAB, hidden_size=64,
                intermediate_size=96, num_hidden_layers=7, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, sliding_window_pattern=3,
                rope_theta=5e5, rope_local_base_freq=777.0,
                rope_scaling={"rope_type": "linear", "factor": 8.0})
  theirs = transformers.Gemma3TextConfig(**legacy)
  ours = decoder.config_from_hf(legacy)
  assert list(ours.layer_types) == theirs.layer_types
  full = theirs.rope_parameters["full_attention"]
  assert (ours.rope_type, ours.rope_factor, ours.rope_theta) == (
      full["rope_type"], full["factor"], full["rope_theta"])
  assert ours.rope_local_theta == theirs.rope_parameters[
      "sliding_attention"]["rope_theta"]
  assert ours.hidden_act == "gelu_pytorch_tanh"
  # Written back in transformers 5's form, it reads the same.
  assert decoder.config_from_hf(json.loads(json.dumps(
      decoder.config_to_hf(ours)))) == ours
  # Llama 3.1 as released: rope_scaling and a top-level rope_theta.
  llama = dict(model_type="llama", vocab_size=VOCAB, hidden_size=64,
               intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
               rope_theta=5e5, max_position_embeddings=131072,
               rope_scaling={"rope_type": "llama3", "factor": 8.0,
                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192})
  cfg = decoder.config_from_hf(llama)
  assert (cfg.rope_type, cfg.rope_theta, cfg.rope_factor,
          cfg.rope_original_max_position_embeddings) == ("llama3", 5e5, 8.0, 8192)
  # Qwen3Config's defaults differ from hidden / heads.
  qwen3 = dict(model_type="qwen3", vocab_size=VOCAB, hidden_size=64,
               intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
               num_key_value_heads=2)
  assert decoder.config_from_hf(qwen3).head_dim == 128


@pytest.mark.parametrize("edit,match", [
    (dict(model_type="llama", rope_parameters={"rope_type": "yarn", "factor": 4.0}),
     r"rope type 'yarn'.*supported rope types: default, linear, llama3"),
    (dict(model_type="llama", rope_parameters={"rope_type": "llama3",
                                               "factor": 8.0}),
     r"'llama3' needs 'low_freq_factor'"),
    (dict(model_type="qwen3", use_sliding_window=True), "use_sliding_window"),
    (dict(model_type="gemma3_text", use_bidirectional_attention=True),
     "use_bidirectional_attention"),
    (dict(model_type="gemma3_text", attn_logit_softcapping=50.0),
     "attn_logit_softcapping=50.0"),
    (dict(model_type="gemma3_text", rope_parameters={
        "sliding_attention": {"rope_type": "dynamic", "factor": 2.0}}),
     r"'dynamic' of Gemma 3's sliding_attention layers"),
])
def test_unsupported_configs_are_refused_by_name(edit, match):
  base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
  with pytest.raises(ValueError, match=match):
    decoder.config_from_hf(dict(base, **edit))
