"""The bundled offline multitask suite: short text-to-text tasks from a seed.

Each task is a natural-language instruction over a small synthetic problem,
short enough for byte-level models (inputs <= 64 bytes, targets <= 16 bytes).
Held-in tasks teach single skills; several held-out tasks compose them
(reverse_uppercase = reverse + uppercase, sort_descending = sort + reverse,
add_compare = add + compare, is_palindrome = reverse + copy), so zero-shot
transfer to them measures composition, as in T0 (Sanh et al., 2022,
arXiv:2110.08207) and FLAN's held-out task clusters (Wei et al., 2022).
Few-shot rendering follows MetaICL (Min et al., 2022, arXiv:2110.15943):
k training demonstrations (input, output) are concatenated before the query.

Examples are dicts: inputs, targets (str), answer_choices (list of str, empty
for generation tasks), label (index of targets in answer_choices, or -1).
"""
import functools
import string
import zlib
from typing import Callable, Dict, List, Optional

import numpy as np

SPLIT_SIZES = {"train": 2000, "validation": 200, "test": 200}
MAX_INPUT_BYTES = 64
MAX_TARGET_BYTES = 16

_POSITIVE = ["good", "great", "fun", "lovely", "superb", "warm", "bright",
             "happy", "clever", "charming", "moving", "fresh"]
_NEGATIVE = ["bad", "dull", "awful", "boring", "weak", "cold", "sad", "messy",
             "slow", "silly", "bland", "noisy"]
_NEUTRAL = ["film", "plot", "cast", "music", "story", "ending", "scene", "book"]


def _word(rng, lo=3, hi=9, alphabet=string.ascii_lowercase):
  return "".join(rng.choice(list(alphabet), size=rng.integers(lo, hi + 1)))


def _gen(rng, instruction, target):
  return dict(inputs=instruction, targets=target, answer_choices=[], label=-1)


def _cls(instruction, choices, label):
  return dict(inputs=instruction, targets=choices[label],
              answer_choices=list(choices), label=int(label))


def _copy(rng):
  w = _word(rng)
  return _gen(rng, f"Copy the word: {w}", w)


def _reverse(rng):
  w = _word(rng)
  return _gen(rng, f"Reverse the letters: {w}", w[::-1])


def _uppercase(rng):
  w = _word(rng)
  return _gen(rng, f"Write in uppercase: {w}", w.upper())


def _sort_letters(rng):
  w = _word(rng)
  return _gen(rng, f"Sort the letters: {w}", "".join(sorted(w)))


def _add(rng):
  a, b = rng.integers(0, 1000, size=2)
  return _gen(rng, f"What is {a} plus {b}?", str(a + b))


def _subtract(rng):
  a, b = sorted(rng.integers(0, 1000, size=2))[::-1]
  return _gen(rng, f"What is {a} minus {b}?", str(a - b))


def _compare(rng):
  a, b = rng.choice(1000, size=2, replace=False)
  return _cls(f"Which is larger, {a} or {b}?", [str(a), str(b)],
              int(b > a))


def _sentiment(rng):
  label = int(rng.integers(2))
  major, minor = (_POSITIVE, _NEGATIVE) if label else (_NEGATIVE, _POSITIVE)
  words = list(rng.choice(major, size=2, replace=False))
  words += [rng.choice(minor if rng.random() < 0.5 else _NEUTRAL),
            rng.choice(_NEUTRAL)]
  rng.shuffle(words)
  return _cls(f"Review: {' '.join(words)}. Positive or negative?",
              ["negative", "positive"], label)


def _parity(rng):
  n = int(rng.integers(0, 100000))
  return _cls(f"Is {n} even or odd?", ["even", "odd"], n % 2)


def _kv_lookup(rng):
  keys = rng.choice(list(string.ascii_lowercase), size=4, replace=False)
  vals = rng.integers(0, 10, size=4)
  q = int(rng.integers(4))
  pairs = ", ".join(f"{k}={v}" for k, v in zip(keys, vals, strict=True))
  return _gen(rng, f"Given {pairs}, what is {keys[q]}?", str(vals[q]))


def _list_max(rng):
  xs = rng.integers(0, 100, size=rng.integers(3, 7))
  return _gen(rng, f"Largest of {', '.join(map(str, xs))}?", str(xs.max()))


def _reverse_uppercase(rng):
  w = _word(rng)
  return _gen(rng, f"Reverse the letters, in uppercase: {w}", w[::-1].upper())


def _sort_descending(rng):
  w = _word(rng)
  return _gen(rng, f"Sort the letters in reverse: {w}",
              "".join(sorted(w))[::-1])


def _add_compare(rng):
  a, b = rng.integers(0, 500, size=2)
  c = int(a + b + rng.integers(-50, 51))
  return _cls(f"Is {a} plus {b} larger than {c}?", ["no", "yes"],
              int(a + b > c))


def _is_palindrome(rng):
  w = _word(rng, 2, 4, "abcdefgh")
  if rng.random() < 0.5:
    w = w + w[::-1][int(rng.integers(2)):]
  else:
    w = w + _word(rng, 1, 4, "abcdefgh")
  return _cls(f"Is {w} a palindrome?", ["no", "yes"], int(w == w[::-1]))


HELD_IN: Dict[str, Callable] = {
    "copy": _copy, "reverse": _reverse, "uppercase": _uppercase,
    "sort_letters": _sort_letters, "add": _add, "subtract": _subtract,
    "compare": _compare, "sentiment": _sentiment, "parity": _parity,
    "kv_lookup": _kv_lookup, "list_max": _list_max,
}
HELD_OUT: Dict[str, Callable] = {
    "reverse_uppercase": _reverse_uppercase,
    "sort_descending": _sort_descending,
    "add_compare": _add_compare,
    "is_palindrome": _is_palindrome,
}
TASKS: Dict[str, Callable] = {**HELD_IN, **HELD_OUT}
# Which held-in skills each held-out task composes (for analysis/plots).
COMPOSES = {"reverse_uppercase": ["reverse", "uppercase"],
            "sort_descending": ["sort_letters", "reverse"],
            "add_compare": ["add", "compare"],
            "is_palindrome": ["reverse", "copy"]}


def _rng(*parts) -> np.random.Generator:
  """A generator keyed by strings/ints, stable across processes and runs."""
  key = [zlib.crc32(str(p).encode()) for p in parts]
  return np.random.default_rng(key)


def _check_task(task):
  if task not in TASKS:
    raise KeyError(f"unknown suite task {task!r}; known: {sorted(TASKS)}")


@functools.lru_cache(maxsize=None)
def _examples(task: str, seed: int):
  """All splits of a task; evaluation inputs never occur in train."""
  _check_task(task)
  out, seen = {}, set()
  for split in ("train", "validation", "test"):
    rng, rows = _rng("suite", task, split, seed), []
    for _ in range(SPLIT_SIZES[split] * 50):
      if len(rows) == SPLIT_SIZES[split]:
        break
      ex = TASKS[task](rng)
      if split != "train" and ex["inputs"] in seen:
        continue
      rows.append(ex)
      if split == "train":
        seen.add(ex["inputs"])
    out[split] = tuple(rows)
  return out


def num_examples(task: str, split: str, seed: int = 0) -> int:
  """len(examples(task, split, seed)); train's without generating it (train
  never skips a row, so it always has SPLIT_SIZES['train'])."""
  _check_task(task)
  if split == "train":
    return SPLIT_SIZES["train"]
  return len(_examples(task, seed)[split])


def examples(task: str, split: str, seed: int = 0,
             max_examples: Optional[int] = None) -> List[dict]:
  """A fresh list of the split's examples (same seed -> same examples)."""
  rows = _examples(task, seed)
  if split not in rows:
    raise KeyError(f"unknown split {split!r}; use one of {list(rows)}")
  rows = rows[split][:max_examples]
  return [dict(ex, answer_choices=list(ex["answer_choices"])) for ex in rows]


def render_few_shot(demos: List[dict], query: dict) -> str:
  """MetaICL concatenation: 'x1\\ny1\\n\\n...xk\\nyk\\n\\nx'."""
  return "".join(f"{d['inputs']}\n{d['targets']}\n\n" for d in demos) + \
      query["inputs"]


def few_shot(task: str, k: int, seed: int, split: str = "validation",
             max_examples: Optional[int] = None, suite_seed: int = 0):
  """Examples of split with k train demonstrations each (sampled by seed)."""
  train = _examples(task, suite_seed)["train"]
  out = []
  for i, ex in enumerate(examples(task, split, suite_seed, max_examples)):
    idx = _rng("few_shot", task, split, seed, i).choice(
        len(train), size=k, replace=False)
    demos = [train[j] for j in idx]
    out.append(dict(ex, inputs=render_few_shot(demos, ex),
                    demonstrations=[dict(d) for d in demos]))
  return out
