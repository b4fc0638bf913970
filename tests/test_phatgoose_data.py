"""PHATGOOSE on real datasets: train/eval splits, template groups, intervals."""
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from mtjax.data import tasks
from mtjax.evaluation import results
from mtjax.experiments import phatgoose as pg

DATA = tasks.default_data_dir()
needs_data = pytest.mark.skipif(not (DATA / "mc" / "piqa.jsonl").exists(),
                                reason="../shared/data not present")


@needs_data
def test_val_train_and_val_test_split_the_validation_file():
  real = tasks.real_tasks(DATA)
  for task in (real["piqa"][0], real["piqa"][1], real["copa"][0]):
    assert "val_train" in tasks.splits_of(task)
    full, _ = tasks.render(task, "validation")
    train, _ = tasks.render(task, "val_train")
    test, _ = tasks.render(task, "val_test")
    key = lambda e: (e["inputs"], e["targets"])
    assert not {key(e) for e in train} & {key(e) for e in test}
    assert len(train) + len(test) == len(full)
    assert 0.1 < len(test) / len(full) < 0.3
  # The same file rows on the same side for every template of a dataset.
  a = tasks.render(real["piqa"][0], "val_test")[0]
  b = tasks.render(real["piqa"][1], "val_test")[0]
  assert len(a) == len(b)


@needs_data
def test_dataset_groups_are_templates_and_plain_only_without_them():
  real = {d: [t.name for t in ts] for d, ts in tasks.real_tasks(DATA).items()}
  reg = tasks.Registered(vocab_key="byte", held_in=["copy"], held_out=[],
                         real=real, mixtures=[], names={"copy": "x"})
  groups = pg.dataset_groups(reg, ["piqa", "siqa", "copy"], templates=2)
  assert groups["piqa"] == real["piqa"][:2]
  assert not any(t.endswith(".plain") for t in groups["piqa"])
  assert groups["siqa"] == ["siqa.plain"]      # no promptsource template
  assert groups["copy"] == ["copy"]            # a suite task: itself
  with pytest.raises(KeyError, match="not registered"):
    pg.dataset_groups(reg, ["no_such_dataset"])


def test_median_of_templates_and_its_intervals():
  rng = np.random.default_rng(0)
  correct = {f"a{i}": rng.random(200) < p for i, p in enumerate((.5, .6, .9))}
  correct.update({"b0": rng.random(100) < .3})
  out = results.median_of_templates(
      correct, {"a": ["a0", "a1", "a2"], "b": ["b0"]})
  assert out["a"][0] == pytest.approx(np.mean(correct["a1"]))  # the median
  assert out["b"][0] == pytest.approx(np.mean(correct["b0"]))
  assert out["mean"][0] == pytest.approx((out["a"][0] + out["b"][0]) / 2)
  for point, lo, hi in out.values():
    assert lo <= point <= hi and hi - lo < 0.3
  # More examples, narrower interval.
  wide = results.median_of_templates({"x": correct["b0"][:25]}, {"x": ["x"]})
  narrow = results.median_of_templates({"x": correct["b0"]}, {"x": ["x"]})
  assert wide["x"][2] - wide["x"][1] > narrow["x"][2] - narrow["x"][1]


def test_templates_of_a_dataset_are_resampled_at_the_same_examples():
  """One bootstrap draw resamples a dataset's examples once, for every
  template: two identical templates give one template's interval (drawn
  independently, their median would be a narrower mean of two draws), and
  two complementary templates a constant median."""
  v = np.random.default_rng(1).random(60) < 0.6
  one = results.median_of_templates({"t": v}, {"d": ["t"]})
  two = results.median_of_templates({"t": v, "u": v.copy()},
                                    {"d": ["t", "u"]})
  assert two["d"] == pytest.approx(one["d"])
  assert two["mean"] == pytest.approx(one["mean"])
  flip = results.median_of_templates({"t": v, "u": ~v}, {"d": ["t", "u"]})
  assert flip["d"] == pytest.approx((0.5, 0.5, 0.5))


TABLE = pathlib.Path(__file__).resolve().parents[1] / "docs/data/phatgoose_table.py"


def _results_file(path, row: str, ids):
  """A minimal phatgoose_results.json: one held-out dataset of two
  templates, one row; ids None leaves 'example_ids' out (an older file)."""
  groups = {"e": ["e.t"], "d": ["d.t0", "d.t1"]}
  correct = {t: [1, 0, 1, 1] for ts in groups.values() for t in ts}
  out = {"groups": groups, "experts": ["e"], "correct": {row: correct},
         "scores": {row: {"d": [0.75, 0.5, 1.0],
                          "held_out": [0.75, 0.5, 1.0]}}}
  if ids is not None:
    out["example_ids"] = {row: {t: list(ids) for t in correct}}
  path.write_text(json.dumps(out))
  return str(path)


def _table(*files):
  return subprocess.run([sys.executable, str(TABLE), *files,
                         "--baseline=a"], capture_output=True, text=True,
                        check=False)


def test_table_combines_files_only_when_they_scored_the_same_examples(
    tmp_path):
  a = _results_file(tmp_path / "a.json", "a", [1, 2, 3, 4])
  same = _results_file(tmp_path / "b.json", "b", [1, 2, 3, 4])
  other = _results_file(tmp_path / "c.json", "c", [1, 2, 3, 5])
  old = _results_file(tmp_path / "d.json", "d", None)
  ok = _table(a, same)
  assert ok.returncode == 0, ok.stderr
  assert "| b |" in ok.stdout and "b - a: +0.000" in ok.stdout
  assert "note" not in ok.stderr
  # A row of other examples is shown apart, with why, and never paired.
  apart = _table(a, other)
  assert apart.returncode == 0, apart.stderr
  assert "c (" in apart.stdout and "c.json" in apart.stdout
  assert "other examples of d.t0 than a" in apart.stdout
  assert "c - a" not in apart.stdout
  # Older files without ids: combined on the count check, with a note.
  legacy = _table(a, old)
  assert legacy.returncode == 0, legacy.stderr
  assert "d.json: no example ids" in legacy.stderr


def test_file_overlaps_count_seen_inputs_and_seen_answers(tmp_path):
  """A held-out test input found in a held-in train file is counted, and
  counted again as a seen answer only with the same output (case kept)."""
  def task(folder, split, rows):
    (tmp_path / folder).mkdir(exist_ok=True)
    (tmp_path / folder / f"{split}.json").write_text(json.dumps(
        [{"input": i, "output": o} for i, o in rows]))
  task("capitalize_first_letter", "train", [("wolf", "W"), ("a", "A")])
  task("english-french", "train", [("Wolf", "loup"), ("cat", "chat")])
  task("capitalize_last_letter", "test", [("wolf", "F"), ("a", "A"),
                                          ("zebra", "A")])
  o = pg.si_tasks.file_overlaps(
      tmp_path, ["si_qa_capitalize_first_letter", "si_qa_english_french"],
      ["si_qa_capitalize_last_letter"])
  v = o["held_out"]["si_qa_capitalize_last_letter"]
  assert (v["rows"], v["input_seen"], v["pair_seen"]) == (3, 2, 1)
  assert v["by_task"] == {"si_qa_capitalize_first_letter": 2,
                          "si_qa_english_french": 1}
  assert o["held_in"] == {
      "si_qa_capitalize_first_letter|si_qa_english_french": 1}
  first = pg.si_tasks.file_overlaps(
      tmp_path, ["si_qa_capitalize_first_letter"],
      ["si_qa_capitalize_last_letter"], held_out_rows=1)
  assert first["held_out"]["si_qa_capitalize_last_letter"]["rows"] == 1
