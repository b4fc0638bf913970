"""Analysis of learned head selections (soft injection's alpha over layers x
heads): per-task heatmaps, the top heads, the overlap (Jaccard) of top-k heads
between tasks, written as PNG, JSON and text; the alpha-transfer bar chart;
the stratified bootstrap interval of a mean over tasks.

  alphas = {task: (L, H) array in [0, 1]}
  png, text = write_analysis(alphas, workdir, k=4)

The workdir may be a gs:// URL (mtjax.paths).
"""
import itertools

import numpy as np

from mtjax import paths
from mtjax.evaluation import plots


def top_k_heads(alpha, k):
  """(L, H) alpha -> set of (layer, head) of the k largest values."""
  alpha = np.asarray(alpha)
  flat = np.argsort(-alpha, axis=None, kind="stable")[:k]
  return {tuple(int(i) for i in np.unravel_index(f, alpha.shape)) for f in flat}


def jaccard_matrix(alphas, k):
  """{task: (L, H)} -> (tasks, (n, n) Jaccard overlap of their top-k heads)."""
  tasks = sorted(alphas)
  tops = {t: top_k_heads(alphas[t], k) for t in tasks}
  mat = np.ones((len(tasks), len(tasks)))
  for (i, a), (j, b) in itertools.product(enumerate(tasks), repeat=2):
    mat[i, j] = len(tops[a] & tops[b]) / max(1, len(tops[a] | tops[b]))
  return tasks, mat


def format_jaccard(tasks, mat, k):
  width = max(len(t) for t in tasks)
  lines = [f"Jaccard overlap of top-{k} heads"]
  lines.append(" " * width + " " + " ".join(f"{t[:8]:>8}" for t in tasks))
  for t, row in zip(tasks, mat, strict=True):
    lines.append(f"{t:>{width}} " + " ".join(f"{v:8.2f}" for v in row))
  return "\n".join(lines)


def plot_alpha_heatmaps(alphas, path, title="soft-injection alpha", cols=8):
  """One heatmap (layers x heads, colour = alpha in [0, 1]) per task, `cols`
  per row -> PNG path."""
  plt = plots.pyplot()
  tasks = sorted(alphas)
  ncol = min(cols, len(tasks))
  nrow = -(-len(tasks) // ncol)
  some = np.asarray(alphas[tasks[0]])
  tall = 3.0 if some.shape[0] <= 8 else 4.0
  fig, axes = plt.subplots(nrow, ncol, figsize=(2.2 * ncol + 1, tall * nrow),
                           squeeze=False, constrained_layout=True)
  for ax in axes.flat[len(tasks):]:
    ax.axis("off")
  for ax, task in zip(axes.flat[:len(tasks)], tasks, strict=True):
    a = np.asarray(alphas[task])
    im = ax.imshow(a, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    ax.set_title(task, fontsize=8)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(a.shape[1]))
    ax.set_yticks(range(0, a.shape[0], 1 if a.shape[0] <= 8 else 5))
  fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="alpha")
  fig.suptitle(title, fontsize=9)
  paths.savefig(fig, path, dpi=100)
  plt.close(fig)
  return path


def format_top_heads(alphas, n=5):
  """The n heads with the largest alpha per task, as 'L<layer>H<head>=alpha'."""
  lines = [f"top-{n} heads by alpha (layer, head)"]
  width = max(len(t) for t in alphas)
  for t in sorted(alphas):
    a = np.asarray(alphas[t])
    flat = np.argsort(-a, axis=None, kind="stable")[:n]
    cells = [np.unravel_index(f, a.shape) for f in flat]
    lines.append(f"{t:>{width}} " + " ".join(
        f"L{i}H{j}={a[i, j]:.2f}" for i, j in cells))
  return "\n".join(lines)


def task_mean_ci(correct, level=0.95, resamples=2000, seed=0):
  """Mean over tasks of per-task means, with a percentile bootstrap interval
  that resamples examples within each task (stratified).

  correct: per task a (N_t,) array of per-example scores -> (mean, lo, hi).
  """
  rng = np.random.default_rng(seed)
  tasks = [np.asarray(c, np.float64) for c in correct if len(c)]
  if not tasks:
    return float("nan"), float("nan"), float("nan")
  means = np.zeros(resamples)
  for c in tasks:
    means += c[rng.integers(0, c.size, (resamples, c.size))].mean(1)
  means /= len(tasks)
  tail = (1 - level) / 2 * 100
  lo, hi = np.percentile(means, [tail, 100 - tail])
  mean = float(np.mean([c.mean() for c in tasks]))
  return mean, float(lo), float(hi)


def format_transfer(transfer):
  """{task: {'own'|'similar'|'dissimilar': {'alpha_of', 'em'}}} -> text."""
  if not transfer:
    return "alpha transfer: none run"
  lines = ["alpha transfer: EM of task A with A's embedding and the alpha of"]
  for a, row in transfer.items():
    lines.append(f"  {a}: " + ", ".join(
        f"{k} ({v['alpha_of']}) {v['em']:.3f}" for k, v in row.items()))
  return "\n".join(lines)


def plot_transfer(transfer, path):
  """Grouped bars per task A: EM with its own / a similar / a dissimilar
  task's alpha (`format_transfer`'s dict) -> PNG path."""
  plt = plots.pyplot()
  tasks = list(transfer)
  kinds = ("own", "similar", "dissimilar")
  fig, ax = plt.subplots(figsize=(1.6 * len(tasks) + 2, 3.2),
                         constrained_layout=True)
  x = np.arange(len(tasks))
  for i, kind in enumerate(kinds):
    ax.bar(x + (i - 1) * 0.27, [transfer[t][kind]["em"] for t in tasks], 0.27,
           label=kind)
  ax.set_xticks(x)
  ax.set_xticklabels([f"{t}\n({transfer[t]['similar']['alpha_of']} / "
                      f"{transfer[t]['dissimilar']['alpha_of']})"
                      for t in tasks], fontsize=7)
  ax.set_ylabel("exact match")
  ax.set_ylim(0, 1)
  ax.legend(title="alpha of", fontsize=7)
  ax.set_title("soft injection: own vs transferred alpha", fontsize=9)
  paths.savefig(fig, path, dpi=100)
  plt.close(fig)
  return path


def write_analysis(alphas, workdir, k=None):
  """alpha_heatmap.png + head_overlap.{json,txt} under workdir -> (png, text).

  k: heads compared per task (default a quarter of all heads).
  """
  some = np.asarray(next(iter(alphas.values())))
  k = k or max(1, some.size // 4)
  png = plot_alpha_heatmaps(alphas, paths.join(workdir, "alpha_heatmap.png"))
  tasks, mat = jaccard_matrix(alphas, k)
  text = format_jaccard(tasks, mat, k) + "\n\n" + format_top_heads(alphas)
  paths.write_json(paths.join(workdir, "head_overlap.json"),
                   {"k": k, "tasks": tasks, "jaccard": mat.tolist(),
                    "top_k": {t: sorted(top_k_heads(alphas[t], k))
                              for t in tasks},
                    "alpha": {t: np.asarray(alphas[t]).tolist()
                              for t in tasks}}, indent=1)
  paths.write_text(paths.join(workdir, "head_overlap.txt"), text + "\n")
  return png, text
