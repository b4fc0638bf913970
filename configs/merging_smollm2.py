r"""Merging against routing on SmolLM2-135M-Instruct: the PHATGOOSE run's
expert library, merged by each method of mtjax.merging, on the same
held-out tasks, examples and templates (issue 14).

Reuses the experts of a configs/phatgoose_smollm2.py run (its library
folder; their base fingerprint is checked), so the merge rows sit next to
that run's merged / Arrow / PHATGOOSE / oracle rows on identical examples:

  python -m mtjax.main --config=configs/phatgoose_smollm2.py:cpu \
      --workdir=workdirs/phatgoose_smollm2_cpu
  python -m mtjax.main --config=configs/merging_smollm2.py:cpu \
      --workdir=workdirs/merging_smollm2_cpu \
      --config.library_dir=workdirs/phatgoose_smollm2_cpu/library

Rows (experiments.phatgoose.merge_step):
  task_arithmetic  sum of the experts' updates, lambda = 0.4 each
                   (Ilharco et al. 2023 pick lambda in [0.3, 0.5] on
                   validation; no held-out validation exists here)
  ties             density 0.2, lambda 1 (Yadav et al. 2023's defaults)
  dare_ties        density 0.5, lambda 1 (mergekit's example)
  adamerging       layer-wise, 0.3 init clamped to [0, 1], entropy of the
                   answer-position prediction on the held-out tasks'
                   unlabeled prompts (test-time adaptation, as the paper)
  atlas            per-tensor coefficients, cross-entropy on the held-in
                   mixture (held-out tasks stay zero-shot)
  self_positioning one coefficient per expert, cross-entropy on the held-in
                   mixture
  scalearn         per-module output scales of the experts, held-in mixture
  merged           the routing baseline (A and B averaged), for reference
Learned merges: `merge_steps` steps of batch 8 (cpu: 20, full: 200), lr
1e-2. cpu: held-out tasks only (as the PHATGOOSE cpu rows); full: every row
on every task, plus the PHATGOOSE and oracle rows.
"""
from configs import phatgoose_smollm2

VARIANTS = phatgoose_smollm2.VARIANTS

MERGES = (
    dict(name="task_arithmetic", kind="merge",
         merge=dict(name="task_arithmetic"), weights=0.4),
    dict(name="ties", kind="merge", merge=dict(name="ties", density=0.2)),
    dict(name="dare_ties", kind="merge",
         merge=dict(name="dare_ties", density=0.5)),
    dict(name="adamerging", kind="merge", merge=dict(name="adamerging")),
    dict(name="atlas", kind="merge", merge=dict(name="atlas")),
    dict(name="self_positioning", kind="merge",
         merge=dict(name="self_positioning")),
    dict(name="scalearn", kind="merge", merge=dict(name="scalearn")),
)


def get_config(variant="cpu"):
  c = phatgoose_smollm2.get_config(variant)
  full = variant == "full"
  c.methods = MERGES + (dict(name="merged"),) + (
      (dict(name="phatgoose"), dict(name="oracle")) if full else ())
  c.held_in_rows = None if full else ()
  c.merge_steps = 200 if full else 20
  c.require_library = True   # never trains experts of its own
  c.library_dir = ("workdirs/phatgoose_smollm2/library" if full
                   else "workdirs/phatgoose_smollm2_cpu/library")
  return c
