"""Reference rows of the PHATGOOSE table that are no routers: in-context
learning and merges whose hyper-parameter is chosen on validation data.

Registered in phatgoose.STEPS (a config entry names them by 'kind'):

  icl           the base model prompted with k demonstrations from the
                task's train split (the dataset's '.icl<k>' task), scored on
                the same examples as the zero-shot rows (Brown et al., 2020,
                "Language Models are Few-Shot Learners").
  merge_select  a static merge (task arithmetic, Ilharco et al., 2023; TIES,
                Yadav et al., 2023) with one hyper-parameter taken from a
                grid by the mean accuracy on the held-in tasks' validation
                split -- the experts' own tasks, so held-out tasks stay
                zero-shot -- then scored like every other row.

Both write per-example correctness under the zero-shot tasks' names and the
zero-shot examples' ids, so docs/data/phatgoose_table.py pairs them with
every other row.
"""
import dataclasses

import numpy as np

from mtjax import data
from mtjax.experiments import phatgoose as pg
from mtjax.methods.full import FullFineTuning


def icl_task(run: pg.Run, task: str, shots: int) -> str:
  """The '.icl<shots>' task of the dataset of a zero-shot task."""
  dataset = task.rsplit(".", 1)[0]
  name = f"{dataset}.icl{shots}"
  if name not in run.reg.real.get(dataset, ()):
    raise ValueError(f"icl row: dataset {dataset!r} has no {shots}-shot task "
                     f"{name!r} (registered: {run.reg.real.get(dataset)}); "
                     "add the shot count to data.tasks.SI_SHOTS")
  return name


def prompt_stats(run: pg.Run, examples: list, inputs_length: int) -> dict:
  """How a k-shot task's eval examples fit `inputs_length` tokens: how many
  are left-truncated, and the mean number of demonstrations ('Q:' blocks
  before the query's) that survive the truncation."""
  kept = [run.vocab.decode(list(e["input_ids"][-inputs_length:])).count("Q:")
          - 1 for e in examples]
  return {"examples": len(examples),
          "truncated": int(sum(len(e["input_ids"]) > inputs_length
                               for e in examples)),
          "mean_shots_kept": float(np.mean(kept))}


@pg.STEPS.register("icl")
def icl_step(run: pg.Run, entry: dict) -> dict:
  """entry: {'name', 'kind': 'icl', 'shots': k, 'inputs_length': tokens}.

  The base model on each task's k-shot prompts, with its own (longer)
  prompt length; per-example results are stored under the zero-shot task,
  after checking that both score the same examples in the same order."""
  name, shots = entry["name"], entry.get("shots", 10)
  lengths = dict(run.eval_lengths, inputs=entry.get(
      "inputs_length", run.eval_lengths["inputs"]))
  long_run = dataclasses.replace(run, eval_lengths=lengths)   # shares results
  tasks = run.eval_tasks(name)
  label = f"{name} (k-shot tasks)"
  res = pg.evaluate_method(long_run, label, FullFineTuning(),
                           lambda t: {"base": run.base},
                           [icl_task(run, t, shots) for t in tasks])
  correct = run.correct.pop(label)
  run.example_ids.pop(label)   # replaced by the zero-shot examples' ids
  run.correct[name], run.example_ids[name], out = {}, {}, {}
  stats = run.diagnostics.setdefault(name, {})
  for t in tasks:
    k = icl_task(run, t, shots)
    zero = data.eval_examples(t, run.vocab, split=run.split_of(t),
                              max_examples=len(correct[k]))
    few = data.eval_examples(k, run.vocab, split=run.split_of(t),
                             max_examples=len(correct[k]))
    if [e["targets"] for e in zero] != [e["targets"] for e in few]:
      raise AssertionError(f"{k} and {t} score other examples")
    out[t] = res[k]
    run.correct[name][t] = correct[k]
    run.example_ids[name][t] = pg.example_ids(zero)
    stats[t] = prompt_stats(run, few, lengths["inputs"])
    run.log(f"[{name}] {t}: {stats[t]['truncated']}/{stats[t]['examples']} "
            f"prompts left-truncated to {lengths['inputs']} tokens, "
            f"{stats[t]['mean_shots_kept']:.1f} demonstrations kept on "
            "average")
  return out


GRID_KEYS = ("weights", "density", "drop_rate")


def grid_of(entry: dict) -> tuple:
  """(key, values) of a merge_select entry: exactly one of GRID_KEYS is a
  tuple of candidates ('weights' as the entry's option, the others the
  merge's)."""
  found = [(k, tuple(v)) for k, v in entry.items()
           if k in GRID_KEYS and isinstance(v, (tuple, list))]
  if len(found) != 1:
    raise ValueError(f"merge_select row {entry['name']!r}: give exactly one "
                     f"of {GRID_KEYS} as a tuple of candidates (got "
                     f"{[k for k, _ in found]})")
  if not pg.is_static(entry.get("merge") or {}):
    raise ValueError(f"merge_select row {entry['name']!r}: merge "
                     f"{entry.get('merge')} is not a static merge; learned "
                     "merges are kind 'merge' rows")
  return found[0]


@pg.STEPS.register("merge_select")
def merge_select_step(run: pg.Run, entry: dict) -> dict:
  """entry: {'name', 'kind': 'merge_select', 'merge': {'name': ...},
  one grid (`grid_of`), other merge options fixed}.

  Each candidate is scored on the first config.valid_examples examples of
  every held-in task's config.valid_split; the best mean (ties: the first
  candidate) is evaluated on the row's tasks. The validation scores and the
  choice go to run.diagnostics[name]."""
  cfg, name = run.config, entry["name"]
  key, values = grid_of(entry)
  fns = pg.eval_fns(run, FullFineTuning())
  valid = {}
  best = None
  for v in values:
    spec = dict(entry["merge"])
    weights = entry.get("weights", 1.0)
    if key == "weights":
      weights = v
    else:
      spec[key] = v
    params = pg.static_merge(run, spec, weights)
    label = f"{name} {key}={v} (validation)"
    r = pg.evaluate_method(run, label, FullFineTuning(),
                           lambda t, p=params: {"base": p}, run.held_in, fns,
                           split=cfg.valid_split,
                           max_examples=cfg.valid_examples)
    run.correct.pop(label), run.example_ids.pop(label)
    valid[str(v)] = float(np.mean([pg.headline(r[t]) for t in run.held_in]))
    if best is None or valid[str(v)] > valid[str(best[0])]:
      best = (v, params)
  run.diagnostics[name] = {"grid": key, "validation": valid,
                           "selected": best[0]}
  run.log(f"{name}: {key} chosen on held-in validation: {best[0]} "
          f"({valid})")
  return pg.evaluate_method(run, name, FullFineTuning(),
                            lambda t: {"base": best[1]}, run.eval_tasks(name),
                            fns)
