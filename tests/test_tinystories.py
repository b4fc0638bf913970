"""The real TinyStories 260K llama2.c checkpoint reproduces llama2.c's greedy run."""
import functools

import numpy as np
import pytest

from mtjax.models import decoder, llama2c


@functools.lru_cache(maxsize=1)
def _load(folder):
  return llama2c.load(folder)


@pytest.fixture
def tinystories(shared_data):
  folder = shared_data / "models" / "tinystories_260k"
  return folder, _load(str(folder))


def test_greedy_200_steps_match_llama2c(tinystories):
  # SOURCES.md: llama2.zig's test.sh runs llama2.c at 7ac65cb as
  # `run stories260K.bin -z tok512.bin -t 0 -n 200` (empty prompt): 200 forward
  # steps from BOS, each printing its argmax, then a newline.
  folder, (model, params, tok) = tinystories
  expected = (folder / "greedy_200_tokens.txt").read_text()
  text = llama2c.run_c_greedy(model, params, tok, prompt="", steps=200)
  assert text == expected
  # The step count matters: 199 steps print one token less.
  assert llama2c.run_c_greedy(model, params, tok, "", 199) != expected


def test_config_and_tokenizer(tinystories):
  _, (model, params, tok) = tinystories
  c = model.config
  assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers,
          c.num_attention_heads, c.num_key_value_heads, c.vocab_size) == (
              64, 172, 5, 8, 4, 512)
  assert c.tie_word_embeddings and "lm_head" not in params
  ids = tok.encode("Once upon a time")
  assert ids[0] == llama2c.BOS and len(ids) < len("Once upon a time")
  assert tok.decode_run_c(ids[1:]) == "Once upon a time"
  # Characters missing from the 512-piece vocabulary fall back to UTF-8 bytes.
  ids = tok.encode("a \u2603")  # snowman: UTF-8 e2 98 83
  assert [tok.pieces[i] for i in ids[-3:]] == [b"<0xE2>", b"<0x98>", b"<0x83>"]
  # run.c prints raw bytes for byte pieces; lone non-ASCII bytes are skipped.
  assert tok.piece_bytes(0, tok.pieces.index(b"<0x41>")) == b"A"
  assert tok.piece_bytes(0, ids[-1]) == b""


def test_uncached_forward_agrees_with_cached_generation(tinystories):
  _, (model, params, _) = tinystories
  prompt = np.array([[1, 403, 407, 261]])
  out = np.asarray(decoder.generate(model, params, prompt, None, 4))
  logits = model.apply({"params": params}, np.concatenate([prompt, out[:, :3]], 1))
  np.testing.assert_array_equal(np.asarray(logits)[0, 3:].argmax(-1), out[0])
