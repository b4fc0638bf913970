"""Zero-shot rank classification of a pretrained LM on the real tasks.

For every dataset in config.datasets it scores the lm-evaluation-harness
plain format ('<dataset>.plain') and the first config.templates promptsource
templates, with the LM formatting of mtjax.data (no EOS after the prompt,
the answer's leading space with the answer, BOS where the tokenizer adds
one; config.chat wraps each prompt in the model's chat template). Every
(example, choice) is scored by the summed log-likelihood of the choice's
tokens; the table reports acc and acc_norm (log-likelihood / the choice's
UTF-8 bytes, lm-eval's acc_norm) with 95% percentile-bootstrap intervals
over examples, the number of examples, and how many were truncated.

WORKDIR/results.json: {task: {accuracy, accuracy_lo, accuracy_hi,
accuracy_norm, ..._lo, ..._hi, num_examples, truncated, chance}} plus
'average/<format>' rows; an existing file is kept as results.<n>.json.
"""
import os
import time

import jax
import numpy as np
from absl import logging

from mtjax import data, methods, paths
from mtjax.evaluation import evaluate
from mtjax.evaluation import results as results_lib
from mtjax.experiments.train import JOBS
from mtjax.models import sharding
from mtjax.training import trainer


def default_vocab(model_config) -> str:
  """The vocabulary spec of the model's own tokenizer."""
  if model_config.get("gguf_path"):
    return f"gguf:{model_config.gguf_path}"
  if model_config.get("hf_path"):
    return f"hf:{os.path.join(model_config.hf_path, 'tokenizer.json')}"
  raise ValueError("config.vocab is empty and the model is built from "
                   "scratch: set config.vocab (e.g. 'byte')")


def task_names(reg, datasets, templates: int) -> list[str]:
  """'<dataset>.plain' (if it exists) + the first `templates` promptsource
  tasks of each dataset, in config order."""
  out = []
  for name in datasets:
    if name not in reg.real:
      raise KeyError(f"dataset {name!r} is not registered from the data dir; "
                     f"known: {sorted(reg.real)}")
    tasks = reg.real[name]
    out += [t for t in tasks if t.endswith(".plain")]
    out += [t for t in tasks if not t.endswith(".plain")][:templates]
  return out


def chat_examples(vocab, examples):
  """Rows re-encoded with each prompt as one chat turn (answers unspaced)."""
  out = []
  for ex in examples:
    choices = [c.lstrip() for c in ex["answer_choices"]]
    out.append(dict(ex, **data.lm_choices(vocab, vocab.chat(ex["inputs"]),
                                          choices)))
  return out


def lengths_for(examples, max_length: int) -> dict[str, int]:
  """Per-task sequence lengths: the longest row rounded up to 64 tokens,
  at most max_length (longer prompts are left-truncated and counted)."""
  target = max(len(c) for ex in examples for c in ex["choice_ids"])
  longest = max(len(ex["input_ids"]) + target for ex in examples)
  total = min(max_length, -(-longest // 64) * 64)
  return {"inputs": max(total - target, 1), "targets": target}


def score_task(scorer, model, params, vocab, examples, config, mesh) -> dict:
  """Metrics with bootstrap intervals for one task's examples."""
  lengths = lengths_for(examples, config.max_length)
  scored = evaluate.score_choices(
      scorer, model, params, examples, lengths, config.batch_size, mesh,
      pad_id=data.pad_token_id(vocab), lm=data.lm_format(vocab))
  labels = np.array([ex["label"] for ex in examples])
  correct = {
      "accuracy": np.array([np.argmax(s) for s, _, _ in scored]) == labels,
      "accuracy_norm": np.array([np.argmax(s / np.maximum(n, 1))
                                 for s, n, _ in scored]) == labels}
  out = {"num_examples": len(examples),
         "truncated": int(sum(c for _, _, c in scored)),
         "chance": float(np.mean([1 / len(ex["choice_ids"])
                                  for ex in examples]))}
  for name, hits in correct.items():
    lo, hi = results_lib.bootstrap_ci(hits.astype(np.float64),
                                      seed=config.seed)
    out.update({name: float(hits.mean()), f"{name}_lo": lo,
                f"{name}_hi": hi})
  return out


@JOBS.register("zero_shot")
def run(config, workdir: str) -> dict:
  """Scores config.datasets zero-shot; writes results.json; returns results."""
  paths.makedirs(workdir)
  mesh = sharding.make_mesh(tuple(config.mesh_shape))
  start = time.time()
  model, base = trainer.build_model(config.model, jax.random.key(0), mesh)
  if model.config.is_encoder_decoder:
    raise ValueError("the zero-shot job scores decoder-only LMs; "
                     f"{model.config.model_type} is encoder-decoder")
  vocab = data.vocabulary(config.vocab or default_vocab(config.model))
  trainer.check_vocab(model, vocab, "config.vocab")
  reg = data.register(vocab)
  logging.info("model and vocabulary loaded in %.1f s", time.time() - start)
  method = methods.build({"name": "full"})
  scorer = evaluate.make_scorer(method, model)
  params = {"base": base}
  results, groups = {}, {"plain": [], "promptsource": []}
  with sharding.use_mesh(mesh):
    for task in task_names(reg, config.datasets, config.templates):
      examples = data.eval_examples(task, vocab, split=config.split,
                                    max_examples=config.max_examples or None)
      if config.chat:
        examples = chat_examples(vocab, examples)
      t0 = time.time()
      results[task] = score_task(scorer, model, params, vocab, examples,
                                 config, mesh)
      groups["plain" if task.endswith(".plain") else "promptsource"].append(
          task)
      r = results[task]
      print(f"{task:<44} acc {r['accuracy']:.3f} [{r['accuracy_lo']:.3f}, "
            f"{r['accuracy_hi']:.3f}]  acc_norm {r['accuracy_norm']:.3f} "
            f"[{r['accuracy_norm_lo']:.3f}, {r['accuracy_norm_hi']:.3f}]  "
            f"n={r['num_examples']} truncated={r['truncated']} "
            f"chance={r['chance']:.3f}  ({time.time() - t0:.0f} s)",
            flush=True)
  groups = {k: v for k, v in groups.items() if v}
  results = results_lib.with_averages(results, groups)
  for group in groups:  # a mean of interval bounds is not an interval
    results[f"average/{group}"] = {
        k: v for k, v in results[f"average/{group}"].items()
        if not k.endswith(("_lo", "_hi"))}
  metrics = ["accuracy", "accuracy_lo", "accuracy_hi", "accuracy_norm",
             "accuracy_norm_lo", "accuracy_norm_hi", "chance", "num_examples",
             "truncated"]
  print(results_lib.table(results, groups, metrics))
  print(f"zero-shot wall time: {time.time() - start:.0f} s")
  if jax.process_index() == 0:
    results_lib.write_json(results, workdir)
  return results
