r"""Peak host memory of loading an HF checkpoint: eager (old) vs lazy hf.load.

  python benchmarks/load.py [--folder DIR] [--keep DIR]

Converts SmolLM2-135M-Instruct from ../shared/data/models/smollm2_135m_instruct
(Q4_1 GGUF, dequantised by transformers to f32) to an HF safetensors folder
sharded in 100 MB files (in a temporary folder, or --keep DIR to keep and
reuse it; --folder DIR measures an existing HF folder instead). Then each
load runs in a fresh subprocess, so its RSS is clean:

  eager   the old path: every tensor into one host dict
          (safetensors.numpy.load_file), the f32 numpy param tree
          (hf.params_from_tensors), then each leaf cast to the param dtype
          and placed (as trainer.build_model did with sharding.shard_params)
  lazy    mtjax.models.hf.load: one tensor at a time read, converted, placed

each with f32 and with bf16 parameters. The peak is VmHWM after resetting it
(/proc/self/clear_refs) just before loading, so it counts only the load; the
table gives the peak RSS increase and the RSS still held afterwards, in MB
and as a ratio to the model's f32 size. On the CPU backend the devices'
memory is host memory, so the placed params themselves stay in the RSS
("kept", about 1.0x for f32 and 0.5x for bf16); on an accelerator they do
not. Last, with 8 fake CPU devices and a mesh with fsdp=8, the lazy load is
checked to place every parameter with the NamedSharding of its logical axes.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
from safetensors.numpy import load_file

from mtjax.models import hf, sharding

GGUF = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                    "shared", "data", "models", "smollm2_135m_instruct",
                    "SmolLM2-135M-Instruct.Q4_1.gguf")
MB = 2**20


# ------------------------------------------------------------ measurement

def _status(field):
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1]) * 1024
  raise KeyError(field)


def _reset_peak():
  """Resets VmHWM to the current RSS; False where the kernel refuses."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def _peak(reset):
  if reset:
    return _status("VmHWM")
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def eager_load(folder, param_dtype="float32", mesh=None):
  """The old hf.load followed by trainer.build_model's placement."""
  with open(os.path.join(folder, "config.json")) as f:
    hf_config = json.load(f)
  arch = hf.arch_module(hf_config.get("model_type"))
  model = arch.Model(arch.config_from_hf(hf_config))
  tensors = {}
  for file in hf.safetensors_files(folder):
    tensors.update(load_file(file))
  host = hf.params_from_tensors(tensors, model, path_hint=folder)  # f32
  del tensors  # (the f32 tree still views most of it, as before)
  dtype = jax.numpy.dtype(param_dtype)
  host = jax.tree.map(lambda x: np.asarray(x, dtype), host)
  if mesh is None:
    return model, jax.device_put(host)
  boxed = sharding.abstract_params(model, **hf.dummy_inputs(model.config))
  return model, sharding.shard_params(host, boxed, mesh)


def f32_sizes(folder):
  """(f32 bytes of all tensors, f32 bytes of the largest, number of files)."""
  tensors = hf.LazyTensors(folder)
  sizes = [4 * int(np.prod(tensors.shape(n))) for n in tensors]
  return sum(sizes), max(sizes), len(hf.safetensors_files(folder))


def measure(mode, folder, param_dtype):
  """One load in this (fresh) process; prints a JSON line."""
  jax.devices()  # the backend is up before the baseline
  total, largest, _ = f32_sizes(folder)
  before = _status("VmRSS")
  reset = _reset_peak()
  start_peak = _peak(reset)
  t0 = time.perf_counter()
  if mode == "eager":
    _, params = eager_load(folder, param_dtype)
  else:
    _, params = hf.load(folder, param_dtype=param_dtype)
  jax.block_until_ready(params)
  secs = time.perf_counter() - t0
  peak = _peak(reset)
  leaves = jax.tree.leaves(params)
  print(json.dumps(dict(
      mode=mode, param_dtype=param_dtype, f32_bytes=total, largest=largest,
      peak=peak - (before if reset else start_peak), kept=_status("VmRSS") -
      before, param_bytes=sum(x.nbytes for x in leaves), seconds=secs,
      dtypes=sorted({str(x.dtype) for x in leaves}), hwm_reset=reset,
      backend=jax.default_backend())))


def check_fsdp(folder):
  """With 8 devices: fsdp=8 placement by the logical axes, values as eager."""
  mesh = sharding.make_mesh((1, 8, 1))
  before = _status("VmRSS")
  reset = _reset_peak()
  model, params = hf.load(folder, param_dtype="bfloat16", mesh=mesh)
  jax.block_until_ready(params)
  peak = _peak(reset) - before
  boxed = sharding.abstract_params(model, **hf.dummy_inputs(model.config))
  want = sharding.tree_shardings(boxed, mesh)
  flat = jax.tree_util.tree_leaves_with_path(params)
  wrong = [jax.tree_util.keystr(p) for (p, x), s in
           zip(flat, jax.tree.leaves(want), strict=True) if x.sharding != s]
  split = [x for _, x in flat if x.addressable_shards[0].data.size < x.size]
  emb = params["model"]["embed_tokens"]["embedding"]
  q = params["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
  _, ref = eager_load(folder, "bfloat16")
  same = all(jax.tree.leaves(jax.tree.map(
      lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))),
      params, ref)))
  total = sum(x.nbytes for _, x in flat)
  print(f"fsdp=8 on {len(jax.devices())} devices (mesh "
        f"{dict(mesh.shape)}), bf16 params:")
  print(f"  {len(flat)} params, {len(wrong)} with another sharding than "
        f"their logical axes imply{': ' + ', '.join(wrong[:5]) if wrong else ''}")
  whole = [jax.tree_util.keystr(p) for p, x in flat
           if x.addressable_shards[0].data.size == x.size]
  print(f"  {len(split)} split over the devices "
        f"({sum(x.nbytes for x in split) / total:.1%} of the bytes); "
        f"{len(whole)} whole on each{': ' + ', '.join(whole[:3]) if whole else ''}")
  print(f"  embed_tokens {emb.shape} {emb.sharding.spec}: shard "
        f"{emb.addressable_shards[0].data.shape} on each of "
        f"{len(emb.addressable_shards)} devices")
  print(f"  layers_0 q_proj {q.shape} {q.sharding.spec}: shard "
        f"{q.addressable_shards[0].data.shape}")
  print(f"  values equal to the eager load: {same}; peak RSS increase "
        f"{peak / MB:.0f} MB (all 8 fake devices' memory is host memory)")
  if wrong or not same:
    sys.exit(1)


# ------------------------------------------------------------- the driver

def convert(gguf_path, out):
  """GGUF -> f32 HF safetensors folder in 100 MB shards, via transformers."""
  import torch  # noqa: PLC0415 (only the parent converts; children stay lean)
  import transformers  # noqa: PLC0415 (same)
  t0 = time.perf_counter()
  model = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path),
      dtype=torch.float32)
  # The GGUF "quantizer" has already dequantised every weight to f32; without
  # it (and its config entry) the model saves as an ordinary checkpoint.
  model.hf_quantizer = None
  if hasattr(model.config, "quantization_config"):
    del model.config.quantization_config
  model.save_pretrained(out, max_shard_size="100MB")
  del model
  print(f"converted {os.path.basename(gguf_path)} -> {out} in "
        f"{time.perf_counter() - t0:.0f}s", flush=True)


def _child(*args, env=None):
  out = subprocess.run([sys.executable, os.path.abspath(__file__), *args],
                       capture_output=True, text=True, env=env, check=False)
  if out.returncode:
    sys.stderr.write(out.stdout + out.stderr)
    raise SystemExit(f"child {args} failed ({out.returncode})")
  return out.stdout


def run(folder):
  rows = []
  for mode in ("eager", "lazy"):
    for dtype in ("float32", "bfloat16"):
      line = _child("--child", mode, "--param_dtype", dtype, "--folder", folder)
      rows.append(json.loads(line.strip().splitlines()[-1]))
  total, largest, files = f32_sizes(folder)
  print(f"\n{os.path.basename(folder.rstrip('/'))}: f32 size {total / MB:.1f} "
        f"MB in {files} safetensors files; largest tensor {largest / MB:.1f} "
        f"MB (f32); backend {rows[0]['backend']}; peak from "
        f"{'VmHWM (reset)' if rows[0]['hwm_reset'] else 'ru_maxrss'}")
  print(f"{'path':6} {'params':9} {'peak dRSS':>10} {'/f32':>6} "
        f"{'kept dRSS':>10} {'/f32':>6} {'peak-kept':>10} {'params MB':>10} "
        f"{'time':>6}")
  for r in rows:
    print(f"{r['mode']:6} {r['param_dtype']:9} {r['peak'] / MB:8.0f}MB "
          f"{r['peak'] / total:5.2f}x {r['kept'] / MB:8.0f}MB "
          f"{r['kept'] / total:5.2f}x {(r['peak'] - r['kept']) / MB:8.0f}MB "
          f"{r['param_bytes'] / MB:8.0f}MB {r['seconds']:5.1f}s")
  env = dict(os.environ,
             XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  print()
  print(_child("--child", "fsdp", "--folder", folder, env=env), end="")


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--folder", help="an existing HF safetensors folder")
  ap.add_argument("--keep", help="convert into (or reuse) this folder")
  ap.add_argument("--gguf", default=GGUF)
  ap.add_argument("--child", choices=("eager", "lazy", "fsdp"),
                  help=argparse.SUPPRESS)
  ap.add_argument("--param_dtype", default="float32", help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.child == "fsdp":
    return check_fsdp(args.folder)
  if args.child:
    return measure(args.child, args.folder, args.param_dtype)
  if args.folder:
    return run(args.folder)
  if args.keep:
    if not os.path.exists(os.path.join(args.keep, "config.json")):
      convert(args.gguf, args.keep)
    return run(args.keep)
  with tempfile.TemporaryDirectory() as tmp:
    folder = os.path.join(tmp, "SmolLM2-135M-Instruct")
    convert(args.gguf, folder)
    return run(folder)


if __name__ == "__main__":
  main()
