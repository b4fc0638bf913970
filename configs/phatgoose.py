r"""PHATGOOSE and its baselines on the bundled suite, end to end.

Muqeeth et al. 2024 (arXiv:2402.05859). One command runs the whole pipeline
(mtjax.methods.phatgoose.run): a small byte-level T5 base (trained here on the
held-in mixture, or loaded from model.hf_path), one rank-16 LoRA expert on every
encoder and decoder linear layer per held-in task, 100 steps of gate training
per expert, then every method in `methods` on held-in and held-out tasks. It
prints one table (rows methods, columns tasks + averages), the PHATGOOSE
own-expert routing rate per layer, and writes to WORKDIR:
  phatgoose_results.json   results, averages, routing diagnostics per method
                           (entropy per layer, oracle agreement, load)
  routing_choices.npz      per-token, per-module PHATGOOSE choices
  routing_held_out.png     experts used by each held-out task, by layer

  python -m mtjax.methods.phatgoose --config=configs/phatgoose.py \
      --workdir=workdirs/phatgoose
(or python -m mtjax.main with the same flags, where main dispatches
config.job == 'phatgoose' to mtjax.methods.phatgoose.run).

Default sizes finish in about 10 minutes on 2 CPU cores.
"""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.job = "phatgoose"
  c.seed = 0
  c.model = ml_collections.ConfigDict(dict(
      hf_path="", arch="t5", dtype="float32",
      vocab_size=259, d_model=64, d_kv=16, num_heads=4, d_ff=128,
      num_layers=2, num_decoder_layers=2, feed_forward_proj="relu",
      tie_word_embeddings=False, dropout_rate=0.0,
      relative_attention_num_buckets=32, relative_attention_max_distance=64))
  c.data = ml_collections.ConfigDict(dict(
      vocab="byte", inputs_length=64, targets_length=16))
  c.held_in = ()    # () = the suite's held-in tasks (one expert each)
  c.held_out = ()   # () = the suite's held-out tasks

  c.batch_size = 32
  c.optimizer = ml_collections.ConfigDict(dict(
      name="adamw", learning_rate=3e-3, warmup_steps=0, decay="constant",
      b1=0.9, b2=0.98, eps=1e-8, weight_decay=0.0, grad_clip=1.0))
  # Base: full fine-tuning on base_mixture (0 steps: keep the init / hf_path).
  c.base_steps = 600
  c.base_lr = 3e-3
  c.base_mixture = "held_in"
  # Experts: LoRA rank 16 on every encoder and decoder linear layer (paper).
  c.expert = ml_collections.ConfigDict(dict(
      rank=16, alpha=16.0, targets=(r"(encoder|decoder)/.*",)))
  c.expert_steps = 200
  c.expert_lr = 3e-3
  c.gate_steps = 100   # paper: 100
  c.gate_lr = 1e-2
  c.multitask_steps = 400

  # Routing.
  c.top_k = 2          # paper: 2
  c.impl = "auto"      # blocked (CPU) | ragged (GPU/TPU) | dense
  c.retrieval_batches = 2
  c.poly = ml_collections.ConfigDict(dict(
      num_skills=4, heads=4, steps=400, z_steps=30, z_lr=1e-1))
  c.methods = ("base,multitask,oracle,uniform,merged,arrow,phatgoose,"
               "task_gate,retrieval,poly,mhr,mhr_mu,mhr_z")
  c.diagnostics_examples = 64
  c.continue_on_error = False  # True: log a failing method and go on
  c.library_dir = ""  # load experts+gates from here (mtjax.methods.library)

  c.mesh_shape = (-1, 1, 1)
  c.eval = ml_collections.ConfigDict(dict(
      split="validation", max_examples=64, batch_size=64, max_new_tokens=16))
  return c
