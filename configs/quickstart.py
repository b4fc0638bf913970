r"""Quickstart: a small byte-level T5 trained from scratch on the suite.

Trains on the bundled suite's held-in mixture and evaluates every held-in and
held-out task (rank classification for tasks with answer choices, greedy
generation otherwise). Sized to finish in under 10 minutes on 2 CPU cores.

  python -m mtjax.main --config=configs/quickstart.py --workdir=workdirs/quickstart

`--config=configs/quickstart.py:llama` trains a Llama-style decoder instead.

Every field (shared blocks: configs/common.py) can be overridden from the
command line, e.g. --config.num_train_steps=100
--config.optimizer.learning_rate=1e-3.
"""
import ml_collections

from configs import common

# --config=configs/quickstart.py:VARIANT; the first is get_config()'s default.
VARIANTS = ("t5", "llama")


def get_config(arch="t5"):
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.overwrite_config = False  # allow a changed config in an existing workdir

  # Base model: an HF folder (hf_path) or built from scratch from these HF
  # config.json fields (vocab 259 = byte vocabulary: pad 0, eos 1).
  if arch == "t5":
    c.model = common.tiny_t5(tie_word_embeddings=True)
  elif arch == "llama":
    c.model = common.tiny_llama(tie_word_embeddings=True)
  else:
    raise ValueError(f"quickstart arch {arch!r}: use 't5' or 'llama' "
                     "(--config=configs/quickstart.py:llama)")
  c.method = ml_collections.ConfigDict(dict(name="full"))
  c.trainable = ""  # regex over param paths; "" = the method's own

  c.data = common.byte_data()

  c.batch_size = 32
  c.grad_accum = 1
  c.num_train_steps = 1500
  c.dropout = False  # deterministic=False in training (needs dropout_rate)
  c.optimizer = common.adamw(learning_rate=1e-3, warmup_steps=100,
                             end_factor=0.05, weight_decay=0.01)

  c.mesh_shape = (-1, 1, 1)  # data x fsdp x tensor; -1 takes the rest
  c.log_every = 50
  c.checkpoint_every = 500
  c.keep_checkpoints = 2

  c.eval = common.eval_block(groups=("held_in", "held_out"))
  return c
