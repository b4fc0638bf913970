r"""Soft injection vs zero-shot, ICL and prompt tuning on a real pretrained LM.

Park et al., "Soft Head Selection for Injecting ICL-Derived Task Embeddings"
(the Soft Injection paper; mtjax/methods/soft_injection.py) in the paper's
protocol on SmolLM2-135M-Instruct (the bundled GGUF file, dequantised to f32)
and the paper's own tasks (../shared/data/soft_injection_tasks/<task>/
{train,valid,test}.json; ../shared/data/SOURCES.md):

  * prompts: demonstrations 'Q: {input}\nA: {output}\n\n', the query
    'Q: {input}\nA:', the whole string encoded at once (BOS first if the
    tokenizer adds one); the answer is the first generated line (generation
    stops at any token containing '\n', at most 12 new tokens);
  * task embedding: mean head outputs at the last prompt token over
    `num_prompts` prompts of `num_shots` demonstrations drawn from train;
  * alpha: Adam (constant lr 0.2) on the first-answer-token loss of 0-shot
    prompts from train, validated on the first `val_examples` valid examples
    every 10 steps, keeping the best-validation alpha;
  * test: the first `eval_examples` test examples (0 = all), exact match after
    the reference normalisation ('St.' -> 'Saint', cut at '(', stripped,
    lower-cased except for capitalize*/lowercase* tasks; the whole first
    line must equal the target; --config.em_prefix=True compares only the
    output's first len(target) characters, as the reference eval.py);
  * rows: zero-shot, 5- and 10-shot ICL (demonstrations from train), soft
    injection (0-shot prompt + injection), prompt tuning (10 soft tokens, the
    alpha budget); per-task EM and the task mean with 95% bootstrap intervals;
    ms of generation per example, the peak-memory rise (device
    peak_bytes_in_use, or process max RSS on CPU) and the KV-cache MB;
  * head analysis: alpha heatmaps, top heads, Jaccard overlap of top heads,
    and alpha transfer (task A's embedding with a similar / a dissimilar
    task's alpha, `transfer`).

  python -m mtjax.main --config=configs/soft_injection_smollm2.py:cpu \
      --workdir=workdirs/soft_injection_smollm2_cpu
  python -m mtjax.main --config=configs/soft_injection_smollm2.py:full \
      --workdir=workdirs/soft_injection_smollm2      # an accelerator

Variants:
  cpu   CPU_TASKS (7 tasks: the three transfer pairs + capitalize), 10
        prompts x 10 shots, alpha 50 steps of batch 4, validation on 25 valid
        examples, test on 50 test examples, prompt tuning 50 steps of batch 4,
        no teacher-forced scoring. Sized for about 45 minutes on 2 CPU cores
        (about 4-6 minutes a task of CPU time; more when the cores are shared).
  full  all 57 tasks, the paper's protocol: 50 prompts x 10 shots, alpha 400
        steps of batch 1, validation on 100 valid examples, every test
        example, prompt tuning 400 steps. For a GPU/TPU.
"""
import ml_collections

from configs import common, soft_injection

VARIANTS = ("cpu", "full")

ALL_TASKS = (
    "adjective_v_verb_3", "adjective_v_verb_5", "ag_news",
    "alphabetically_first_3", "alphabetically_first_5",
    "alphabetically_last_3", "alphabetically_last_5", "animal_v_object_3",
    "animal_v_object_5", "antonym", "capitalize", "capitalize_first_letter",
    "capitalize_last_letter", "capitalize_second_letter", "choose_first_of_3",
    "choose_first_of_5", "choose_last_of_3", "choose_last_of_5",
    "choose_middle_of_3", "choose_middle_of_5", "color_v_animal_3",
    "color_v_animal_5", "commonsense_qa", "concept_v_object_3",
    "concept_v_object_5", "conll2003_location", "conll2003_organization",
    "conll2003_person", "country-capital", "country-currency",
    "english-french", "english-german", "english-spanish", "fruit_v_animal_3",
    "fruit_v_animal_5", "landmark-country", "lowercase_first_letter",
    "lowercase_last_letter", "national_parks", "next_capital_letter",
    "next_item", "object_v_concept_3", "object_v_concept_5", "park-country",
    "person-instrument", "person-occupation", "person-sport", "present-past",
    "prev_item", "product-company", "sentiment", "singular-plural",
    "squad_val", "synonym", "verb_v_adjective_3", "verb_v_adjective_5",
    "word_length")

CPU_TASKS = ("antonym", "synonym", "english-french", "english-spanish",
             "country-capital", "country-currency", "capitalize")

# (task A, a similar task B, a dissimilar task C): A's embedding is injected
# with A's, B's and C's fitted alpha.
TRANSFER = (("antonym", "synonym", "capitalize"),
            ("english-french", "english-spanish", "capitalize"),
            ("country-capital", "country-currency", "capitalize"))


def get_config(variant="cpu"):
  if variant not in VARIANTS:
    raise ValueError(f"soft_injection_smollm2 variant {variant!r}: use one of "
                     f"{VARIANTS} (--config=configs/soft_injection_smollm2.py:cpu)")
  full = variant == "full"
  c = soft_injection.get_config()
  c.model_source = "gguf"
  c.model = common.smollm2()
  c.vocab = "gguf:" + c.model.gguf_path
  del c["testbed"]
  c.paper_tasks = ALL_TASKS if full else CPU_TASKS
  c.tasks = ()
  c.transfer = TRANSFER
  c.shots = (0, 5, 10)
  c.max_prompt_len = 1024
  c.max_new_tokens = 12
  c.num_prompts = 50 if full else 10
  c.num_shots = 10
  c.fit_examples = 0          # alpha is fitted on all of train
  c.val_examples = 100 if full else 25
  c.eval_examples = 0 if full else 50
  c.eval_batch_size = 32 if full else 16
  c.score_targets = full
  c.alpha = ml_collections.ConfigDict(dict(
      steps=400 if full else 50, learning_rate=0.2,
      batch_size=1 if full else 4))
  c.prompt_tuning = ml_collections.ConfigDict(dict(length=10,
                                                   learning_rate=0.1))
  return c
