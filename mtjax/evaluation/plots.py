"""Plots of results: routing loads per layer and expert (PNG files).

matplotlib is imported on first use: it is slow to import and only plotting
needs it. A path may be a gs:// URL (mtjax.paths).
"""
import numpy as np

from mtjax import paths


def pyplot():
  """matplotlib.pyplot with the file-only Agg backend."""
  import matplotlib  # noqa: PLC0415 (slow import, only plots need it)
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415 (as above)
  return plt


def plot_routing(loads_by_task, expert_names, path, title="PHATGOOSE routing"):
  """PNG: one heat map per task, layers (rows) x experts (columns) = load."""
  plt = pyplot()
  tasks = list(loads_by_task)
  if not tasks:
    raise ValueError("plot_routing: no tasks to plot")
  fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 5),
                           squeeze=False)
  for ax, task in zip(axes[0], tasks, strict=True):
    layers_ = list(loads_by_task[task])
    mat = np.stack([loads_by_task[task][layer] for layer in layers_])
    im = ax.imshow(mat, aspect="auto", cmap="viridis", vmin=0)
    ax.set_title(task, fontsize=9)
    ax.set_yticks(range(len(layers_)), layers_, fontsize=7)
    if len(expert_names) <= 32:
      ax.set_xticks(range(len(expert_names)), expert_names, rotation=90,
                    fontsize=7)
    ax.set_xlabel("expert")
    fig.colorbar(im, ax=ax, fraction=0.04)
  fig.suptitle(title)
  fig.tight_layout()
  paths.savefig(fig, path, dpi=110)
  plt.close(fig)
  return path
