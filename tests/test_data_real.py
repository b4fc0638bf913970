"""Real evaluation material in shared/data: promptsource files, XCOPA,
SuperGLUE and multiple-choice sets rendered through their templates."""
import collections
import json

import pytest

from mtjax.data import si_tasks, tasks, templates

XCOPA_LANGS = tasks.XCOPA_LANGS


def test_every_template_file_loads(shared_data):
  counts = {}
  for root in ("promptsource", "promptsource-xp3mt"):
    files = templates.find_files(shared_data / root / "templates")
    n = 0
    for path in files:
      loaded = templates.load(path)
      for name, t in loaded.items():
        assert isinstance(t, templates.Template) and t.name == name and t.jinja
      n += len(loaded)
    counts[root] = (len(files), n)
  print("template files, templates:", counts)
  assert counts["promptsource"][0] == 279  # as SOURCES.md says
  assert counts["promptsource-xp3mt"][0] == 2685
  assert counts["promptsource"][1] > 1000


def test_loader_is_safe(tmp_path):
  path = tmp_path / "templates.yaml"
  path.write_text("dataset: x\ntemplates:\n  a: !!python/object/apply:os.system"
                  " ['echo pwned']\n")
  with pytest.raises(Exception, match="python/object"):
    templates.load(path)


def _rows(path, n=None):
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f][:n]


def test_copa_templates_render_xcopa_every_language(shared_data):
  copa = templates.load(shared_data / "promptsource/templates/super_glue/copa/"
                        "templates.yaml")
  assert len(copa) == 12
  for lang in XCOPA_LANGS:
    rows = _rows(shared_data / f"xcopa/data/{lang}/val.{lang}.jsonl")
    assert len(rows) == 100
    rendered = 0
    for t in copa.values():
      for i, row in enumerate(rows):
        inputs, target, choices = t.apply(row, key=i)
        if not inputs:  # cause-only / effect-only templates skip the others
          continue
        assert choices == [row["choice1"], row["choice2"]]
        assert target == choices[row["label"]]
        assert row["premise"] in inputs
        rendered += 1
    assert rendered > 800, lang


def test_xp3mt_templates_render_each_language(shared_data):
  for lang in XCOPA_LANGS:
    path = shared_data / f"promptsource-xp3mt/templates/xcopa/{lang}/" \
        "templates.yaml"
    loaded = templates.load(path)
    assert loaded, lang
    rows = _rows(shared_data / f"xcopa/data/{lang}/val.{lang}.jsonl", 20)
    for t in loaded.values():
      ok = 0
      for i, row in enumerate(rows):
        inputs, target, choices = t.apply(row, key=i)
        if inputs:
          assert target == choices[row["label"]], (lang, t.name)
          ok += 1
      assert ok > 0, (lang, t.name)


def test_real_tasks_register_and_render(shared_data):
  real = tasks.real_tasks(shared_data)
  counts = {k: len(v) for k, v in real.items()}
  print("real datasets:", len(real), "tasks:", sum(counts.values()), counts)
  for lang in XCOPA_LANGS:
    # th and tr files hold only 'effect' questions: COPA's two cause-only
    # templates render no row there and are not registered. +1: lm-eval's
    # plain format ('xcopa.<lang>.plain').
    want = 11 if lang in ("th", "tr") else 13
    assert f"xcopa.{lang}.plain" in [t.name for t in real[f"xcopa.{lang}"]]
    assert counts[f"xcopa.{lang}"] == want and counts[f"xcopa_mt.{lang}"] >= 1
    if lang != "qu":  # no English back-translation of Quechua
      assert counts[f"xcopa_gmt.{lang}"] == want
  for name in ("cb", "copa", "rte", "wsc", "boolq", "winogrande", "piqa",
               "arc_easy", "arc_challenge", "openbook_qa", "siqa",
               "commonsense_qa", "hellaswag"):
    assert counts[name] >= 1, name
  # Every registered template renders the first rows of its dataset.
  for dataset, file_tasks in real.items():
    for task in file_tasks:
      split = task.files[0][0]
      # XCOPA files list effect questions first: render all 100 of them.
      limit = None if dataset.startswith("xcopa") else 30
      rows, _ = tasks.render(task, split, max_rows=limit)
      assert rows, task.name
      for row in rows:
        assert row["inputs"] and row["targets"]
        if task.name.startswith(si_tasks.DATASET_PREFIX) and not (
            si_tasks.is_word_choice(dataset[len(si_tasks.DATASET_PREFIX):])):
          # The Soft Injection generation tasks (si_tasks): no choices.
          assert row["answer_choices"] == []
          continue
        assert row["answer_choices"][row["label"]] == row["targets"]


def test_real_tasks_in_seqio(shared_data):
  from mtjax import data  # pylint: disable=g-import-not-at-top
  vocab = data.vocabulary("byte")
  reg = data.register(vocab, data_dir=shared_data)
  assert len(reg.real) == len(tasks.real_tasks(shared_data))
  val = {"cb": 56, "copa": 100, "rte": 277, "wsc": 104}
  for name, n in val.items():
    task = reg.real[name][0]
    assert data.task_kind(task, vocab) == "rank_classification"
    rows = data.eval_examples(task, vocab)
    assert len(rows) == n, name  # the official validation sets
  for task in (reg.real["xcopa.sw"][0], reg.real["hellaswag"][-1],
               reg.real["xcopa_mt.zh"][0]):
    rows = data.eval_examples(task, vocab, max_examples=4)
    assert len(rows) == 4
    for r in rows:
      assert vocab.decode(r["choice_ids"][r["label"]]) == r["targets"]


def test_word_choice_tasks_render_every_row(shared_data):
  """The Soft Injection word-choice folders become si_* rank-classification
  tasks: every row of every split lists its target among its choices, and
  the instruction names the task's rule."""
  real = tasks.real_tasks(shared_data)
  # si_qa_*: the same folders in the 'Q: x\nA:' format (si_tasks), apart.
  si = sorted(k for k in real if k.startswith("si_")
              and not k.startswith(si_tasks.DATASET_PREFIX))
  assert len(si) == 2 * len(tasks.WORD_CHOICE)   # lists of 3 and of 5 words
  for dataset in si:
    (task,) = real[dataset]
    rule = tasks.word_choice_task(dataset[len("si_"):])
    n = int(dataset.rsplit("_", 1)[1])
    sizes = {}
    for split in ("train", "validation", "test"):
      rows, skipped = tasks.render(task, split)
      assert not skipped, (dataset, split, skipped)
      sizes[split] = len(rows)
      for row in rows:
        assert row["inputs"].startswith(tasks.WORD_CHOICE[rule] + "\nWords: ")
        assert len(row["answer_choices"]) == n
        assert row["answer_choices"][row["label"]] == row["targets"]
    assert sizes == {"train": 700, "validation": 90, "test": 210}, dataset
  assert tasks.word_choice_task("antonym") is None
  assert tasks.word_choice_task("choose_first_of_4") is None


def test_json_list_reader_names_bad_files(tmp_path):
  good = tmp_path / "good.json"
  good.write_text('[{"input": "a, b", "output": "a"}, 3]')
  with pytest.raises(tasks.BadRowError, match=r"good.json:2: malformed item"):
    tasks.read_json_list(good)
  skipped = collections.Counter()
  assert tasks.read_json_list(good, "skip", skipped) == [
      (1, {"input": "a, b", "output": "a"})]
  assert sum(skipped.values()) == 1
  (tmp_path / "obj.json").write_text('{"input": "a"}')
  with pytest.raises(tasks.BadRowError, match="expected a JSON list"):
    tasks.read_json_list(tmp_path / "obj.json")
  (tmp_path / "broken.json").write_text('[{"input": ')
  with pytest.raises(tasks.BadRowError, match="broken.json:1: malformed JSON"):
    tasks.read_json_list(tmp_path / "broken.json")
