r"""Train-step speed of a T5-small-sized model: step time, tokens/s, MFU;
and what gradient checkpointing (remat) saves on a SmolLM2 LoRA step.

  python benchmarks/train_step.py [--steps 5] [--dtype float32]
  python benchmarks/train_step.py --remat [--steps 2]

--remat: the LoRA (r=8, every linear layer) step of SmolLM2-135M-Instruct
(the bundled GGUF), batch 8 x 256 tokens, under each policy of
mtjax.models.layers.REMAT_POLICIES, side by side in one run: XLA's
temporary-buffer size of the compiled step (the activations kept for the
backward pass live there; compiled.memory_analysis()), its ratio to 'none',
and the median step time.

Full fine-tuning (AdamW) of d_model 512, 8+8 layers, 6 heads, d_kv 64, d_ff
1024 (gated-gelu), vocab 32128; batch 8 x (128 input, 32 target) tokens, with
the same jitted step as training (mtjax.training.trainer). Model FLOPs are
counted analytically (matmuls of forward + backward = 3 x forward; attention
scores included, optimizer excluded) and compared with this machine's f32
matmul peak, measured in the same run with a large jnp.dot. XLA's own FLOP
count of the compiled step is printed too.
"""
import argparse
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mtjax.methods import full, lora
from mtjax.models import layers, sharding
from mtjax.training import fit, trainer

MODEL = dict(hf_path="", arch="t5", dtype="float32", vocab_size=32128,
             d_model=512, d_kv=64, num_heads=6, d_ff=1024, num_layers=8,
             num_decoder_layers=8, feed_forward_proj="gated-gelu",
             tie_word_embeddings=False, dropout_rate=0.0)
BATCH, LI, LT = 8, 128, 32
GGUF = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                    "shared", "data", "models", "smollm2_135m_instruct",
                    "SmolLM2-135M-Instruct.Q4_1.gguf")


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


def remat_table(steps: int) -> None:
  """The --remat table (module docstring)."""
  mesh = sharding.make_mesh((-1, 1, 1))
  model, base = trainer.build_model(ml_collections.ConfigDict(dict(
      gguf_path=GGUF, dtype="float32")), jax.random.key(0), mesh)
  method = lora.LoRA(rank=8, alpha=16.0)
  flat, sh = trainer.init_params(model, method, jax.random.key(1), mesh, base)
  opt = ml_collections.ConfigDict(dict(
      name="adamw", learning_rate=1e-4, warmup_steps=0, decay="constant"))
  r = np.random.default_rng(0)
  b_, t_ = 8, 256
  ids = r.integers(2, model.config.vocab_size, (b_, t_)).astype(np.int32)
  host = {"decoder_target_tokens": ids,
          "decoder_input_tokens": np.pad(ids[:, :-1], ((0, 0), (1, 0))),
          "decoder_loss_weights": np.ones((b_, t_), np.int32),
          "decoder_causal_attention": np.zeros((b_, t_), np.int32),
          "decoder_mask": np.ones((b_, t_), np.int32),
          "task_index": np.zeros((b_,), np.int32)}
  rows = []
  for policy in layers.REMAT_POLICIES:
    fitter = fit.Fitter(method, model, mesh, opt, steps + 1, remat=policy)
    state, frozen = fitter.init(flat, sh)
    with sharding.use_mesh(mesh):
      b = trainer.put_batch(host, mesh)
      compiled = fitter._fn.lower(state, frozen, b).compile()  # noqa: SLF001 (the Fitter's jitted step)
      temp = compiled.memory_analysis().temp_size_in_bytes
      state, m = fitter._fn(state, frozen, b)  # noqa: SLF001 (warm-up)
      jax.block_until_ready(m)
      times = []
      for _ in range(steps):
        t0 = time.perf_counter()
        state, m = fitter._fn(state, frozen, b)  # noqa: SLF001 (timed)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    rows.append((policy, temp, float(np.median(times)), float(m["loss"])))
  print(f"SmolLM2-135M LoRA r=8 step, batch {b_} x {t_} tokens, "
        f"{jax.devices()[0].device_kind} x{jax.device_count()}")
  print(f"{'remat':6s} {'temp MiB':>9s} {'vs none':>8s} {'step s':>7s} "
        f"{'vs none':>8s} {'loss':>7s}")
  for policy, temp, sec, loss in rows:
    print(f"{policy:6s} {temp / 2**20:9.0f} {temp / rows[0][1]:8.2f} "
          f"{sec:7.2f} {sec / rows[0][2]:8.2f} {loss:7.4f}")


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--dtype", default="float32")
  ap.add_argument("--remat", action="store_true",
                  help="the remat table of a SmolLM2 LoRA step instead")
  args = ap.parse_args()
  if args.remat:
    remat_table(args.steps)
    return
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
