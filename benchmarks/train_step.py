r"""Train-step speed of a T5-small-sized model: step time, tokens/s, MFU.

  python benchmarks/train_step.py [--steps 5] [--dtype float32]

Full fine-tuning (AdamW) of d_model 512, 8+8 layers, 6 heads, d_kv 64, d_ff
1024 (gated-gelu), vocab 32128; batch 8 x (128 input, 32 target) tokens, with
the same jitted step as training (mtjax.training.trainer). Model FLOPs are
counted analytically (matmuls of forward + backward = 3 x forward; attention
scores included, optimizer excluded) and compared with this machine's f32
matmul peak, measured in the same run with a large jnp.dot. XLA's own FLOP
count of the compiled step is printed too.
"""
import argparse
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mtjax.models import sharding
from mtjax.methods import full
from mtjax.training import trainer

MODEL = dict(hf_path="", arch="t5", dtype="float32", vocab_size=32128,
             d_model=512, d_kv=64, num_heads=6, d_ff=1024, num_layers=8,
             num_decoder_layers=8, feed_forward_proj="gated-gelu",
             tie_word_embeddings=False, dropout_rate=0.0)
BATCH, LI, LT = 8, 128, 32


def matmul_peak(n=4096, reps=5, dtype=jnp.float32):
  """Measured FLOP/s of an n x n x n matmul on the default device."""
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  f = jax.jit(lambda x, y: jnp.dot(x, y, precision="highest"))
  f(a, a).block_until_ready()
  t0 = time.perf_counter()
  for _ in range(reps):
    out = f(a, a)
  out.block_until_ready()
  return 2 * n ** 3 * reps / (time.perf_counter() - t0)


def model_flops(m, b=BATCH, li=LI, lt=LT):
  """Training FLOPs per step: 3 x forward matmul FLOPs (2 per multiply-add)."""
  d, hd, ff, v = m["d_model"], m["num_heads"] * m["d_kv"], m["d_ff"], \
      m["vocab_size"]
  ffn = (3 if m["feed_forward_proj"].startswith("gated") else 2) * d * ff
  enc = m["num_layers"] * li * (4 * d * hd + ffn + 2 * li * hd)
  dec = m["num_decoder_layers"] * (
      lt * (4 * d * hd + 2 * lt * hd)           # self-attention
      + lt * 2 * d * hd + li * 2 * d * hd       # cross q,o / k,v projections
      + lt * 2 * li * hd + lt * ffn)            # cross scores, FFN
  head = lt * d * v
  return 3 * 2 * b * (enc + dec + head)


def batch(rng):
  r = np.random.default_rng(rng)
  tgt = r.integers(2, MODEL["vocab_size"], (BATCH, LT)).astype(np.int32)
  return {
      "encoder_input_tokens": r.integers(2, MODEL["vocab_size"],
                                         (BATCH, LI)).astype(np.int32),
      "decoder_target_tokens": tgt,
      "decoder_input_tokens": np.pad(tgt[:, :-1], ((0, 0), (1, 0))),
      "decoder_loss_weights": np.ones((BATCH, LT), np.int32),
      "task_index": np.zeros((BATCH,), np.int32),
  }


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--dtype", default="float32")
  args = ap.parse_args()
  mesh = sharding.make_mesh((-1, 1, 1))
  cfg = ml_collections.ConfigDict(dict(MODEL, dtype=args.dtype))
  model, base = trainer.build_model(cfg, jax.random.key(0), mesh)
  method = full.FullFineTuning()
  flat, sh = trainer.init_params(model, method, jax.random.key(1), mesh, base)
  params, frozen = trainer.split_trainable(flat, method.trainable)
  tx, _ = trainer.make_optimizer(ml_collections.ConfigDict(dict(
      name="adamw", learning_rate=1e-4, warmup_steps=0, decay="constant")), 10)
  state, state_sh = trainer.init_state(tx, params, sh, mesh)
  step = trainer.jit_train_step(
      trainer.make_train_step(method, model, tx, num_tasks=1), state_sh, {},
      mesh)
  n_params = sum(x.size for x in jax.tree.leaves(params))
  with sharding.use_mesh(mesh):
    b = trainer.put_batch(batch(0), mesh)
    t0 = time.perf_counter()
    compiled = step.lower(state, frozen, b).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    state, m = step(state, frozen, b)  # warm-up
    jax.block_until_ready(m)
    times = []
    for i in range(args.steps):
      b = trainer.put_batch(batch(i + 1), mesh)
      t0 = time.perf_counter()
      state, m = step(state, frozen, b)
      jax.block_until_ready(m)
      times.append(time.perf_counter() - t0)
  peak = matmul_peak()
  flops = model_flops(MODEL)
  step_s = float(np.median(times))
  tokens = BATCH * (LI + LT)
  rows = [
      ("device", f"{jax.devices()[0].device_kind} x{jax.device_count()}"),
      ("params (trainable)", f"{n_params / 1e6:.1f} M"),
      ("compile", f"{compile_s:.1f} s"),
      ("step time (median)", f"{step_s * 1e3:.0f} ms over {args.steps} steps"),
      ("tokens/s (in+target)", f"{tokens / step_s:,.0f}"),
      ("model FLOPs / step", f"{flops / 1e9:.1f} GFLOP"),
      ("XLA FLOPs / step", f"{cost.get('flops', float('nan')) / 1e9:.1f} "
       "GFLOP"),
      ("achieved", f"{flops / step_s / 1e9:.1f} GFLOP/s"),
      ("f32 matmul peak (4096^3 dot)", f"{peak / 1e9:.1f} GFLOP/s"),
      ("MFU vs measured peak", f"{flops / step_s / peak:.1%}"),
      ("final loss", f"{float(m['loss']):.3f}"),
  ]
  width = max(len(k) for k, _ in rows)
  for k, v in rows:
    print(f"{k.ljust(width)}  {v}")


if __name__ == "__main__":
  main()
