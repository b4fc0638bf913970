"""T5 family parity with Hugging Face on tiny random models built locally.

Three configurations: T5 v1.1-style (gated-gelu, separate lm_head, more decoder
than encoder layers), original T5 (relu, tied embeddings with the logit scale,
few buckets so short inputs reach the log-spaced buckets) and mT5.
Run with -s to see the measured figures.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from mtjax import models
from mtjax.models import hf, sharding, t5

SMALL = dict(vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_layers=2,
             num_heads=4, dropout_rate=0.1, decoder_start_token_id=0)
# name: (model_type, HF config fields, torch seed). Seeds whose random models
# do not greedily repeat one token (tied random models mostly do; the
# generation test checks the output is not degenerate).
CONFIGS = {
    "v11": ("t5", dict(feed_forward_proj="gated-gelu",
                       tie_word_embeddings=False, num_decoder_layers=3), 1),
    "orig": ("t5", dict(feed_forward_proj="relu", tie_word_embeddings=True,
                        relative_attention_num_buckets=8,
                        relative_attention_max_distance=20), 2),
    "mt5": ("mt5", dict(feed_forward_proj="gated-gelu",
                        tie_word_embeddings=False), 3),
}
HF_CLASSES = {
    "t5": (transformers.T5Config, transformers.T5ForConditionalGeneration),
    "mt5": (transformers.MT5Config, transformers.MT5ForConditionalGeneration),
}
HF_BUCKET = (transformers.models.t5.modeling_t5.T5Attention
             ._relative_position_bucket)
ENC_LENGTHS, DEC_LENGTHS = (11, 6, 9), (16, 5, 9)
STEPS = 16  # generated tokens; = max(DEC_LENGTHS) so compiled shapes are reused


def _batch(vocab, seed=0):
  """Right-padded encoder and decoder ids with HF attention masks."""
  rng = np.random.default_rng(seed)
  def padded(lengths, first=None):
    ids = np.zeros((len(lengths), max(lengths)), np.int64)
    mask = np.zeros_like(ids)
    for row, n in enumerate(lengths):
      ids[row, :n] = rng.integers(2, vocab, n)
      mask[row, :n] = 1
    if first is not None:
      ids[:, 0] = first
    return ids, mask
  input_ids, attention_mask = padded(ENC_LENGTHS)
  decoder_input_ids, decoder_attention_mask = padded(DEC_LENGTHS, first=0)
  return dict(input_ids=input_ids, attention_mask=attention_mask,
              decoder_input_ids=decoder_input_ids,
              decoder_attention_mask=decoder_attention_mask)


def _hf_logits(hf_model, batch):
  with torch.no_grad():
    out = hf_model(**{k: torch.from_numpy(v) for k, v in batch.items()})
  return out.logits.numpy()


@functools.lru_cache(maxsize=None)
def _forward(model):
  return jax.jit(lambda p, b: model.apply({"params": p}, **b))


def _logits(model, params, batch):
  return np.asarray(_forward(model)(params, {k: jnp.asarray(v, jnp.int32)
                                             for k, v in batch.items()}))


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
  """Tiny torch models: extra threads only spin (and slow the JAX compiles)."""
  before = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(before)


def _build(name, tmp_path_factory):
  """HF model -> safetensors -> mtjax (model, params); batch; HF logits."""
  model_type, extra, seed = CONFIGS[name]
  config_cls, model_cls = HF_CLASSES[model_type]
  torch.manual_seed(seed)
  hf_model = model_cls(config_cls(**SMALL, **extra))
  if not extra["tie_word_embeddings"]:
    # transformers 5 builds T5 with lm_head tied to `shared`; real v1.1/mT5
    # checkpoints have their own, so give it one.
    hf_model.lm_head.weight = torch.nn.Parameter(
        torch.randn_like(hf_model.shared.weight))
  hf_model.eval()
  folder = tmp_path_factory.mktemp(name)
  hf_model.save_pretrained(folder, safe_serialization=True)
  model, params = hf.load(str(folder))
  batch = _batch(SMALL["vocab_size"])
  return dict(name=name, hf=hf_model, folder=folder, model=model,
              params=params, batch=batch, hf_logits=_hf_logits(hf_model, batch))


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
  """cases(name) builds each configuration once per module."""
  built = {}
  def get(name):
    if name not in built:
      built[name] = _build(name, tmp_path_factory)
    return built[name]
  yield get
  built.clear()


@pytest.fixture(scope="module", params=list(CONFIGS))
def case(request, cases):
  return cases(request.param)


@pytest.fixture
def v11(cases):
  return cases("v11")


@pytest.fixture
def orig(cases):
  return cases("orig")


def test_relative_position_bucket_matches_hf():
  rel = np.arange(-400, 401)[None, :]
  for bidirectional in (True, False):
    for buckets, distance in ((32, 128), (8, 20), (16, 64)):
      ref = HF_BUCKET(torch.from_numpy(rel), bidirectional, buckets,
                      distance).numpy()
      ours = np.asarray(t5.relative_position_bucket(rel, bidirectional, buckets,
                                                    distance))
      np.testing.assert_array_equal(ours, ref)


def test_config_from_hf(case):
  cfg = case["model"].config
  _, extra, _ = CONFIGS[case["name"]]
  assert cfg.tie_word_embeddings == extra["tie_word_embeddings"]
  assert ("lm_head" in case["params"]) == (not extra["tie_word_embeddings"])
  assert cfg.num_decoder_layers == extra.get("num_decoder_layers", 2)
  assert cfg.feed_forward_proj == extra["feed_forward_proj"]


def test_logits_match_hf(case):
  ours = _logits(case["model"], case["params"], case["batch"])
  diff = float(np.abs(ours - case["hf_logits"]).max())
  print(f"\n[t5 parity] {case['name']}: f32 logits max|mtjax - HF| = "
        f"{diff:.2e} (max |logit| {np.abs(case['hf_logits']).max():.1f})")
  assert ours.shape == case["hf_logits"].shape
  assert diff < 1e-4


def _hf_generate(case, n, **kwargs):
  b = case["batch"]
  with torch.no_grad():
    out = case["hf"].generate(
        input_ids=torch.from_numpy(b["input_ids"]),
        attention_mask=torch.from_numpy(b["attention_mask"]),
        max_new_tokens=n, do_sample=False, num_beams=1,
        use_cache=False,  # HF sizes its cache by num_layers, not the decoder's
        **kwargs).numpy()
  out = out[:, 1:]  # drop decoder_start_token_id
  pad = case["model"].config.pad_token_id
  # HF stops when every row is done; mtjax always returns n tokens of pad.
  return np.pad(out, ((0, 0), (0, n - out.shape[1])), constant_values=pad)


def _generate(case, n, **kwargs):
  b = case["batch"]
  return np.asarray(t5.generate(case["model"], case["params"], b["input_ids"],
                                b["attention_mask"], n, **kwargs))


def test_greedy_generation_matches_hf(case):
  ref = _hf_generate(case, STEPS)
  ours = _generate(case, STEPS)
  np.testing.assert_array_equal(ours, ref)
  assert len(np.unique(ref)) >= 4, f"degenerate reference output {ref}"
  # Stop at a token some row emits mid-way (not pad, not the usual eos): that
  # row ends early, others may too; both sides must pad identically after.
  cfg = case["model"].config
  rows, steps = np.nonzero((ref != cfg.pad_token_id)
                           & (ref != cfg.eos_token_id))
  row, step = next((r, t) for r, t in zip(rows, steps) if 2 <= t < STEPS - 2)
  eos = int(ref[row, step])
  ref_eos = _hf_generate(case, STEPS, eos_token_id=eos)
  ours_eos = _generate(case, STEPS, eos_id=eos)
  np.testing.assert_array_equal(ours_eos, ref_eos)
  assert (ours_eos[row, step + 1:] == cfg.pad_token_id).all()
  print(f"\n[t5 generate] {case['name']}: {STEPS} greedy tokens identical to "
        f"HF (eos {case['model'].config.eos_token_id} and eos {eos})")


def test_kv_cached_generation_equals_uncached_argmax(case):
  model, params, b = case["model"], case["params"], case["batch"]
  cfg = model.config
  cached = _generate(case, STEPS, eos_id=-1)
  # Uncached: re-run the whole decoder on the prefix (one fixed-length buffer;
  # causal attention makes the not-yet-written tail irrelevant).
  dec = np.full((len(ENC_LENGTHS), STEPS), cfg.pad_token_id, np.int64)
  dec[:, 0] = cfg.decoder_start_token_id
  inputs = dict(b, decoder_attention_mask=np.ones_like(dec))
  out = np.zeros_like(dec)
  for i in range(STEPS):
    logits = _logits(model, params, dict(inputs, decoder_input_ids=dec))
    out[:, i] = logits[:, i].argmax(-1)
    if i + 1 < STEPS:
      dec[:, i + 1] = out[:, i]
  np.testing.assert_array_equal(cached, out)


def test_save_roundtrip_through_transformers(case, tmp_path):
  model, params = case["model"], case["params"]
  hf.save(model, params, str(tmp_path))
  _, model_cls = HF_CLASSES[model.config.model_type]
  reloaded, info = model_cls.from_pretrained(str(tmp_path),
                                             output_loading_info=True)
  reloaded.eval()
  assert not info["missing_keys"], info
  assert not info["unexpected_keys"], info
  assert not info["mismatched_keys"], info
  untied = not model.config.tie_word_embeddings
  assert (reloaded.lm_head.weight.data_ptr()
          != reloaded.shared.weight.data_ptr()) == untied
  diff = float(np.abs(_hf_logits(reloaded, case["batch"])
                      - case["hf_logits"]).max())
  print(f"\n[t5 round trip] {case['name']}: mtjax save -> transformers load, "
        f"max logit diff {diff:.2e}")
  assert diff < 1e-5
  model2, params2 = hf.load(str(tmp_path))
  assert model2.config == model.config
  jax.tree.map(np.testing.assert_array_equal, params2, params)


@pytest.mark.parametrize("name", ["v11", "orig"])  # mT5 runs v1.1's code
def test_bf16_compute_close_to_f32(cases, name):
  case = cases(name)
  model16, params16 = hf.load(str(case["folder"]), dtype="bfloat16")
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(params16))
  ours16 = _logits(model16, params16, case["batch"])
  ref = case["hf_logits"]
  err = float(np.abs(ours16 - ref).max()) / float(np.abs(ref).max())
  real = case["batch"]["decoder_attention_mask"] > 0
  agree = float((ours16.argmax(-1) == ref.argmax(-1))[real].mean())
  print(f"\n[t5 bf16] {case['name']}: max|bf16 - f32| / max|f32| = {err:.3f}, "
        f"argmax agreement {agree:.2f}")
  assert ours16.dtype == np.float32
  assert err < 0.05 and agree >= 0.8


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 2, 2), (1, 4, 2)])
def test_sharded_forward_matches_unsharded(v11, mesh_shape):
  case = v11
  model, params, b = case["model"], case["params"], case["batch"]
  expected = _logits(model, params, b)
  mesh = sharding.make_mesh(mesh_shape)
  abstract = sharding.abstract_params(model, **hf.dummy_inputs(model.config))
  placed = sharding.shard_params(params, abstract, mesh)
  _assert_split(placed, mesh_shape)
  with sharding.use_mesh(mesh):
    got = np.asarray(jax.jit(lambda p, x: model.apply({"params": p}, **x))(
        placed, {k: jnp.asarray(v, jnp.int32) for k, v in b.items()}))
  diff = float(np.abs(got - expected).max())
  scale = max(1.0, float(np.abs(expected).max()))
  print(f"\n[t5 sharding] mesh data,fsdp,tensor={mesh_shape}: max diff "
        f"{diff:.1e} (max |logit| {scale:.1f})")
  # Sharded matmuls sum in another order: f32 rounding relative to the logits.
  assert diff < 1e-6 * scale


def _assert_split(params, mesh_shape):
  _, fsdp, tensor = mesh_shape
  q = params["encoder"]["block_0"]["layer_0"]["SelfAttention"]["q"]["kernel"]
  shared = params["shared"]["embedding"]
  wo = params["decoder"]["block_0"]["layer_2"]["DenseReluDense"]["wo"]["kernel"]
  shard = lambda x: x.addressable_shards[0].data.shape  # noqa: E731
  if tensor > 1:
    assert q.sharding.spec[1] == "tensor" and shard(q)[1] < q.shape[1]
    assert wo.sharding.spec[0] == "tensor" and shard(wo)[0] < wo.shape[0]
  if fsdp > 1:
    assert shared.sharding.spec[1] == "fsdp"
    assert shard(shared)[1] < shared.shape[1]
    assert q.sharding.spec[0] == "fsdp" and shard(q)[0] < q.shape[0]
  if tensor == fsdp == 1:
    assert shard(q) == q.shape


def test_generate_under_mesh(v11):
  case = v11
  model, b = case["model"], case["batch"]
  mesh = sharding.make_mesh((2, 2, 2))
  abstract = sharding.abstract_params(model, **hf.dummy_inputs(model.config))
  params = sharding.shard_params(case["params"], abstract, mesh)
  ids, mask = b["input_ids"], b["attention_mask"]
  expected = _generate(case, STEPS)
  with sharding.use_mesh(mesh):
    got = np.asarray(t5.generate(model, params, ids, mask, STEPS))
  np.testing.assert_array_equal(got, expected)


def test_packed_equals_separate(v11):
  """Two examples packed in one row give the same logits as run alone."""
  case = v11
  model, params = case["model"], case["params"]
  rng = np.random.default_rng(3)
  enc = [rng.integers(2, 96, 5), rng.integers(2, 96, 4)]
  dec = [np.r_[0, rng.integers(2, 96, 3)], np.r_[0, rng.integers(2, 96, 2)]]
  def row(parts, length):
    ids, seg = np.zeros(length, np.int64), np.zeros(length, np.int64)
    at = 0
    for i, p in enumerate(parts):
      ids[at:at + len(p)], seg[at:at + len(p)] = p, i + 1
      at += len(p)
    return ids, seg
  # Row 0: both examples packed; rows 1, 2: each alone (segment 1, padded).
  rows = [(row(enc, 11), row(dec, 8)), (row(enc[:1], 11), row(dec[:1], 8)),
          (row(enc[1:], 11), row(dec[1:], 8))]
  batch = dict(input_ids=np.stack([e[0] for e, _ in rows]),
               encoder_segment_ids=np.stack([e[1] for e, _ in rows]),
               decoder_input_ids=np.stack([d[0] for _, d in rows]),
               decoder_segment_ids=np.stack([d[1] for _, d in rows]))
  logits = _logits(model, params, batch)
  np.testing.assert_allclose(logits[0, :4], logits[1, :4], atol=1e-5)
  np.testing.assert_allclose(logits[0, 4:7], logits[2, :3], atol=1e-5)


def test_dropout_sampling_and_dispatch(orig):
  case = orig
  model, params, b = case["model"], case["params"], case["batch"]
  inputs = {k: jnp.asarray(v, jnp.int32) for k, v in b.items()}
  train = jax.jit(lambda p, key: model.apply(
      {"params": p}, **inputs, deterministic=False, rngs={"dropout": key}))
  # rbg keys: threefry dropout masks take several times longer to compile.
  a, a2, c = (np.asarray(train(params, jax.random.key(k, impl="rbg")))
              for k in (1, 1, 2))
  det = _logits(model, params, b)
  np.testing.assert_array_equal(a, a2)
  assert np.abs(a - c).max() > 1e-3 and np.abs(a - det).max() > 1e-3
  greedy = _generate(case, STEPS, eos_id=-1)
  cold = _generate(case, STEPS, eos_id=-1, temperature=1e-4,
                   rng=jax.random.key(0))
  np.testing.assert_array_equal(cold, greedy)
  hot = [_generate(case, STEPS, eos_id=-1, temperature=2.0,
                   rng=jax.random.key(k)) for k in (0, 0, 1)]
  np.testing.assert_array_equal(hot[0], hot[1])
  assert (hot[0] != hot[2]).any()
  assert ((hot[0] >= 0) & (hot[0] < SMALL["vocab_size"])).all()
  with pytest.raises(ValueError, match="rng"):
    _generate(case, STEPS, temperature=1.0)
  # mtjax.models.generate dispatches on model_type to this module.
  via_models = models.generate(model, params, b["input_ids"],
                               b["attention_mask"], STEPS, eos_id=-1)
  np.testing.assert_array_equal(np.asarray(via_models), greedy)


def test_bad_configs_are_explained():
  with pytest.raises(ValueError, match="feed_forward_proj"):
    t5.T5Config(feed_forward_proj="gated-swishy")
  with pytest.raises(ValueError, match="lm_head"):
    t5.T5Config(model_type="mt5", tie_word_embeddings=True)
  with pytest.raises(ValueError, match="decoder_input_ids"):
    model = t5.Model(t5.T5Config(**SMALL))
    model.init(jax.random.key(0), np.ones((1, 3), np.int32))


def test_config_from_hf_variants():
  base = dict(vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_layers=2,
              num_heads=4)
  # transformers 4 files: Flan/v1.1 untied, original T5 without the key.
  flan = t5.config_from_hf(dict(base, model_type="t5",
                                tie_word_embeddings=False,
                                feed_forward_proj="gated-gelu"))
  assert not flan.tie_word_embeddings and flan.is_gated
  assert t5.config_from_hf(dict(base, model_type="t5")).tie_word_embeddings
  # transformers 5 files always say tied; the scaling tells them apart.
  v5 = t5.config_from_hf(dict(base, model_type="t5", tie_word_embeddings=True,
                              scale_decoder_outputs=False))
  assert not v5.tie_word_embeddings
  mt5 = t5.config_from_hf(dict(base, model_type="mt5", tie_word_embeddings=True,
                               eos_token_id=[1, 2], pad_token_id=None))
  assert (not mt5.tie_word_embeddings and mt5.eos_token_id == 1
          and mt5.pad_token_id == 0 and mt5.decoder_start_token_id == 0)
  assert mt5.num_decoder_layers == 2 and mt5.dtype == "float32"
  for cfg in (flan, v5, mt5):
    assert t5.config_from_hf(t5.config_to_hf(cfg)) == cfg


def test_missing_tensor_is_named(v11):
  tensors = hf.params_to_tensors(v11["model"], v11["params"])
  name = "decoder.block.2.layer.1.EncDecAttention.k.weight"
  del tensors[name]
  with pytest.raises(KeyError, match=name):
    hf.params_from_tensors(tensors, v11["model"])
  # Files written by transformers 5 for tied-weight models lack lm_head.weight.
  tensors = hf.params_to_tensors(v11["model"], v11["params"])
  del tensors["lm_head.weight"]
  params = hf.params_from_tensors(tensors, v11["model"])
  np.testing.assert_array_equal(params["lm_head"]["kernel"],
                                v11["params"]["shared"]["embedding"].T)
