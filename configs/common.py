"""Blocks shared by the configs: small models, the byte data, AdamW, eval.

Each function returns a fresh ConfigDict of its defaults; keyword overrides
replace fields or add new ones, and `OMIT` leaves a field out:

  c.model = common.tiny_t5(d_model=64, feed_forward_proj="relu")
  c.data = common.byte_data(mixture="sentiment")
  c.optimizer = common.adamw(learning_rate=0.1)
  c.eval = common.eval_block(groups=common.OMIT, max_examples=64)

The models are built from scratch from these HF config.json fields (hf_path
""; set it to load an HF folder instead) with the byte vocabulary: 259 ids,
pad 0, eos 1 (mtjax.data). `dtype` is the compute dtype; `param_dtype` the
dtype the base parameters are stored in ("bfloat16" halves their memory; an
HF folder is then converted one tensor at a time while it is loaded, and
trainable leaves are still trained in f32, see trainer.init_state).
"""
import os
import pathlib

import ml_collections

OMIT = object()  # an override that leaves the field out of the block


def _block(defaults, overrides):
  fields = dict(defaults)
  for key, value in overrides.items():
    if value is OMIT:
      fields.pop(key, None)
    else:
      fields[key] = value
  return ml_collections.ConfigDict(fields)


def tiny_t5(**overrides):
  """A 2+2-layer byte-level T5 (d_model 128, gated-GELU FFN, untied)."""
  return _block(dict(
      hf_path="", arch="t5", dtype="float32",
      param_dtype="float32",
      vocab_size=259, d_model=128, d_kv=32, num_heads=4, d_ff=512,
      num_layers=2, num_decoder_layers=2, feed_forward_proj="gated-gelu",
      tie_word_embeddings=False, dropout_rate=0.0,
      relative_attention_num_buckets=32, relative_attention_max_distance=64),
                overrides)


def tiny_llama(**overrides):
  """A 4-layer byte-level Llama-style decoder (hidden 128, untied)."""
  return _block(dict(
      hf_path="", arch="llama", dtype="float32",
      param_dtype="float32",
      vocab_size=259, hidden_size=128, intermediate_size=512,
      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
      max_position_embeddings=128, tie_word_embeddings=False,
      pad_token_id=0, bos_token_id=0, eos_token_id=1), overrides)


def data_dir() -> str:
  """$MTJAX_DATA_DIR, else ../shared/data beside the repository."""
  return os.environ.get("MTJAX_DATA_DIR") or str(
      pathlib.Path(__file__).resolve().parents[2] / "shared" / "data")


def smollm2(**overrides):
  """SmolLM2-135M-Instruct (a real pretrained Llama-architecture LM, Apache-2.0)
  from its bundled GGUF file, dequantised to f32 parameters."""
  return _block(dict(
      gguf_path=os.path.join(data_dir(), "models", "smollm2_135m_instruct",
                             "SmolLM2-135M-Instruct.Q4_1.gguf"),
      dtype="float32", param_dtype="float32"), overrides)


def byte_data(**overrides):
  """The bundled suite's held-in mixture, byte vocabulary, 64 -> 16 tokens."""
  return _block(dict(
      vocab="byte", mixture="held_in", inputs_length=64, targets_length=16,
      pack=False, seed=0), overrides)


def adamw(learning_rate, **overrides):
  """AdamW, 20 warmup steps, cosine decay to 0.1 x, clipped at norm 1."""
  return _block(dict(
      name="adamw", learning_rate=learning_rate, warmup_steps=20,
      decay="cosine", end_factor=0.1, b1=0.9, b2=0.98, eps=1e-8,
      weight_decay=0.0, grad_clip=1.0), overrides)


def eval_block(**overrides):
  """Evaluation of `groups` (tasks or mixtures; () = none) on the validation
  split: 100 examples a task, batches of 64, up to 16 new tokens."""
  return _block(dict(
      groups=(), split="validation", max_examples=100, batch_size=64,
      max_new_tokens=16), overrides)
