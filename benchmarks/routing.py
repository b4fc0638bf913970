r"""Forward time of a PHATGOOSE-routed T5 versus its base model.

T5-small sized model (d_model 512, d_ff 2048, 8 heads, 6+6 layers, vocab
32128) with a rank-16 LoRA expert on every encoder and decoder linear layer
(96 modules). For each number of experts E and top-k it times one jitted
forward (median of --reps runs after a warm-up; --reps_large from E >= 1024)
of
  base    the model alone, re-timed beside every row (fair on a shared box),
  routed  per-token PHATGOOSE top-k routing with sort-and-segment application
          (routing.apply_experts; impl 'auto' = 'grouped', 'ragged' on TPU;
          --impl=grouped,blocked adds one row per impl),
  dense   the all-experts reference (impl 'dense'), skipped when its
          (tokens, E, d_out) intermediate exceeds --dense_max_gb,
and prints one table with routed/base and dense/base, plus the library size.

Token count: the default batch is 32 x (128 encoder + 32 decoder) = 5120
tokens, an evaluation-sized batch: routed cost has a per-forward part (reading
every expert's factors once, 2 GB at E=256 in f32) that a realistic batch
amortises; --batch overrides it (the former default was 4).

glibc: buffers of 32 MiB and more are mmap'ed and page-faulted afresh on every
call, which at this batch doubled the base forward's time on the 2-core
development machine; by default the script re-executes itself with
GLIBC_TUNABLES=glibc.malloc.mmap_max=0 (kept heap memory) for both base and
routed; --no-tuned_malloc keeps the environment as it is.

Needs only jax, flax and numpy (no tensorflow/seqio), so it runs on a GPU box.

  python benchmarks/routing.py                 # E 8,64,256,1024 x k 1,2
  python benchmarks/routing.py --pairs=256:2 --impl=grouped,blocked --batch=8
"""
import argparse
import functools
import os
import sys
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mtjax.methods import lora as lora_lib
from mtjax.experiments import phatgoose as pg
from mtjax.routing import experts as ex
from mtjax.routing import routed as routed_lib
from mtjax.routing import kernels as routing
from mtjax.methods import transform
from mtjax.models import t5

T5_SMALL = dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048,
                num_layers=6, num_heads=8, dropout_rate=0.0,
                feed_forward_proj="relu", tie_word_embeddings=True)


@functools.partial(jax.jit, static_argnums=(1, 3))
def _normal(key, shape, scale, dtype):
  return (jax.random.normal(key, shape) * scale).astype(dtype)


def random_library(model, lora, num_e, dtype, seed=0):
  """Stacked {path: lora_a, lora_b, gate} with random (trained-looking) values."""
  targets = lora._targets(model)   # pylint: disable=protected-access
  out = {}
  for i, (path, t) in enumerate(sorted(targets.items())):
    d, o = t.shape
    ka, kb, kg = jax.random.split(jax.random.fold_in(jax.random.key(seed), i), 3)
    out[path] = {"lora_a": _normal(ka, (num_e, d, lora.rank), d ** -0.5, dtype),
                 "lora_b": _normal(kb, (num_e, lora.rank, o), 0.02, dtype),
                 "gate": _normal(kg, (num_e, d), 1.0, dtype)}
  return transform.nest(out)


def time_fn(fn, args, reps):
  jax.block_until_ready(fn(*args))            # compile + warm-up
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4294967296"


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--pairs",
                  default="256:2,1024:2,8:2,64:2,256:1,1024:1,8:1,64:1",
                  help="E:k pairs, timed in this order (E grouped)")
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--inputs_length", type=int, default=128)
  ap.add_argument("--targets_length", type=int, default=32)
  ap.add_argument("--rank", type=int, default=16)
  ap.add_argument("--reps", type=int, default=3)
  ap.add_argument("--reps_large", type=int, default=2,
                  help="reps from E >= 1024 on (slow rows)")
  ap.add_argument("--expert_dtype", default="float32",
                  help="storage dtype of expert factors (float32|bfloat16)")
  ap.add_argument("--bf16_from", type=int, default=1024,
                  help="store experts in bfloat16 from this E on (memory)")
  ap.add_argument("--dense_max_gb", type=float, default=1.0)
  ap.add_argument("--impl", default="auto",
                  help="comma-separated apply_experts impls, one row each")
  ap.add_argument("--tuned_malloc", action=argparse.BooleanOptionalAction,
                  default=True, help="re-exec with GLIBC_TUNABLES (see top)")
  args = ap.parse_args()
  if (args.tuned_malloc and sys.platform.startswith("linux")
      and "GLIBC_TUNABLES" not in os.environ):
    os.execve(sys.executable, [sys.executable] + sys.argv,
              dict(os.environ, GLIBC_TUNABLES=TUNABLES))

  model = t5.Model(t5.T5Config(**T5_SMALL))
  rs = np.random.RandomState(0)
  inputs = dict(
      input_ids=rs.randint(2, 32000, (args.batch, args.inputs_length)
                           ).astype(np.int32),
      decoder_input_ids=rs.randint(2, 32000, (args.batch, args.targets_length)
                                   ).astype(np.int32))
  base = jax.jit(lambda r: nn.unbox(model.init(r, **inputs)["params"]))(
      jax.random.key(0))
  lora = lora_lib.LoRA(rank=args.rank, alpha=float(args.rank),
                       targets=(r"(encoder|decoder)/.*",))
  num_mod = len(lora._targets(model))   # pylint: disable=protected-access
  tokens = args.batch * (args.inputs_length + args.targets_length)
  impls = args.impl.split(",")
  print(f"backend {jax.default_backend()}, {jax.device_count()} device(s) "
        f"({jax.devices()[0].device_kind}); impl {args.impl} (auto = "
        f"{routing.default_impl()}); GLIBC_TUNABLES="
        f"{os.environ.get('GLIBC_TUNABLES', '(unset)')}")
  print(f"T5-small, {num_mod} adapted modules, rank {args.rank}, batch "
        f"{args.batch} x ({args.inputs_length} enc + {args.targets_length} dec)"
        f" = {tokens} tokens; reps {args.reps} ({args.reps_large} from E=1024)",
        flush=True)
  base_fn = jax.jit(lambda p, i: model.apply({"params": p}, **i))
  t_base = time_fn(base_fn, (base, inputs), args.reps)
  print(f"base forward: {t_base * 1e3:.1f} ms", flush=True)
  rows = []
  pairs = [tuple(int(v) for v in p.split(":")) for p in args.pairs.split(",")]
  for num_e in dict.fromkeys(e for e, _ in pairs):
    reps = args.reps_large if num_e >= 1024 else args.reps
    dtype = jnp.bfloat16 if (args.expert_dtype == "bfloat16"
                             or num_e >= args.bf16_from) else jnp.float32
    stacked = random_library(model, lora, num_e, dtype)
    size_gb = pg.size_mb(stacked) / 1024   # pylint: disable=protected-access
    params = routed_lib.routed_params(base, stacked, "phatgoose")
    for k in [kk for e, kk in pairs if e == num_e]:
      dense_txt = None
      for impl in impls:
        routed = routed_lib.build_router("phatgoose", lora, top_k=k, impl=impl)
        fn = jax.jit(lambda p, i, m=routed: m.apply(model, p, i))
        t_routed = time_fn(fn, (params, inputs), reps)
        # base re-timed beside each row: ratios stay fair on a shared machine
        t_base = time_fn(base_fn, (base, inputs), reps)
        if dense_txt is None:   # once per (E, k)
          # dense intermediate: tokens x E x d_out (largest d_out: d_ff)
          dense_gb = tokens * num_e * T5_SMALL["d_ff"] * 4 / 2**30
          if dense_gb <= args.dense_max_gb:
            dense = routed_lib.build_router("phatgoose", lora, top_k=k, impl="dense")
            dfn = jax.jit(lambda p, i, m=dense: m.apply(model, p, i))
            t_dense = time_fn(dfn, (params, inputs), reps)
            dense_txt = f"{t_dense * 1e3:9.1f} {t_dense / t_base:7.2f}"
          else:
            dense_txt = f"  skipped ({dense_gb:.1f} GB/module)"
        rows.append(f"{num_e:5d} {k:2d} {impl:>8} {jnp.dtype(dtype).name:>9} "
                    f"{size_gb:7.2f} {t_base * 1e3:8.1f} {t_routed * 1e3:9.1f} "
                    f"{t_routed / t_base:7.2f}     {dense_txt}")
        print(rows[-1], flush=True)
    del stacked, params
  print("\n    E  k     impl   experts  lib_GB  base_ms routed_ms routed/base"
        "   dense_ms dense/base")
  print("\n".join(rows))
  print("(base_ms: the base model timed next to that row; lib_GB: all expert "
        "factors + gates; experts: their storage dtype; dense: timed once per "
        "E, k, next to the first impl's base)")


if __name__ == "__main__":
  main()
