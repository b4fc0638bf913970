r"""Soft injection of task embeddings vs zero-shot, ICL and prompt tuning.

"Soft Injection of Task Embeddings Outperforms Prompt-Based In-Context
Learning" (2025); mtjax/methods/soft_injection.py. One command trains the
small MetaICL-style test-bed decoder on the bundled suite's held-in tasks, then
for every task compares zero-shot, k-shot ICL, soft injection (task embedding
from `num_prompts` prompts of `num_shots` demonstrations, alpha fitted for
alpha.steps) and prompt tuning with the same budget, printing accuracy (exact
match of the greedy answer) and inference time per example, and writes to
WORKDIR: soft_injection_results.json, soft_injection_table.txt,
alpha_heatmap.png, head_overlap.{json,txt}, task_embeddings/<task>/.

  python -m mtjax.main --config=configs/soft_injection.py \
      --workdir=workdirs/soft_injection
(main dispatches config.job == 'soft_injection' to
mtjax.experiments.soft_injection.run_experiment).
"""
import os

import ml_collections

from configs import common


def get_config():
  c = ml_collections.ConfigDict()
  c.job = "soft_injection"
  c.seed = 0
  c.vocab = "byte"
  c.model_source = "testbed"  # or 'gguf' / 'hf' with c.model (a real LM)
  c.testbed = ml_collections.ConfigDict(dict(
      steps=1500, batch_size=16, max_len=160, max_shots=4, remap_prob=0.5,
      learning_rate=3e-3, hidden=64, layers=4, heads=4, mlp=128))
  c.tasks = ()        # () = the suite's held-out tasks
  c.real_tasks = ()   # registered real tasks (mtjax.data), e.g. SuperGLUE
  c.paper_tasks = ()  # the paper's tasks (folders of paper_tasks_dir)
  c.paper_tasks_dir = os.path.join(common.data_dir(), "soft_injection_tasks")
  # Paper tasks: exact match of the first line; True compares only the
  # output's first len(target) characters, as the reference code does.
  c.em_prefix = False
  c.score_targets = True  # teacher-forced first-token accuracy and NLL
  c.transfer = ()     # ((task, similar task, dissimilar task), ...)
  c.shots = (0, 5, 10)
  c.max_prompt_len = 512
  c.max_new_tokens = 17
  c.eval_examples = 200
  c.eval_batch_size = 16
  c.num_prompts = 50  # M, the paper's default
  c.num_shots = 10    # N
  c.fit_examples = 100
  c.val_examples = 50
  c.alpha = ml_collections.ConfigDict(dict(steps=400, learning_rate=0.2,
                                           batch_size=1))
  c.prompt_tuning = ml_collections.ConfigDict(dict(length=10,
                                                   learning_rate=0.1))
  c.top_k = 0         # heads compared by Jaccard; 0 = a quarter of all heads
  return c
