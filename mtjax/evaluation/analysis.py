"""Analysis of learned head selections (soft injection's alpha over layers x
heads): per-task heatmaps and the overlap (Jaccard) of top-k heads between
tasks, written as PNG, JSON and text.

  alphas = {task: (L, H) array in [0, 1]}
  png, text = write_analysis(alphas, workdir, k=4)
"""
import itertools
import json
import os

import numpy as np

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


def plot_alpha_heatmaps(alphas, path, title="soft-injection alpha"):
  """One heatmap (layers x heads, colour = alpha in [0, 1]) per task -> PNG path."""
  plt = plots.pyplot()
  tasks = sorted(alphas)
  fig, axes = plt.subplots(1, len(tasks), figsize=(2.2 * len(tasks) + 1, 3.0),
                           squeeze=False, constrained_layout=True)
  for ax, task in zip(axes[0], tasks, strict=True):
    a = np.asarray(alphas[task])
    im = ax.imshow(a, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    ax.set_title(task, fontsize=8)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(a.shape[1]))
    ax.set_yticks(range(a.shape[0]))
  fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="alpha")
  fig.suptitle(title, fontsize=9)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def write_analysis(alphas, workdir, k=None):
  """alpha_heatmap.png + head_overlap.{json,txt} under workdir -> (png, text).

  k: heads compared per task (default a quarter of all heads).
  """
  some = np.asarray(next(iter(alphas.values())))
  k = k or max(1, some.size // 4)
  png = plot_alpha_heatmaps(alphas, os.path.join(workdir, "alpha_heatmap.png"))
  tasks, mat = jaccard_matrix(alphas, k)
  text = format_jaccard(tasks, mat, k)
  with open(os.path.join(workdir, "head_overlap.json"), "w") as f:
    json.dump({"k": k, "tasks": tasks, "jaccard": mat.tolist(),
               "top_k": {t: sorted(top_k_heads(alphas[t], k)) for t in tasks},
               "alpha": {t: np.asarray(alphas[t]).tolist() for t in tasks}},
              f, indent=1)
  with open(os.path.join(workdir, "head_overlap.txt"), "w") as f:
    f.write(text + "\n")
  return png, text
