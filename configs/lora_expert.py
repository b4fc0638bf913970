r"""One LoRA expert per task of a mixture, written into an expert library.

  python -m mtjax.main --config=configs/lora_expert.py --workdir=workdirs/lib

(main dispatches config.job == 'library' to mtjax.experiments.library.
train_library.) Each task of `library.tasks` is trained alone with LoRA (rank
8 on attention q/v and the FFN output, Hu et al. 2021) on the same frozen base,
in WORKDIR/runs/<task>; the finished adapter and its evaluation metrics go to
WORKDIR/library/<task>/ (expert.json + weights.safetensors). Re-running skips
experts already in the library.

The base: an HF folder (model.hf_path) or, as here, a small byte-level T5
built from config sizes with config.seed (use a trained base in practice,
e.g. --config.model.hf_path=workdirs/quickstart_hf).
"""
import ml_collections

from configs import common


def get_config():
  c = ml_collections.ConfigDict()
  c.job = "library"
  c.seed = 0
  c.overwrite_config = False

  c.model = common.tiny_t5()
  c.method = ml_collections.ConfigDict(dict(
      name="lora", rank=8, alpha=16.0, dropout=0.0,
      targets=(r".*(SelfAttention|EncDecAttention)/(q|v)",
               r".*DenseReluDense/wo"),
      init_a="kaiming_uniform", num_experts=0, init_from=""))
  c.trainable = ""  # the method's own: 'lora/.*'

  c.library = ml_collections.ConfigDict(dict(
      tasks="held_in",  # 'held_in' | 'held_out' | 'task_a,task_b'
      root=""))         # "" = WORKDIR/library

  c.data = common.byte_data(mixture="")  # each task of library.tasks alone

  c.batch_size = 32
  c.grad_accum = 1
  c.num_train_steps = 300
  c.dropout = False
  c.optimizer = common.adamw(learning_rate=3e-3)

  c.mesh_shape = (-1, 1, 1)
  c.log_every = 50
  c.checkpoint_every = 300
  c.keep_checkpoints = 1

  c.eval = common.eval_block()  # each expert on its own task
  return c
