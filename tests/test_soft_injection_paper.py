"""The Soft Injection paper's protocol (mtjax.experiments.soft_injection):
its task files, prompt format, answer normalisation and the job end to end.

The tasks are the paper's own (../shared/data/soft_injection_tasks); the
format is checked with SmolLM2's tokenizer (the bundled GGUF file). The end
to end run uses the byte-level test bed as the model (SmolLM2 compiles too
slowly on 2 CPU cores for a one-minute test; configs/soft_injection_smollm2.py
runs it on SmolLM2).
"""
import json
import os

import numpy as np
import pytest

from configs import common, soft_injection_smollm2
from configs import soft_injection as si_config
from mtjax import data
from mtjax.evaluation import analysis
from mtjax.experiments import soft_injection as sa

TASKS_DIR = os.path.join(common.data_dir(), "soft_injection_tasks")
GGUF = common.smollm2().gguf_path

needs_tasks = pytest.mark.skipif(not os.path.isdir(TASKS_DIR),
                                 reason=f"no paper tasks at {TASKS_DIR}")
needs_gguf = pytest.mark.skipif(not os.path.isfile(GGUF),
                                reason=f"no SmolLM2 GGUF file at {GGUF}")


@needs_tasks
def test_paper_examples_read_the_task_files():
  train = sa.paper_examples("antonym", "train", TASKS_DIR)
  with open(os.path.join(TASKS_DIR, "antonym", "train.json")) as f:
    raw = json.load(f)
  assert len(train) == len(raw) == 1678
  assert train[0] == {"inputs": "hardware", "targets": "software",
                      "answer_choices": []}
  assert len(sa.paper_examples("antonym", "valid", TASKS_DIR, 100)) == 100
  # word_length stores its answers as ints: they become strings.
  row = sa.paper_examples("word_length", "test", TASKS_DIR, 1)[0]
  assert row == {"inputs": "wolf", "targets": "4", "answer_choices": []}


@needs_tasks
def test_every_configured_task_has_its_splits():
  for task in soft_injection_smollm2.ALL_TASKS:
    for split in ("train", "valid", "test"):
      assert os.path.isfile(os.path.join(TASKS_DIR, task, f"{split}.json"))
  assert set(soft_injection_smollm2.CPU_TASKS) <= set(
      soft_injection_smollm2.ALL_TASKS)
  assert len(soft_injection_smollm2.ALL_TASKS) == 57


def test_paper_prompt_is_the_papers_string():
  demos = [{"inputs": "hot", "targets": "cold"},
           {"inputs": "big", "targets": "small"}]
  query = {"inputs": "up", "targets": "down"}
  assert sa.paper_prompt(demos, query) == (
      "Q: hot\nA: cold\n\nQ: big\nA: small\n\nQ: up\nA:")
  assert sa.paper_prompt([], query) == "Q: up\nA:"
  # Numbers follow 'A:' without the space (the reference's digit rule).
  assert sa.paper_prompt([{"inputs": "wolf", "targets": "4"}], query) == (
      "Q: wolf\nA:4\n\nQ: up\nA:")


@needs_gguf
def test_numeric_targets_start_with_their_digit(smollm2_vocab):
  """word_length's ' 4' would make SmolLM2's first target token a bare
  space; the target is '4\n', so the fitted first token is the digit."""
  v = smollm2_vocab
  fmt = sa.paper_format(v, "word_length")
  target = fmt.target({"inputs": "wolf", "targets": "4"})
  assert v.decode(target[:1]) == "4" and v.decode(target) == "4\n"
  assert v.decode(fmt.target({"inputs": "hot", "targets": "cold"})[:1]) == (
      " cold"[:len(v.decode(v.encode(" cold")[:1]))])


def test_paper_normalisation_follows_the_reference_eval():
  assert sa.paper_normalize(" Paris\nQ: next", "country-capital") == "paris"
  assert sa.paper_normalize("St. Helena pound (SHP)", "country-currency") == (
      "saint helena pound")
  assert sa.paper_normalize(" Cold ", "capitalize") == "Cold"
  assert sa.paper_normalize("Cold", "lowercase_first_letter") == "Cold"
  assert sa.paper_match(" Cold\n", "cold", "antonym")
  assert not sa.paper_match(" Cold\n", "cold", "capitalize")
  assert sa.paper_match(" colder", "cold", "antonym")            # prefix
  assert not sa.paper_match(" colder", "cold", "antonym", prefix=False)
  assert sa.paper_match("St. Lucia", "Saint Lucia", "country-capital")
  assert not sa.paper_match(" warm", "cold", "antonym")


@pytest.fixture(scope="module")
def smollm2_vocab():
  if not os.path.isfile(GGUF):
    pytest.skip(f"no SmolLM2 GGUF file at {GGUF}")
  return data.vocabulary("gguf:" + GGUF)


@needs_gguf
def test_paper_format_on_smollm2_tokens(smollm2_vocab):
  v = smollm2_vocab
  fmt = sa.paper_format(v, "antonym")
  demos = [{"inputs": "hot", "targets": "cold"}]
  query = {"inputs": "big", "targets": "small"}
  bos = [v.bos_id] if v.bos_id is not None else []
  # The whole prompt string is encoded at once.
  ids = fmt.prompt(demos, query)
  assert ids == bos + v.encode("Q: hot\nA: cold\n\nQ: big\nA:")
  assert v.decode(ids[len(bos):]) == "Q: hot\nA: cold\n\nQ: big\nA:"
  # The target continues after 'A:' with the space: ' small\n'.
  assert v.decode(fmt.target(query)) == " small\n"
  # Only EOS stops generation; the answer is the first line of the stripped
  # text, whatever token carries the '\n', a leading newline included.
  endoftext = v.tokenizer.token_to_id("<|endoftext|>")
  assert fmt.stop_ids[0] == v.eos_id and endoftext in fmt.stop_ids
  assert fmt.answer(np.asarray(v.encode(" small") + [endoftext, 5])) == (
      "small")
  merged = [i for i in range(v.vocab_size)
            if "\n" in v.decode([i]) and v.decode([i]) != "\n"]
  assert merged, "SmolLM2 has tokens that merge '\\n' with other text"
  gen = v.encode(" small") + [merged[0]] + v.encode("Q: x")
  assert fmt.answer(np.asarray(gen)) == "small"
  assert fmt.answer(np.asarray(v.encode(" small") + [v.eos_id, 0])) == "small"
  assert fmt.answer(np.asarray(v.encode("\n small\nQ: x"))) == "small"
  assert fmt.correct(fmt.answer(np.asarray(gen)), query)


def test_task_mean_ci_resamples_within_tasks():
  const = [np.ones(10), np.zeros(30)]
  assert analysis.task_mean_ci(const) == (0.5, 0.5, 0.5)
  rng = np.random.default_rng(0)
  mixed = [rng.random(50) < 0.8, rng.random(200) < 0.3]
  mean, lo, hi = analysis.task_mean_ci(mixed)
  assert lo < mean < hi
  assert mean == pytest.approx((mixed[0].mean() + mixed[1].mean()) / 2)


def test_transfer_plot_and_text(tmp_path):
  transfer = {"antonym": {
      "own": {"alpha_of": "antonym", "em": 0.5},
      "similar": {"alpha_of": "synonym", "em": 0.4},
      "dissimilar": {"alpha_of": "capitalize", "em": 0.1}}}
  text = analysis.format_transfer(transfer)
  assert "similar (synonym) 0.400" in text
  png = analysis.plot_transfer(transfer, str(tmp_path / "t.png"))
  assert os.path.getsize(png) > 0


@needs_tasks
def test_job_runs_the_paper_protocol_end_to_end(tmp_path):
  """The job on a paper task with a tiny test bed: every row, the bootstrap
  summary, the saved embeddings, the analysis files and alpha transfer (here
  antonym's own alpha in every role, which must repeat its injection row)."""
  c = si_config.get_config()
  c.testbed.update(steps=4, batch_size=4, max_len=64, hidden=32, layers=2,
                   heads=2, mlp=32)
  c.paper_tasks = ("antonym",)
  c.transfer = (("antonym", "antonym", "antonym"),)
  c.update(shots=(0, 2), num_prompts=2, num_shots=2, val_examples=4,
           eval_examples=4, eval_batch_size=4, max_new_tokens=3,
           max_prompt_len=96, score_targets=False)
  c.alpha.update(steps=2, batch_size=2)
  c.prompt_tuning.length = 2
  out = sa.run_experiment(c, str(tmp_path))
  assert list(out["results"]) == list(c.paper_tasks)
  for rows in out["results"].values():
    assert list(rows) == ["zero-shot", "icl-2", "soft-injection",
                          "prompt-tuning"]
    for r in rows.values():
      assert len(r["correct"]) == 4 and 0 <= r["em"] <= 1 and r["sec"] > 0
    # Demonstrations actually used, per row that has them.
    assert rows["icl-2"]["shots"] == 2 and 0 <= rows["icl-2"][
        "shots_mean"] <= 2
    assert rows["soft-injection"]["shots"] == c.num_shots
  s = out["summary"]["soft-injection"]
  assert s["ci95"][0] <= s["em"] <= s["ci95"][1]
  transfer = out["transfer"]["antonym"]
  assert set(transfer) == {"own", "similar", "dissimilar"}
  assert transfer["similar"]["correct"] == transfer["own"]["correct"]
  for name in ("alpha_heatmap.png", "alpha_transfer.png", "head_overlap.json",
               "soft_injection_results.json", "soft_injection_table.txt"):
    assert (tmp_path / name).exists(), name
  assert (tmp_path / "task_embeddings" / "antonym").is_dir()


def test_prompt_tuning_batches_mark_padding_by_mask_not_by_id_zero():
  """A real LM's id 0 is a token (SmolLM2's <|endoftext|>, Llama-3's '!'):
  target_batch's decoder_mask covers every real token, id 0 included, and
  only the padding after a shorter row is masked."""
  fmt = sa.PromptFormat(prompt=lambda demos, q: [0, 5] + q["ids"],
                        target=lambda ex: [0, 7])
  batch = sa.target_batch([{"ids": [6]}, {"ids": [6, 6, 6]}], fmt, 16)
  np.testing.assert_array_equal(batch["decoder_mask"],
                                [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
  np.testing.assert_array_equal(batch["decoder_input_tokens"][0],
                                [0, 5, 6, 0, 7, 0])
  assert batch["decoder_loss_weights"][0].tolist() == [0, 0, 1, 1, 0, 0]


def test_cut_prompts_report_the_demonstrations_they_kept():
  """Prompts longer than max_len lose their first demonstrations; `kept`
  and shots_used say how many remain, per prompt and on average."""
  train = [{"inputs": f"w{i}", "targets": "x" * 20} for i in range(30)]
  queries = [{"inputs": "q", "targets": "y"}] * 3
  fmt = sa.PromptFormat(prompt=lambda d, q: list(range(10 * len(d) + 2)),
                        target=lambda ex: [1])
  kept = []
  prompts = sa.few_shot_prompts(train, queries, 10, 0, fmt, 45, kept)
  assert kept == [4, 4, 4] and all(len(p) <= 45 for p in prompts)
  assert sa.shots_used(kept, 10) == {"shots": 10, "shots_mean": 4.0,
                                     "prompts_cut": 3}
  full = []
  sa.few_shot_prompts(train, queries, 2, 0, fmt, 45, full)
  assert sa.shots_used(full, 2)["prompts_cut"] == 0
