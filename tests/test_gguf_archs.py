"""GGUF import of Qwen3 and Gemma-3: tiny random models written as llama.cpp does.

No Qwen3/Gemma-3 GGUF file ships here, so each test writes one from a tiny
random transformers model with the `gguf` package, the way llama.cpp's
convert_hf_to_gguf.py lays it out (llama.cpp tensor names, Gemma's norms
stored as 1 + w), then checks that mtjax.models.gguf.load and transformers'
own GGUF loader (an independent reading of the same file) both reproduce the
original model's logits.
"""
import numpy as np
import pytest

import mtjax.models
from mtjax.models import gguf as gguf_lib

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

_BLOCK = {  # HF name after 'model.layers.N.' -> llama.cpp name after 'blk.N.'
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
_QWEN3 = dict(_BLOCK, post_attention_layernorm="ffn_norm")
_GEMMA3 = dict(_BLOCK, post_attention_layernorm="post_attention_norm",
               pre_feedforward_layernorm="ffn_norm",
               post_feedforward_layernorm="post_ffw_norm")


def _tiny(arch):
  torch.manual_seed(0)
  common = dict(vocab_size=96, hidden_size=64, intermediate_size=96,
                num_attention_heads=2, num_key_value_heads=1,
                bos_token_id=1, eos_token_id=2, pad_token_id=0)
  if arch == "qwen3":
    # head_dim 128: transformers' GGUF reader takes Qwen3's default for it.
    config = transformers.Qwen3Config(**common, head_dim=128,
                                      num_hidden_layers=2,
                                      tie_word_embeddings=False)
    model = transformers.Qwen3ForCausalLM(config)
  else:  # What a Gemma-3 GGUF implies (and both readers assume): 5 sliding
    # layers then a global one, query_pre_attn_scalar = head_dim = 256 (the
    # released models'), local rope base 10000.
    config = transformers.Gemma3TextConfig(
        **common, head_dim=256, query_pre_attn_scalar=256, num_hidden_layers=6,
        sliding_window=4)
    model = transformers.Gemma3ForCausalLM(config)
  config._attn_implementation = "eager"
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "embed" not in name:
        p.add_(torch.randn_like(p) * (0.3 if "norm" in name else 0.05))
  return model.eval()


def _gguf_name(name, arch):
  if name == "model.embed_tokens.weight":
    return "token_embd.weight"
  if name == "model.norm.weight":
    return "output_norm.weight"
  if name == "lm_head.weight":
    return "output.weight"
  _, _, layer, rest = name.split(".", 3)
  stem, leaf = rest.rsplit(".", 1)
  table = _GEMMA3 if arch == "gemma3" else _QWEN3
  return f"blk.{layer}.{table[stem]}.{leaf}"


def _write(model, arch, path):
  c = model.config
  w = gguf.GGUFWriter(str(path), arch)
  for key, value in (("block_count", c.num_hidden_layers),
                     ("context_length", 128),
                     ("embedding_length", c.hidden_size),
                     ("feed_forward_length", c.intermediate_size),
                     ("attention.head_count", c.num_attention_heads),
                     ("attention.head_count_kv", c.num_key_value_heads),
                     ("attention.key_length", c.head_dim),
                     ("attention.value_length", c.head_dim),
                     ("vocab_size", c.vocab_size)):
    w.add_uint32(f"{arch}.{key}", value)
  theta = (c.rope_parameters.get("full_attention", c.rope_parameters)
           if arch == "gemma3" else c.rope_parameters)["rope_theta"]
  w.add_float32(f"{arch}.rope.freq_base", float(theta))
  w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", c.rms_norm_eps)
  if arch == "gemma3":
    w.add_uint32(f"{arch}.attention.sliding_window", c.sliding_window)
  for name, tensor in model.state_dict().items():
    if name == "lm_head.weight" and c.tie_word_embeddings:
      continue
    value = tensor.detach().numpy().astype(np.float32)
    if arch == "gemma3" and name.endswith("norm.weight"):
      value = value + 1.0  # llama.cpp stores Gemma's (1 + w) norms as 1 + w
    w.add_tensor(_gguf_name(name, arch), value)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


@pytest.mark.parametrize("arch", ["qwen3", "gemma3"])
def test_gguf_written_like_llama_cpp_loads_like_the_original(arch, tmp_path):
  original = _tiny(arch)
  path = tmp_path / f"{arch}.gguf"
  _write(original, arch, path)
  ids = np.random.default_rng(0).integers(3, 96, (2, 10))
  mask = np.ones_like(ids)
  mask[1, :3] = 0  # left padding
  with torch.no_grad():
    want = original(torch.tensor(ids), attention_mask=torch.tensor(mask)
                    ).logits.numpy()
  model, params = gguf_lib.load(str(path))
  assert model.config.model_type == {"qwen3": "qwen3",
                                     "gemma3": "gemma3_text"}[arch]
  got = np.asarray(mtjax.models.logits(model, params, ids, mask))
  real = mask.astype(bool)
  assert np.abs(got - want)[real].max() < 1e-4
  # transformers reads the same file independently and agrees.
  theirs = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
  with torch.no_grad():
    ref = theirs(torch.tensor(ids), attention_mask=torch.tensor(mask)
                 ).logits.numpy()
  assert np.abs(ref - want)[real].max() < 1e-4
