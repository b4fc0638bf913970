"""Parameter-efficient methods as pure transforms of an unchanged model.

Every method follows one contract (see transform.py for the mechanism):
  method = build(method_config, model)
  method_params = method.init(rng, model, base_params)
      # {'lora': {...}} etc.; leaves are nn.LogicallyPartitioned (logical axis
      # names for sharding, as flax's model.init); nn.unbox gives arrays.
  logits = method.apply(model, {'base': base_params, **method_params}, inputs,
                        rng=None, deterministic=True)
      # inputs: model kwargs, plus optional 'adapter_index' (B,) int32.
  method.trainable   # regex over '/'-joined param paths, e.g. 'lora/.*'

Methods: 'full' (full fine-tuning), 'lora', 'ia3', 'prompt_tuning',
'multitask_prompt', 'soft_injection' (soft_injection.py). library.py holds the expert library, PEFT interchange,
adapter-only checkpoints and the multi-run jobs: `run_job(config, workdir)`
runs config.job 'library' (one expert per task) or 'prompt_transfer'.
"""
from mtjax.methods import ia3, lora, prompt_tuning, transform  # noqa: F401

_KWARGS = {
    "lora": ("rank", "alpha", "dropout", "targets", "init_a", "num_experts",
             "init_from"),
    "ia3": ("targets", "ff_targets", "num_experts"),
    "prompt_tuning": ("length", "init", "sample_vocab", "label_ids",
                      "init_from", "embedding", "scope", "num_experts",
                      "placeholder_id"),
    "multitask_prompt": ("num_tasks", "composition", "length", "init",
                         "sample_vocab", "label_ids", "init_from", "embedding",
                         "scope", "placeholder_id"),
}
_CLASSES = {
    "lora": lora.LoRA, "ia3": ia3.IA3,
    "prompt_tuning": prompt_tuning.PromptTuning,
    "multitask_prompt": prompt_tuning.MultitaskPromptTuning,
}
# Config keys that belong to the surrounding job, not to the method object.
_JOB_KEYS = ("name", "adapter_index_from")


def run_job(config, workdir):
  """Multi-run jobs (config.job 'library' | 'prompt_transfer'), for mtjax.main."""
  from mtjax.methods import library  # pylint: disable=g-import-not-at-top
  return library.run_job(config, workdir)


def _full():
  from mtjax.training import trainer  # pylint: disable=g-import-not-at-top
  return trainer.FullFineTuning()


def build(method_config, model=None):
  """A method object from a config (ml_collections.ConfigDict or dict)."""
  del model  # targets are resolved lazily against the model given to init
  if not method_config:
    return _full()
  cfg = dict(method_config.to_dict() if hasattr(method_config, "to_dict")
             else method_config)
  name = cfg.get("name", "full")
  if name == "full":
    return _full()
  if name == "soft_injection":
    from mtjax.methods import soft_injection  # pylint: disable=g-import-not-at-top
    return soft_injection.build(cfg)
  if name not in _CLASSES:
    raise ValueError(f"method.name={name!r}: use one of "
                     f"{['full', 'soft_injection'] + sorted(_CLASSES)}")
  unknown = sorted(set(cfg) - set(_KWARGS[name]) - set(_JOB_KEYS))
  if unknown:
    raise ValueError(f"method {name!r} has no option(s) {unknown}; known: "
                     f"{sorted(_KWARGS[name])}")
  kwargs = {k: cfg[k] for k in _KWARGS[name] if k in cfg}
  for k in ("targets", "ff_targets", "label_ids"):
    if isinstance(kwargs.get(k), list):
      kwargs[k] = tuple(kwargs[k])
  method = _CLASSES[name](**kwargs)
  method.name = name
  return method
