"""GGUF files (llama.cpp's format) -> (model, params).

GGUF stores an HF model's tensors under llama.cpp names, often quantised
(Q4_0, Q4_1, Q8_0, K-quants, ...), with the hyper-parameters and tokenizer as
metadata. `load(path)` reads it with the `gguf` package (llama.cpp's own
Python reader), dequantises each tensor with `gguf.quants.dequantize`, undoes
llama.cpp's layout changes, and builds the mtjax decoder through the same
HF-name conversion as safetensors checkpoints (`hf.params_from_tensors`), so a
GGUF model is an ordinary f32 (or bf16) mtjax model. Tensors are dequantised
one at a time, when the conversion asks for them.

llama.cpp's conversion changes two things we undo here:
  * Llama/Mistral q and k projections are permuted from HF's rotate-half
    rotary layout to interleaved pairs (convert_hf_to_gguf.py `permute`);
  * Gemma's (1 + w) RMSNorm weights are stored as 1 + w.
The tokenizer is in the metadata too; `mtjax.data.vocabulary('gguf:PATH')`
builds it (the data layer owns tokenizers).

Supported: general.architecture in SUPPORTED_ARCHS; every quantisation type
the `gguf` package can dequantise (anything else raises, naming the type).
"""
import collections.abc
import os
from typing import Any, Iterator, Optional

import numpy as np
from jax.sharding import Mesh

from mtjax.models import decoder, hf

SUPPORTED_ARCHS = ("llama", "qwen2", "qwen3", "gemma3")
_MODEL_TYPE = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
               "gemma3": "gemma3_text"}

# llama.cpp tensor name (after 'blk.N.') -> HF name (after 'model.layers.N.').
_BLOCK = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Gemma-3 has four norms per layer; llama.cpp's ffn_norm is the pre-FFN one.
_GEMMA3_BLOCK = dict(_BLOCK, ffn_norm="pre_feedforward_layernorm",
                     post_attention_norm="post_attention_layernorm",
                     post_ffw_norm="post_feedforward_layernorm")
_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
        "output": "lm_head"}


def _gguf():
  # The gguf package is only needed on this path; keep `import mtjax` light.
  import gguf  # noqa: PLC0415 (optional, heavy-ish dependency of one loader)
  return gguf


def reader(path: str) -> Any:
  """gguf.GGUFReader of `path`, with a clear error for a missing/bad file."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"GGUF file {path} does not exist")
  try:
    return _gguf().GGUFReader(path)
  except ValueError as e:
    raise ValueError(f"{path} is not a readable GGUF file: {e}") from e


def metadata(r: Any) -> dict[str, Any]:
  """Scalar and string metadata {key: value} (arrays other than short ones
  are left out: the tokenizer's vocabulary is read by mtjax.data)."""
  out = {}
  for key, field in r.fields.items():
    if key.startswith("tokenizer.ggml.") and key.split(".")[-1] in (
        "tokens", "scores", "token_type", "merges"):
      continue
    try:
      out[key] = field.contents()
    except (ValueError, TypeError, IndexError):
      continue
  return out


def hf_config(meta: dict[str, Any],
              shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
  """GGUF metadata and tensor shapes {name: ggml shape} -> an HF config.json
  dict that decoder.config_from_hf reads."""
  arch = meta.get("general.architecture")
  if arch not in SUPPORTED_ARCHS:
    raise ValueError(
        f"GGUF general.architecture {arch!r} is not supported; mtjax loads "
        f"{list(SUPPORTED_ARCHS)} from GGUF. Load the original Hugging Face "
        "safetensors checkpoint with mtjax.models.hf.load instead.")
  g = lambda k, default=None: meta.get(f"{arch}.{k}", default)  # noqa: E731
  scaling = g("rope.scaling.type", "none")
  if scaling not in ("none", None) or "rope_freqs.weight" in shapes:
    raise ValueError(
        f"this {arch} GGUF uses rope scaling ({scaling!r}"
        f"{', rope_freqs tensor' if 'rope_freqs.weight' in shapes else ''}"
        "), which mtjax does not read from GGUF; load the Hugging Face "
        "checkpoint (config.json's rope_parameters) with mtjax.models.hf.load")
  hidden, heads = int(g("embedding_length")), int(g("attention.head_count"))
  tok = lambda k: meta.get(f"tokenizer.ggml.{k}")  # noqa: E731
  cfg = dict(
      model_type=_MODEL_TYPE[arch],
      vocab_size=int(shapes["token_embd.weight"][1]),
      hidden_size=hidden, intermediate_size=int(g("feed_forward_length")),
      num_hidden_layers=int(g("block_count")), num_attention_heads=heads,
      num_key_value_heads=int(g("attention.head_count_kv", heads)),
      head_dim=int(g("attention.key_length", hidden // heads)),
      rope_theta=float(g("rope.freq_base", 10000.0)),
      rms_norm_eps=float(g("attention.layer_norm_rms_epsilon", 1e-6)),
      max_position_embeddings=int(g("context_length", 2048)),
      tie_word_embeddings="output.weight" not in shapes,
      bos_token_id=tok("bos_token_id"), eos_token_id=tok("eos_token_id"),
      pad_token_id=tok("padding_token_id"))
  if arch == "qwen2":
    cfg["attention_bias"] = "blk.0.attn_q.bias" in shapes
  if arch == "gemma3":
    cfg.update(hidden_act="gelu_pytorch_tanh",
               sliding_window=int(g("attention.sliding_window", 512)),
               query_pre_attn_scalar=cfg["head_dim"],
               rope_local_base_freq=10000.0, sliding_window_pattern=6,
               final_logit_softcapping=g("final_logit_softcapping"),
               attn_logit_softcapping=g("attn_logit_softcapping"))
  return cfg


def hf_name(name: str, arch: str) -> Optional[str]:
  """llama.cpp tensor name -> HF state-dict name (None: not a model weight)."""
  stem, _, leaf = name.rpartition(".")
  if stem in _TOP:
    return f"{_TOP[stem]}.{leaf}"
  parts = stem.split(".")
  if len(parts) == 3 and parts[0] == "blk":
    table = _GEMMA3_BLOCK if arch == "gemma3" else _BLOCK
    if parts[2] in table:
      return f"model.layers.{parts[1]}.{table[parts[2]]}.{leaf}"
  return None


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
  """Undoes llama.cpp's rotary permutation of a q/k weight (out, in) or bias."""
  half = w.shape[0] // heads // 2
  return (w.reshape(heads, half, 2, *w.shape[1:]).swapaxes(1, 2)
          .reshape(w.shape))


class Tensors(collections.abc.Mapping):
  """HF-named, dequantised f32 tensors of a GGUF file, read on access."""

  def __init__(self, r: Any, arch: str, config: dict[str, Any]):
    self._arch, self._config = arch, config
    self._by_hf = {}
    for t in r.tensors:
      name = hf_name(t.name, arch)
      if name is not None:
        self._by_hf[name] = t
    if config.get("tie_word_embeddings"):
      self._by_hf.pop("lm_head.weight", None)

  def __getitem__(self, name: str) -> np.ndarray:
    t = self._by_hf[name]
    qtype = _gguf().GGMLQuantizationType(t.tensor_type)
    try:
      w = np.asarray(_gguf().quants.dequantize(t.data, qtype), np.float32)
    except NotImplementedError as e:
      raise NotImplementedError(
          f"GGUF tensor {t.name} is quantised as {qtype.name}, which the gguf "
          f"package cannot dequantise ({e}); re-quantise the model to a "
          "supported type (Q8_0, Q4_0, Q4_1, Q4_K, Q6_K, F16, ...)") from e
    w = w.reshape(tuple(int(s) for s in reversed(t.shape.tolist())))
    c = self._config
    if self._arch == "llama" and ".self_attn.q_proj." in name:
      w = _unpermute(w, c["num_attention_heads"])
    elif self._arch == "llama" and ".self_attn.k_proj." in name:
      w = _unpermute(w, c["num_key_value_heads"])
    if self._arch == "gemma3" and name.endswith("norm.weight"):
      w = w - 1.0  # llama.cpp stores Gemma's (1 + w) norms as 1 + w
    return w

  def __iter__(self) -> Iterator[str]:
    return iter(self._by_hf)

  def __len__(self) -> int:
    return len(self._by_hf)


def load(path: str, dtype: str = "float32", param_dtype: str = "float32",
         mesh: Optional[Mesh] = None) -> tuple[hf.Model, dict]:
  """GGUF file -> (model, params on devices); `dtype` is the compute dtype.

  Each tensor is dequantised when it is placed (hf.place_params: converted
  to `param_dtype`, sharded by its logical axes on `mesh`), so the host holds
  about one f32 tensor at a time. Raises for an unsupported architecture,
  rope scaling or quantisation type, naming it.
  """
  r = reader(path)
  meta = metadata(r)
  shapes = {t.name: tuple(int(s) for s in t.shape.tolist()) for t in r.tensors}
  config_dict = hf_config(meta, shapes)
  config = decoder.config_from_hf(config_dict, dtype=dtype)
  model = decoder.Model(config)
  tensors = Tensors(r, meta["general.architecture"], config_dict)
  return model, hf.place_params(tensors, model, path_hint=path,
                                param_dtype=param_dtype, mesh=mesh)
