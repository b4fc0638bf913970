r"""Batched greedy generation: mtjax vs transformers on CPU (SmolLM2-135M).

  python benchmarks/generate.py [--batch 8] [--new 32] [--repeats 3]
                                [--folder DIR] [--keep DIR] [--torch_threads N]

Loads SmolLM2-135M-Instruct from ../shared/data/models/smollm2_135m_instruct
(Q4_1 GGUF) into transformers (dequantised to f32, `AutoModelForCausalLM.
from_pretrained(dir, gguf_file=name)`, the tokenizer likewise), saves it with
save_pretrained to a temporary folder (--keep DIR keeps it; --folder DIR
reuses one) and loads that folder with `mtjax.models.hf.load`. Then, on the
same `--batch` English prompts (left-padded, no EOS stop, `--new` tokens),
times batched greedy generation three ways, in one process and one after the
other, each after a warm-up run (compilation excluded), best of --repeats:

  transformers   model.generate(do_sample=False) (torch, KV cache)
  mtjax          mtjax.models.generate (jitted prefill + cached scan)
  mtjax eval     the evaluation path: evaluate.generate_rows with
                 make_greedy of the 'full' method (prefill and cached steps
                 through method.apply; lm=True: the model reads exactly the
                 prompt tokens), host batching and placement included

Prints tokens/s (batch * new / seconds) for each, the ratios mtjax /
transformers, and whether the generated tokens agree (they should, token for
token). The load average is printed too: the machine may be shared, and
torch's OpenMP threads slow down badly when another process holds a core
(--torch_threads 1 is the fairer setting then).
"""
import argparse
import os
import tempfile
import time

import jax
import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import mtjax.models
from mtjax.evaluation import evaluate
from mtjax.methods import full
from mtjax.models import hf, sharding

GGUF = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                    "shared", "data", "models", "smollm2_135m_instruct",
                    "SmolLM2-135M-Instruct.Q4_1.gguf")
PROMPTS = [
    "The history of the Roman Empire spans more than a thousand years, and",
    "Photosynthesis is the process by which green plants",
    "In computer science, a hash table is a data structure that",
    "The best way to learn a new language is to",
    "Mount Everest, the highest mountain on Earth, was first climbed",
    "A healthy breakfast usually includes",
    "The French Revolution began in 1789 when",
    "Machine learning models are trained by adjusting their parameters so",
]


def convert(gguf, out):
  """GGUF -> transformers (f32) -> save_pretrained folder `out`."""
  folder, name = os.path.split(os.path.abspath(gguf))
  tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
  model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                               dtype=torch.float32)
  # The weights are dequantised f32 tensors; transformers only refuses to
  # save a model still flagged as GGUF-quantised.
  model.hf_quantizer = None
  if hasattr(model.config, "quantization_config"):
    del model.config.quantization_config
  model.save_pretrained(out)
  tok.save_pretrained(out)


def best_time(fn, repeats):
  out = fn()  # warm-up: compilation, allocator
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - t0)
  return min(times), out


def run(folder, args):
  tok = AutoTokenizer.from_pretrained(folder)
  prompts = (PROMPTS * (args.batch // len(PROMPTS) + 1))[:args.batch]
  rows = [tok(p)["input_ids"] for p in prompts]
  pad = tok.pad_token_id if tok.pad_token_id is not None else 0
  width = max(map(len, rows))
  ids = np.full((len(rows), width), pad, np.int32)
  mask = np.zeros_like(ids)
  for i, r in enumerate(rows):
    ids[i, width - len(r):], mask[i, width - len(r):] = r, 1
  n = args.new
  print(f"batch {len(rows)}, prompts of {min(map(len, rows))}-{width} tokens, "
        f"{n} new tokens; jax {jax.__version__} on {jax.devices()[0].platform}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads); "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")

  hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
  hf_model.eval()
  hf_model.generation_config.eos_token_id = None  # no early stop: n tokens

  def transformers_generate():
    with torch.no_grad():
      out = hf_model.generate(input_ids=torch.tensor(ids, dtype=torch.long),
                              attention_mask=torch.tensor(mask),
                              max_new_tokens=n, do_sample=False,
                              pad_token_id=pad)
    return out[:, width:].numpy()

  model, params = hf.load(folder)

  def mtjax_generate():
    return np.asarray(mtjax.models.generate(model, params, ids, mask,
                                            max_new_tokens=n))

  greedy = evaluate.make_greedy(full.FullFineTuning(), model, n)
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])

  def eval_generate():
    with sharding.use_mesh(mesh):
      out = evaluate.generate_rows(
          greedy, model, {"base": params}, rows, {"inputs": width}, n,
          batch_size=len(rows), mesh=mesh, eos_id=-1, pad_id=pad, lm=True)
    return np.asarray(out)

  results = {}
  for name, fn in (("transformers", transformers_generate),
                   ("mtjax", mtjax_generate), ("mtjax eval", eval_generate)):
    sec, out = best_time(fn, args.repeats)
    results[name] = (sec, out)
    print(f"{name:>13}: {sec:7.3f} s  {len(rows) * n / sec:8.1f} tokens/s")
  ref_sec, ref = results["transformers"]
  for name in ("mtjax", "mtjax eval"):
    sec, out = results[name]
    same = (out == ref).all(axis=1)
    print(f"{name} / transformers: {ref_sec / sec:.2f}x tokens/s; tokens "
          f"equal in {int(same.sum())}/{len(same)} rows "
          f"({(out == ref).mean():.1%} of tokens)")
  sample = tok.decode(results["mtjax"][1][0])
  print(f"row 0: {prompts[0]!r} -> {sample!r}")


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--gguf", default=GGUF)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--new", type=int, default=32)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--folder", default="",
                  help="an HF folder already converted (skips the GGUF step)")
  ap.add_argument("--keep", default="", help="convert into DIR and keep it")
  ap.add_argument("--torch_threads", type=int, default=0,
                  help="torch.set_num_threads (0: torch's default)")
  args = ap.parse_args()
  if args.torch_threads:
    torch.set_num_threads(args.torch_threads)
  if args.folder:
    run(args.folder, args)
  elif args.keep:
    convert(args.gguf, args.keep)
    run(args.keep, args)
  else:
    with tempfile.TemporaryDirectory() as tmp:
      convert(args.gguf, tmp)
      run(tmp, args)


if __name__ == "__main__":
  main()
