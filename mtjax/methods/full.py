"""Full fine-tuning in the method contract: no extra params, all base trainable."""
from typing import Any, Callable, Optional, Union

import jax

from mtjax.methods import transform

Model = Any  # a flax linen module (mtjax.models)


@transform.METHODS.register("full")
class FullFineTuning:
  """Every base parameter is trainable; the forward is the plain model."""
  name = "full"
  trainable = "base/.*"

  def init(self, rng: Optional[jax.Array], model: Model,
           base_params: Optional[dict]) -> dict:
    del rng, model, base_params
    return {}

  def apply(self, model: Model, params: dict, inputs: dict, *,
            rng: Optional[jax.Array] = None, deterministic: bool = True,
            method: Union[str, Callable, None] = None) -> jax.Array:
    inputs = {k: v for k, v in inputs.items() if k != "adapter_index"}
    rngs = {"dropout": rng} if rng is not None else {}
    return model.apply({"params": params["base"]}, **inputs,
                       deterministic=deterministic, rngs=rngs, method=method)
