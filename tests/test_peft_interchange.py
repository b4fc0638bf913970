"""LoRA adapters move between Hugging Face PEFT and mtjax with equal logits."""
import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from mtjax.methods import library, lora, transform  # noqa: E402
from mtjax.models import hf  # noqa: E402

TOL = 1e-4


def tiny_hf(kind, folder):
  torch.manual_seed(0)
  if kind == "t5":
    cfg = transformers.T5Config(
        vocab_size=96, d_model=32, d_kv=8, d_ff=48, num_layers=2,
        num_decoder_layers=2, num_heads=4, relative_attention_num_buckets=8,
        relative_attention_max_distance=16, dropout_rate=0.0,
        feed_forward_proj="gated-gelu", decoder_start_token_id=0,
        pad_token_id=0, eos_token_id=1)
    model = transformers.T5ForConditionalGeneration(cfg)
    targets = ["q", "v"]
  else:
    cfg = transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg)
    targets = ["q_proj", "v_proj", "down_proj"]
  model.eval()
  model.save_pretrained(folder, safe_serialization=True)
  return model, targets


def inputs(kind):
  rs = np.random.RandomState(1)
  ids = rs.randint(3, 96, (2, 7)).astype(np.int64)
  mask = np.ones_like(ids)
  mask[1, 5:] = 0
  out = dict(input_ids=ids, attention_mask=mask)
  if kind == "t5":
    out["decoder_input_ids"] = rs.randint(3, 96, (2, 5)).astype(np.int64)
  return out


def torch_logits(model, batch):
  with torch.no_grad():
    out = model(**{k: torch.from_numpy(v) for k, v in batch.items()})
  return out.logits.numpy()


def masked_max_diff(a, b, batch, kind):
  # Decoder-only rows past the padding see only padded keys: compare real ones.
  if kind == "t5":
    return float(np.abs(a - b).max())
  m = batch["attention_mask"].astype(bool)
  return float(np.abs(a - b)[m].max())


@pytest.mark.parametrize("kind", ["t5", "llama"])
def test_peft_to_mtjax(kind, tmp_path):
  hf_model, targets = tiny_hf(kind, tmp_path / "base")
  config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                           lora_dropout=0.0, init_lora_weights=True)
  pmodel = peft.get_peft_model(hf_model, config)
  torch.manual_seed(1)
  with torch.no_grad():  # nonzero B so the adapter matters
    for name, p in pmodel.named_parameters():
      if "lora_B" in name:
        p.normal_(0, 0.3)
  pmodel.eval()
  pmodel.save_pretrained(tmp_path / "adapter", safe_serialization=True)
  batch = inputs(kind)
  want = torch_logits(pmodel, batch)
  with pmodel.disable_adapter():
    base_logits = torch_logits(pmodel, batch)

  model, base = hf.load(str(tmp_path / "base"))
  method, lora_params = library.import_peft(str(tmp_path / "adapter"), model)
  got = np.asarray(method.apply(model, {"base": base, **lora_params}, batch))
  diff = masked_max_diff(got, want, batch, kind)
  effect = masked_max_diff(want, base_logits, batch, kind)
  print(f"{kind}: PEFT->mtjax max |logit diff| {diff:.2e} "
        f"(adapter changes logits by {effect:.2e})")
  assert effect > 1e-2, "the adapter should change the logits"
  assert diff < TOL
  n = len(transform.flatten(lora_params["lora"])) // 2
  assert n == len([m for m, _ in pmodel.named_modules()
                   if m.endswith(".lora_A")])


@pytest.mark.parametrize("kind", ["t5", "llama"])
def test_mtjax_to_peft(kind, tmp_path):
  hf_model, _ = tiny_hf(kind, tmp_path / "base")
  model, base = hf.load(str(tmp_path / "base"))
  targets = ((r"encoder/.*SelfAttention/(q|v)", r"decoder/.*/wo")
             if kind == "t5" else (r".*self_attn/(k_proj|o_proj)",))
  method = lora.LoRA(rank=3, alpha=6.0, targets=targets)
  params = jax.tree.map(np.asarray, transform.flatten(
      __import__("flax").linen.unbox(method.init(jax.random.key(0), model))))
  rs = np.random.RandomState(2)
  params = {k: (rs.normal(0, 0.3, v.shape).astype(np.float32)
                if k.endswith("lora_b") else v) for k, v in params.items()}
  params = transform.nest(params)
  batch = inputs(kind)
  want = np.asarray(method.apply(model, {"base": base, **params}, batch))
  library.export_peft(model, method, params, str(tmp_path / "adapter"))

  pmodel = peft.PeftModel.from_pretrained(hf_model, str(tmp_path / "adapter"))
  pmodel.eval()
  got = torch_logits(pmodel, batch)
  diff = masked_max_diff(got, want, batch, kind)
  print(f"{kind}: mtjax->PEFT max |logit diff| {diff:.2e}")
  assert diff < TOL
  # PEFT put adapters exactly on the exported modules, no more.
  n_peft = len([m for m, _ in pmodel.named_modules() if m.endswith(".lora_A")])
  assert n_peft == len(transform.flatten(params["lora"])) // 2


def test_import_rejects_unsupported(tmp_path):
  hf_model, _ = tiny_hf("llama", tmp_path / "base")
  config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                           use_dora=True)
  peft.get_peft_model(hf_model, config).save_pretrained(tmp_path / "dora")
  model, _ = hf.load(str(tmp_path / "base"))
  with pytest.raises(ValueError, match="use_dora"):
    library.import_peft(str(tmp_path / "dora"), model)
  with pytest.raises(FileNotFoundError, match="adapter_config.json"):
    library.import_peft(str(tmp_path / "base"), model)
