"""Prompt templates in promptsource's format (Bach et al., 2022, arXiv:2202.01279).

The YAML files are read as they are: `!Template` and `!TemplateMetadata` tags
are registered on a yaml.SafeLoader subclass (no unsafe loading). A template's
`jinja` renders an example into 'input ||| target'; its `answer_choices` is a
Jinja expression rendered with the same example into 'a ||| b ||| ...'.
Rendering follows promptsource: '|||' inside field values is escaped before
rendering, parts are stripped, and the env has the `choice`/`random` and
`most_frequent` filters and `zip`. Unlike promptsource, randomness is seeded
per (template, example key) so renders are reproducible, and a field missing
from the example is an error (StrictUndefined) naming template, file, row and
field instead of rendering as an empty string.
"""
import collections
import dataclasses
import functools
import pathlib
import random
import re
import zlib
from typing import Any, Dict, List, Optional, Tuple

import jinja2
import jinja2.meta
import yaml

_SEP = "|||"
_ESCAPED_SEP = "\u241e\u241e\u241e"  # never in real text; restored after split


@dataclasses.dataclass
class TemplateMetadata:
  original_task: Optional[bool] = None
  choices_in_prompt: Optional[bool] = None
  metrics: Optional[List[str]] = None
  languages: Optional[List[str]] = None


class TemplateFieldError(KeyError):
  """A template referenced a field the example lacks."""

  def __str__(self):
    return self.args[0]


@dataclasses.dataclass
class Template:
  """One promptsource template; apply(example) -> (input, target, choices)."""
  id: str = ""
  name: str = ""
  jinja: str = ""
  reference: str = ""
  answer_choices: Optional[str] = None
  metadata: Optional[TemplateMetadata] = None
  path: str = ""  # the templates.yaml it came from

  def fields(self) -> set:
    """Top-level example fields the template and its answer_choices read."""
    names = set()
    for src in (self.jinja, self.answer_choices or ""):
      names |= jinja2.meta.find_undeclared_variables(_ENV.parse(src))
    return names - set(_ENV.globals) - {"answer_choices"}

  def answer_choices_list(self, example, key=0) -> Optional[List[str]]:
    if not self.answer_choices:
      return None
    text = self._render(self.answer_choices, _escape(example), key, "")
    return [_unescape(c.strip()) for c in text.split(_SEP)]

  def apply(self, example: Dict[str, Any], key=0, where: str = ""
            ) -> Tuple[str, str, Optional[List[str]]]:
    """Renders example; key seeds `choice`; where names the row in errors."""
    protected = _escape(example)
    choices = None
    if self.answer_choices:
      text = self._render(self.answer_choices, protected, key, where)
      choices = [_unescape(c.strip()) for c in text.split(_SEP)]
      protected["answer_choices"] = [_escape(c) for c in choices]
    parts = self._render(self.jinja, protected, key, where).split(_SEP)
    parts = [_unescape(p.strip()) for p in parts]
    return parts[0], (parts[1] if len(parts) > 1 else ""), choices

  def _render(self, source, example, key, where):
    rng = random.Random(zlib.crc32(f"{self.id}/{key}".encode()))
    try:
      return _compile(source).render(_rng=rng, **example)
    except jinja2.exceptions.UndefinedError as e:
      field = _missing_field(str(e))
      raise TemplateFieldError(
          f"template {self.name!r} ({self.path}) reads field {field!r} that "
          f"the example at {where or '?'} lacks (fields: "
          f"{sorted(k for k in example if not k.startswith('_'))}); map the "
          "row to the fields the template expects") from None


@functools.lru_cache(maxsize=4096)
def _compile(source):
  return _ENV.from_string(source)


def _missing_field(message):
  m = re.search(r"has no attribute '([^']+)'|'([^']+)' is undefined", message)
  return (m.group(1) or m.group(2)) if m else message


def _escape(value):
  if isinstance(value, str):
    return value.replace(_SEP, _ESCAPED_SEP)
  if isinstance(value, dict):
    return {k: _escape(v) for k, v in value.items()}
  if isinstance(value, list):
    return [_escape(v) for v in value]
  return value


def _unescape(text):
  return text.replace(_ESCAPED_SEP, _SEP)


@jinja2.pass_context
def _choice(ctx, seq):
  return ctx["_rng"].choice(list(seq))


def _most_frequent(items):
  counts = collections.Counter(items).most_common()
  top = counts[0][1]
  return [x for x, c in counts if c == top]


_ENV = jinja2.Environment(loader=jinja2.BaseLoader(),
                          undefined=jinja2.StrictUndefined)
_ENV.globals.update(zip=zip)
_ENV.filters.update(choice=_choice, random=_choice,
                    most_frequent=_most_frequent,
                    highlight=lambda s: s)


class TemplateLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
  """(C)SafeLoader that knows promptsource's two tags and nothing else."""


def _construct(cls):
  def construct(loader, node):
    values = loader.construct_mapping(node, deep=True)
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in known})
  return construct


TemplateLoader.add_constructor("!Template", _construct(Template))
TemplateLoader.add_constructor("!TemplateMetadata", _construct(TemplateMetadata))


def load(path) -> Dict[str, Template]:
  """templates.yaml -> {template name: Template}, in file order."""
  path = pathlib.Path(path)
  with open(path, encoding="utf-8") as f:
    data = yaml.load(f, Loader=TemplateLoader)  # SafeLoader subclass
  out = {}
  for t in (data or {}).get("templates", {}).values():
    if not isinstance(t, Template):
      raise ValueError(f"{path}: entry {t!r} is not a !Template")
    t.path = str(path)
    out[t.name] = t
  return out


def find_files(root) -> List[pathlib.Path]:
  """All templates.yaml under root (sorted)."""
  return sorted(pathlib.Path(root).rglob("templates.yaml"))
