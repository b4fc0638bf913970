"""Per-task results: group averages, an aligned text table, results.json.

results.json is {task: {metric: value}} plus one entry per group,
'average/<group>': {metric: mean over the group's tasks that report it}.
An existing results.json is never overwritten silently: it is renamed to
results.<n>.json first and the rename is logged. The workdir may be a gs://
URL (mtjax.paths).
"""
import math
import os

import numpy as np
from absl import logging

from mtjax import paths


def bootstrap_ci(values, level: float = 0.95, resamples: int = 2000,
                 seed: int = 0) -> tuple[float, float]:
  """Percentile bootstrap interval of the mean of per-example `values` (N,)."""
  values = np.asarray(values, np.float64)
  if values.size == 0:
    return float("nan"), float("nan")
  rng = np.random.default_rng(seed)
  means = values[rng.integers(0, values.size, (resamples, values.size))].mean(1)
  tail = (1 - level) / 2 * 100
  lo, hi = np.percentile(means, [tail, 100 - tail])
  return float(lo), float(hi)


def median_of_templates(correct: dict, datasets: dict, level: float = 0.95,
                        resamples: int = 2000, seed: int = 0) -> dict:
  """T0's score per dataset, the median over its templates of the accuracy,
  and the mean over datasets, each with a percentile bootstrap interval.

  correct: {task: per-example 0/1 (N_task,)}; datasets: {dataset: [tasks]}
  (its templates). The templates of a dataset score the same examples, so
  each resample draws one set of example indices per dataset and applies it
  to every template of it (`template_draws`); the statistic is recomputed
  from the resampled accuracies.
  Returns {dataset: (point, lo, hi)} and 'mean' -> (point, lo, hi).
  """
  rng = np.random.default_rng(seed)
  boot, point = {}, {}
  for name, tasks in datasets.items():
    values = [np.asarray(correct[t], np.float64) for t in tasks]
    point[name] = float(np.median([v.mean() for v in values]))
    boot[name] = np.median(template_draws(values, rng, resamples, name), 0)
  tail = (1 - level) / 2 * 100
  out = {n: (point[n], *map(float, np.percentile(boot[n], [tail, 100 - tail])))
         for n in datasets}
  mean = np.mean(np.stack([boot[n] for n in datasets]), axis=0)
  out["mean"] = (float(np.mean([point[n] for n in datasets])),
                 *map(float, np.percentile(mean, [tail, 100 - tail])))
  return out


def template_draws(values: list, rng, resamples: int,
                   name: str = "") -> np.ndarray:
  """(templates, resamples) bootstrap accuracies of one dataset's templates
  `values` [(N,)], every template resampled at the same example indices.

  Templates with different example counts (a template that skips rows)
  cannot be aligned by position: each is then resampled on its own, with a
  warning naming the dataset."""
  sizes = {v.size for v in values}
  if len(sizes) == 1:
    idx = rng.integers(0, values[0].size, (resamples, values[0].size))
    return np.stack([v[idx].mean(1) for v in values])
  logging.warning("dataset %s: templates score %s examples; resampled "
                  "independently", name, sorted(sizes))
  return np.stack([v[rng.integers(0, v.size, (resamples, v.size))].mean(1)
                   for v in values])


def with_averages(results, groups):
  """results plus 'average/<group>' rows; groups: {group: [task names]}."""
  out = dict(results)
  for group, tasks in groups.items():
    rows = [results[t] for t in tasks if t in results]
    metrics = sorted({m for r in rows for m in r})
    out[f"average/{group}"] = {
        m: float(sum(r[m] for r in rows if m in r) /
                 sum(1 for r in rows if m in r)) for m in metrics}
  return out


def table(results, groups=None, metrics=None):
  """Aligned text table: one row per task (grouped), one column per metric."""
  groups = groups or {"": sorted(k for k in results
                                 if not k.startswith("average/"))}
  metrics = metrics or sorted({m for r in results.values() for m in r})
  header = ["task", "group"] + metrics
  lines = []
  for group, tasks in groups.items():
    for name in list(tasks) + [f"average/{group}"]:
      if name in results:
        lines.append([name, group] + [_fmt(results[name].get(m))
                                      for m in metrics])
  widths = [max(len(str(r[i])) for r in [header] + lines)
            for i in range(len(header))]
  def fmt_row(r):
    return "  ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w)
                     for i, (c, w) in enumerate(zip(r, widths, strict=True)))
  rule = "  ".join("-" * w for w in widths)
  return "\n".join([fmt_row(header), rule] + [fmt_row(r) for r in lines])


def _fmt(v):
  if v is None:
    return "-"
  if isinstance(v, float) and math.isnan(v):
    return "nan"
  return f"{v:.4f}"


def write_json(results, workdir, name="results.json"):
  """Writes WORKDIR/results.json, keeping any previous file as results.<n>.json."""
  path = paths.join(workdir, name)
  if paths.exists(path):
    stem, ext = os.path.splitext(name)
    n = 1
    while paths.exists(paths.join(workdir, f"{stem}.{n}{ext}")):
      n += 1
    kept = paths.join(workdir, f"{stem}.{n}{ext}")
    paths.move(path, kept)
    logging.warning("previous %s kept as %s", path, kept)
  return paths.write_json(path, results, indent=2, sort_keys=True)
