"""SmolLM2-135M-Instruct from its GGUF file: mtjax against transformers.

transformers dequantises the same file with its own GGUF loader (an
independent implementation), so equal logits, greedy tokens and token ids
check the dequantisation, llama.cpp's q/k permutation, the config mapping and
the tokenizer built from metadata.
"""
import pathlib

import jax
import numpy as np
import pytest

import mtjax.models
from configs import zero_shot as zs_config
from mtjax import data
from mtjax.data import tasks
from mtjax.evaluation import evaluate
from mtjax.experiments import zero_shot
from mtjax.methods import full
from mtjax.models import gguf as gguf_lib
from mtjax.models import sharding

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


# ---------------------------------------------------------------- harness
# The evaluation harness (mtjax.data formatting + evaluate.score_choices)
# against a reference written here with transformers alone: the same prompt
# and answer strings, lm-eval's encode-pair split, per-choice summed
# log-likelihood of the answer tokens.


def _reference_logliks(tok, ref, context, continuations):
  spaces = len(context) - len(context.rstrip(" "))
  ctx = context[:len(context) - spaces]
  ctx_ids = tok(ctx).input_ids
  out = []
  for cont in continuations:
    whole = tok(ctx + context[len(ctx):] + cont).input_ids
    cont_ids = whole[len(ctx_ids):]
    with torch.no_grad():
      logits = ref(torch.tensor([whole])).logits[0]
    logp = torch.log_softmax(logits.double(), -1)
    rows = torch.arange(len(ctx_ids) - 1, len(whole) - 1)
    out.append(float(logp[rows, torch.tensor(cont_ids)].sum()))
  return np.array(out)


def _harness(smollm, task, n):
  model, params = smollm
  vocab = data.vocabulary(f"gguf:{SMOLLM}")
  examples = data.eval_examples(task, vocab, max_examples=n)
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  scorer = evaluate.make_scorer(full.FullFineTuning(), model)
  with sharding.use_mesh(mesh):
    scored = evaluate.score_choices(
        scorer, model, {"base": params}, examples,
        {"inputs": 480, "targets": 32}, 8, mesh,
        pad_id=data.pad_token_id(vocab), lm=True)
  return examples, scored


def _compare(reference, smollm, task, n, shared_data):
  del shared_data
  tok, ref = reference
  examples, scored = _harness(smollm, task, n)
  assert len(examples) == n
  labels = np.array([ex["label"] for ex in examples])
  got_pred, want_pred = [], []
  for ex, (sums, _, cut) in zip(examples, scored, strict=True):
    assert not cut
    want = _reference_logliks(tok, ref, ex["inputs"], ex["answer_choices"])
    np.testing.assert_allclose(sums, want, atol=5e-3, rtol=1e-4)
    got_pred.append(int(np.argmax(sums)))
    want_pred.append(int(np.argmax(want)))
  assert got_pred == want_pred
  return float(np.mean(np.array(got_pred) == labels))


def test_harness_matches_transformers_on_copa(reference, smollm, shared_data):
  _compare(reference, smollm, "copa.plain", 16, shared_data)


@pytest.mark.slow
@pytest.mark.parametrize("task", ["copa.plain", "arc_easy.plain",
                                  "piqa.plain"])
def test_harness_accuracy_equals_transformers_reference(reference, smollm,
                                                        shared_data, task):
  acc = _compare(reference, smollm, task, 100, shared_data)
  print(f"{task}: accuracy {acc:.3f} on 100 examples (harness == reference)")


def test_unsupported_quantisation_is_named(tmp_path):
  gguf = pytest.importorskip("gguf")
  path = tmp_path / "q81.gguf"
  writer = gguf.GGUFWriter(str(path), "llama")
  for key, value in (("block_count", 1), ("embedding_length", 64),
                     ("feed_forward_length", 128), ("context_length", 64)):
    writer.add_uint32(f"llama.{key}", value)
  writer.add_uint32("llama.attention.head_count", 4)
  # Q8_1 (blocks of 32 values in 40 bytes): the gguf package cannot
  # dequantise it, and the loader must say so by name.
  writer.add_tensor("token_embd.weight", np.zeros((32, 80), np.uint8),
                    raw_shape=(32, 80),
                    raw_dtype=gguf.GGMLQuantizationType.Q8_1)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  with pytest.raises(NotImplementedError, match="quantised as Q8_1"):
    gguf_lib.load(str(path))


def test_chat_template_task_option(shared_data):
  del shared_data
  vocab = data.vocabulary(f"gguf:{SMOLLM}")
  copa = [t for t in tasks.real_tasks(tasks.default_data_dir())["copa"]
          if t.name == "copa.plain"][0]
  plain = data.eval_examples(tasks.register_file_task(copa, vocab), vocab,
                             max_examples=2)
  chat = data.eval_examples(tasks.register_file_task(copa, vocab, chat=True),
                            vocab, max_examples=2)
  for p, c in zip(plain, chat, strict=True):
    assert c["inputs"] == vocab.chat(p["inputs"])
    assert c["inputs"].endswith("<|im_start|>assistant\n")
    # After the assistant header the answer needs no leading space.
    assert [a.lstrip() for a in p["answer_choices"]] == c["answer_choices"]


def test_zero_shot_job(tmp_path, shared_data):
  del shared_data
  config = zs_config.get_config("quick")
  config.model.gguf_path = str(SMOLLM)
  config.datasets, config.templates, config.max_examples = ("copa",), 1, 4
  results = zero_shot.run(config, str(tmp_path))
  tasks = [k for k in results if not k.startswith("average/")]
  assert len(tasks) == 2 and "copa.plain" in tasks
  for task in tasks:
    r = results[task]
    assert r["num_examples"] == 4 and r["truncated"] == 0 and r["chance"] == 0.5
    assert r["accuracy_lo"] <= r["accuracy"] <= r["accuracy_hi"]
    assert r["accuracy_norm_lo"] <= r["accuracy_norm"] <= r["accuracy_norm_hi"]
  assert "accuracy_lo" not in results["average/plain"]
  assert (tmp_path / "results.json").exists()
