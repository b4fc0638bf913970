r"""Multitask prompt transfer (Wang et al. 2023, MPT): source, then targets.

  python -m mtjax.main --config=configs/prompt_transfer.py --workdir=workdirs/mpt

(main dispatches config.job == 'prompt_transfer' to
mtjax.experiments.library.train_prompt_transfer.) Stage 1 trains a shared
prompt S (P x d) times per-task rank-1 factors u_t v_t^T jointly on the
held-in mixture (the batch's task_index selects each row's prompt); stage 2
tunes a plain prompt on each held-out task, initialised from S. Compare with
configs/prompt_tuning.py (vocabulary init) to see the transfer.
"""
import ml_collections

from configs import prompt_tuning


def get_config():
  c = prompt_tuning.get_config()
  c.job = "prompt_transfer"
  c.method.update(init="vocab")
  c.transfer = ml_collections.ConfigDict(dict(
      source_mixture="held_in", source_steps=1000,
      target_tasks="held_out",
      source_method=ml_collections.ConfigDict(dict(
          name="multitask_prompt", num_tasks=0,  # 0: the mixture's task count
          composition="multiplicative", length=20, init="vocab",
          sample_vocab=259, adapter_index_from="task_index"))))
  c.num_train_steps = 300
  return c
