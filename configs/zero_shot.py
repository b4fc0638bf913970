r"""Zero-shot evaluation of a pretrained LM (default SmolLM2-135M-Instruct).

Scores the real tasks in ../shared/data (SuperGLUE BoolQ/CB/COPA/RTE/WSC, the
multiple-choice dev sets, HellaSwag, XCOPA) in lm-eval's plain formats and
with promptsource templates, printing acc and acc_norm per task with 95%
bootstrap intervals, the number of examples and truncations
(mtjax/experiments/zero_shot.py).

  python -m mtjax.main --config=configs/zero_shot.py --workdir=workdirs/zero_shot
  python -m mtjax.main --config=configs/zero_shot.py:quick --workdir=workdirs/zs_quick

'quick' is the real-model quickstart: 3 tasks, 100 examples each.
Other models: --config.model.gguf_path=/path/model.gguf, or
--config.model.gguf_path= --config.model.hf_path=/path/hf_folder.
"""
import ml_collections

from configs import common

VARIANTS = ("full", "quick")

DATASETS = ("boolq", "cb", "copa", "rte", "wsc", "arc_easy", "arc_challenge",
            "openbook_qa", "commonsense_qa", "piqa", "siqa", "winogrande",
            "hellaswag", "xcopa.it", "xcopa.id", "xcopa.zh")


def get_config(variant="full"):
  if variant not in VARIANTS:
    raise ValueError(f"zero_shot variant {variant!r}: use one of {VARIANTS}")
  c = ml_collections.ConfigDict()
  c.job = "zero_shot"
  c.seed = 0
  c.model = common.smollm2()
  c.vocab = ""  # "" = the model's own tokenizer (gguf: or hf: spec)
  c.datasets = DATASETS if variant == "full" else ("copa", "boolq", "arc_easy")
  c.templates = 1 if variant == "full" else 0  # promptsource templates a dataset
  c.chat = False  # wrap prompts in the instruct model's chat template
  c.split = "validation"
  c.max_examples = 100  # per task (0 = all); the table reports n and CIs
  c.max_length = 512  # tokens of prompt + answer; longer prompts lose their start
  c.batch_size = 16
  c.mesh_shape = (-1, 1, 1)
  return c
