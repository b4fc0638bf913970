"""Vocabularies as seqio.Vocabulary: bytes, SentencePiece, HF `tokenizers`, GGUF.

Spec strings: 'byte' | 'spm:/path/model.model' | 'hf:/path/tokenizer.json' |
'gguf:/path/model.gguf' (the tokenizer in a GGUF file's metadata).

Padding. seqio pads with id 0 and derives masks and loss weights from
`token != 0`. The byte and SentencePiece vocabularies keep id 0 for padding.
Real LM vocabularies (SmolLM2, Llama-3, Qwen2) use id 0 for an ordinary or
special token, so for them (`shifts_ids(vocab)`) the data pipeline runs seqio
on ids + 1 and shifts back when it emits a batch, with explicit masks; the
pad id written into model inputs is `pad_token_id(vocab)` and never decides
what is a token.

Formatting. HF and GGUF vocabularies are `lm_format`: tasks are joined as a
decoder-only LM saw text in pretraining (no EOS after the prompt, the
answer's leading space kept with the answer, BOS first when the tokenizer
adds one, EOS after the target for training only).
"""
import hashlib
import json
import os
import pathlib
import tempfile
from typing import Any, Optional, Sequence

import jinja2
import jinja2.sandbox
import numpy as np
import sentencepiece as spm
import seqio
import tensorflow as tf
import tokenizers
from tokenizers import decoders, pre_tokenizers

_EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<eos>", "<|im_end|>", "[SEP]")

class HFTokenizerVocabulary(seqio.Vocabulary):
  """A Hugging Face `tokenizers` tokenizer.json as a seqio.Vocabulary.

  The tf ops call the Rust tokenizer through tf.numpy_function, so they run
  inside tf.data pipelines (on the host, like every seqio preprocessor).
  """

  def __init__(self, path: Optional[str] = None,
               eos_token: Optional[str] = None,
               tokenizer: Optional[tokenizers.Tokenizer] = None,
               add_bos: Optional[bool] = None,
               chat_template: Optional[str] = None,
               pad_token: Optional[str] = None,
               source: Optional[str] = None):
    """path: a tokenizer.json; or `tokenizer` (built e.g. from a GGUF file)
    with `source` naming where it came from. add_bos: whether the model's
    tokenizer puts BOS first (None: read it from the tokenizer's post
    processor). chat_template: jinja2 source of an instruct model's template.
    """
    if tokenizer is None:
      if path is None or not os.path.exists(str(path)):
        raise FileNotFoundError(f"HF tokenizer file {path} does not exist; "
                                "pass 'hf:/path/to/tokenizer.json'")
      tokenizer = tokenizers.Tokenizer.from_file(str(path))
      source = str(path)
      cfg = pathlib.Path(path).with_name("tokenizer_config.json")
      if chat_template is None and cfg.exists():
        chat_template = _json_field(cfg, "chat_template")
    self._path = source or "<tokenizer>"
    self._tok = tokenizer
    self._digest = hashlib.sha1(tokenizer.to_str().encode()).hexdigest()
    candidates = (eos_token,) if eos_token else _EOS_CANDIDATES
    eos = [self._tok.token_to_id(t) for t in candidates
           if self._tok.token_to_id(t) is not None]
    if not eos:
      raise ValueError(f"{self._path}: no end-of-sequence token among "
                       f"{candidates}; pass eos_token=")
    self._eos_id = eos[0]
    unk = [self._tok.token_to_id(t) for t in ("<unk>", "[UNK]")
           if self._tok.token_to_id(t) is not None]
    self._unk_id = unk[0] if unk else None
    bos = self._tok.encode("a", add_special_tokens=True).ids
    plain = self._tok.encode("a", add_special_tokens=False).ids
    detected = bos[0] if len(bos) > len(plain) else None
    self._bos_id = detected if add_bos is None or add_bos else None
    if add_bos and detected is None:
      for t in ("<s>", "<bos>", "<|begin_of_text|>", "<|im_start|>"):
        if self._tok.token_to_id(t) is not None:
          self._bos_id = self._tok.token_to_id(t)
          break
    pad = self._tok.token_to_id(pad_token) if pad_token else None
    self._pad_token_id = self._eos_id if pad is None else pad
    self.chat_template = chat_template
    super().__init__(extra_ids=0)

  @property
  def path(self) -> str:
    return self._path

  @property
  def tokenizer(self) -> tokenizers.Tokenizer:
    return self._tok

  @property
  def digest(self) -> str:
    """sha1 of the tokenizer's JSON: identifies it in seqio task names."""
    return self._digest

  @property
  def bos_id(self) -> Optional[int]:
    """The id the tokenizer puts first (None: it adds none, like SmolLM2)."""
    return self._bos_id

  @property
  def pad_token_id(self) -> int:
    """The id written into padded slots of model inputs (masks say they are
    padding; the value only has to be a valid id)."""
    return self._pad_token_id

  lm_format = True

  def chat(self, user: str) -> str:
    """`user` as one user turn in the chat template, with the generation
    prompt (what an instruct model expects before its answer)."""
    if not self.chat_template:
      raise ValueError(f"{self._path} has no chat template; use a plain "
                       "format or an instruct model's tokenizer")
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)
    bos = (self._tok.id_to_token(self._bos_id) if self._bos_id is not None
           else "")
    return env.from_string(self.chat_template).render(
        messages=[{"role": "user", "content": user}],
        add_generation_prompt=True, bos_token=bos,
        eos_token=self._tok.id_to_token(self._eos_id))

  @property
  def eos_id(self) -> Optional[int]:
    return self._eos_id

  @property
  def unk_id(self) -> Optional[int]:
    return self._unk_id

  @property
  def stop_ids(self) -> tuple:
    """Every end-of-text token the tokenizer has (EOS first): generation
    stops at any of them (SmolLM2's EOS is <|im_end|>, but a continuation
    can also end with <|endoftext|>)."""
    found = [self._tok.token_to_id(t) for t in _EOS_CANDIDATES]
    return tuple(dict.fromkeys([self._eos_id] + [i for i in found
                                                 if i is not None]))

  @property
  def _base_vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  def _encode(self, s: str) -> Sequence[int]:
    return self._tok.encode(s, add_special_tokens=False).ids

  def _decode(self, ids) -> str:
    # Special tokens (EOS, <|endoftext|>, ...) are dropped by the tokenizer;
    # id 0 is no padding here (Llama-3's and Qwen2's id 0 is '!'): masks,
    # not ids, say which slots are padding.
    ids = [int(i) for i in ids if int(i) != self.eos_id]
    return self._tok.decode(ids, skip_special_tokens=True)

  def _encode_tf(self, s: tf.Tensor) -> tf.Tensor:
    def enc(x):  # bytes in graph mode, a 0-d array in eager mode
      x = x.item() if isinstance(x, np.ndarray) else x
      return np.asarray(self._encode(x.decode("utf-8")), np.int32)
    out = tf.numpy_function(enc, [s], tf.int32, stateful=False)
    return tf.ensure_shape(out, [None])

  def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
    def dec(x):
      if x.ndim == 1:
        return np.asarray(self._decode(x.tolist()).encode("utf-8"), object)
      return np.asarray([self._decode(r.tolist()).encode("utf-8") for r in x],
                        object)
    out = tf.numpy_function(dec, [ids], tf.string, stateful=False)
    return tf.ensure_shape(out, ids.shape[:-1])

  def __eq__(self, other):
    return (isinstance(other, HFTokenizerVocabulary)
            and other.digest == self.digest and other.eos_id == self.eos_id
            and other.bos_id == self.bos_id)

  def __hash__(self):
    return hash(("hf", self._digest))


def _json_field(path, name):
  with open(path) as f:
    return json.load(f).get(name)


def lm_format(vocab: seqio.Vocabulary) -> bool:
  """Whether tasks are formatted for a pretrained decoder-only LM (module doc)."""
  return bool(getattr(vocab, "lm_format", False))


def shifts_ids(vocab: seqio.Vocabulary) -> bool:
  """Whether the pipeline runs seqio on ids + 1 (id 0 is a real token)."""
  return isinstance(vocab, HFTokenizerVocabulary)


def pad_token_id(vocab: seqio.Vocabulary) -> int:
  """The id written into padded model-input slots (0 for seqio vocabularies)."""
  return getattr(vocab, "pad_token_id", 0)


# Pre-tokenizer splits of the byte-level BPE vocabularies GGUF files name in
# tokenizer.ggml.pre (the published regexes of these tokenizers).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLITS = {"llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT,
           "llama-v3": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}
_GPT2_PRE = ("default", "gpt2", "gpt-2", "smollm", None)
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


def _byte_alphabet() -> dict[int, str]:
  """GPT-2's byte -> printable character table (byte-level BPE's alphabet)."""
  keep = (list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD))
          + list(range(0xAE, 0x100)))
  table, extra = {}, 0
  for b in range(256):
    if b in keep:
      table[b] = chr(b)
    else:
      table[b] = chr(256 + extra)
      extra += 1
  return table


def gguf_tokenizer(path: str) -> tuple[tokenizers.Tokenizer, dict[str, Any]]:
  """The byte-level BPE tokenizer in a GGUF file's metadata, and its info
  {bos_token_id, eos_token_id, padding_token_id, add_bos_token, chat_template}.

  Supports tokenizer.ggml.model 'gpt2' (SmolLM2, Llama-3, Qwen2/3); others
  (sentencepiece 'llama' vocabularies such as Gemma's) raise, naming the
  model: pass their tokenizer.json as 'hf:/path/tokenizer.json' instead.
  """
  import gguf  # noqa: PLC0415 (the GGUF reader is only needed for gguf: specs)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"GGUF file {path} does not exist")
  fields = gguf.GGUFReader(path).fields
  get = lambda k: (fields[k].contents() if k in fields else None)  # noqa: E731
  kind, pre = get("tokenizer.ggml.model"), get("tokenizer.ggml.pre")
  if kind != "gpt2":
    raise ValueError(
        f"{path}: tokenizer.ggml.model {kind!r} is not supported (mtjax builds "
        "byte-level BPE 'gpt2' tokenizers from GGUF); pass the model's "
        "tokenizer.json as 'hf:/path/tokenizer.json'")
  if pre not in _GPT2_PRE and pre not in _SPLITS:
    raise ValueError(f"{path}: tokenizer.ggml.pre {pre!r} is not supported; "
                     f"known: {sorted(p for p in _GPT2_PRE if p)} + "
                     f"{sorted(_SPLITS)}")
  alphabet = _byte_alphabet()
  letters = set(alphabet.values())
  tokens = get("tokenizer.ggml.tokens")
  types = get("tokenizer.ggml.token_type") or [1] * len(tokens)
  spell = lambda t: (t if set(t) <= letters else  # noqa: E731
                     "".join(alphabet[b] for b in t.encode("utf-8")))
  vocab = {spell(t): i for i, t in enumerate(tokens)}
  merges = [tuple(m.split(" ")) for m in get("tokenizer.ggml.merges")]
  tok = tokenizers.Tokenizer(tokenizers.models.BPE(
      vocab, merges, fuse_unk=False, byte_fallback=False))
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False,
                                        use_regex=pre not in _SPLITS)
  if pre in _SPLITS:
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(
        tokenizers.Regex(_SPLITS[pre]), behavior="isolated"), byte_level])
  elif pre == "smollm":  # SmolLM2's tokenizer.json splits digits first
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), byte_level])
  else:
    tok.pre_tokenizer = byte_level
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens([
      tokenizers.AddedToken(t, normalized=False, special=True)
      for t, k in zip(tokens, types, strict=True)
      if k == _CONTROL and set(t) <= letters])
  tok.add_tokens([tokenizers.AddedToken(t, normalized=False, special=False)
                  for t, k in zip(tokens, types, strict=True)
                  if k == _USER_DEFINED])
  info = {k: get(f"tokenizer.ggml.{k}") for k in (
      "bos_token_id", "eos_token_id", "padding_token_id", "add_bos_token")}
  info["chat_template"] = get("tokenizer.chat_template")
  return tok, info


def gguf_vocabulary(path: str) -> "HFTokenizerVocabulary":
  """HFTokenizerVocabulary of the tokenizer inside a GGUF file."""
  tok, info = gguf_tokenizer(path)
  name = lambda k: (None if info[k] is None  # noqa: E731
                    else tok.id_to_token(int(info[k])))
  return HFTokenizerVocabulary(
      tokenizer=tok, eos_token=name("eos_token_id"),
      add_bos=bool(info["add_bos_token"]), pad_token=name("padding_token_id"),
      chat_template=info["chat_template"], source=path)


def from_spec(spec: str) -> seqio.Vocabulary:
  """'byte' | 'spm:/path/model' | 'hf:/path/tokenizer.json' -> Vocabulary."""
  if spec == "byte":
    return seqio.ByteVocabulary()
  kind, _, path = spec.partition(":")
  if kind == "spm" and path:
    if not os.path.exists(path):
      raise FileNotFoundError(f"sentencepiece model {path} does not exist "
                              f"(spec {spec!r})")
    return seqio.SentencePieceVocabulary(path)
  if kind == "hf" and path:
    return HFTokenizerVocabulary(path)
  if kind == "gguf" and path:
    return gguf_vocabulary(path)
  raise ValueError(f"unknown vocabulary spec {spec!r}; use 'byte', "
                   "'spm:/path/model.model', 'hf:/path/tokenizer.json' or "
                   "'gguf:/path/model.gguf'")


def key(vocab: seqio.Vocabulary) -> str:
  """Short stable name of a vocabulary, used inside seqio task names."""
  if isinstance(vocab, seqio.ByteVocabulary):
    return "byte" if not vocab.extra_ids else f"byte{vocab.extra_ids}"
  if isinstance(vocab, seqio.SentencePieceVocabulary):
    digest = hashlib.sha1(vocab.sp_model).hexdigest()[:10]
    return f"spm_{digest}_{vocab.extra_ids}"
  if isinstance(vocab, HFTokenizerVocabulary):
    return f"hf_{vocab.digest[:10]}_{vocab.eos_id}_{vocab.bos_id}"
  raise TypeError(f"unsupported vocabulary {type(vocab).__name__}; build one "
                  "with mtjax.data.vocabulary(spec)")


def train_sentencepiece(texts: Sequence[str], model_prefix: str,
                        vocab_size: int = 256, model_type: str = "bpe") -> str:
  """Trains a sentencepiece model with seqio's id layout (pad 0, eos 1, unk 2)."""
  with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
    f.write("\n".join(texts))
    corpus = f.name
  try:
    spm.SentencePieceTrainer.train(
        input=corpus, model_prefix=model_prefix, vocab_size=vocab_size,
        model_type=model_type, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        character_coverage=1.0, byte_fallback=vocab_size >= 320, num_threads=1,
        hard_vocab_limit=False, minloglevel=2)
  finally:
    os.remove(corpus)
  return model_prefix + ".model"
