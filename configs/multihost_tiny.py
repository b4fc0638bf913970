r"""Seconds-long training for multi-process tests (tests/test_multihost.py).

configs/quickstart.py shrunk: a one-layer byte-level T5 (d_model 32) trained
on the suite's 4-task held_out mixture (quickstart's 11-task held_in costs
every process of every start ~2 s more CPU to build its input pipeline),
global batch 16, 12 steps, a checkpoint every 3 steps, then generation (copy)
and rank classification (compare) on 8 examples each. Run it as 2 processes
x 4 fake CPU devices, or as 1 x 8 (same batches: data.shard_by='rows'):

  python launch/local.py --num_processes=2 --devices_per_process=4 -- \
      python -m mtjax.main --config=configs/multihost_tiny.py --workdir=/tmp/mh2
"""
from configs import common, quickstart


def get_config():
  c = quickstart.get_config()
  c.model = common.tiny_t5(d_model=32, d_kv=16, num_heads=2, d_ff=64,
                           num_layers=1, num_decoder_layers=1)
  # Every process reads the whole stream and keeps its rows: the batches do
  # not depend on the number of processes (see mtjax/experiments/train.py).
  c.data.update(mixture="held_out", inputs_length=32, targets_length=8,
                shard_by="rows")
  c.batch_size = 16
  c.num_train_steps = 12
  c.optimizer.update(learning_rate=1e-2, warmup_steps=2)
  c.mesh_shape = (-1, 1, 1)
  c.log_every = 1
  c.checkpoint_every = 3
  c.keep_checkpoints = 10
  c.eval.update(groups=("copy", "compare"), max_examples=8, batch_size=16,
                max_new_tokens=4)
  return c
