"""The real TinyStories 260K llama2.c checkpoint reproduces llama2.c's greedy run."""
import functools

import pytest

from mtjax.models import llama2c


@functools.lru_cache(maxsize=1)
def _load(folder):
  return llama2c.load(folder)


@pytest.fixture
def tinystories(shared_data):
  folder = shared_data / "models" / "tinystories_260k"
  return folder, _load(str(folder))


def test_greedy_200_steps_match_llama2c(tinystories):
  # SOURCES.md points to llama2.zig's test.sh, which records the output of
  # llama2.c (commit 7ac65cb) `run stories260K.bin -z tok512.bin -t 0 -n 200`:
  # empty prompt, 200 forward steps from BOS each printing its argmax token,
  # then run.c's final newline.
  folder, (model, params, tok) = tinystories
  expected = (folder / "greedy_200_tokens.txt").read_text()
  ids = llama2c.run_c_tokens(model, params, tok, prompt="", steps=200)
  assert len(ids) == 200
  assert tok.decode_run_c(ids) + "\n" == expected
  # The step count matters: 199 steps (one token less) would not match.
  assert tok.decode_run_c(ids[:199]) + "\n" != expected


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

