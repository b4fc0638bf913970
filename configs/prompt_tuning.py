r"""Prompt tuning (Lester et al. 2021) of a frozen base on one task or mixture.

  python -m mtjax.main --config=configs/prompt_tuning.py --workdir=workdirs/pt

20 soft-prompt vectors are prepended to the encoder input (T5) or the whole
input (decoder-only) by intercepting the embedding call; the base stays frozen
(trainable 'prompt/.*'). Init 'vocab' samples embeddings of frequent tokens;
'labels' starts from answer-choice tokens (set method.label_ids); init_from
takes a saved prompt (orbax adapter, expert folder or a workdir).
"""
import ml_collections

from configs import common


def get_config():
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.overwrite_config = False
  c.model = common.tiny_t5()
  c.method = ml_collections.ConfigDict(dict(
      name="prompt_tuning", length=20, init="vocab", sample_vocab=259,
      label_ids=(), init_from="", num_experts=0))
  c.trainable = ""
  # Prompt tuning cannot pack (one prompt per row).
  c.data = common.byte_data(mixture="sentiment")
  c.batch_size = 32
  c.grad_accum = 1
  c.num_train_steps = 500
  c.dropout = False
  # Lester et al. use a large learning rate (0.3, Adafactor) for prompts.
  c.optimizer = common.adamw(learning_rate=0.1)
  c.mesh_shape = (-1, 1, 1)
  c.log_every = 50
  c.checkpoint_every = 500
  c.keep_checkpoints = 1
  c.eval = common.eval_block(groups=("sentiment",))
  return c
