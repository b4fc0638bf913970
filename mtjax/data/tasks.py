"""seqio Tasks and Mixtures: the suite, real eval sets from local files, tfds.

Every Task has string sources 'inputs', 'targets', 'answer_choices' (a list,
empty for generation) and 'label' (index into answer_choices, -1 for
generation), and the same preprocessors: tokenize (keeping *_pretokenized),
record the untrimmed lengths, append EOS after trimming (seqio's default),
and tag every target token with the task's id ('task_ids'), which the
pipeline turns into a per-batch task index. seqio names are
f'mtjax.{vocab key}.{plain name}', so several vocabularies coexist.

Real held-out tasks follow T0 (Sanh et al., 2022, arXiv:2110.08207) and
BLOOMZ/mT0 (Muennighoff et al., 2023, arXiv:2211.01786): one rank
classification task per (dataset, promptsource template), scored by median
or mean over templates.
"""
import bz2
import collections
import csv
import dataclasses
import functools
import json
import logging
import os
import pathlib
import re
import zlib
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import seqio
import tensorflow as tf

from mtjax.data import si_tasks, suite
from mtjax.data import templates as templates_lib
from mtjax.data import vocab as vocab_lib

XCOPA_LANGS = ("et", "ht", "id", "it", "qu", "sw", "ta", "th", "tr", "vi", "zh")
SUPERGLUE = {"cb": "CB", "copa": "COPA", "rte": "RTE", "wsc": "WSC",
             "boolq": "BoolQ"}
SUPERGLUE_TEMPLATES = {"cb": "super_glue/cb", "copa": "super_glue/copa",
                       "rte": "super_glue/rte", "wsc": "super_glue/wsc.fixed",
                       "boolq": "super_glue/boolq"}
MC_TEMPLATES = {"winogrande": "winogrande/winogrande_xl", "piqa": "piqa",
                "arc_easy": "ai2_arc/ARC-Easy",
                "arc_challenge": "ai2_arc/ARC-Challenge",
                "openbook_qa": "openbookqa/main", "siqa": None,
                "commonsense_qa": "commonsense_qa", "hellaswag": "hellaswag"}
SHUFFLE_BUFFER = 256  # after preprocessing; sources reshuffle fully


class BadRowError(ValueError):
  """A data file row that cannot be used; the message names file and line."""


# ------------------------------------------------------------------ metrics


def accuracy(targets: Sequence[str], predictions: Sequence[str]):
  """Exact-match fraction in [0, 1] (whitespace-stripped); seqio signature."""
  if len(targets) != len(predictions):
    raise ValueError(f"{len(targets)} targets but {len(predictions)} "
                     "predictions")
  hits = [str(t).strip() == str(p).strip()
          for t, p in zip(targets, predictions, strict=True)]
  return {"accuracy": float(np.mean(hits)) if hits else float("nan")}


# ------------------------------------------------------------------ readers


def _bad(path, line, why, on_bad_row, skipped):
  message = f"{path}:{line}: {why}"
  if on_bad_row == "skip":
    if skipped is not None:
      skipped[why.split(":")[0]] += 1
    logging.warning("skipping %s", message)
    return
  raise BadRowError(message + " (set on_bad_row='skip' to count and skip)")


def read_jsonl(path, on_bad_row="error", skipped=None) -> List[Tuple[int, dict]]:
  """[(line number, row dict)]; malformed lines raise or are counted+skipped."""
  rows = []
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        _bad(path, n, f"malformed JSON: {e.msg} at column {e.colno}",
             on_bad_row, skipped)
        continue
      if not isinstance(row, dict):
        _bad(path, n, f"malformed JSON: expected an object, got "
             f"{type(row).__name__}", on_bad_row, skipped)
        continue
      rows.append((n, row))
  return rows


def read_tsv(path, on_bad_row="error", skipped=None) -> List[Tuple[int, dict]]:
  """[(line number, row dict)] from a TSV with a header line."""
  rows = []
  with open(path, encoding="utf-8", newline="") as f:
    reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
    header = next(reader)
    for n, cells in enumerate(reader, start=2):
      if len(cells) != len(header):
        _bad(path, n, f"malformed TSV: {len(cells)} cells, header has "
             f"{len(header)}", on_bad_row, skipped)
        continue
      rows.append((n, dict(zip(header, cells, strict=True))))
  return rows


def read_hellaswag(path, on_bad_row="error", skipped=None):
  """HellaSwag .txt(.bz2): 6 lines per item (label: context, gold, 4 endings)."""
  opener = bz2.open if str(path).endswith(".bz2") else open
  with opener(path, "rt", encoding="utf-8") as f:
    lines = f.read().split("\n")
  rows = []
  for start in range(0, len(lines) - 5, 6):
    head, gold, *endings = lines[start:start + 6]
    activity, sep, ctx = head.partition(": ")
    if not sep or not gold.strip().isdigit():
      _bad(path, start + 1, "malformed HellaSwag item: expected "
           "'activity: context' then a gold index", on_bad_row, skipped)
      continue
    rows.append((start + 1, dict(activity_label=activity, ctx=ctx,
                                 endings=endings, label=gold.strip())))
  return rows


def read_json_list(path, on_bad_row="error", skipped=None):
  """[(item number, row dict)] from a file holding one JSON list of objects
  (the Soft Injection task files); items are numbered from 1."""
  with open(path, encoding="utf-8") as f:
    try:
      items = json.load(f)
    except json.JSONDecodeError as e:
      raise BadRowError(f"{path}:{e.lineno}: malformed JSON: {e.msg}; the "
                        "file must hold one list of objects") from e
  if not isinstance(items, list):
    raise BadRowError(f"{path}: expected a JSON list of objects, got "
                      f"{type(items).__name__}")
  rows = []
  for n, row in enumerate(items, start=1):
    if not isinstance(row, dict):
      _bad(path, n, f"malformed item: expected an object, got "
           f"{type(row).__name__}", on_bad_row, skipped)
      continue
    rows.append((n, row))
  return rows


READERS = {"jsonl": read_jsonl, "tsv": read_tsv, "hellaswag": read_hellaswag,
           "json_list": read_json_list}


# ------------------------------------------ row adapters (file -> HF fields)


def _letters(n):
  return [chr(ord("A") + i) for i in range(n)]


def _strip_prefix(text, prefix):
  text = text.strip()
  return text[len(prefix):].strip() if text.startswith(prefix) else text


def _parse_listed_choices(query):
  """'Question: q\\nChoices:\\nA. x\\nB. y\\nAnswer:' -> (q, [x, y])."""
  head, _, tail = query.partition("\nChoices:\n")
  choices = [m.group(1).strip() for m in
             re.finditer(r"^[A-Z]\. (.*)$", tail, flags=re.M)]
  return head, choices


def _superglue_row(name):
  labels = {"cb": ["entailment", "contradiction", "neutral"],
            "rte": ["entailment", "not_entailment"]}.get(name)

  def adapt(row):
    row = dict(row)
    if name == "wsc":
      row.update(row.pop("target"))
    if labels is not None:
      row["label"] = labels.index(row["label"])
    elif isinstance(row.get("label"), bool):
      row["label"] = int(row["label"])
    return row
  return adapt


def _mc_row(name):
  """llm-foundry rows -> the HF fields promptsource's templates read."""
  def adapt(row):
    if name == "hellaswag":  # read_hellaswag yields the HF fields already
      return dict(row)
    gold = int(row["gold"])
    if name == "piqa":
      return dict(goal=_strip_prefix(row["query"], "Question:"),
                  sol1=row["choices"][0], sol2=row["choices"][1], label=gold)
    if name in ("arc_easy", "arc_challenge", "openbook_qa"):
      labels = _letters(len(row["choices"]))
      key = "question_stem" if name == "openbook_qa" else "question"
      return {key: _strip_prefix(row["query"], "Question:"),
              "choices": dict(text=list(row["choices"]), label=labels),
              "answerKey": labels[gold]}
    if name == "commonsense_qa":
      question, texts = _parse_listed_choices(row["query"])
      labels = _letters(len(texts))
      return dict(question=_strip_prefix(question, "Question:"),
                  choices=dict(text=texts, label=labels),
                  answerKey=labels[gold])
    if name == "winogrande":
      a, b = row["context_options"]
      prefix = a[:len(_common_prefix(a, b))]
      prefix = prefix[:prefix.rfind(" ") + 1] if " " in prefix else ""
      rest = row["continuation"]
      joiner = "" if rest[:1] in ",.;:!?'" else " "
      return dict(sentence=prefix + "_" + joiner + rest,
                  option1=a[len(prefix):], option2=b[len(prefix):],
                  answer=str(gold + 1))
    raise KeyError(name)
  return adapt


def _common_prefix(a, b):
  n = 0
  while n < min(len(a), len(b)) and a[n] == b[n]:
    n += 1
  return a[:n]


def _plain_mc_row(name):
  """The choice format (llm-foundry): inputs = query, choices as given."""
  def adapt(row):
    if name == "hellaswag":
      return dict(inputs=f"{row['activity_label']}: {row['ctx']}",
                  answer_choices=row["endings"], label=int(row["label"]))
    return dict(inputs=row["query"].strip(),
                answer_choices=list(row["choices"]), label=int(row["gold"]))
  return adapt


# lm-evaluation-harness's cause/effect connectors for COPA and XCOPA.
_CONNECTORS = {
    "en": ("because", "therefore"), "et": ("sest", "seetõttu"),
    "ht": ("poukisa", "donk sa"), "id": ("karena", "maka"),
    "it": ("perché", "quindi"), "qu": ("imataq", "chaymi"),
    "sw": ("kwa sababu", "kwa hiyo"), "ta": ("காரணமாக", "எனவே"),
    "th": ("เพราะ", "ดังนั้น"), "tr": ("çünkü", "bu yüzden"),
    "vi": ("bởi vì", "vì vậy"), "zh": ("因为", "所以"),
}


def _lower_first(text):
  return text[:1].lower() + text[1:]


def _plain_copa_row(lang):
  """lm-eval's (X)COPA: 'premise-without-period connector' + ' choice'."""
  cause, effect = _CONNECTORS[lang]

  def adapt(row):
    conn = cause if row["question"] == "cause" else effect
    return dict(inputs=f"{row['premise'].strip()[:-1]} {conn}",
                answer_choices=[_lower_first(row["choice1"]),
                                _lower_first(row["choice2"])],
                label=int(row["label"]))
  return adapt


def _plain_superglue_row(name):
  """lm-eval's zero-shot SuperGLUE prompts (BoolQ, CB, RTE, WSC; COPA above)."""
  if name == "copa":
    return _plain_copa_row("en")
  base = _superglue_row(name)

  def adapt(row):
    row = base(row)
    if name == "boolq":
      return dict(inputs=f"{row['passage']}\nQuestion: {row['question']}?"
                  "\nAnswer:", answer_choices=["no", "yes"], label=row["label"])
    if name == "cb":
      return dict(inputs=f"{row['premise']}\nQuestion: {row['hypothesis']}. "
                  "True, False, or Neither?\nAnswer:",
                  answer_choices=["True", "False", "Neither"],
                  label=row["label"])
    if name == "rte":
      return dict(inputs=f"{row['premise']}\nQuestion: {row['hypothesis']} "
                  "True or False?\nAnswer:", answer_choices=["True", "False"],
                  label=row["label"])
    if name == "wsc":
      return dict(inputs=f"Passage: {row['text']}\nQuestion: In the passage "
                  f"above, does the pronoun \"*{row['span2_text']}*\" refer to "
                  f"\"*{row['span1_text']}*\"?\nAnswer:",
                  answer_choices=["no", "yes"], label=row["label"])
    raise KeyError(name)
  return adapt


# The Soft Injection paper's "pick one of the listed words" tasks (inputs
# 'w1, w2, w3'), as rank classification over the listed words with an
# instruction naming the rule: short prompts whose tasks share one input
# format and differ only in the rule, so a merged model must read the
# instruction (what merging experiments measure). The instructions are ours.
WORD_CHOICE = {
    "choose_first_of": "Which word comes first in the list?",
    "choose_middle_of": "Which word is in the middle of the list?",
    "choose_last_of": "Which word comes last in the list?",
    "alphabetically_first": "Which word comes first in alphabetical order?",
    "alphabetically_last": "Which word comes last in alphabetical order?",
    "animal_v_object": "Which word names an animal?",
    "color_v_animal": "Which word names a colour?",
    "fruit_v_animal": "Which word names a fruit?",
    "object_v_concept": "Which word names a physical object?",
    "concept_v_object": "Which word names an abstract concept?",
    "verb_v_adjective": "Which word is a verb?",
    "adjective_v_verb": "Which word is an adjective?",
}


def word_choice_task(folder_name: str) -> Optional[str]:
  """The WORD_CHOICE rule of a Soft Injection task folder ('choose_first_of_3'
  -> 'choose_first_of'), or None for the tasks that are not word choices."""
  rule, _, n = folder_name.rpartition("_")
  return rule if rule in WORD_CHOICE and n in ("3", "5") else None


def _word_choice_row(rule):
  def adapt(row):
    words = [w.strip() for w in str(row["input"]).split(",")]
    return dict(inputs=f"{WORD_CHOICE[rule]}\nWords: {', '.join(words)}"
                "\nAnswer:", answer_choices=words,
                label=words.index(str(row["output"]).strip()))
  return adapt


# ------------------------------------------------------- file task specs


@dataclasses.dataclass(frozen=True)
class FileTask:
  """A rank-classification task rendered from local files.

  files: {split: path}; reader: 'jsonl' | 'tsv' | 'hellaswag'; adapt maps a
  file row to the fields the template reads (or, with template None, to
  inputs / answer_choices / label directly). on_bad_row / on_empty_target:
  'error' (default: raise naming file and line) or 'skip' (count, log, skip).
  """
  name: str
  files: Tuple[Tuple[str, str], ...]
  reader: str
  adapt: Callable[[dict], dict]
  template: Optional[templates_lib.Template] = None
  on_bad_row: str = "error"
  on_empty_target: str = "error"
  # Generation tasks scored by the Soft Injection paper's exact match
  # (si_tasks.ExactMatch of this task folder) instead of plain accuracy.
  si_match: Optional[str] = None

  def __hash__(self):
    return hash((self.name, self.files, self.reader,
                 self.template.id if self.template else None,
                 self.on_bad_row, self.on_empty_target, self.si_match))


# Splits carved out of a dataset's validation file, for experiments that train
# on some of a dataset and evaluate on the rest (the MC dev sets have no train
# file): a row goes to 'val_test' when crc32('<line number>') % 5 == 0 (about
# 20%), else to 'val_train'. The split depends on the line number only, so
# every template of a dataset sees the same rows on the same side.
DERIVED_SPLITS = ("val_train", "val_test")


def in_derived_split(split: str, line: int) -> bool:
  """Whether file line `line` of a validation file belongs to `split`."""
  test = zlib.crc32(str(line).encode()) % 5 == 0
  return test if split == "val_test" else not test


def splits_share_rows(a: str, b: str) -> bool:
  """Whether two split names can hold the same rows of a file task: the
  same split, or 'validation' and one of DERIVED_SPLITS (cut from it)."""
  pair = {a, b}
  return a == b or ("validation" in pair and bool(pair & set(DERIVED_SPLITS)))


def splits_of(task: "FileTask") -> List[str]:
  """The task's file splits, plus DERIVED_SPLITS when it has 'validation'."""
  splits = [s for s, _ in task.files]
  return splits + (list(DERIVED_SPLITS) if "validation" in splits else [])


def render(task: FileTask, split: str, max_rows: Optional[int] = None):
  """(examples, skipped Counter) for split; examples are suite-style dicts."""
  files = dict(task.files)
  path = files["validation" if split in DERIVED_SPLITS else split]
  skipped = collections.Counter()
  examples = []
  rows = (_read_cached(task.reader, path) if task.on_bad_row == "error"
          else READERS[task.reader](path, task.on_bad_row, skipped))
  if split in DERIVED_SPLITS:
    rows = [(line, row) for line, row in rows if in_derived_split(split, line)]
  for line, row in rows[:max_rows]:
    where = f"{path}:{line}"
    try:
      fields = task.adapt(row)
    except (KeyError, IndexError, ValueError, TypeError) as e:
      _bad(path, line, f"malformed row: cannot read field {e}",
           task.on_bad_row, skipped)
      continue
    if task.template is None:
      inputs, choices = fields["inputs"], list(fields["answer_choices"])
      targets = choices[fields["label"]] if 0 <= fields["label"] < len(
          choices) else fields.get("targets", "")
    else:
      inputs, targets, choices = task.template.apply(fields, key=line,
                                                     where=where)
      if not inputs and not targets:  # template does not apply to this row
        skipped["template does not apply"] += 1
        continue
    if not targets.strip():
      _bad(path, line, f"empty target (task {task.name})",
           task.on_empty_target, skipped)
      continue
    choices = choices or []
    if choices and targets not in choices:
      raise BadRowError(
          f"{where}: target {targets!r} of task {task.name} is not one of "
          f"its answer_choices {choices}")
    examples.append(dict(inputs=inputs, targets=targets,
                         answer_choices=choices,
                         label=choices.index(targets) if choices else -1))
  if skipped:
    logging.info("task %s %s: skipped %s", task.name, split, dict(skipped))
  return examples, skipped


_render_cached = functools.lru_cache(maxsize=None)(render)


# ----------------------------------------------------------- seqio plumbing


def task_id(plain_name: str) -> int:
  """Stable positive id of a task (crc32 of its plain name), never 0."""
  return zlib.crc32(plain_name.encode()) % (2**31 - 2) + 1


def output_features(vocab):
  """EOS after both features (T5/seqio); after the target only for LMs."""
  lm = vocab_lib.lm_format(vocab)
  return {"inputs": seqio.Feature(vocabulary=vocab, add_eos=not lm,
                                  required=True),
          "targets": seqio.Feature(vocabulary=vocab, add_eos=True,
                                   required=True)}


def _record_lengths(dataset, input_eos=1):
  """Untrimmed lengths (EOS included), so the pipeline can refuse truncation."""
  def fn(ex):
    return dict(ex, inputs_length=tf.size(ex["inputs"]) + input_eos,
                targets_length=tf.size(ex["targets"]) + 1)
  return dataset.map(fn, num_parallel_calls=tf.data.AUTOTUNE)


def answer_delimiter(context: str, answer: str) -> str:
  """What joins a prompt and its answer for a decoder-only LM: one space, as
  lm-evaluation-harness's target_delimiter, unless either side already has
  whitespace there. The space belongs to the answer (its first token)."""
  if not context or context[-1:].isspace() or answer[:1].isspace():
    return ""
  return " "


def _lm_delimit(dataset):
  """targets and answer_choices get their leading space (answer_delimiter)."""
  def delimit(context, answers):
    glue = tf.logical_not(tf.logical_or(
        tf.strings.regex_full_match(context, r"(?s)(.*\s)?"),
        tf.strings.regex_full_match(answers, r"(?s)\s.*")))
    return tf.where(glue, tf.strings.join([" ", answers]), answers)

  def fn(ex):
    out = dict(ex, targets=delimit(ex["inputs"], ex["targets"]))
    if "answer_choices" in ex:
      out["answer_choices"] = delimit(ex["inputs"], ex["answer_choices"])
    return out
  return dataset.map(fn, num_parallel_calls=tf.data.AUTOTUNE)


def _prepend_bos(dataset, bos_id):
  def fn(ex):
    return dict(ex, inputs=tf.concat([[bos_id], ex["inputs"]], 0))
  return dataset.map(fn, num_parallel_calls=tf.data.AUTOTUNE)


def _add_task_ids(dataset, task_id_value):
  def fn(ex):
    return dict(ex, task_ids=tf.fill(tf.shape(ex["targets"]),
                                     tf.constant(task_id_value, tf.int32)))
  return dataset.map(fn, num_parallel_calls=tf.data.AUTOTUNE)


_CHOICE_SEP = "\x1f"  # ASCII unit separator: joins answer_choices in tensors


def examples_dataset(rows_fn):
  """seqio dataset_fn over python rows (a list per split, built lazily).

  With shuffle_files it reshuffles all rows every epoch (seeded), which is
  cheap on raw strings, so the Task's buffer after preprocessing can stay
  small (SHUFFLE_BUFFER) and the first batch comes quickly.
  """
  def dataset_fn(split, shuffle_files, seed=None):
    rows = rows_fn(split)
    columns = dict(
        inputs=[ex["inputs"] for ex in rows],
        targets=[ex["targets"] for ex in rows],
        answer_choices=[_CHOICE_SEP.join(ex["answer_choices"]) for ex in rows],
        label=np.asarray([ex["label"] for ex in rows], np.int32))
    ds = tf.data.Dataset.from_tensor_slices(
        {k: tf.constant(v, tf.string if k != "label" else tf.int32)
         for k, v in columns.items()})
    if shuffle_files:
      ds = ds.shuffle(len(rows), seed=seed, reshuffle_each_iteration=True)
    return ds.map(_split_choices, num_parallel_calls=tf.data.AUTOTUNE)
  dataset_fn.rows_fn = rows_fn
  return dataset_fn


def _split_choices(ex):
  parts = tf.strings.split(ex["answer_choices"], _CHOICE_SEP)
  parts = tf.boolean_mask(parts, tf.strings.length(parts) > 0)
  return dict(ex, answer_choices=parts)


class InMemorySource(seqio.FunctionDataSource):
  """A FunctionDataSource over rows held in memory (see examples_dataset).

  It reports no num_input_examples on purpose: seqio would then cache the
  first epoch in memory and replay its order; num_rows(split) gives sizes.
  FunctionDataSource's warning about file-level shuffling does not apply.
  """

  def __init__(self, rows_fn, splits, num_rows_fn=None):
    super().__init__(examples_dataset(rows_fn), splits=splits)
    self._rows_fn = rows_fn
    self._num_rows_fn = num_rows_fn

  def num_rows(self, split: str) -> int:
    if self._num_rows_fn is not None:
      return self._num_rows_fn(split)
    return len(self._rows_fn(split))

  def get_dataset(self, split="train", shuffle=True, seed=None,
                  shard_info=None, **unused):
    if shard_info and shard_info.num_shards > 1:
      raise ValueError("shard after reading: InMemorySource is one shard")
    return self._dataset_fn(split=split, shuffle_files=shuffle, seed=seed)


def _chat_format(dataset, vocab):
  """inputs -> one user turn of the vocabulary's chat template + the
  generation prompt (the answer then follows the assistant header)."""
  def chat(text):
    return vocab.chat(text.decode("utf-8")).encode("utf-8")

  def fn(ex):
    out = tf.numpy_function(chat, [ex["inputs"]], tf.string, stateful=False)
    return dict(ex, inputs=tf.ensure_shape(out, []))
  return dataset.map(fn, num_parallel_calls=tf.data.AUTOTUNE)


def add_task(seqio_name, plain, source, vocab, metric_fns=(accuracy,),
             extra_preprocessors=(), chat: bool = False):
  """Registers a Task with the shared preprocessors (no-op if present).

  chat=True renders each prompt with the vocabulary's chat template (an
  instruct model's jinja2 template, `HFTokenizerVocabulary.chat`).
  """
  if seqio_name in seqio.TaskRegistry.names():
    return seqio.TaskRegistry.get(seqio_name)
  lm = vocab_lib.lm_format(vocab)
  if chat and not getattr(vocab, "chat_template", None):
    raise ValueError(f"task {plain}: chat=True needs a vocabulary with a chat "
                     f"template; {vocab_lib.key(vocab)} has none (use an "
                     "instruct model's tokenizer: gguf: or hf: spec)")
  chat_step = [functools.partial(_chat_format, vocab=vocab)] if chat else []
  bos = getattr(vocab, "bos_id", None) if lm else None
  return seqio.TaskRegistry.add(
      seqio_name, source=source,
      preprocessors=[*extra_preprocessors, *chat_step,
                     *([_lm_delimit] if lm else []),
                     seqio.preprocessors.tokenize,
                     *([functools.partial(_prepend_bos, bos_id=bos)]
                       if bos is not None else []),
                     functools.partial(_record_lengths, input_eos=int(not lm)),
                     seqio.preprocessors.append_eos_after_trim,
                     functools.partial(_add_task_ids,
                                       task_id_value=task_id(plain))],
      output_features=output_features(vocab), metric_fns=list(metric_fns),
      shuffle_buffer_size=SHUFFLE_BUFFER)


def seqio_name(vocab, plain: str) -> str:
  return f"mtjax.{vocab_lib.key(vocab)}.{plain}"


def plain_name(name: str) -> str:
  """'mtjax.<vocab key>.<plain>' -> '<plain>'; plain names pass through."""
  return name.split(".", 2)[2] if name.startswith("mtjax.") else name


def register_file_task(task: FileTask, vocab, chat: bool = False) -> str:
  """Registers a FileTask (rows rendered on first use); returns seqio name.

  chat=True registers '<task>.chat': prompts in the chat template.
  """
  source = InMemorySource(lambda split: _render_cached(task, split)[0],
                          splits_of(task))
  plain = task.name + (".chat" if chat else "")
  name = seqio_name(vocab, plain)
  metrics = ((si_tasks.ExactMatch(task.si_match),) if task.si_match
             else (accuracy,))
  add_task(name, plain, source, vocab, metric_fns=metrics, chat=chat)
  return name


class TfdsSource(seqio.TfdsDataSource):
  """seqio.TfdsDataSource that tolerates missing split metadata.

  Under tfds.testing.mock_data (and for builders without generated
  dataset_info) split sizes and files are unknown; seqio asks for them only
  to decide on in-memory caching and on where to shard, so unknown means
  'do not cache' and 'shard the examples' rather than a crash.
  """

  def num_input_examples(self, split):
    try:
      return super().num_input_examples(split)
    except KeyError:
      return None

  def list_shards(self, split):
    try:
      return super().list_shards(split)
    except KeyError:  # unknown files: one shard, seqio shards the examples
      return [split]


def register_tfds_task(plain: str, tfds_name: str, vocab,
                       to_text: Callable[[dict], dict],
                       answer_choices: Sequence[str] = (),
                       splits=("train", "test"), tfds_data_dir=None) -> str:
  """A Task over a tensorflow-datasets dataset via seqio.TfdsDataSource.

  to_text(tf example) -> {'inputs': tf.string, 'targets': tf.string} (tf ops);
  answer_choices, when given, are fixed for every example (classification).
  splits: the tfds splits the task offers (seqio cannot list them offline).
  """
  choices = tf.constant(list(answer_choices), tf.string) if answer_choices \
      else tf.zeros([0], tf.string)
  choice_list = list(answer_choices)

  def to_example(dataset):
    def fn(ex):
      text = to_text(ex)
      label = tf.constant(-1, tf.int32)
      if choice_list:
        label = tf.cast(tf.argmax(tf.cast(tf.equal(choices, text["targets"]),
                                          tf.int32)), tf.int32)
      return dict(inputs=text["inputs"], targets=text["targets"],
                  answer_choices=choices, label=label)
    return dataset.map(fn, num_parallel_calls=tf.data.AUTOTUNE)

  source = TfdsSource(tfds_name=tfds_name, splits=list(splits),
                                tfds_data_dir=tfds_data_dir)
  name = seqio_name(vocab, plain)
  add_task(name, plain, source, vocab, extra_preprocessors=[to_example])
  return name


def examples_proportional_rates(task_names: Sequence[str], cap: int,
                                split: str = "train") -> Dict[str, float]:
  """T0/xP3-style rates: min(number of examples, cap) per seqio task."""
  rates = {}
  for name in task_names:
    task = seqio.get_mixture_or_task(name)
    n = (task.source.num_rows(split) if isinstance(task.source, InMemorySource)
         else task.num_input_examples(split))
    if n is None:
      raise ValueError(f"task {name} does not know its number of {split} "
                       "examples; pass explicit rates")
    rates[name] = float(min(n, cap))
  return rates


def add_mixture(seqio_name_: str, rates: Dict[str, float]) -> str:
  """A seqio.Mixture with explicit rates {seqio task name: rate}."""
  if seqio_name_ not in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.add(seqio_name_, list(rates.items()))
  return seqio_name_


# -------------------------------------------------------------- register


@dataclasses.dataclass(frozen=True)
class _Spec:  # a real dataset: files and the templates to render it with
  dataset: str
  files: Tuple[Tuple[str, str], ...]
  reader: str
  adapt: Callable[[dict], dict]
  fields: frozenset
  template_file: Optional[pathlib.Path]
  plain_adapt: Optional[Callable[[dict], dict]] = None


def _specs(data_dir: pathlib.Path) -> List[_Spec]:
  ps = data_dir / "promptsource" / "templates"
  xp3 = data_dir / "promptsource-xp3mt" / "templates"
  copa = frozenset(["premise", "choice1", "choice2", "question", "label",
                    "idx"])
  out = []
  for lang in XCOPA_LANGS:
    for kind, folder in (("xcopa", "data"), ("xcopa_gmt", "data-gmt")):
      d = data_dir / "xcopa" / folder / lang
      files = tuple((s, str(d / f"{f}.{lang}.jsonl"))
                    for s, f in (("validation", "val"), ("test", "test"))
                    if (d / f"{f}.{lang}.jsonl").exists())
      if files:
        out.append(_Spec(f"{kind}.{lang}", files, "jsonl", dict, copa,
                         ps / "super_glue/copa/templates.yaml",
                         _plain_copa_row("en" if kind == "xcopa_gmt"
                                         else lang)))
        if kind == "xcopa":
          out.append(_Spec(f"xcopa_mt.{lang}", files, "jsonl", dict, copa,
                           xp3 / "xcopa" / lang / "templates.yaml"))
  sg_fields = {"cb": ["premise", "hypothesis", "label"], "copa": copa,
               "rte": ["premise", "hypothesis", "label"],
               "wsc": ["text", "span1_index", "span2_index", "span1_text",
                       "span2_text", "label"],
               "boolq": ["question", "passage", "label"]}
  for name, folder in SUPERGLUE.items():
    d = data_dir / "superglue" / folder
    files = tuple((s, str(d / f)) for s, f in
                  (("validation", "val.jsonl"), ("train", "train.jsonl"))
                  if (d / f).exists())
    if files:
      out.append(_Spec(name, files, "jsonl", _superglue_row(name),
                       frozenset(sg_fields[name]),
                       ps / SUPERGLUE_TEMPLATES[name] / "templates.yaml",
                       _plain_superglue_row(name)))
  mc_fields = {"winogrande": ["sentence", "option1", "option2", "answer"],
               "piqa": ["goal", "sol1", "sol2", "label"],
               "arc_easy": ["question", "choices", "answerKey"],
               "arc_challenge": ["question", "choices", "answerKey"],
               "openbook_qa": ["question_stem", "choices", "answerKey"],
               "commonsense_qa": ["question", "choices", "answerKey"],
               "hellaswag": ["activity_label", "ctx", "endings", "label"],
               "siqa": []}
  for name, folder in MC_TEMPLATES.items():
    reader = "hellaswag" if name == "hellaswag" else "jsonl"
    path = data_dir / "mc" / ("hellaswag_val_full.txt.bz2"
                              if name == "hellaswag" else f"{name}.jsonl")
    if path.exists():
      out.append(_Spec(name, (("validation", str(path)),), reader,
                       _mc_row(name), frozenset(mc_fields[name]),
                       ps / folder / "templates.yaml" if folder else None,
                       None if name == "winogrande" else _plain_mc_row(name)))
  si = data_dir / "soft_injection_tasks"
  for folder in sorted(si.iterdir()) if si.is_dir() else ():
    rule = word_choice_task(folder.name)
    files = tuple((s, str(folder / f"{f}.json")) for s, f in
                  (("train", "train"), ("validation", "valid"),
                   ("test", "test")) if (folder / f"{f}.json").exists())
    if rule and files:
      out.append(_Spec(f"si_{folder.name}", files, "json_list", dict,
                       frozenset(), None, _word_choice_row(rule)))
  return out


def _slug(text):
  return re.sub(r"[^0-9a-z]+", "_", text.lower()).strip("_") or "t"


@functools.lru_cache(maxsize=None)
def _templates(path):
  return templates_lib.load(path) if path.exists() else {}


def usable_templates(spec_fields, path) -> List[templates_lib.Template]:
  """Rank-classification templates whose fields the rows provide."""
  out = []
  for t in _templates(path).values():
    original = t.metadata.original_task if t.metadata else None
    if t.answer_choices and original is not False and t.fields() <= spec_fields:
      out.append(t)
  return out


@functools.lru_cache(maxsize=None)
def _read_cached(reader, path):
  return READERS[reader](path)


def _applies(template, spec) -> bool:
  """Whether template renders at least one row of the spec's first split.

  Some templates apply to a subset (e.g. COPA's cause-only prompts), and
  some XCOPA languages (th, tr) have only 'effect' questions.
  """
  for line, row in _read_cached(spec.reader, spec.files[0][1]):
    inputs, _, _ = template.apply(spec.adapt(row), key=line)
    if inputs:
      return True
  return False


def real_tasks(data_dir) -> Dict[str, List[FileTask]]:
  """{dataset: [FileTask per template]} for what exists under data_dir."""
  data_dir = pathlib.Path(data_dir)
  if not data_dir.is_dir():
    return {}
  out = {}
  for spec in _specs(data_dir):
    tasks, seen = [], set()
    usable = (usable_templates(spec.fields, spec.template_file)
              if spec.template_file else [])
    for t in usable:
      if not _applies(t, spec):
        logging.info("%s: template %r renders no row; not registered",
                     spec.dataset, t.name)
        continue
      slug = _slug(t.name)
      while slug in seen:
        slug += "_"
      seen.add(slug)
      tasks.append(FileTask(f"{spec.dataset}.{slug}", spec.files, spec.reader,
                            spec.adapt, t))
    if spec.plain_adapt is not None:
      tasks.append(FileTask(f"{spec.dataset}.plain", spec.files, spec.reader,
                            spec.plain_adapt, None))
    if tasks:
      out[spec.dataset] = tasks
  out.update(si_qa_tasks(data_dir / "soft_injection_tasks"))
  return out


# Few-shot variants registered for every Soft Injection task (si_tasks).
SI_SHOTS = (10,)


def si_qa_tasks(si_dir: pathlib.Path) -> Dict[str, List[FileTask]]:
  """{'si_qa_<folder>': [its '.inst' task, its '.icl<k>' tasks]} for every
  Soft Injection task folder (si_tasks: the instruction + 'Q: x\nA:' format;
  word-choice folders rank-classify the listed words)."""
  out = {}
  for folder in sorted(si_dir.iterdir()) if si_dir.is_dir() else ():
    files = tuple((s, str(folder / f"{f}.json")) for s, f in
                  (("train", "train"), ("validation", "valid"),
                   ("test", "test")) if (folder / f"{f}.json").exists())
    if not files or si_tasks.rule_of(folder.name) not in si_tasks.INSTRUCTIONS:
      continue
    train = dict(files).get("train")
    rows = (functools.partial(_train_rows, train) if train else None)
    match = None if si_tasks.is_word_choice(folder.name) else folder.name
    name = si_tasks.dataset_name(folder.name)
    out[name] = [FileTask(f"{name}.inst", files, "json_list",
                          si_tasks.adapter(folder.name), si_match=match)]
    out[name] += [FileTask(f"{name}.icl{k}", files, "json_list",
                           si_tasks.adapter(folder.name, rows, k),
                           si_match=match) for k in SI_SHOTS if rows]
  return out


def _train_rows(path: str) -> List[dict]:
  return [row for _, row in _read_cached("json_list", path)]


@dataclasses.dataclass(frozen=True)
class Registered:
  """What register() put into seqio's registries for one vocabulary."""
  vocab_key: str
  held_in: List[str]
  held_out: List[str]
  real: Dict[str, List[str]]
  mixtures: List[str]
  names: Dict[str, str]

  def seqio_name(self, plain: str) -> str:
    if plain in self.names:
      return self.names[plain]
    if plain in self.names.values():
      return plain
    raise KeyError(f"{plain!r} is not registered for vocabulary "
                   f"{self.vocab_key!r}; known: {sorted(self.names)[:20]}...")


def default_data_dir() -> pathlib.Path:
  """$MTJAX_DATA_DIR, else <repo>/../shared/data (may not exist)."""
  if os.environ.get("MTJAX_DATA_DIR"):
    return pathlib.Path(os.environ["MTJAX_DATA_DIR"])
  return pathlib.Path(__file__).resolve().parents[2].parent / "shared" / "data"


def register(vocab, data_dir=None, cap: int = 3000):
  """Registers suite (seed 0) + real tasks + mixtures for vocab (idempotent).

  Mixtures 'held_in', 'held_out', 'suite' mix examples-proportionally with
  rates min(train size, cap) (T0/xP3 style).
  """
  data_dir = pathlib.Path(data_dir) if data_dir else default_data_dir()
  names = {}
  for plain in suite.TASKS:
    # Sizes without generating the rows: mixing rates need only train's.
    source = InMemorySource(functools.partial(_suite_rows, plain),
                            list(suite.SPLIT_SIZES),
                            functools.partial(suite.num_examples, plain))
    names[plain] = seqio_name(vocab, plain)
    add_task(names[plain], plain, source, vocab)
  real = {}
  for dataset, tasks in real_tasks(data_dir).items():
    real[dataset] = [t.name for t in tasks]
    for t in tasks:
      names[t.name] = register_file_task(t, vocab)
  groups = {"held_in": list(suite.HELD_IN), "held_out": list(suite.HELD_OUT),
            "suite": list(suite.TASKS)}
  for mix, members in groups.items():
    rates = examples_proportional_rates([names[m] for m in members], cap)
    names[mix] = add_mixture(seqio_name(vocab, mix), rates)
  return Registered(vocab_key=vocab_lib.key(vocab),
                        held_in=list(suite.HELD_IN),
                        held_out=list(suite.HELD_OUT), real=real,
                        mixtures=list(groups), names=names)


def _suite_rows(plain, split):
  return suite.examples(plain, split)
