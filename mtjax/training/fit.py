"""The one fit loop: a jitted train step built once, run over batches.

Every training in mtjax goes through `Fitter`: the trainer job
(mtjax.experiments.train), experts, PHATGOOSE gates, task gates and Poly/MHR
in the PHATGOOSE experiment, and the soft-injection experiment's alpha, prompt
and test-bed fitting. What differs between them is the method (which leaves
are trainable), the optimizer config, the loss (trainer.target_token_loss by
default, wrapped by the method's `training_loss` if it has one, e.g. MPT's
distillation) and what happens after each step (`on_step`: logging, checkpoints).

  fitter = Fitter(method, model, mesh, optimizer_config, num_steps,
                  num_tasks=len(batches.task_names))
  state, frozen = fitter.init(flat_params, flat_shardings)
  state, metrics = fitter.run(state, frozen, batches)       # num_steps steps
  params = fitter.params(state, frozen)                     # nested tree

The jitted step is compiled on the first `run` and reused by later calls with
the same shapes (e.g. one LoRA expert per task: one compilation).
"""
from typing import Any, Callable, Iterator, Optional

import jax

from mtjax.training import trainer

Model = Any  # a flax linen module (mtjax.models)
Config = Any  # an ml_collections.ConfigDict


class Fitter:
  """Trains a method's trainable leaves (see module docstring)."""

  def __init__(self, method: Any, model: Model, mesh: jax.sharding.Mesh,
               optimizer: Config, num_steps: int, *,
               num_tasks: int = 1, seed: int = 0, grad_accum: int = 1,
               dropout: bool = False, trainable: Optional[str] = None,
               loss: Optional[Callable] = None, remat: str = "none") -> None:
    """loss: per-token (nll, correct, weights) as trainer.target_token_loss;
    default: the method's `training_loss(target_token_loss)` when it has one
    (e.g. MPT's distillation), else target_token_loss. remat: gradient
    checkpointing of the step's model per block ('none' | 'full' | 'dots',
    trainer.with_remat): less activation memory for a recomputed forward."""
    if loss is None:
      loss = trainer.target_token_loss
      if hasattr(method, "training_loss"):
        loss = method.training_loss(loss)
    self.method, self.model, self.mesh = method, model, mesh
    self.num_steps = int(num_steps)
    self.trainable = trainable or method.trainable
    self.tx, self.schedule = trainer.make_optimizer(optimizer,
                                                    max(self.num_steps, 1))
    self.step = trainer.make_train_step(method,
                                        trainer.with_remat(model, remat),
                                        self.tx, num_tasks,
                                        grad_accum, seed, dropout, loss)
    self.state_sh = self.frozen_sh = None
    self._fn = None

  def init(self, flat: dict, flat_sh: dict) -> tuple:
    """(state, frozen) from flat params and their shardings."""
    trainable, frozen = trainer.split_trainable(flat, self.trainable)
    state, state_sh = trainer.init_state(
        self.tx, trainable, {k: flat_sh[k] for k in trainable}, self.mesh)
    frozen_sh = {k: flat_sh[k] for k in frozen}
    frozen = {k: jax.device_put(v, frozen_sh[k]) for k, v in frozen.items()}
    if self._fn is None:
      self.state_sh, self.frozen_sh = state_sh, frozen_sh
      self._fn = trainer.jit_train_step(self.step, state_sh, frozen_sh,
                                        self.mesh)
    return state, frozen

  def run(self, state: dict, frozen: dict, batches: Iterator[dict],
          start: int = 0, stop: Optional[int] = None, *,
          put: Callable = trainer.put_batch,
          prepare: Optional[Callable] = None,
          on_step: Optional[Callable] = None) -> tuple:
    """Steps start..stop-1 (default: num_steps-1) over `batches`: (state,
    the last step's metrics).

    prepare(host_batch) -> host_batch runs before placement (e.g. to add
    'adapter_index'); on_step(done_steps, state, metrics) after each step.
    """
    metrics = None
    for step in range(start, self.num_steps if stop is None else stop):
      host = next(batches)
      if prepare is not None:
        host = prepare(host)
      state, metrics = self._fn(state, frozen, put(host, self.mesh))
      if on_step is not None:
        on_step(step + 1, state, metrics)
    return state, metrics

  def params(self, state: dict, frozen: dict) -> dict:
    """The nested tree of all params (trained and frozen)."""
    return trainer.unflatten({**state["params"], **frozen})

  def fit(self, flat: dict, flat_sh: dict, batches: Iterator[dict],
          prepare: Optional[Callable] = None, *,
          put: Callable = trainer.put_batch) -> tuple:
    """init + run + params: (nested params, last loss or nan). put: as in
    `run` (trainer.put_global_batch for batches every process reads whole)."""
    state, frozen = self.init(flat, flat_sh)
    state, metrics = self.run(state, frozen, batches, put=put,
                              prepare=prepare)
    loss = float("nan") if metrics is None else float(metrics["loss"])
    return self.params(state, frozen), loss
