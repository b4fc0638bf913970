"""The Soft Injection paper's 57 tasks as prompted zero-shot / few-shot tasks.

Park et al. 2025 ("Soft Head Selection for Injecting ICL-Derived Task
Embeddings"; data from Todd et al.'s function vectors) release 57 tasks as
lists of {"input", "output"} pairs with train/valid/test files
(../shared/data/soft_injection_tasks). The paper's prompt is
'Q: {input}\\nA: {output}'; here each task also gets a one-line instruction
naming it (ours: `INSTRUCTIONS`), because without demonstrations many tasks
share their inputs ('Q: opinion' may ask for French, German, an antonym, a
plural ...) and a zero-shot row could not know which was meant:

  inst    '{instruction}\\nQ: {input}\\nA:'  -> ' {output}'
  icl<k>  the instruction, k demonstrations 'Q: x\\nA: y\\n\\n' drawn from the
          task's train file (seeded by the query, never the query itself),
          then 'Q: {input}\\nA:'

Word-choice tasks (pick one of the listed words) are rank classification
over the listed words; every other task is generation, scored by the paper's
exact match (`normalize`, `match`): strip, first line, cut at '(', 'St.'
read as 'Saint', lower-cased except for the capitalize*/lowercase* tasks,
the output's first len(target) characters compared (the reference code).

FAMILIES groups the tasks as the paper's analysis does (translation, letter
operations, word-choice rules, category choice, entity facts, lexical
relations, sequences, NER extraction, classification/QA), for protocols that
hold out a task while keeping its relatives.
"""
import json
import pathlib
import zlib
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

INSTRUCTIONS = {
    "adjective_v_verb": "Which word is an adjective?",
    "ag_news": "What is the topic of the news article?",
    "alphabetically_first": "Which word comes first in alphabetical order?",
    "alphabetically_last": "Which word comes last in alphabetical order?",
    "animal_v_object": "Which word names an animal?",
    "antonym": "Give the antonym of the word.",
    "capitalize": "Write the word with its first letter capitalised.",
    "capitalize_first_letter": "Write the first letter of the word in upper "
                               "case.",
    "capitalize_last_letter": "Write the last letter of the word in upper "
                              "case.",
    "capitalize_second_letter": "Write the second letter of the word in "
                                "upper case.",
    "choose_first_of": "Which word comes first in the list?",
    "choose_last_of": "Which word comes last in the list?",
    "choose_middle_of": "Which word is in the middle of the list?",
    "color_v_animal": "Which word names a colour?",
    "commonsense_qa": "Answer the question with the letter of the right "
                      "option.",
    "concept_v_object": "Which word names an abstract concept?",
    "conll2003_location": "Name the location mentioned in the sentence.",
    "conll2003_organization": "Name the organisation mentioned in the "
                              "sentence.",
    "conll2003_person": "Name the person mentioned in the sentence.",
    "country-capital": "What is the capital city of the country?",
    "country-currency": "What is the currency of the country?",
    "english-french": "Translate the English word into French.",
    "english-german": "Translate the English word into German.",
    "english-spanish": "Translate the English word into Spanish.",
    "fruit_v_animal": "Which word names a fruit?",
    "landmark-country": "In which country is this landmark?",
    "lowercase_first_letter": "Write the first letter of the word in lower "
                              "case.",
    "lowercase_last_letter": "Write the last letter of the word in lower "
                             "case.",
    "national_parks": "In which US state is this national park or site?",
    "next_capital_letter": "Write, in upper case, the letter that follows "
                           "the word's first letter in the alphabet.",
    "next_item": "What comes next in the sequence?",
    "object_v_concept": "Which word names a physical object?",
    "park-country": "In which country is this national park?",
    "person-instrument": "Which instrument does this musician play?",
    "person-occupation": "What is this person's occupation?",
    "person-sport": "Which sport does this person play?",
    "present-past": "Give the past tense of the verb.",
    "prev_item": "What comes before this in the sequence?",
    "product-company": "Which company makes this product?",
    "sentiment": "Is the sentiment of the sentence positive or negative?",
    "singular-plural": "Give the plural of the noun.",
    "squad_val": "Answer the question with a span of the passage.",
    "synonym": "Give a synonym of the word.",
    "verb_v_adjective": "Which word is a verb?",
    "word_length": "How many letters does the word have?",
}

WORD_CHOICE_RULES = ("adjective_v_verb", "alphabetically_first",
                     "alphabetically_last", "animal_v_object",
                     "choose_first_of", "choose_last_of", "choose_middle_of",
                     "color_v_animal", "concept_v_object", "fruit_v_animal",
                     "object_v_concept", "verb_v_adjective")

FAMILIES = {
    "translation": ("english-french", "english-german", "english-spanish"),
    "letters": ("capitalize", "capitalize_first_letter",
                "capitalize_last_letter", "capitalize_second_letter",
                "lowercase_first_letter", "lowercase_last_letter",
                "next_capital_letter"),
    "word_choice": ("choose_first_of", "choose_middle_of", "choose_last_of",
                    "alphabetically_first", "alphabetically_last"),
    "category": ("animal_v_object", "color_v_animal", "fruit_v_animal",
                 "object_v_concept", "concept_v_object", "verb_v_adjective",
                 "adjective_v_verb"),
    "entity_facts": ("country-capital", "country-currency",
                     "landmark-country", "national_parks", "park-country",
                     "person-instrument", "person-occupation", "person-sport",
                     "product-company"),
    "lexical": ("antonym", "synonym", "present-past", "singular-plural"),
    "sequence": ("next_item", "prev_item"),
    "counting": ("word_length",),
    "ner": ("conll2003_location", "conll2003_organization",
            "conll2003_person"),
    "classification": ("ag_news", "sentiment"),
    "qa": ("commonsense_qa", "squad_val"),
}


def rule_of(folder: str) -> str:
  """'choose_first_of_3' -> 'choose_first_of'; other folders unchanged."""
  head, _, n = folder.rpartition("_")
  return head if head in WORD_CHOICE_RULES and n in ("3", "5") else folder


def family_of(folder: str) -> str:
  """The FAMILIES key of a task folder or of its dataset (`dataset_name`)."""
  key = rule_of(folder.removeprefix(DATASET_PREFIX).replace("-", "_"))
  for fam, members in FAMILIES.items():
    if key in [m.replace("-", "_") for m in members]:
      return fam
  raise KeyError(f"Soft Injection task {folder!r} is in no family of "
                 f"{sorted(FAMILIES)}")


DATASET_PREFIX = "si_qa_"


def dataset_name(folder: str) -> str:
  """'country-capital' -> 'si_qa_country_capital' (seqio names allow no
  '-'); its tasks are '<dataset>.inst' and '<dataset>.icl10'."""
  return DATASET_PREFIX + folder.replace("-", "_")


def is_word_choice(folder: str) -> bool:
  return rule_of(folder) in WORD_CHOICE_RULES


def _text(value) -> str:
  return str(value).strip()


def query_text(instruction: str, query: str, demos: Sequence = ()) -> str:
  """'{instruction}\\n' + 'Q: x\\nA: y\\n\\n' per demo + 'Q: {query}\\nA:'."""
  shots = "".join(f"Q: {_text(d['input'])}\nA: {_text(d['output'])}\n\n"
                  for d in demos)
  return f"{instruction}\n{shots}Q: {_text(query)}\nA:"


def demos_for(train: List[dict], query: str, k: int) -> List[dict]:
  """k train rows for a query: a fixed draw seeded by the query text, never a
  row with the query's own input."""
  rng = np.random.default_rng(zlib.crc32(_text(query).encode()))
  pool = [train[i] for i in rng.permutation(len(train))[:k + 1]
          if _text(train[i]["input"]) != _text(query)]
  return pool[:k]


def adapter(folder: str, train: Optional[Callable[[], List[dict]]] = None,
            shots: int = 0) -> Callable[[dict], dict]:
  """Row {'input', 'output'} -> task fields (inputs, targets or
  answer_choices/label); `shots` demonstrations from the rows `train()`
  returns (read on first use) when > 0."""
  rule = rule_of(folder)
  instruction = INSTRUCTIONS[rule]
  if shots and train is None:
    raise ValueError(f"{folder}: {shots}-shot prompts need its train rows")

  def adapt(row):
    demos = demos_for(train(), row["input"], shots) if shots else ()
    inputs = query_text(instruction, row["input"], demos)
    if rule in WORD_CHOICE_RULES:
      words = [w.strip() for w in _text(row["input"]).split(",")]
      return dict(inputs=inputs, answer_choices=words,
                  label=words.index(_text(row["output"])))
    return dict(inputs=inputs, targets=_text(row["output"]),
                answer_choices=[], label=-1)
  return adapt


def normalize(text: str, task: str) -> str:
  """The reference evaluation's normalisation: the text stripped, then its
  first line ('St.' read as 'Saint'), cut at '(', stripped, lower-cased
  except for the capitalize*/lowercase* tasks (whose case is the answer)."""
  text = text.replace("St.", "Saint").strip().split("\n")[0]
  text = text.split("(")[0].strip()
  keep_case = "capitalize" in task.lower() or "lowercase" in task.lower()
  return text if keep_case else text.lower()


def match(prediction: str, target: str, task: str, prefix: bool = True
          ) -> bool:
  """Exact match after `normalize`; prefix=True compares the prediction's
  first len(target) characters, as the reference code does."""
  out, tgt = normalize(prediction, task), normalize(target, task)
  return (out[:len(tgt)] if prefix else out) == tgt


class ExactMatch:
  """seqio metric fn of a Soft Injection generation task; `.match` gives the
  per-example decision the evaluation uses for its intervals."""

  def __init__(self, task: str):
    self.task = task
    self.__name__ = f"si_exact_match[{task}]"

  def match(self, prediction: str, target: str) -> bool:
    return match(prediction, target, self.task)

  def __call__(self, targets: Sequence[str], predictions: Sequence[str]
               ) -> Dict[str, float]:
    hits = [self.match(p, t) for p, t in zip(predictions, targets,
                                             strict=True)]
    return {"si_exact_match": float(np.mean(hits)) if hits else 0.0}


FILES = {"train": "train.json", "validation": "valid.json",
         "test": "test.json"}


def folder_of(si_dir, dataset: str) -> str:
  """'si_qa_country_capital' -> 'country-capital' (the folder in si_dir)."""
  for folder in sorted(pathlib.Path(si_dir).iterdir()):
    if dataset_name(folder.name) == dataset:
      return folder.name
  raise KeyError(f"no Soft Injection task folder for {dataset!r} in {si_dir}")


def rows_of(si_dir, folder: str, split: str,
            max_rows: Optional[int] = None) -> List[dict]:
  """The {'input', 'output'} rows of a split file, in file order."""
  with open(pathlib.Path(si_dir) / folder / FILES[split]) as f:
    return json.load(f)[:max_rows]


def file_overlaps(si_dir, held_in: Sequence[str], held_out: Sequence[str],
                  held_out_rows: Optional[int] = None) -> dict:
  """What the held-out test rows share with the held-in train files.

  held_in / held_out: dataset names ('si_qa_...'); held_out_rows: the first
  rows of each test file that are scored. Inputs compare stripped and
  lower-cased, outputs as written (case is the answer of the capitalize*/
  lowercase* tasks). Returns {'held_out': {dataset: {'rows', 'input_seen' (test
  inputs found in some held-in train file), 'pair_seen' (the same input with
  the same output), 'by_task' {held-in dataset: inputs found there}}},
  'held_in': {'a|b': inputs shared by the train files of a and b}}.
  """
  key = lambda r: _text(r["input"]).lower()
  pair = lambda r: (key(r), _text(r["output"]))
  train = {d: rows_of(si_dir, folder_of(si_dir, d), "train") for d in held_in}
  inputs = {d: {key(r) for r in rows} for d, rows in train.items()}
  pairs = {d: {pair(r) for r in rows} for d, rows in train.items()}
  out = {"held_out": {}, "held_in": {}}
  for d in held_out:
    test = rows_of(si_dir, folder_of(si_dir, d), "test", held_out_rows)
    by_task = {h: sum(key(r) in inputs[h] for r in test) for h in held_in}
    out["held_out"][d] = {
        "rows": len(test),
        "input_seen": sum(any(key(r) in inputs[h] for h in held_in)
                          for r in test),
        "pair_seen": sum(any(pair(r) in pairs[h] for h in held_in)
                         for r in test),
        "by_task": {h: n for h, n in by_task.items() if n}}
  for i, a in enumerate(held_in):
    for b in held_in[i + 1:]:
      shared = len(inputs[a] & inputs[b])
      if shared:
        out["held_in"][f"{a}|{b}"] = shared
  return out
