"""Parameter-efficient methods as pure transforms of an unchanged model.

Every method follows one contract (see transform.py for the mechanism):
  method = build(method_config)
  method_params = method.init(rng, model, base_params)
      # {'lora': {...}} etc.; leaves are nn.LogicallyPartitioned (logical axis
      # names for sharding, as flax's model.init); nn.unbox gives arrays.
  logits = method.apply(model, {'base': base_params, **method_params}, inputs,
                        rng=None, deterministic=True)
      # inputs: model kwargs, plus optional 'adapter_index' (B,) int32.
  method.trainable   # regex over '/'-joined param paths, e.g. 'lora/.*'

Methods are registered by name in `METHODS` (transform.py): 'full', 'lora',
'ia3', 'prompt_tuning', 'multitask_prompt', 'soft_injection'. A new method is
one class decorated with `@METHODS.register('name')`; `build` checks a
config's options against its constructor. library.py holds the expert library
and PEFT interchange, adapters.py adapter files.
"""
from typing import Any, Mapping, Optional

from mtjax.methods import (  # noqa: F401
  adapters,
  full,
  ia3,
  library,
  lora,
  prompt_tuning,
  soft_injection,
  transform,
)
from mtjax.methods.transform import METHODS

# Config keys that belong to the surrounding job, not to the method object.
JOB_KEYS = ("name", "adapter_index_from")


def build(method_config: Optional[Mapping[str, Any]] = None,
          model: Any = None) -> Any:
  """A method object from a config (ConfigDict or dict); None/{} is 'full'.

  The options are checked against the registered constructor's signature.
  """
  del model  # targets are resolved lazily against the model given to init
  cfg = dict(transform.to_dict(method_config))
  cfg.setdefault("name", "full")
  method = METHODS.build(cfg, ignore=JOB_KEYS)
  method.name = cfg["name"]
  return method
