"""Real LM vocabularies: masks carry the truth, LM formatting, truncation.

In Llama-3/Qwen2/SmolLM2 vocabularies id 0 is a real token, so nothing may
read `token == 0` as padding; prompts and answers are joined as an LM reads
text; prompts longer than the limit lose their start and are counted.
"""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from mtjax import data
from mtjax.evaluation import evaluate
from mtjax.methods import full
from mtjax.models import sharding
from mtjax.training import trainer

LLAMA = dict(hf_path="", arch="llama", dtype="float32", vocab_size=96,
             hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=128, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def llama():
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  model, base = trainer.build_model(ml_collections.ConfigDict(LLAMA),
                                    jax.random.key(0), mesh)
  return model, {"base": base}, mesh


def _loglik(model, params, prompt, answer):
  """log p(answer | prompt) from one unpadded forward over exactly the text."""
  seq = list(prompt) + list(answer)
  logits = model.apply({"params": params["base"]}, jnp.array([seq]))[0]
  logp = jax.nn.log_softmax(logits)
  rows = np.arange(len(prompt) - 1, len(seq) - 1)
  return float(logp[rows, np.array(answer)].sum())


def test_id_zero_is_scored_like_any_token_and_pad_id_is_irrelevant(llama):
  model, params, mesh = llama
  scorer = evaluate.make_scorer(full.FullFineTuning(), model)
  lengths = {"inputs": 12, "targets": 4}
  rows = [([5, 0, 7, 0], [0, 3]), ([9, 8, 7, 6, 5, 4], [0]),
          ([0, 0, 1], [2, 0, 0])]
  want = [_loglik(model, params, p, a) for p, a in rows]
  got = {}
  with sharding.use_mesh(mesh):
    for pad in (0, 17):
      batch = evaluate.score_rows(rows, "decoder", lengths, pad_id=pad, lm=True)
      # Padding holds the pad id, yet the id-0 tokens count as text.
      assert (batch["decoder_target_tokens"][1, 7:] == pad).all()
      assert batch["decoder_mask"][0].tolist()[:7] == [0, 1, 1, 1, 1, 1, 1]
      sums, counts = scorer(params, trainer.put_batch(batch, mesh))
      got[pad] = np.asarray(sums)
      np.testing.assert_array_equal(np.asarray(counts), [2, 1, 3])
  np.testing.assert_allclose(got[0], want, atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(got[17], want, atol=1e-4, rtol=1e-4)


def test_long_prompt_is_left_truncated_and_counted(llama):
  model, params, mesh = llama
  scorer = evaluate.make_scorer(full.FullFineTuning(), model)
  lengths = {"inputs": 6, "targets": 2}
  prompt = list(range(10, 22))  # 12 tokens: only the last 8 - 2 = 6 fit
  examples = [dict(input_ids=prompt, choice_ids=[[3, 4], [5, 6]], label=0,
                   choice_bytes=[2, 2]),
              dict(input_ids=prompt[:3], choice_ids=[[3, 4], [5, 6]], label=1,
                   choice_bytes=[2, 2])]
  with sharding.use_mesh(mesh):
    metrics, _ = evaluate.rank_classification(
        scorer, model, params, examples, lengths, 4, mesh, pad_id=1, lm=True)
    scored = evaluate.score_choices(scorer, model, params, examples, lengths,
                                    4, mesh, pad_id=1, lm=True)
  assert metrics["truncated"] == 1 and metrics["num_examples"] == 2
  assert [c for _, _, c in scored] == [True, False]
  want = [_loglik(model, params, prompt[-6:], c) for c in ([3, 4], [5, 6])]
  np.testing.assert_allclose(scored[0][0], want, atol=1e-4, rtol=1e-4)


def _zero_is_a_letter_tokenizer(path):
  """A byte-level BPE whose id 0 is an ordinary token ('!', as in Llama-3)."""
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(
      ["Write in uppercase: hello HELLO! Copy: abc abc. Reverse: ab ba"] * 4,
      trainers.BpeTrainer(vocab_size=300, special_tokens=[],
                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tok.add_special_tokens(["</s>"])
  tok.save(str(path))
  return tok


def test_lm_batches_keep_id_zero_and_join_prompt_and_answer(tmp_path):
  tok = _zero_is_a_letter_tokenizer(tmp_path / "tokenizer.json")
  assert tok.id_to_token(0) == "!"
  vocab = data.vocabulary(f"hf:{tmp_path}/tokenizer.json")
  assert data.lm_format(vocab) and vocab.bos_id is None
  batches = data.train_batches("uppercase", vocab, {"inputs": 48,
                                                    "targets": 24},
                               4, "decoder", seed=0)
  batch = next(batches)
  for i in range(4):
    mask = batch["decoder_mask"][i].astype(bool)
    text_ids = batch["decoder_input_tokens"][i][mask].tolist()
    weights = batch["decoder_loss_weights"][i].astype(bool)
    target = batch["decoder_target_tokens"][i][weights].tolist()
    # The model reads the prompt, then the answer (its leading space first),
    # with no EOS or start token in between; EOS ends the target.
    assert text_ids.index(vocab.eos_id) == len(text_ids) - 1
    assert target[-1] == vocab.eos_id and text_ids[-len(target):] == target
    text = vocab.tokenizer.decode(text_ids, skip_special_tokens=False)
    prompt, _, answer = text.partition(": ")
    assert prompt == "Write in uppercase"
    word, _, rest = answer.partition(" ")
    assert rest == word.upper() + "</s>"
    assert not mask[0] and mask[1:len(text_ids) + 1].all()
    padding = ~mask
    padding[0] = False
    assert (batch["decoder_input_tokens"][i][padding]
            == vocab.pad_token_id).all()


def test_lm_choices_follow_lm_eval_encode_pair(tmp_path):
  _zero_is_a_letter_tokenizer(tmp_path / "tokenizer.json")
  vocab = data.vocabulary(f"hf:{tmp_path}/tokenizer.json")
  enc = lambda s: list(vocab.encode(s))  # noqa: E731
  row = data.lm_choices(vocab, "Copy: abc ", [" abc!", "ba"])
  ctx = enc("Copy: abc")
  assert row["input_ids"] == ctx
  # The context's trailing space moves to the continuation; the pair is
  # encoded whole and split after the context's tokens; no EOS.
  assert row["choice_ids"][0] == enc("Copy: abc  abc!")[len(ctx):]
  assert row["choice_ids"][1] == enc("Copy: abc ba")[len(ctx):]
  assert 0 in row["choice_ids"][0]  # '!' is id 0 and is kept
  assert row["choice_bytes"] == [len(" abc!"), 2]


def test_decode_keeps_a_real_token_with_id_zero():
  """Llama-3's and Qwen2's id 0 is '!': decoding drops special tokens and
  EOS, never a token for being id 0."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  from mtjax.data import vocab as vocab_lib  # pylint: disable=g-import-not-at-top
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(
      {"!": 0, "a": 1, "</s>": 2, "<|endoftext|>": 3}, unk_token="a"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.add_special_tokens(["</s>", "<|endoftext|>"])
  v = vocab_lib.HFTokenizerVocabulary(tokenizer=tok, source="test")
  assert v.eos_id == 2 and v.stop_ids == (2, 3)
  assert "!" in v.decode([1, 0, 1]) and "!" in v.decode([0, 1, 3])
  assert v.decode([1, 2, 0]) == v.decode([1])   # cut at EOS (seqio)
