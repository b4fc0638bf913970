"""SmolLM2-135M-Instruct from its GGUF file: mtjax against transformers.

transformers dequantises the same file with its own GGUF loader (an
independent implementation), so equal logits, greedy tokens and token ids
check the dequantisation, llama.cpp's q/k permutation, the config mapping and
the tokenizer built from metadata.
"""
import pathlib

import numpy as np
import pytest

import mtjax.models
from mtjax import data
from mtjax.models import gguf as gguf_lib

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

SMOLLM = (pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" /
          "models" / "smollm2_135m_instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf")
pytestmark = pytest.mark.skipif(not SMOLLM.exists(),
                                reason=f"{SMOLLM} not present")

TEXTS = [
    "The capital of France is",
    "In 1905, Albert Einstein published four papers that changed physics.",
    "Q: Is the sky blue on a clear day?\nA:",
    "  double  spaces, tabs\tand digits 3.14159 - über café 日本語!",
]


@pytest.fixture(scope="module")
def reference():
  tok = transformers.AutoTokenizer.from_pretrained(
      SMOLLM.parent, gguf_file=SMOLLM.name)
  model = transformers.AutoModelForCausalLM.from_pretrained(
      SMOLLM.parent, gguf_file=SMOLLM.name, dtype=torch.float32).eval()
  return tok, model


@pytest.fixture(scope="module")
def smollm():
  return gguf_lib.load(str(SMOLLM))


def test_tokenizer_matches_transformers(reference):
  tok, _ = reference
  vocab = data.vocabulary(f"gguf:{SMOLLM}")
  for text in TEXTS + ["<|im_start|>user\nhi<|im_end|>"]:
    assert list(vocab.encode(text)) == tok(text).input_ids, text
  assert vocab.eos_id == tok.eos_token_id == 2
  assert vocab.bos_id is None  # SmolLM2 adds no BOS
  assert vocab.pad_token_id == tok.pad_token_id
  messages = [{"role": "user", "content": "What is 2+2?"}]
  assert vocab.chat("What is 2+2?") == tok.apply_chat_template(
      messages, tokenize=False, add_generation_prompt=True)


def test_logits_and_greedy_match_transformers(reference, smollm):
  tok, ref = reference
  model, params = smollm
  assert model.config.num_hidden_layers == 30 and model.config.vocab_size == 49152
  tok.padding_side = "left"
  enc = tok(TEXTS[:3], return_tensors="pt", padding=True)
  ids, mask = enc.input_ids.numpy(), enc.attention_mask.numpy()
  assert (mask == 0).any()  # a padded batch
  with torch.no_grad():
    want = ref(**enc).logits.numpy()
  got = np.asarray(mtjax.models.logits(model, params, ids, mask))
  diff = np.abs(got - want)[mask.astype(bool)].max()
  assert diff < 1e-3, diff
  with torch.no_grad():
    want_ids = ref.generate(**enc, max_new_tokens=32, do_sample=False)
  want_ids = want_ids.numpy()[:, ids.shape[1]:]
  got_ids = np.asarray(mtjax.models.generate(
      model, params, ids, mask, max_new_tokens=32, eos_id=tok.eos_token_id))
  np.testing.assert_array_equal(got_ids, want_ids)
  assert tok.decode(got_ids[0]).startswith(" Paris")


def test_unsupported_architecture_is_named(tmp_path):
  gguf = pytest.importorskip("gguf")
  path = tmp_path / "falcon.gguf"
  writer = gguf.GGUFWriter(str(path), "falcon")
  writer.add_block_count(1)
  writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  with pytest.raises(ValueError, match="'falcon' is not supported"):
    gguf_lib.load(str(path))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    gguf_lib.load(str(tmp_path / "missing.gguf"))
