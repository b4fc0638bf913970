r"""Routed and mixed-adapter LoRA on a T5 versus its base model.

T5-small sized model (d_model 512, d_ff 2048, 8 heads, 6+6 layers, vocab
32128) with a rank-16 LoRA on every encoder and decoder linear layer (96
modules). Three tables, every ratio measured side by side in one run (the
base re-timed beside each row, median of --reps runs after a warm-up):

  prefill  one jitted forward of batch 32 x (128 encoder + 32 decoder) =
           5120 tokens: base, per-token PHATGOOSE top-k routing among E
           experts (routing.apply_experts, impl 'auto' unless --impl), and
           the all-experts 'dense' reference while its (tokens, E, d_ff)
           intermediate stays under --dense_max_gb;
  decode   one KV-cached decoder step (batch 32, one new token per row; the
           encoding and cross-attention cache made beforehand): base and
           routed at the same E, k (--decode_reps runs);
  mixed    a mixed-adapter batch (32 rows, adapter_index = 0..31 of a
           32-adapter library: each row its own LoRA) against one LoRA for
           all 32 rows, prefill and decode step; ratio single/mixed is the
           mixed batch's relative throughput (S-LoRA's measure).

The 'impl' column is what 'auto' chose for that call (routing.default_impl
of the call's N*k assignments and E: prefill and decode differ; mixed
batches: grouped.per_example_impl). Goals (issue 15): routed/base <= 1.5
(E=256, k=2), decode <= 1.3, mixed/single throughput >= 0.9.

Compilation dominates a cold run on CPU (the routed T5's 96 'grouped'
modules took 80 s of CPU each to lower and compile on the loaded 2-core
development machine, against 5 s for the base), so compiled programs are kept
in JAX's persistent compilation cache (--compile_cache, default
~/.cache/mtjax/benchmarks; '' turns it off): a re-run only traces. The last
line gives the run's wall time and how much of it went to first calls.

glibc: buffers of 32 MiB and more are mmap'ed and page-faulted afresh on
every call, which at this batch doubled the base forward's time on the
2-core development machine; by default the script re-executes itself with
GLIBC_TUNABLES=glibc.malloc.mmap_max=0 (kept heap memory);
--no-tuned_malloc keeps the environment as it is.

Needs only jax, flax and numpy (no tensorflow/seqio), so it runs on a GPU box.

  python benchmarks/routing.py                     # E 8,64,256,1024 x k 1,2
  python benchmarks/routing.py --pairs=256:2 --impl=grouped,blocked --batch=8
  python benchmarks/routing.py --tables=mixed      # one table
"""
import argparse
import functools
import os
import statistics
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mtjax.methods import grouped, transform
from mtjax.methods import lora as lora_lib
from mtjax.models import t5
from mtjax.routing import kernels as routing
from mtjax.routing import routed as routed_lib

T5_SMALL = dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048,
                num_layers=6, num_heads=8, dropout_rate=0.0,
                feed_forward_proj="relu", tie_word_embeddings=True)
TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4294967296"


@functools.partial(jax.jit, static_argnums=(1, 3))
def _normal(key, shape, scale, dtype):
  return (jax.random.normal(key, shape) * scale).astype(dtype)


def random_library(model, lora, num_e, dtype, seed=0, gates=True):
  """Stacked {path: lora_a, lora_b[, gate]} with random (trained-looking)
  values."""
  targets = lora._targets(model)   # pylint: disable=protected-access
  out = {}
  for i, (path, t) in enumerate(sorted(targets.items())):
    d, o = t.shape
    ka, kb, kg = jax.random.split(jax.random.fold_in(jax.random.key(seed), i), 3)
    out[path] = {"lora_a": _normal(ka, (num_e, d, lora.rank), d ** -0.5, dtype),
                 "lora_b": _normal(kb, (num_e, lora.rank, o), 0.02, dtype)}
    if gates:
      out[path]["gate"] = _normal(kg, (num_e, d), 1.0, dtype)
  return transform.nest(out)


def size_gb(tree):
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)) / 2**30


FIRST = []   # seconds of each timed function's first call (compile + run)


def time_fn(fn, args, reps):
  """Median seconds of `reps` calls after a first (compiling) call."""
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  FIRST.append(time.perf_counter() - t0)
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


class Bench:
  """The model, base params, inputs and the decoding context of one run."""

  def __init__(self, args):
    self.args = args
    self.model = t5.Model(t5.T5Config(**dict(T5_SMALL,
                                             num_layers=args.num_layers)))
    rs = np.random.RandomState(0)
    b, li, lt = args.batch, args.inputs_length, args.targets_length
    self.inputs = dict(
        input_ids=rs.randint(2, 32000, (b, li)).astype(np.int32),
        decoder_input_ids=rs.randint(2, 32000, (b, lt)).astype(np.int32))
    self.base = jax.jit(lambda r: nn.unbox(self.model.init(
        r, **self.inputs)["params"]))(jax.random.key(0))
    self.lora = lora_lib.LoRA(rank=args.rank, alpha=float(args.rank),
                              targets=(r"(encoder|decoder)/.*",))
    self.tokens = b * (li + lt)
    self.base_fn = jax.jit(lambda p, i: self.model.apply({"params": p}, **i))
    self._decode_context()

  def _decode_context(self):
    """Encoding and a decoder cache after one prompt token (base model)."""
    model, base = self.model, self.base
    mask = np.ones_like(self.inputs["input_ids"])
    enc = jax.jit(lambda p: model.apply({"params": p}, self.inputs["input_ids"],
                                        mask, method="encode"))(base)
    self.ctx = {"encoded": enc, "attention_mask": mask}
    first = self.inputs["decoder_input_ids"][:, :1]
    b, lt = first.shape[0], self.args.targets_length

    @jax.jit
    def cache0(p):
      ids = jnp.broadcast_to(first, (b, lt))
      _, cache = transform.apply_model(
          model, p, {**self.ctx, "decoder_input_ids": ids}, method="decode",
          decode=transform.PREFILL)
      _, cache = transform.apply_model(
          model, p, {**self.ctx, "decoder_input_ids": first}, method="decode",
          decode=transform.PREFILL, cache=cache)
      return cache
    self.cache, self.token = cache0(base), first

  def step_fn(self, method=None):
    """jitted (params, cache, token, extra) -> (logits, cache), one step."""
    def step(p, cache, tok, extra):
      inputs = {**self.ctx, "decoder_input_ids": tok, **extra}
      if method is None:
        return transform.apply_model(self.model, p, inputs, method="decode",
                                     decode=transform.STEP, cache=cache)
      return method.apply(self.model, p, inputs, method="decode",
                          decode=transform.STEP, cache=cache)
    return jax.jit(step)

  def time_step(self, fn, params, extra=None):
    return time_fn(fn, (params, self.cache, self.token, extra or {}),
                   self.args.decode_reps)


def prefill_rows(bench, num_e, k, dtype, params, lib_gb):
  """Rows (one per --impl) of the prefill table at E, k."""
  args, rows, dense_txt = bench.args, [], None
  reps = args.reps_large if num_e >= 1024 else args.reps
  for impl in args.impl.split(","):
    routed = routed_lib.build_router("phatgoose", bench.lora, top_k=k,
                                     impl=impl)
    fn = jax.jit(lambda p, i, m=routed: m.apply(bench.model, p, i))
    t_routed = time_fn(fn, (params, bench.inputs), reps)
    t_base = time_fn(bench.base_fn, (bench.base, bench.inputs), reps)
    chose = (routing.default_impl(bench.tokens * k, num_e) if impl == "auto"
             else impl)
    if dense_txt is None:    # once per (E, k); tokens x E x d_ff intermediate
      dense_gb = bench.tokens * num_e * T5_SMALL["d_ff"] * 4 / 2**30
      if dense_gb <= args.dense_max_gb:
        dense = routed_lib.build_router("phatgoose", bench.lora, top_k=k,
                                        impl="dense")
        dfn = jax.jit(lambda p, i, m=dense: m.apply(bench.model, p, i))
        t_dense = time_fn(dfn, (params, bench.inputs), reps)
        dense_txt = f"{t_dense * 1e3:9.1f} {t_dense / t_base:7.2f}"
      else:
        dense_txt = f"  skipped ({dense_gb:.1f} GB/module)"
    rows.append(f"{num_e:5d} {k:2d} {impl + '>' + chose:>14} "
                f"{jnp.dtype(dtype).name:>9} {lib_gb:7.2f} {t_base * 1e3:8.1f} "
                f"{t_routed * 1e3:9.1f} {t_routed / t_base:7.2f}     "
                f"{dense_txt}")
    print("prefill", rows[-1], flush=True)
  return rows


def decode_row(bench, num_e, k, params):
  """The decode table's row at E, k (impl 'auto')."""
  routed = routed_lib.build_router("phatgoose", bench.lora, top_k=k)
  t_routed = bench.time_step(bench.step_fn(routed), params)
  t_base = bench.time_step(bench.step_fn(), bench.base)
  chose = routing.default_impl(bench.args.batch * k, num_e)
  row = (f"{num_e:5d} {k:2d} {chose:>8} {t_base * 1e3:8.2f} "
         f"{t_routed * 1e3:9.2f} {t_routed / t_base:7.2f}")
  print("decode ", row, flush=True)
  return row


def routed_tables(bench, pairs, tables):
  pre, dec = [], []
  for num_e in dict.fromkeys(e for e, _ in pairs):
    args = bench.args
    dtype = jnp.bfloat16 if (args.expert_dtype == "bfloat16"
                             or num_e >= args.bf16_from) else jnp.float32
    stacked = random_library(bench.model, bench.lora, num_e, dtype)
    params = routed_lib.routed_params(bench.base, stacked, "phatgoose")
    for k in [kk for e, kk in pairs if e == num_e]:
      if "prefill" in tables:
        pre += prefill_rows(bench, num_e, k, dtype, params, size_gb(stacked))
      if "decode" in tables:
        dec.append(decode_row(bench, num_e, k, params))
    del stacked, params
  return pre, dec


def mixed_rows(bench, num_adapters):
  """Mixed batch (row i: adapter i % n) vs one adapter for every row."""
  args, rows = bench.args, []
  batch = args.batch
  single = lora_lib.LoRA(rank=args.rank, alpha=float(args.rank),
                         targets=bench.lora.targets)
  mixed = lora_lib.LoRA(rank=args.rank, alpha=float(args.rank),
                        targets=bench.lora.targets, num_experts=num_adapters)
  lib = random_library(bench.model, single, num_adapters, jnp.float32,
                       gates=False)
  p_mixed = {"base": bench.base, "lora": lib}
  p_single = {"base": bench.base,
              "lora": jax.tree.map(lambda x: x[0], lib)}
  extra = {"adapter_index": np.arange(batch, dtype=np.int32) % num_adapters}
  fwd = lambda m: jax.jit(lambda p, i: m.apply(bench.model, p, i))  # noqa: E731
  inputs = {**bench.inputs, **extra}
  t_mixed = time_fn(fwd(mixed), (p_mixed, inputs), args.reps)
  t_single = time_fn(fwd(single), (p_single, bench.inputs), args.reps)
  t_base = time_fn(bench.base_fn, (bench.base, bench.inputs), args.reps)
  chose = grouped.per_example_impl(bench.tokens, num_adapters)
  rows.append(f"prefill {num_adapters:4d} {chose:>8} {t_base * 1e3:8.1f} "
              f"{t_single * 1e3:9.1f} {t_mixed * 1e3:9.1f} "
              f"{t_single / t_mixed:7.2f}")
  print("mixed  ", rows[-1], flush=True)
  s_mixed = bench.time_step(bench.step_fn(mixed), p_mixed, extra)
  s_single = bench.time_step(bench.step_fn(single), p_single)
  s_base = bench.time_step(bench.step_fn(), bench.base)
  chose = grouped.per_example_impl(batch, num_adapters)
  rows.append(f"decode  {num_adapters:4d} {chose:>8} {s_base * 1e3:8.2f} "
              f"{s_single * 1e3:9.2f} {s_mixed * 1e3:9.2f} "
              f"{s_single / s_mixed:7.2f}")
  print("mixed  ", rows[-1], flush=True)
  return rows


def parse_args():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--pairs",
                  default="256:2,1024:2,8:2,64:2,256:1,1024:1,8:1,64:1",
                  help="E:k pairs, timed in this order (E grouped)")
  ap.add_argument("--tables", default="prefill,decode,mixed")
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--inputs_length", type=int, default=128)
  ap.add_argument("--targets_length", type=int, default=32)
  ap.add_argument("--rank", type=int, default=16)
  ap.add_argument("--num_layers", type=int, default=6,
                  help="encoder and decoder layers (6: T5-small; fewer only "
                       "for a quick check of the script)")
  ap.add_argument("--reps", type=int, default=3)
  ap.add_argument("--reps_large", type=int, default=2,
                  help="prefill reps from E >= 1024 on (slow rows)")
  ap.add_argument("--decode_reps", type=int, default=10)
  ap.add_argument("--mixed_adapters", type=int, default=32,
                  help="adapters of the mixed batch (row i: i % n)")
  ap.add_argument("--expert_dtype", default="float32",
                  help="storage dtype of expert factors (float32|bfloat16)")
  ap.add_argument("--bf16_from", type=int, default=1024,
                  help="store experts in bfloat16 from this E on (memory)")
  ap.add_argument("--dense_max_gb", type=float, default=1.0)
  ap.add_argument("--impl", default="auto",
                  help="comma-separated apply_experts impls, one prefill row "
                       "each")
  ap.add_argument("--tuned_malloc", action=argparse.BooleanOptionalAction,
                  default=True, help="re-exec with GLIBC_TUNABLES (see top)")
  ap.add_argument("--compile_cache",
                  default=os.path.expanduser("~/.cache/mtjax/benchmarks"),
                  help="JAX persistent compilation cache ('' = off)")
  return ap.parse_args()


def main():
  args = parse_args()
  if (args.tuned_malloc and sys.platform.startswith("linux")
      and "GLIBC_TUNABLES" not in os.environ):
    os.execve(sys.executable, [sys.executable] + sys.argv,
              dict(os.environ, GLIBC_TUNABLES=TUNABLES))
  if args.compile_cache:
    jax.config.update("jax_compilation_cache_dir", args.compile_cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  start = time.perf_counter()
  tables = args.tables.split(",")
  bench = Bench(args)
  pairs = [tuple(int(v) for v in p.split(":")) for p in args.pairs.split(",")]
  num_mod = len(bench.lora._targets(bench.model))   # pylint: disable=protected-access
  print(f"backend {jax.default_backend()}, {jax.device_count()} device(s) "
        f"({jax.devices()[0].device_kind}); auto = "
        f"{routing.default_impl(bench.tokens * 2, 256)} (prefill, E=256 k=2), "
        f"{routing.default_impl(args.batch * 2, 256)} (decode step, E=256 "
        f"k=2); GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '(unset)')}")
  print(f"T5-small ({args.num_layers}+{args.num_layers} layers), {num_mod} "
        f"adapted modules, rank {args.rank}, batch "
        f"{args.batch} x ({args.inputs_length} enc + {args.targets_length} dec)"
        f" = {bench.tokens} tokens; reps {args.reps} ({args.reps_large} from "
        f"E=1024), decode reps {args.decode_reps}", flush=True)
  pre, dec = routed_tables(bench, pairs, tables)
  mixed = mixed_rows(bench, args.mixed_adapters) if "mixed" in tables else []
  if pre:
    print("\nprefill (forward of all tokens)\n    E  k    impl>chose   "
          "experts  lib_GB  base_ms routed_ms routed/base   dense_ms "
          "dense/base")
    print("\n".join(pre))
  if dec:
    print(f"\ndecode (one KV-cached step, {args.batch} rows x 1 token)\n"
          "    E  k     impl  base_ms routed_ms routed/base")
    print("\n".join(dec))
  if mixed:
    print(f"\nmixed-adapter batch ({args.batch} rows, {args.mixed_adapters} "
          "adapters) vs one adapter\n          n     impl  base_ms single_ms "
          " mixed_ms single/mixed")
    print("\n".join(mixed))
  print("(base_ms: the base model timed next to that row; lib_GB: all expert "
        "factors + gates; experts: their storage dtype; impl>chose: the impl "
        "asked for and what ran; dense: once per E, k)")
  print(f"wall {time.perf_counter() - start:.0f} s, of which first calls "
        f"(compilation) {sum(FIRST):.0f} s; compile cache "
        f"{args.compile_cache or 'off'}")


if __name__ == "__main__":
  main()
