r"""Inference cost: 10-shot ICL vs soft injection vs zero-shot, same batch size.

Soft injection (mtjax/methods/soft_injection.py) runs the zero-shot prompt and
mixes the task embedding into the heads at its last position during prefill,
so it should cost what zero-shot costs, while k-shot ICL pays for k
demonstrations in every prompt. All three run the same jitted greedy loop
(prefill + KV-cached decoding, `greedy_with_prefill`) on the same suite
examples; compilation is excluded. Weights are random: cost does not depend
on them.

  python benchmarks/soft_injection.py                      # test-bed size
  python benchmarks/soft_injection.py --hidden 256 --layers 8 --heads 8
"""
import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from mtjax import data
from mtjax.data import suite
from mtjax.experiments import soft_injection as sa
from mtjax.methods import soft_injection as si


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--task", default="sentiment")
  ap.add_argument("--examples", type=int, default=64)
  ap.add_argument("--batch_size", type=int, default=16)
  ap.add_argument("--shots", type=int, default=10)
  ap.add_argument("--max_new_tokens", type=int, default=8)
  ap.add_argument("--hidden", type=int, default=64)
  ap.add_argument("--layers", type=int, default=4)
  ap.add_argument("--heads", type=int, default=4)
  ap.add_argument("--repeats", type=int, default=3)
  args = ap.parse_args()

  vocab = data.vocabulary("byte")
  model = sa.testbed_model(vocab, hidden=args.hidden, layers_=args.layers,
                           heads=args.heads, mlp=2 * args.hidden,
                           max_len=4096)
  params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  train = suite.examples(args.task, "train")
  evals = suite.examples(args.task, "validation", max_examples=args.examples)
  enc = vocab.encode
  zero = sa.few_shot_prompts(train, evals, 0, 0, enc, 4096)
  icl = sa.few_shot_prompts(train, evals, args.shots, 0, enc, 4096)
  head_dim = args.hidden // args.heads
  emb = jax.random.normal(jax.random.key(1), (args.layers, args.heads, head_dim))
  alpha = jnp.full((args.layers, args.heads), 0.5)
  n = args.max_new_tokens

  def runner(prefill, payload):
    return lambda i, m: si.greedy_with_prefill(
        model, params, jnp.asarray(i), jnp.asarray(m), payload, prefill, n,
        None, 0)

  cases = {"zero-shot": (zero, runner(si.plain_prefill, ())),
           f"icl-{args.shots}": (icl, runner(si.plain_prefill, ())),
           "soft-injection": (zero, runner(si.injected_prefill,
                                           (emb, alpha, None)))}
  print(f"device {jax.devices()[0].device_kind}; model hidden {args.hidden}, "
        f"{args.layers} layers, {args.heads} heads; task {args.task}, "
        f"{len(evals)} examples, batch {args.batch_size}, {n} new tokens")
  times = {name: float("inf") for name in cases}
  for _ in range(args.repeats):  # interleaved, best of repeats
    for name, (prompts, fn) in cases.items():
      times[name] = min(times[name],
                        sa.timed_generation(fn, prompts, args.batch_size)[1])
  for name, (prompts, _) in cases.items():
    mean_len = np.mean([len(p) for p in prompts])
    print(f"{name:>16}: {times[name] * 1e3:8.3f} ms/example  (mean prompt "
          f"{mean_len:.0f} tokens)")
  base = times["zero-shot"]
  print("ratios to zero-shot: " + ", ".join(
      f"{k} {v / base:.2f}x" for k, v in times.items()))
  print(f"icl-{args.shots} / soft-injection: "
        f"{times[f'icl-{args.shots}'] / times['soft-injection']:.2f}x")


if __name__ == "__main__":
  t0 = time.time()
  main()
  print(f"total {time.time() - t0:.0f}s")
