r"""Train-step time of LoRA and prompt tuning: mtjax vs Hugging Face PEFT.

  python benchmarks/peft_step.py [--steps 5] [--skip_torch]

T5-small-sized model (d_model 512, 8+8 layers, 6 heads, d_kv 64, d_ff 1024
gated-gelu, vocab 32128), batch 8, 128 input / 32 target tokens, f32, random
weights. For each of: frozen forward pass, full fine-tuning, LoRA (r=8,
alpha=16 on q and v of every attention) and prompt tuning (20 vectors), one
AdamW train step (loss, gradients of the trainable params only, update) is
timed as the median of --steps runs after a warm-up (compilation excluded).
mtjax runs on the default jax backend; PEFT on CPU torch with the same
config and batch, in the same process (one after the other, never together).
Prints a table and the ratios step / full-FT step and step / frozen forward,
and mtjax's speed-up over PEFT per method.
"""
import argparse
import os
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtjax import methods
from mtjax.models import t5

HF_CONFIG = dict(
    vocab_size=32128, d_model=512, d_kv=64, d_ff=1024, num_layers=8,
    num_decoder_layers=8, num_heads=6, relative_attention_num_buckets=32,
    relative_attention_max_distance=128, dropout_rate=0.0,
    feed_forward_proj="gated-gelu", tie_word_embeddings=False,
    decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
BATCH, INPUTS, TARGETS, RANK, PROMPT = 8, 128, 32, 8, 20


def make_batch(seed=0):
  rs = np.random.RandomState(seed)
  ids = rs.randint(2, HF_CONFIG["vocab_size"], (BATCH, INPUTS)).astype(np.int32)
  labels = rs.randint(2, HF_CONFIG["vocab_size"],
                      (BATCH, TARGETS)).astype(np.int32)
  dec = np.concatenate([np.zeros((BATCH, 1), np.int32), labels[:, :-1]], 1)
  return dict(input_ids=ids, attention_mask=np.ones_like(ids),
              decoder_input_ids=dec, decoder_attention_mask=np.ones_like(dec),
              labels=labels)


def timed(fn, steps):
  fn()  # warm-up: compilation / allocator
  fn()
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


# ------------------------------------------------------------------ mtjax

def mtjax_times(steps):
  model = t5.Model(t5.config_from_hf(HF_CONFIG))
  batch = make_batch()
  labels = jnp.asarray(batch.pop("labels"))
  inputs = {k: jnp.asarray(v) for k, v in batch.items()}
  base = jax.jit(lambda r: nn.unbox(model.init(r, **inputs)["params"]))(
      jax.random.key(0))
  tx = optax.adamw(1e-4)
  out = {}

  forward = jax.jit(lambda p, x: model.apply({"params": p}, **x))
  out["frozen forward"] = timed(
      lambda: forward(base, inputs).block_until_ready(), steps)

  def loss_fn(method, trainable, frozen, key):
    params = {**frozen, key: trainable} if key != "base" else {
        "base": trainable, **frozen}
    logits = method.apply(model, params, inputs)
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, labels).mean()

  configs = {"full fine-tuning": ({"name": "full"}, "base"),
             f"LoRA r={RANK} q,v": ({"name": "lora", "rank": RANK,
                                      "alpha": 16.0}, "lora"),
             f"prompt tuning P={PROMPT}": ({"name": "prompt_tuning",
                                            "length": PROMPT}, "prompt")}
  for name, (cfg, key) in configs.items():
    method = methods.build(cfg, model)
    extra = nn.unbox(method.init(jax.random.key(1), model, base))
    trainable = base if key == "base" else extra[key]
    frozen = {k: v for k, v in extra.items() if k != key}
    if key != "base":
      frozen["base"] = base
    opt_state = tx.init(trainable)

    @jax.jit
    def step(trainable, opt_state, frozen, method=method, key=key):
      loss, grads = jax.value_and_grad(
          lambda t: loss_fn(method, t, frozen, key))(trainable)
      updates, opt_state = tx.update(grads, opt_state, trainable)
      return optax.apply_updates(trainable, updates), opt_state, loss

    state = [trainable, opt_state]

    def run(step=step, state=state, frozen=frozen):
      state[0], state[1], loss = step(state[0], state[1], frozen)
      loss.block_until_ready()
    out[name] = timed(run, steps)
    n = sum(x.size for x in jax.tree.leaves(trainable))
    print(f"  mtjax {name}: {n:,} trainable params, {out[name]:.3f} s/step",
          flush=True)
  return out


# ------------------------------------------------------------- PEFT/torch

def torch_times(steps):
  import peft  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(os.cpu_count())
  batch = {k: torch.from_numpy(v.astype(np.int64))
           for k, v in make_batch().items()}
  out = {}

  def fresh():
    torch.manual_seed(0)
    return transformers.T5ForConditionalGeneration(
        transformers.T5Config(**HF_CONFIG)).train()

  model = fresh()
  def forward():
    with torch.no_grad():
      model(**batch)
  out["frozen forward"] = timed(forward, steps)

  variants = {
      "full fine-tuning": lambda m: m,
      f"LoRA r={RANK} q,v": lambda m: peft.get_peft_model(m, peft.LoraConfig(
          r=RANK, lora_alpha=16, target_modules=["q", "v"],
          lora_dropout=0.0, task_type="SEQ_2_SEQ_LM")),
      f"prompt tuning P={PROMPT}": lambda m: peft.get_peft_model(
          m, peft.PromptTuningConfig(num_virtual_tokens=PROMPT,
                                     task_type="SEQ_2_SEQ_LM")),
  }
  for name, wrap in variants.items():
    m = wrap(fresh())
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad],
                            lr=1e-4)
    def step(m=m, opt=opt):
      opt.zero_grad(set_to_none=True)
      m(**batch).loss.backward()
      opt.step()
    out[name] = timed(step, steps)
    n = sum(p.numel() for p in m.parameters() if p.requires_grad)
    print(f"  PEFT  {name}: {n:,} trainable params, {out[name]:.3f} s/step",
          flush=True)
  return out


def report(results):
  names = list(next(iter(results.values())))
  print(f"\nstep time (median), batch {BATCH}, {INPUTS}+{TARGETS} tokens, "
        "T5-small-sized f32")
  head = f"{'':28s}" + "".join(
      f"{lib + ' s':>12s}{'/full':>8s}{'/fwd':>8s}" for lib in results)
  print(head + ("  mtjax speed-up" if len(results) > 1 else ""))
  for n in names:
    row = f"{n:28s}"
    for r in results.values():
      row += (f"{r[n]:12.3f}{r[n] / r['full fine-tuning']:8.2f}"
              f"{r[n] / r['frozen forward']:8.2f}")
    if len(results) > 1:
      row += f"  {results['PEFT'][n] / results['mtjax'][n]:6.2f}x"
    print(row)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--skip_torch", action="store_true")
  args = parser.parse_args()
  print(f"jax {jax.__version__} on {jax.devices()[0].platform} "
        f"({jax.devices()[0].device_kind}); {os.cpu_count()} CPU cores",
        flush=True)
  results = {"mtjax": mtjax_times(args.steps)}
  if not args.skip_torch:
    results["PEFT"] = torch_times(args.steps)
  report(results)


if __name__ == "__main__":
  main()
