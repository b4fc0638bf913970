r"""TIES over many LoRA experts: mtjax.merging vs PEFT's add_weighted_adapter.

  python benchmarks/merging.py [--experts 100] [--quick] [--density 0.2]
                               [--threads N] [--kinds ties,ties_svd]

SmolLM2-135M-shaped model (config read from
../shared/data/models/smollm2_135m_instruct/*.gguf when present: 30 layers,
hidden 576, 9 heads / 3 KV heads), E random LoRA experts (rank 8, alpha 16,
on q_proj and v_proj of every layer: 60 modules; A kaiming-uniform as PEFT
inits it, B ~ N(0, 0.02)), written once as PEFT adapter folders. Both
libraries merge the same experts with TIES (density 0.2, weights 1):

  ties      PEFT add_weighted_adapter(combination_type='ties'): the A's and
            the B's merged separately (rank stays 8); mtjax
            merge_lora(space='factors'), its equivalent
  ties_svd  PEFT combination_type='ties_svd', svd_rank=8: TIES on every
            expert's update dW = B A s, then a truncated SVD; mtjax
            merge_lora(space='delta', rank=8), its equivalent

Each (library, merge) runs in its own subprocess, so peak-memory figures do
not mix: the setup (loading the experts, and for PEFT the base model it
needs) is done first, then the merge is timed. `peak` is the process's
ru_maxrss (resource.getrusage) and `merge +` the peak RSS increase over the
setup (VmHWM reset through /proc/self/clear_refs just before the merge, when
the kernel allows it). mtjax's time and merge memory are those of its first
call (jit compilation included) and, in brackets, of a second warm call;
PEFT has no compilation. The merged updates of two modules are compared between the two
libraries (max |dW difference|; ties' A/B merge is compared factor by
factor). --quick: 8 experts. --threads N sets the BLAS/LAPACK threads
(OMP/OPENBLAS/MKL_NUM_THREADS) and torch's in both children: on a machine
shared with other jobs, multi-threaded LAPACK (the SVDs) slows down ~10x
for both libraries. Prints one table and the PEFT / mtjax ratios.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
GGUF = os.path.join(HERE, "..", "..", "shared", "data", "models",
                    "smollm2_135m_instruct", "SmolLM2-135M-Instruct.Q4_1.gguf")
# SmolLM2-135M's shapes, used when the GGUF file is absent.
SMOLLM2_135M = dict(
    model_type="llama", vocab_size=49152, hidden_size=576,
    intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, head_dim=64, rope_theta=100000.0,
    rms_norm_eps=1e-5, max_position_embeddings=8192, tie_word_embeddings=True,
    bos_token_id=1, eos_token_id=2, pad_token_id=2)
RANK, ALPHA = 8, 16.0
TARGETS = (r".*self_attn/(q_proj|v_proj)",)
COMPARE = ("model/layers_0/self_attn/q_proj", "model/layers_29/self_attn/v_proj")
MB = 2**20


def hf_config():
  """The model's HF config dict: from the GGUF's metadata, else built in."""
  if not os.path.exists(GGUF):
    return dict(SMOLLM2_135M), "built-in SmolLM2-135M shapes"
  from mtjax.models import gguf  # noqa: PLC0415 (parent only)
  r = gguf.reader(GGUF)
  shapes = {t.name: tuple(int(s) for s in t.shape.tolist()) for t in r.tensors}
  return gguf.hf_config(gguf.metadata(r), shapes), os.path.basename(GGUF)


def mtjax_model(cfg):
  from mtjax.models import decoder  # noqa: PLC0415 (children import lazily)
  return decoder.Model(decoder.config_from_hf(cfg))


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


def _maxrss():
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# --------------------------------------------------------------- experts

def write_experts(cfg, num, folder):
  """num random PEFT adapter folders e0..e{num-1} (via mtjax's export)."""
  from mtjax.methods import library, lora, transform  # noqa: PLC0415
  model = mtjax_model(cfg)
  method = lora.LoRA(rank=RANK, alpha=ALPHA, targets=TARGETS)
  targets = transform.resolve_targets(model, TARGETS)
  for e in range(num):
    rs = np.random.RandomState(1000 + e)
    flat = {}
    for path, t in sorted(targets.items()):
      d_in, d_out = t.shape
      bound = 1.0 / np.sqrt(d_in)
      flat[path + "/lora_a"] = rs.uniform(-bound, bound, (d_in, RANK)).astype(
          np.float32)
      flat[path + "/lora_b"] = (0.02 * rs.randn(RANK, d_out)).astype(
          np.float32)
    library.export_peft(model, method, {"lora": transform.nest(flat)},
                        os.path.join(folder, f"e{e}"))
  return len(targets)


# ---------------------------------------------------------------- children

def child_mtjax(cfg, folder, num, kind, density, out_npz, threads=None):
  import jax  # noqa: PLC0415 (each child imports only its own library)

  from mtjax import merging  # noqa: PLC0415
  from mtjax.methods import library, transform  # noqa: PLC0415
  del threads  # LAPACK's threads come from the environment (_child)
  jax.devices()
  model = mtjax_model(cfg)
  experts = []
  for e in range(num):
    method, params = library.import_peft(os.path.join(folder, f"e{e}"), model)
    experts.append(merging.LoRAExpert(method, jax.tree.map(np.asarray, params)))
  space = "factors" if kind == "ties" else "delta"
  config = {"name": "ties", "density": density}
  setup = _status("VmRSS")
  times, peaks, result = [], [], None
  for _ in range(2):   # the first call compiles, the second is warm
    before = _status("VmRSS")
    reset = _reset_peak()
    t0 = time.perf_counter()
    result = merging.merge_lora(experts, config, [1.0] * num, rank=RANK,
                                space=space)
    jax.block_until_ready(result[1])
    times.append(time.perf_counter() - t0)
    peaks.append(_status("VmHWM") - before if reset else None)
  flat = transform.flatten(result[1]["lora"])
  np.savez(out_npz, **{p.replace("/", "."): np.asarray(
      flat[p + "/lora_a"] @ flat[p + "/lora_b"]) for p in COMPARE},
           **{p.replace("/", ".") + ".a": np.asarray(flat[p + "/lora_a"])
              for p in COMPARE})
  return dict(seconds=times[0], warm=times[1], setup=setup, merge=peaks[0],
              merge_warm=peaks[1], maxrss=_maxrss())


def child_peft(cfg, folder, num, kind, density, out_npz, threads=None):
  import peft  # noqa: PLC0415 (each child imports only its own library)
  import torch  # noqa: PLC0415
  import transformers  # noqa: PLC0415
  torch.set_num_threads(threads or os.cpu_count())
  keys = ("vocab_size", "hidden_size", "intermediate_size",
          "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
          "head_dim", "rope_theta", "rms_norm_eps", "max_position_embeddings",
          "tie_word_embeddings")
  torch.manual_seed(0)
  base = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      **{k: cfg[k] for k in keys if k in cfg})).eval()
  model = peft.PeftModel.from_pretrained(base, os.path.join(folder, "e0"),
                                         adapter_name="e0")
  for e in range(1, num):
    model.load_adapter(os.path.join(folder, f"e{e}"), adapter_name=f"e{e}")
  names = [f"e{e}" for e in range(num)]
  setup = _status("VmRSS")
  reset = _reset_peak()
  t0 = time.perf_counter()
  with torch.no_grad():
    if kind == "ties":
      model.add_weighted_adapter(names, [1.0] * num, "merged",
                                 combination_type="ties", density=density)
    else:
      model.add_weighted_adapter(names, [1.0] * num, "merged",
                                 combination_type="ties_svd", svd_rank=RANK,
                                 density=density)
  seconds = time.perf_counter() - t0
  peak = _status("VmHWM") if reset else _maxrss()
  out = {}
  for p in COMPARE:
    hf_name = p.replace("/", ".").replace("layers_", "layers.")
    layer = model.base_model.model.get_submodule(hf_name)
    a = layer.lora_A["merged"].weight.detach().numpy()
    b = layer.lora_B["merged"].weight.detach().numpy()
    out[p.replace("/", ".")] = (b @ a).T
    out[p.replace("/", ".") + ".a"] = a.T
  np.savez(out_npz, **out)
  return dict(seconds=seconds, warm=None, setup=setup,
              merge=peak - setup if reset else None, merge_warm=None,
              maxrss=_maxrss())


# ------------------------------------------------------------------ driver

def _child(args, threads=None):
  env = dict(os.environ)
  if threads:
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
      env[var] = str(threads)
    args = [*args, "--threads", str(threads)]
  out = subprocess.run([sys.executable, os.path.abspath(__file__), *args],
                       capture_output=True, text=True, check=False, env=env)
  if out.returncode:
    sys.stderr.write(out.stdout + out.stderr)
    raise SystemExit(f"child {args} failed ({out.returncode})")
  return json.loads(out.stdout.strip().splitlines()[-1])


def _mb(x):
  return "n/a" if x is None else f"{x / MB:.0f}"


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--experts", type=int, default=100)
  parser.add_argument("--quick", action="store_true", help="8 experts")
  parser.add_argument("--density", type=float, default=0.2)
  parser.add_argument("--threads", type=int, default=None,
                      help="BLAS/LAPACK and torch threads in both children "
                      "(default: the libraries' own, torch: all cores); 1 "
                      "avoids thread contention on a busy machine")
  parser.add_argument("--kinds", default="ties,ties_svd",
                      help="comma-separated merges to time (ties, ties_svd)")
  parser.add_argument("--child", nargs=2, metavar=("LIB", "KIND"),
                      help=argparse.SUPPRESS)
  parser.add_argument("--folder", help=argparse.SUPPRESS)
  parser.add_argument("--npz", help=argparse.SUPPRESS)
  args = parser.parse_args()
  num = 8 if args.quick else args.experts
  kinds = [k for k in args.kinds.split(",") if k]
  if not kinds or set(kinds) - {"ties", "ties_svd"}:
    raise SystemExit(f"--kinds={args.kinds!r}: use ties and/or ties_svd")
  cfg, source = hf_config()
  if args.child:
    lib, kind = args.child
    fn = child_mtjax if lib == "mtjax" else child_peft
    print(json.dumps(fn(cfg, args.folder, num, kind, args.density, args.npz,
                        args.threads)))
    return

  print(f"{num} LoRA experts (rank {RANK}, q_proj+v_proj) of a "
        f"{cfg['num_hidden_layers']}-layer, hidden {cfg['hidden_size']} model "
        f"({source}); TIES density {args.density}; {os.cpu_count()} CPU cores"
        f"{f', {args.threads} thread(s) each' if args.threads else ''}",
        flush=True)
  with tempfile.TemporaryDirectory() as tmp:
    t0 = time.perf_counter()
    modules = write_experts(cfg, num, tmp)
    print(f"wrote {num} PEFT adapters ({modules} modules each) in "
          f"{time.perf_counter() - t0:.0f}s", flush=True)
    rows, diffs = {}, {}
    for kind in kinds:
      for lib in ("mtjax", "PEFT"):
        npz = os.path.join(tmp, f"{lib}_{kind}.npz")
        rows[lib, kind] = _child(
            ["--child", lib, kind, "--folder", tmp, "--npz", npz,
             "--experts", str(num), "--density", str(args.density)],
            args.threads)
        print(f"  {lib:5s} {kind:8s} {json.dumps(rows[lib, kind])}",
              flush=True)
      ours = np.load(os.path.join(tmp, f"mtjax_{kind}.npz"))
      theirs = np.load(os.path.join(tmp, f"PEFT_{kind}.npz"))
      keys = [k for k in ours.files if (k.endswith(".a") == (kind == "ties"))]
      diffs[kind] = max(float(np.abs(ours[k] - theirs[k]).max()) for k in keys)

  print(f"\nTIES over {num} LoRA experts, {modules} modules; time in s, "
        "memory in MB")
  print(f"{'merge':9s}{'library':8s}{'time':>9s}{'(warm)':>9s}{'setup':>8s}"
        f"{'merge +':>9s}{'(warm)':>8s}{'peak':>8s}")
  for kind in kinds:
    for lib in ("mtjax", "PEFT"):
      r = rows[lib, kind]
      warm = "" if r["warm"] is None else f"({r['warm']:.2f})"
      warm_mem = "" if r["merge_warm"] is None else f"({_mb(r['merge_warm'])})"
      print(f"{kind:9s}{lib:8s}{r['seconds']:9.2f}{warm:>9s}"
            f"{_mb(r['setup']):>8s}{_mb(r['merge']):>9s}{warm_mem:>8s}"
            f"{_mb(r['maxrss']):>8s}")
  print("\nPEFT / mtjax ratios (> 1: mtjax faster / smaller; first call, "
        "then warm)")
  ratio = lambda a, b: "n/a" if not (a and b) else f"{a / b:.2f}x"
  for kind in kinds:
    m, p = rows["mtjax", kind], rows["PEFT", kind]
    print(f"  {kind:9s} time {ratio(p['seconds'], m['seconds'])} / "
          f"{ratio(p['seconds'], m['warm'])}, merge memory "
          f"{ratio(p['merge'], m['merge'])} / "
          f"{ratio(p['merge'], m['merge_warm'])}, peak RSS "
          f"{ratio(p['maxrss'], m['maxrss'])}; max |difference| "
          f"{diffs[kind]:.1e} ({'A factors' if kind == 'ties' else 'dW'} "
          "of 2 modules)")
  print("(PEFT's setup and peak include the base model it needs, "
        f"{_mb(rows['PEFT', 'ties']['setup'])} MB; mtjax merges the adapter "
        "files alone.)")


if __name__ == "__main__":
  main()
