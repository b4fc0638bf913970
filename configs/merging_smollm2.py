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

words (CPU, trains its own library): the merging benchmarks' protocol --
merge the experts, score the merge on the experts' own tasks -- on the Soft
Injection paper's word-choice tasks (mtjax.data.tasks.WORD_CHOICE: 'Which
word comes first in the list?  Words: jar, white, gray', rank
classification over the listed words, chance 1/3). The held-in tasks share
one input format and differ only in the rule, so experts conflict and a
merge has to keep each rule reachable from its instruction; two held-out
rules (middle of the list, fruit) are scored too. 5 experts (LoRA r16 on
q/v, 60 steps of batch 8 on each task's train file), every row on the test
files' first 50 examples of every task (static merges first); AdaMerging
adapts on the unlabeled prompts of every scored task (its paper's
test-time setting). Short prompts (48 + 8 tokens) keep it a CPU run:

  python -m mtjax.main --config=configs/merging_smollm2.py:words \
      --workdir=workdirs/merging_smollm2_words
"""
from configs import phatgoose_smollm2

VARIANTS = phatgoose_smollm2.VARIANTS + ("words",)

WORDS_HELD_IN = ("si_choose_first_of_3", "si_choose_last_of_3",
                 "si_alphabetically_first_3", "si_animal_v_object_3",
                 "si_verb_v_adjective_3")
WORDS_HELD_OUT = ("si_choose_middle_of_3", "si_fruit_v_animal_3")

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


def words_config():
  """The 'words' variant (module docstring)."""
  c = phatgoose_smollm2.get_config("cpu")
  c.held_in, c.held_out = WORDS_HELD_IN, WORDS_HELD_OUT
  c.templates = 1
  c.train_split, c.held_in_split, c.eval.split = "train", "test", "test"
  c.data.inputs_length, c.data.targets_length = 48, 8
  c.expert_steps, c.gate_steps, c.merge_steps = 60, 10, 30
  c.eval.max_examples, c.eval.batch_size = 50, 32
  merges = tuple(dict(m, data="eval_prompts") if m["name"] == "adamerging"
                 else m for m in MERGES)
  rows = {e["name"]: e for e in merges + tuple(dict(name=n) for n in (
      "base", "oracle", "merged", "phatgoose", "arrow", "uniform"))}
  c.methods = tuple(rows[n] for n in (
      "base", "oracle", "merged", "task_arithmetic", "ties", "dare_ties",
      "phatgoose", "adamerging", "self_positioning", "atlas", "scalearn",
      "arrow", "uniform"))
  c.held_in_rows = None
  c.require_library = False
  c.library_dir = ""
  return c


def get_config(variant="cpu"):
  if variant == "words":
    return words_config()
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
