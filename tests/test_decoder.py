"""Decoder-only models against transformers (tiny random models, CPU torch)."""
import functools

import numpy as np
import pytest
import torch
import transformers

import jax
from mtjax.models import decoder, hf

torch.set_num_threads(1)  # tiny models: threads only contend with XLA

VOCAB = 96
LENGTH = 9  # prompt length in every test, so compiled functions are reused
NEW = 16  # generated tokens in every test
ARCHS = ("llama", "qwen2", "gemma", "bloom", "mistral")


def hf_tiny(arch):
  """A tiny random transformers model; every weight (biases, norms) perturbed."""
  torch.manual_seed(0)
  common = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2,
                pad_token_id=0)
  llama_like = dict(common, hidden_size=32, intermediate_size=48,
                    num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2)  # GQA: 2 query heads per KV head
  if arch == "llama":
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**llama_like))
  elif arch == "qwen2":  # q/k/v biases
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**llama_like))
  elif arch == "mistral":  # sliding window shorter than the test sequences
    model = transformers.MistralForCausalLM(transformers.MistralConfig(
        **llama_like, sliding_window=4))
  elif arch == "gemma":  # MQA, head_dim != hidden / heads, tied embeddings
    model = transformers.GemmaForCausalLM(transformers.GemmaConfig(
        **dict(llama_like, num_key_value_heads=1, head_dim=16)))
  elif arch == "bloom":  # 6 heads: exercises ALiBi's non-power-of-2 slopes
    model = transformers.BloomForCausalLM(transformers.BloomConfig(
        **common, hidden_size=48, n_layer=2, n_head=6))
  # Large enough weights that greedy decoding does not collapse into repeating
  # one token (which would make generation comparisons weak).
  noise = 0.7 if arch == "bloom" else 0.4
  with torch.no_grad():
    for name, p in model.named_parameters():
      big = p.ndim == 2 and (arch == "bloom" or "embed" not in name)
      p.add_((noise if big else 0.1) * torch.randn_like(p))
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


def forward(model, params, ids, mask=None, segment_ids=None):
  """Jitted logits; jit caches by model and shapes, so tests share compiles."""
  return np.asarray(_forward(model, params, ids, mask, segment_ids))


XLA_DEFAULT_OPTIMISATION = {"xla_backend_optimization_level": 3,
                            "xla_llvm_disable_expensive_passes": False}


@functools.partial(jax.jit, static_argnames="model")
def _forward(model, params, ids, mask, segment_ids):
  return model.apply({"params": params}, ids, mask, segment_ids=segment_ids)


def left_padded_batch(seed=0, length=LENGTH):
  rng = np.random.RandomState(seed)
  ids = rng.randint(3, VOCAB, (3, length)).astype(np.int64)
  mask = np.ones_like(ids)
  mask[1, :2] = 0
  mask[2, :3] = 0
  ids[mask == 0] = 0
  return ids, mask


def hf_logits(ref, ids, mask):
  positions = np.maximum(np.cumsum(mask, 1) - 1, 0)  # what HF generate passes
  with torch.no_grad():
    return ref(torch.tensor(ids), attention_mask=torch.tensor(mask),
               position_ids=torch.tensor(positions)).logits.float().numpy()


def test_logits_match_hf(pair):
  arch, ref, model, params = pair
  ids, mask = left_padded_batch()
  # Compiled as mtjax compiles by default: conftest.py's fast-compile flags
  # round differently (BLOOM's max difference: 3.9e-5 at XLA's default
  # optimisation, 1.6e-4 with the flags).
  ours = np.asarray(_forward.lower(model, params, ids, mask, None).compile(
      compiler_options=XLA_DEFAULT_OPTIMISATION)(params, ids, mask, None))
  theirs = hf_logits(ref, ids, mask)
  # HF's pad-query rows attend to nothing meaningful: compare real tokens.
  diff = np.abs(ours - theirs)[mask.astype(bool)].max()
  print(f"{arch}: max |logits - HF| over real tokens = {diff:.2e}")
  assert diff < 1e-4


def test_greedy_generation_matches_hf(pair):
  arch, ref, model, params = pair
  ids, mask = left_padded_batch(seed=1)
  ours = np.asarray(decoder.generate(model, params, ids, mask, NEW))
  with torch.no_grad():
    out = ref.generate(torch.tensor(ids), attention_mask=torch.tensor(mask),
                       max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                       eos_token_id=None, pad_token_id=0)
  theirs = out[:, ids.shape[1]:].numpy()
  print(f"{arch}: ours {ours[0].tolist()} HF {theirs[0].tolist()}")
  np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("pair", ['llama'], indirect=True)
def test_eos_stops_rows_like_hf(pair):
  arch, ref, model, params = pair
  ids, mask = left_padded_batch(seed=1)
  free = np.asarray(decoder.generate(model, params, ids, mask, NEW))
  # EOS := the first token row 0 emits at step >= 2 that it never emitted before.
  step = next(i for i in range(2, NEW) if free[0, i] not in free[0, :i])
  eos = int(free[0, step])
  ours = np.asarray(decoder.generate(model, params, ids, mask, NEW, eos_id=eos))
  with torch.no_grad():
    out = ref.generate(torch.tensor(ids), attention_mask=torch.tensor(mask),
                       max_new_tokens=NEW, do_sample=False, eos_token_id=eos,
                       pad_token_id=0)
  theirs = out[:, ids.shape[1]:].numpy()
  theirs = np.pad(theirs, ((0, 0), (0, NEW - theirs.shape[1])),
                  constant_values=0)
  np.testing.assert_array_equal(ours, theirs)
  assert ours[0, step] == eos and (ours[0, step + 1:] == 0).all()  # then pads


def test_save_then_transformers_load(pair, tmp_path):
  arch, _, model, params = pair
  hf.save(model, params, str(tmp_path))
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(
      str(tmp_path)).eval()
  assert type(reloaded).__name__ == decoder.config_to_hf(
      model.config)["architectures"][0]
  ids, mask = left_padded_batch(seed=2)
  ours = forward(model, params, ids, mask)
  diff = np.abs(ours - hf_logits(reloaded, ids, mask))[mask.astype(bool)].max()
  print(f"{arch}: saved -> transformers max diff = {diff:.2e}")
  assert diff < 1e-4
  model2, params2 = hf.load(str(tmp_path))
  assert model2.config == model.config
  jax.tree.map(np.testing.assert_array_equal, params, params2)


@pytest.mark.parametrize("pair", ['llama', 'bloom'], indirect=True)
def test_cached_generation_equals_uncached_argmax(pair):
  arch, _, model, params = pair
  ids, mask = left_padded_batch(seed=1)
  cached = np.asarray(decoder.generate(model, params, ids, mask, NEW))
  # Uncached: one fixed-size buffer (future slots masked out; causal attention
  # makes them invisible anyway), full forward pass per new token.
  seq = np.concatenate([ids, np.zeros((3, NEW), ids.dtype)], 1)
  m = np.concatenate([mask, np.zeros((3, NEW), mask.dtype)], 1)
  for i in range(NEW):
    t = LENGTH + i
    seq[:, t] = forward(model, params, seq, m)[:, t - 1].argmax(-1)
    m[:, t] = 1
  np.testing.assert_array_equal(cached, seq[:, LENGTH:])


@pytest.mark.parametrize("pair", ['llama', 'bloom', 'mistral'], indirect=True)
def test_packed_segments_equal_separate_passes(pair):
  arch, _, model, params = pair
  rng = np.random.RandomState(4)
  a, b = rng.randint(3, VOCAB, 5), rng.randint(3, VOCAB, 4)
  packed = np.concatenate([a, b, [0, 0]])[None]
  segments = np.array([[1] * 5 + [2] * 4 + [0] * 2])
  out = forward(model, params, packed, segment_ids=segments)
  # Separate passes, right-padded to the same shape (causal: pads are unseen).
  alone = np.zeros((2, 11), int)
  alone[0, :5], alone[1, :4] = a, b
  sep = forward(model, params, alone, (alone > 0).astype(int))
  la, lb = sep[:1, :5], sep[1:, :4]
  diff = max(np.abs(out[:, :5] - la).max(), np.abs(out[:, 5:9] - lb).max())
  print(f"{arch}: packed vs separate max diff = {diff:.2e}")
  assert diff < 1e-5


@pytest.mark.parametrize("pair", ['llama', 'bloom'], indirect=True)
def test_bfloat16_close_to_float32(pair):
  arch, _, model, params = pair
  ids, mask = left_padded_batch(seed=5)
  f32 = forward(model, params, ids, mask)
  bf16_model = decoder.Model(decoder.DecoderConfig(
      **{**model.config.__dict__, "dtype": "bfloat16"}))
  bf16 = forward(bf16_model, params, ids, mask)
  assert bf16.dtype == np.float32  # logits are f32 whatever the compute dtype
  real = mask.astype(bool)
  rel = np.abs(bf16 - f32)[real].max() / np.abs(f32[real]).max()
  print(f"{arch}: bf16 vs f32 max diff relative to max |logit| = {rel:.3f}")
  assert rel < 0.05  # bf16 keeps 8 mantissa bits; 2 layers drift ~1%
  agree = (bf16.argmax(-1) == f32.argmax(-1))[real].mean()
  assert agree > 0.8


@pytest.mark.parametrize("pair", ['llama'], indirect=True)
def test_sampling_uses_rng_and_stays_in_vocab(pair):
  arch, _, model, params = pair
  ids, mask = left_padded_batch(seed=6)
  def sample(key, temperature=1.0):
    return np.asarray(decoder.generate(model, params, ids, mask, NEW,
                                       temperature=temperature,
                                       rng=jax.random.key(key)))
  s1, s1b, s2 = sample(1), sample(1), sample(2)
  np.testing.assert_array_equal(s1, s1b)
  assert (s1 != s2).any()
  assert ((0 <= s1) & (s1 < VOCAB)).all()
  # A tiny temperature is (almost surely) greedy.
  greedy = np.asarray(decoder.generate(model, params, ids, mask, NEW))
  np.testing.assert_array_equal(sample(3, temperature=1e-4), greedy)
  with pytest.raises(ValueError, match="rng"):
    decoder.generate(model, params, ids, mask, 3, temperature=0.7)


def test_default_positions_follow_hf_and_restart_per_segment():
  mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
  np.testing.assert_array_equal(decoder.default_positions(mask),
                                [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]])
  segments = np.array([[1, 1, 1, 2, 2, 0]])
  np.testing.assert_array_equal(
      decoder.default_positions(segments != 0, segments), [[0, 1, 2, 0, 1, 0]])
  # Decoding continues from per-row offsets.
  np.testing.assert_array_equal(
      decoder.default_positions(np.ones((2, 2)), offset=np.array([3, 5])),
      [[3, 4], [5, 6]])
