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
  cached_decoding = True  # the plain model's KV cache (transform docstring)

  def init(self, rng: Optional[jax.Array], model: Model,
           base_params: Optional[dict]) -> dict:
    del rng, model, base_params
    return {}

  def apply(self, model: Model, params: dict, inputs: dict, *,
            rng: Optional[jax.Array] = None, deterministic: bool = True,
            method: Union[str, Callable, None] = None,
            decode: Optional[str] = None,
            cache: Optional[dict] = None) -> Any:
    """Logits, or (logits, cache) with `decode` (see transform's docstring)."""
    inputs = {k: v for k, v in inputs.items() if k != "adapter_index"}
    rngs = {"dropout": rng} if rng is not None else {}
    return transform.apply_model(model, params["base"], inputs, method=method,
                                 decode=decode, cache=cache,
                                 deterministic=deterministic, rngs=rngs)
