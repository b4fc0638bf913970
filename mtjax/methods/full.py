"""Full fine-tuning in the method contract: no extra params, all base trainable."""
from mtjax.methods import transform


@transform.METHODS.register("full")
class FullFineTuning:
  """Every base parameter is trainable; the forward is the plain model."""
  name = "full"
  trainable = "base/.*"

  def init(self, rng, model, base_params) -> dict:
    del rng, model, base_params
    return {}

  def apply(self, model, params: dict, inputs: dict, *, rng=None,
            deterministic: bool = True, method=None):
    inputs = {k: v for k, v in inputs.items() if k != "adapter_index"}
    rngs = {"dropout": rng} if rng is not None else {}
    return model.apply({"params": params["base"]}, **inputs,
                       deterministic=deterministic, rngs=rngs, method=method)
