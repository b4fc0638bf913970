"""Name -> class or function tables: methods, routers, experiment steps, jobs.

A variant is added by registering it, with no edit elsewhere:

  METHODS = Registry("method")

  @METHODS.register("lora")
  class LoRA: ...

  METHODS.build({"name": "lora", "rank": 8})   # LoRA(rank=8)

`build` checks the options against the constructor's signature, so a typo
fails with the list of valid options instead of being ignored. (Read after
levanter's `ChoiceRegistry` and big_vision's `Registry`.)
"""
import inspect
from typing import Any, Callable, Iterable, Mapping, Optional


class Registry:
  """A named table of constructors (classes or functions)."""

  def __init__(self, kind: str) -> None:
    self.kind = kind
    self._table: dict = {}

  def register(self, name: str, *, overwrite: bool = False) -> Callable:
    """Decorator: registers a class or function under `name`."""
    def add(obj):
      if name in self._table and not overwrite and self._table[name] is not obj:
        raise ValueError(f"{self.kind} {name!r} is already registered "
                         f"({self._table[name]!r}); pick another name or pass "
                         "overwrite=True")
      self._table[name] = obj
      return obj
    return add

  def names(self) -> list:
    return sorted(self._table)

  def __contains__(self, name: str) -> bool:
    return name in self._table

  def get(self, name: str) -> Any:
    if name not in self._table:
      raise ValueError(f"{self.kind} {name!r} is not registered; known: "
                       f"{self.names()}")
    return self._table[name]

  def options(self, name: str) -> list:
    """Keyword options the constructor of `name` accepts."""
    return sorted(options_of(self.get(name)))

  def build(self, config: Mapping[str, Any], *args: Any,
            ignore: Iterable[str] = ("name",), **extra: Any) -> Any:
    """Calls the constructor of config['name'] with the config's options.

    Positional `args` and keyword `extra` are passed as they are (things that
    are not config, e.g. a LoRA object); `ignore` names config keys that
    belong to the caller, not to the constructor.
    """
    config = to_dict(config)
    if "name" not in config:
      raise ValueError(f"a {self.kind} config needs a 'name'; known: "
                       f"{self.names()}")
    fn = self.get(config["name"])
    kwargs = {k: v for k, v in config.items() if k not in set(ignore)}
    check_options(fn, kwargs, f"{self.kind} {config['name']!r}")
    return fn(*args, **{**{k: tuple_of(v) for k, v in kwargs.items()},
                        **extra})


def _signatures(fn: Callable) -> list:
  """Signatures that define fn's options: a class's __init__ and, while one
  passes **kwargs on, those of its base classes."""
  if not inspect.isclass(fn):
    return [inspect.signature(fn)]
  out = []
  for cls in inspect.getmro(fn):
    if "__init__" not in vars(cls) or cls is object:
      continue
    sig = inspect.signature(vars(cls)["__init__"])
    out.append(sig)
    if not any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values()):
      break
  return out or [inspect.signature(fn)]


def options_of(fn: Callable) -> dict:
  """{option: default or inspect.Parameter.empty} of a constructor."""
  out = {}
  for sig in reversed(_signatures(fn)):
    out.update({k: p.default for k, p in sig.parameters.items()
                if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                and k != "self"})
  return out


def check_options(fn: Callable, kwargs: Mapping[str, Any], what: str) -> None:
  """Raises naming the unknown options of `fn` (unless it takes **kwargs)."""
  last = _signatures(fn)[-1]
  if any(p.kind == p.VAR_KEYWORD for p in last.parameters.values()):
    return
  known = options_of(fn)
  unknown = sorted(set(kwargs) - set(known))
  if unknown:
    raise ValueError(f"{what} has no option(s) {unknown}; known: "
                     f"{sorted(known)}")


def to_dict(config: Optional[Mapping[str, Any]]) -> dict:
  """A plain dict of a ConfigDict, dict or None."""
  if config is None:
    return {}
  return dict(config.to_dict() if hasattr(config, "to_dict") else config)


def tuple_of(value: Any) -> Any:
  """Lists become tuples (hashable, as frozen method fields need)."""
  return tuple(value) if isinstance(value, list) else value
