"""Vocabularies as seqio.Vocabulary: bytes, SentencePiece, HF `tokenizers`.

Spec strings: 'byte' | 'spm:/path/model.model' | 'hf:/path/tokenizer.json'.
seqio pads with id 0 and derives loss weights from `token != 0`, so every
vocabulary here keeps id 0 for padding (the HF wrapper checks it).
"""
import hashlib
import os
import pathlib
import tempfile
from typing import Optional, Sequence

import numpy as np
import sentencepiece as spm
import seqio
import tensorflow as tf
import tokenizers

_EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<eos>", "<|im_end|>", "[SEP]")


class HFTokenizerVocabulary(seqio.Vocabulary):
  """A Hugging Face `tokenizers` tokenizer.json as a seqio.Vocabulary.

  The tf ops call the Rust tokenizer through tf.numpy_function, so they run
  inside tf.data pipelines (on the host, like every seqio preprocessor).
  """

  def __init__(self, path: str, eos_token: Optional[str] = None):
    self._path = str(path)
    if not os.path.exists(self._path):
      raise FileNotFoundError(f"HF tokenizer file {self._path} does not exist; "
                              "pass 'hf:/path/to/tokenizer.json'")
    self._tok = tokenizers.Tokenizer.from_file(self._path)
    special = {t.content for t in self._tok.get_added_tokens_decoder().values()
               if t.special}
    zero = self._tok.id_to_token(0)
    if zero not in special:
      raise ValueError(
          f"{self._path}: id 0 is the ordinary token {zero!r}, but seqio pads "
          "with id 0 and masks the loss where token == 0. Use a tokenizer whose "
          "id 0 is a special token (e.g. '<pad>' or '<unk>').")
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
    super().__init__(extra_ids=0)

  @property
  def path(self) -> str:
    return self._path

  @property
  def eos_id(self) -> Optional[int]:
    return self._eos_id

  @property
  def unk_id(self) -> Optional[int]:
    return self._unk_id

  @property
  def _base_vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  def _encode(self, s: str) -> Sequence[int]:
    return self._tok.encode(s, add_special_tokens=False).ids

  def _decode(self, ids) -> str:
    ids = [int(i) for i in ids if int(i) not in (self.pad_id, self.eos_id)]
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
            and other.path == self.path and other.eos_id == self.eos_id)

  def __hash__(self):
    return hash(("hf", self._path))


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
  raise ValueError(f"unknown vocabulary spec {spec!r}; use 'byte', "
                   "'spm:/path/model.model' or 'hf:/path/tokenizer.json'")


def key(vocab: seqio.Vocabulary) -> str:
  """Short stable name of a vocabulary, used inside seqio task names."""
  if isinstance(vocab, seqio.ByteVocabulary):
    return "byte" if not vocab.extra_ids else f"byte{vocab.extra_ids}"
  if isinstance(vocab, seqio.SentencePieceVocabulary):
    digest = hashlib.sha1(vocab.sp_model).hexdigest()[:10]
    return f"spm_{digest}_{vocab.extra_ids}"
  if isinstance(vocab, HFTokenizerVocabulary):
    digest = hashlib.sha1(pathlib.Path(vocab.path).read_bytes()).hexdigest()
    return f"hf_{digest[:10]}_{vocab.eos_id}"
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
