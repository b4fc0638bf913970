"""TensorBoard summaries (clu.metric_writers, process 0 only) and progress.

On a terminal the progress is a tqdm bar with steps/s and ETA; otherwise
(logs, CI, subprocesses) it is one plain line every `log_every` steps:
  step 40/200 loss 1.234 acc 0.567 | 3.10 steps/s | ETA 0:00:51
"""
import datetime
import sys
import time
from typing import Any, Optional, Sequence

import jax
import tqdm
from absl import logging
from jax.typing import ArrayLike


class _NullWriter:
  """Stands in for clu's writer on processes other than 0 (and without TB)."""

  def write_scalars(self, step: int, scalars: dict) -> None:
    del step, scalars

  def write_hparams(self, hparams: dict) -> None:
    del hparams

  def flush(self) -> None:
    pass

  def close(self) -> None:
    pass


def writer(logdir: str) -> Any:
  """A clu MetricWriter writing TensorBoard events under logdir (process 0)."""
  if jax.process_index() != 0:
    return _NullWriter()
  try:
    from clu import metric_writers  # noqa: PLC0415 (optional: needs tensorboard)
  except ImportError as e:  # clu's TensorBoard writer needs `tensorboard`.
    logging.warning("TensorBoard summaries disabled (%s); pip install "
                    "tensorboard to enable them", e)
    return _NullWriter()
  # Only TensorBoard: progress lines already go to stdout.
  return metric_writers.AsyncWriter(metric_writers.SummaryWriter(logdir))


def scalars_from_metrics(metrics: dict, task_names: Sequence[str],
                         lr: Optional[ArrayLike] = None) -> dict:
  """Device metrics of one step -> {'train/loss': .., 'train/<task>/loss': ..}."""
  m = jax.device_get(metrics)
  out = {"train/loss": float(m["loss"]), "train/accuracy": float(m["accuracy"]),
         "train/grad_norm": float(m["grad_norm"])}
  if lr is not None:
    out["train/learning_rate"] = float(lr)
  for i, name in enumerate(task_names):
    tokens = float(m["tokens"][i])
    if tokens > 0:
      short = name.split(".")[-1]
      out[f"train/{short}/loss"] = float(m["nll"][i]) / tokens
      out[f"train/{short}/accuracy"] = float(m["correct"][i]) / tokens
  return out


class Progress:
  """tqdm bar on a terminal, plain log lines otherwise; process 0 only."""

  def __init__(self, start_step: int, total_steps: int,
               log_every: int) -> None:
    self.start, self.total, self.log_every = start_step, total_steps, log_every
    self.t0 = time.time()
    self.bar = None
    self.active = jax.process_index() == 0
    if self.active and sys.stdout.isatty():
      self.bar = tqdm.tqdm(total=total_steps, initial=start_step,
                           unit="step", dynamic_ncols=True)

  def update(self, step: int, scalars: Optional[dict] = None) -> None:
    """Call after finishing `step` (1-based count of steps done)."""
    if not self.active:
      return
    if self.bar is not None:
      self.bar.update(step - self.bar.n)
      if scalars:
        self.bar.set_postfix(loss=f"{scalars['train/loss']:.4f}")
      return
    if scalars is None:
      return
    rate = (step - self.start) / max(time.time() - self.t0, 1e-9)
    eta = datetime.timedelta(seconds=int((self.total - step) / max(rate, 1e-9)))
    print(f"step {step}/{self.total} loss {scalars['train/loss']:.4f} "
          f"acc {scalars['train/accuracy']:.3f} | {rate:.2f} steps/s | "
          f"ETA {eta}", flush=True)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()
