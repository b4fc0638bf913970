"""llama2.c checkpoints and tokenizers -> mtjax Llama (karpathy/llama2.c).

Reads the legacy `run.c` format without pickle: a header of 7 int32
(dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len; a
negative vocab_size means an untied classifier) followed by float32 tensors in
PyTorch (out, in) layout: token embedding, attention RMSNorm weights, wq, wk,
wv, wo, FFN RMSNorm weights, w1, w2, w3, final RMSNorm weight, the (unused)
freq_cis tables, then wcls when untied.

llama2.c's rotary embedding rotates interleaved pairs (2j, 2j+1); HF's Llama
rotates halves (j, j + head_dim/2). Permuting the output rows of wq and wk per
head (as HF's convert_llama_weights_to_hf does) makes the two identical.

The tokenizer file holds max_token_length (int32) then, per token, a float32
score, an int32 byte length and the bytes. `encode`/`decode_run_c` follow
run.c: BOS=1, a dummy-prefix space, byte-fallback <0xXX> tokens (ids 3..258),
greedy highest-score pair merging, the leading space dropped after BOS and
non-printable single bytes skipped when printing.
"""
import dataclasses
import os
import re
import string
from typing import Iterable

import numpy as np

from mtjax.models import decoder

BOS, EOS = 1, 2
_HEADER = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads",
           "vocab_size", "seq_len")


def _permute_rotary(w, n_heads):
  """(n_heads*hd, in) interleaved-pair rows -> HF rotate_half row order."""
  out, inp = w.shape
  return w.reshape(n_heads, out // n_heads // 2, 2, inp).transpose(
      0, 2, 1, 3).reshape(out, inp)


def load_checkpoint(path: str,
                    dtype: str = "float32") -> tuple[decoder.Model, dict]:
  """llama2.c legacy .bin -> (decoder.Model, params) of a Llama config."""
  with open(path, "rb") as f:
    raw = f.read()
  header = dict(zip(_HEADER, np.frombuffer(raw[:28], "<i4").tolist(), strict=True))
  data = np.frombuffer(raw[28:], "<f4")
  dim, hidden, n_layers = header["dim"], header["hidden_dim"], header["n_layers"]
  n_heads, n_kv = header["n_heads"], header["n_kv_heads"]
  vocab, seq_len = abs(header["vocab_size"]), header["seq_len"]
  tied = header["vocab_size"] > 0
  hd = dim // n_heads
  kv_dim = n_kv * hd
  shapes = [("tok", (vocab, dim)), ("rms_att", (n_layers, dim)),
            ("wq", (n_layers, dim, dim)), ("wk", (n_layers, kv_dim, dim)),
            ("wv", (n_layers, kv_dim, dim)), ("wo", (n_layers, dim, dim)),
            ("rms_ffn", (n_layers, dim)), ("w1", (n_layers, hidden, dim)),
            ("w2", (n_layers, dim, hidden)), ("w3", (n_layers, hidden, dim)),
            ("rms_final", (dim,)), ("freq_cis", (seq_len, hd))]
  if not tied:
    shapes.append(("wcls", (vocab, dim)))
  need = sum(int(np.prod(s)) for _, s in shapes)
  if data.size != need:
    raise ValueError(
        f"{path}: header {header} implies {need} float32 weights but the file "
        f"holds {data.size}; is it a llama2.c *legacy* (version 0) checkpoint?")
  w, offset = {}, 0
  for name, shape in shapes:
    n = int(np.prod(shape))
    w[name] = data[offset:offset + n].reshape(shape)
    offset += n

  config = decoder.DecoderConfig(
      model_type="llama", vocab_size=vocab, hidden_size=dim,
      intermediate_size=hidden, num_hidden_layers=n_layers,
      num_attention_heads=n_heads, num_key_value_heads=n_kv, head_dim=hd,
      rope_theta=10000.0, norm_eps=1e-5, tie_word_embeddings=tied,
      max_position_embeddings=seq_len, hidden_act="silu", bos_token_id=BOS,
      eos_token_id=EOS, dtype=dtype)
  body = {"embed_tokens": {"embedding": w["tok"]},
          "norm": {"scale": w["rms_final"]}}
  for i in range(n_layers):
    body[f"layers_{i}"] = {
        "input_layernorm": {"scale": w["rms_att"][i]},
        "post_attention_layernorm": {"scale": w["rms_ffn"][i]},
        "self_attn": {
            "q_proj": {"kernel": _permute_rotary(w["wq"][i], n_heads).T},
            "k_proj": {"kernel": _permute_rotary(w["wk"][i], n_kv).T},
            "v_proj": {"kernel": w["wv"][i].T},
            "o_proj": {"kernel": w["wo"][i].T}},
        "mlp": {"gate_proj": {"kernel": w["w1"][i].T},
                "up_proj": {"kernel": w["w3"][i].T},
                "down_proj": {"kernel": w["w2"][i].T}}}
  params = {"model": body}
  if not tied:
    params["lm_head"] = {"kernel": w["wcls"].T}
  params = _copy_tree(params)
  return decoder.Model(config), params


def _copy_tree(tree):
  if isinstance(tree, dict):
    return {k: _copy_tree(v) for k, v in tree.items()}
  return np.ascontiguousarray(tree, np.float32)


@dataclasses.dataclass(frozen=True)
class Tokenizer:
  """llama2.c tokenizer: pieces (bytes) and merge scores."""
  pieces: tuple
  scores: tuple
  max_token_length: int

  @property
  def vocab_size(self) -> int:
    return len(self.pieces)

  @property
  def _index(self):
    return {p: i for i, p in enumerate(self.pieces)}

  def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
    """run.c's encode: UTF-8 code points (byte fallback), then BPE merges."""
    index = self._index
    ids = [BOS] if bos else []
    data = text.encode("utf-8")
    if data:
      ids.append(index[b" "])  # sentencepiece's add_dummy_prefix
    for ch in text:
      piece = ch.encode("utf-8")
      if piece in index:
        ids.append(index[piece])
      else:
        ids.extend(b + 3 for b in piece)  # <0xXX> pieces follow <unk> <s> </s>
    while True:
      best = None
      for i in range(len(ids) - 1):
        j = index.get(self.pieces[ids[i]] + self.pieces[ids[i + 1]])
        if j is not None and (best is None or self.scores[j] > best[0]):
          best = (self.scores[j], i, j)
      if best is None:
        break
      _, i, j = best
      ids[i:i + 2] = [j]
    return ids + ([EOS] if eos else [])

  def piece_bytes(self, prev: int, token: int) -> bytes:
    """Bytes run.c prints for `token` after `prev` (its decode + safe_printf)."""
    piece = self.pieces[token]
    if prev == BOS and piece.startswith(b" "):
      piece = piece[1:]
    m = re.fullmatch(rb"<0x([0-9A-Fa-f]{2})>", piece)
    if m:
      piece = bytes([int(m.group(1), 16)])
    if len(piece) == 1 and chr(piece[0]) not in _PRINTABLE:
      return b""
    return piece

  def decode_run_c(self, ids: Iterable[int], prev: int = BOS) -> str:
    """Text run.c prints for generated `ids` following `prev`; stops at BOS."""
    out = []
    for token in ids:
      token = int(token)
      if token == BOS:
        break
      out.append(self.piece_bytes(prev, token))
      prev = token
    return b"".join(out).decode("utf-8", errors="replace")


# C's isprint || isspace in the "C" locale.
_PRINTABLE = set(string.printable)


def load_tokenizer(path: str, vocab_size: int) -> Tokenizer:
  """llama2.c tokenizer.bin -> Tokenizer (the file does not store vocab_size)."""
  with open(path, "rb") as f:
    raw = f.read()
  max_len = int(np.frombuffer(raw[:4], "<i4")[0])
  pieces, scores, pos = [], [], 4
  for i in range(vocab_size):
    if pos + 8 > len(raw):
      raise ValueError(f"{path} ends after {i} tokens; expected {vocab_size}")
    score = float(np.frombuffer(raw[pos:pos + 4], "<f4")[0])
    n = int(np.frombuffer(raw[pos + 4:pos + 8], "<i4")[0])
    pieces.append(raw[pos + 8:pos + 8 + n])
    scores.append(score)
    pos += 8 + n
  return Tokenizer(tuple(pieces), tuple(scores), max_len)


def load(folder: str,
         dtype: str = "float32") -> tuple[decoder.Model, dict, Tokenizer]:
  """Folder with checkpoint_legacy.bin + tokenizer.bin -> (model, params, tok)."""
  model, params = load_checkpoint(os.path.join(folder, "checkpoint_legacy.bin"),
                                  dtype)
  tok = load_tokenizer(os.path.join(folder, "tokenizer.bin"),
                       model.config.vocab_size)
  return model, params, tok


def run_c_greedy(model: decoder.Model, params: dict, tokenizer: Tokenizer,
                 prompt: str = "", steps: int = 256) -> str:
  """What `run <ckpt> -z <tok> -t 0 -n steps -i prompt` prints to stdout."""
  return tokenizer.decode_run_c(
      run_c_tokens(model, params, tokenizer, prompt, steps)) + "\n"


def run_c_tokens(model: decoder.Model, params: dict, tokenizer: Tokenizer,
                 prompt: str = "", steps: int = 256) -> list[int]:
  """The tokens run.c's greedy loop prints, as ids (BOS excluded).

  run.c forwards `steps` positions starting from BOS: prompt tokens are forced,
  every later position appends its argmax, so steps - (len(prompt ids) - 1)
  tokens are generated. It prints the prompt and the new tokens (stopping at a
  BOS) and a final newline.
  """
  ids = tokenizer.encode(prompt, bos=True)
  new = steps - (len(ids) - 1)
  if new < 1:
    raise ValueError(f"steps={steps} leaves no room after {len(ids)} prompt tokens")
  out = decoder.generate(model, params, np.asarray([ids]),
                         np.ones((1, len(ids)), np.int32), new)
  return ids[1:] + np.asarray(out)[0].tolist()
