r"""Prompt tuning (Lester et al. 2021) of a frozen base on one task or mixture.

  python -m mtjax.main --config=configs/prompt_tuning.py --workdir=workdirs/pt

20 soft-prompt vectors are prepended to the encoder input (T5) or the whole
input (decoder-only) by intercepting the embedding call; the base stays frozen
(trainable 'prompt/.*'). Init 'vocab' samples embeddings of frequent tokens;
'labels' starts from answer-choice tokens (set method.label_ids); init_from
takes a saved prompt (orbax adapter, expert folder or a workdir).
"""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.overwrite_config = False
  c.model = ml_collections.ConfigDict(dict(
      hf_path="", arch="t5", dtype="float32",
      vocab_size=259, d_model=128, d_kv=32, num_heads=4, d_ff=512,
      num_layers=2, num_decoder_layers=2, feed_forward_proj="gated-gelu",
      tie_word_embeddings=False, dropout_rate=0.0,
      relative_attention_num_buckets=32, relative_attention_max_distance=64))
  c.method = ml_collections.ConfigDict(dict(
      name="prompt_tuning", length=20, init="vocab", sample_vocab=259,
      label_ids=(), init_from="", num_experts=0))
  c.trainable = ""
  c.data = ml_collections.ConfigDict(dict(
      vocab="byte", mixture="sentiment", inputs_length=64, targets_length=16,
      pack=False, seed=0))  # prompt tuning cannot pack (one prompt per row)
  c.batch_size = 32
  c.grad_accum = 1
  c.num_train_steps = 500
  c.dropout = False
  # Lester et al. use a large learning rate (0.3, Adafactor) for prompts.
  c.optimizer = ml_collections.ConfigDict(dict(
      name="adamw", learning_rate=0.1, warmup_steps=20, decay="cosine",
      end_factor=0.1, b1=0.9, b2=0.98, eps=1e-8, weight_decay=0.0,
      grad_clip=1.0))
  c.mesh_shape = (-1, 1, 1)
  c.log_every = 50
  c.checkpoint_every = 500
  c.keep_checkpoints = 1
  c.eval = ml_collections.ConfigDict(dict(
      groups=("sentiment",), split="validation", max_examples=100,
      batch_size=64, max_new_tokens=16))
  return c
