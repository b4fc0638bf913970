r"""Quickstart: a small byte-level T5 trained from scratch on the suite.

Trains on the bundled suite's held-in mixture and evaluates every held-in and
held-out task (rank classification for tasks with answer choices, greedy
generation otherwise). Sized to finish in under 10 minutes on 2 CPU cores.

  python -m mtjax.main --config=configs/quickstart.py --workdir=workdirs/quickstart

`--config=configs/quickstart.py:llama` trains a Llama-style decoder instead.

Every field below can be overridden from the command line, e.g.
--config.num_train_steps=100 --config.optimizer.learning_rate=1e-3.
"""
import ml_collections


def get_config(arch="t5"):
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.overwrite_config = False  # allow a changed config in an existing workdir

  # Base model: an HF folder (hf_path) or built from scratch from these HF
  # config.json fields (vocab 259 = byte vocabulary: pad 0, eos 1).
  if arch == "t5":
    c.model = ml_collections.ConfigDict(dict(
        hf_path="", arch="t5", dtype="float32",
        vocab_size=259, d_model=128, d_kv=32, num_heads=4, d_ff=512,
        num_layers=2, num_decoder_layers=2, feed_forward_proj="gated-gelu",
        tie_word_embeddings=True, dropout_rate=0.0,
        relative_attention_num_buckets=32, relative_attention_max_distance=64))
  elif arch == "llama":
    c.model = ml_collections.ConfigDict(dict(
        hf_path="", arch="llama", dtype="float32",
        vocab_size=259, hidden_size=128, intermediate_size=512,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=128, tie_word_embeddings=True,
        pad_token_id=0, bos_token_id=0, eos_token_id=1))
  else:
    raise ValueError(f"quickstart arch {arch!r}: use 't5' or 'llama' "
                     "(--config=configs/quickstart.py:llama)")
  c.method = ml_collections.ConfigDict(dict(name="full"))
  c.trainable = ""  # regex over param paths; "" = the method's own

  c.data = ml_collections.ConfigDict(dict(
      vocab="byte", mixture="held_in", inputs_length=64, targets_length=16,
      pack=False, seed=0))

  c.batch_size = 32
  c.grad_accum = 1
  c.num_train_steps = 1500
  c.dropout = False  # deterministic=False in training (needs dropout_rate)
  c.optimizer = ml_collections.ConfigDict(dict(
      name="adamw", learning_rate=1e-3, warmup_steps=100, decay="cosine",
      end_factor=0.05, b1=0.9, b2=0.98, eps=1e-8, weight_decay=0.01,
      grad_clip=1.0))

  c.mesh_shape = (-1, 1, 1)  # data x fsdp x tensor; -1 takes the rest
  c.log_every = 50
  c.checkpoint_every = 500
  c.keep_checkpoints = 2

  c.eval = ml_collections.ConfigDict(dict(
      groups=("held_in", "held_out"), split="validation", max_examples=100,
      batch_size=64, max_new_tokens=16))
  return c
