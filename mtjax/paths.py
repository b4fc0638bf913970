"""Run outputs on a local disk or an object store (gs://, s3://) alike.

Every read and write of a run's outputs (workdir, config.json, metrics.jsonl,
results, expert libraries, task embeddings, merges, plots) goes through
`etils.epath`, so a workdir may be a local folder or a `gs://BUCKET/...` URL
shared by all hosts of a pod. Orbax takes the same strings (`absolute`): a
URL is passed on unchanged, a local path is made absolute.

Atomicity: a local file is written to '<name>.tmp' and renamed over the old
one (`os.replace`), so a reader never sees half a file. On an object store a
plain write is already atomic per object (the new object replaces the old one
only once its upload completes), so it is written in place; a 'rename' there
is a copy then a delete, not atomic (`move`).

Bundled local inputs (../shared data, GGUF files, templates) stay plain local
paths; only run outputs and what a run reads back from them come here.
"""
import contextlib
import errno
import io
import json
import os
import re
import tempfile
import time
from typing import Any, Iterator, Optional, Union

import numpy as np
import safetensors.numpy
from etils import epath

PathLike = Union[str, os.PathLike]

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")

# The OS's own words for a full disk / quota; tensorstore (orbax's array
# writer) reports the OS error as text in a ValueError, without an errno.
NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_NO_SPACE_TEXT = tuple(os.strerror(e) for e in NO_SPACE_ERRNOS)


def is_url(p: PathLike) -> bool:
  """True for 'gs://...', 's3://...' (anything with a scheme), not for paths."""
  return bool(_URL.match(os.fspath(p)))


def absolute(p: PathLike) -> str:
  """A URL unchanged; a local path made absolute (as orbax wants it)."""
  s = os.fspath(p)
  return s if is_url(s) else os.path.abspath(s)


def path(p: PathLike) -> epath.Path:
  """epath.Path of a local path or URL."""
  return epath.Path(os.fspath(p))


def join(p: PathLike, *parts: str) -> str:
  """'gs://b/run' + 'config.json' -> 'gs://b/run/config.json' (os.path.join
  for local paths)."""
  if not is_url(p):
    return os.path.join(os.fspath(p), *parts)
  return os.fspath(path(p).joinpath(*parts))


def exists(p: PathLike) -> bool:
  return path(p).exists()


def isdir(p: PathLike) -> bool:
  return path(p).is_dir()


def makedirs(p: PathLike) -> None:
  """mkdir -p (object stores have no folders; harmless there)."""
  path(p).mkdir(parents=True, exist_ok=True)


def listdir(p: PathLike) -> list:
  """Sorted names of the entries of a folder."""
  return sorted(c.name for c in path(p).iterdir())


def read_text(p: PathLike) -> str:
  return path(p).read_text()


def read_bytes(p: PathLike) -> bytes:
  return path(p).read_bytes()


def read_json(p: PathLike) -> Any:
  return json.loads(read_text(p))


def write_bytes(p: PathLike, data: bytes) -> str:
  """Writes a whole file atomically (module docstring); returns its path."""
  target = path(p)
  if is_url(p):
    target.write_bytes(data)   # one object: replaced whole or not at all
    return os.fspath(p)
  target.parent.mkdir(parents=True, exist_ok=True)
  tmp = os.fspath(p) + ".tmp"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, p)
  return os.fspath(p)


def write_text(p: PathLike, text: str) -> str:
  return write_bytes(p, text.encode("utf-8"))


def write_json(p: PathLike, obj: Any, **dump_options: Any) -> str:
  """json.dump(obj, **dump_options) written atomically; returns the path."""
  return write_text(p, json.dumps(obj, **dump_options))


def write_safetensors(p: PathLike, tensors: dict,
                      metadata: Optional[dict] = None) -> str:
  """{name: np.ndarray} as a safetensors file (atomically); returns the path."""
  return write_bytes(p, safetensors.numpy.save(tensors, metadata=metadata))


def read_safetensors(p: PathLike) -> dict:
  """{name: np.ndarray} of a safetensors file at a path or URL."""
  return safetensors.numpy.load(read_bytes(p))


def savez(p: PathLike, **arrays: np.ndarray) -> str:
  """np.savez_compressed of `arrays` at a path or URL; returns the path."""
  buf = io.BytesIO()
  np.savez_compressed(buf, **arrays)
  return write_bytes(p, buf.getvalue())


def remove(p: PathLike) -> None:
  """Deletes a file if it exists."""
  path(p).unlink(missing_ok=True)


def savefig(fig: Any, p: PathLike, **options: Any) -> str:
  """A matplotlib figure as a file (format from the suffix) at a path or URL."""
  buf = io.BytesIO()
  fmt = os.path.splitext(os.fspath(p))[1].lstrip(".") or "png"
  fig.savefig(buf, format=fmt, **options)
  return write_bytes(p, buf.getvalue())


def files(folder: PathLike) -> list:
  """Sorted '/'-joined names, relative to `folder`, of every file under it.

  (Not epath's walk: with the fsspec backend it yields URLs without their
  scheme.)"""
  out, stack = [], [(path(folder), "")]
  while stack:
    here, rel = stack.pop()
    for child in here.iterdir():
      if child.is_dir():
        stack.append((child, f"{rel}{child.name}/"))
      else:
        out.append(rel + child.name)
  return sorted(out)


def move(src: PathLike, dst: PathLike) -> None:
  """Renames a file or folder. Locally one atomic rename; on an object store
  a copy of each object then the deletion of the source."""
  if not is_url(src) and not is_url(dst):
    os.replace(src, dst)
    return
  s, d = path(src), path(dst)
  if not s.is_dir():
    s.copy(d, overwrite=True)
    s.unlink()
    return
  for name in files(s):
    (d / name).parent.mkdir(parents=True, exist_ok=True)
    (s / name).copy(d / name, overwrite=True)
  s.rmtree()


@contextlib.contextmanager
def staged_folder(folder: PathLike) -> Iterator[str]:
  """A local folder to write into for libraries that need local files
  (safetensors' save_file, hf.save): `folder` itself when local; for a URL a
  temporary folder whose files are uploaded to `folder` on success."""
  if not is_url(folder):
    yield os.fspath(folder)
    return
  with tempfile.TemporaryDirectory(prefix="mtjax-stage-") as tmp:
    yield tmp
    for root, _, files in os.walk(tmp):
      rel = os.path.relpath(root, tmp)
      for name in files:
        dst = join(folder, name) if rel == "." else join(folder, rel, name)
        with open(os.path.join(root, name), "rb") as f:
          write_bytes(dst, f.read())


def no_space_reason(e: BaseException) -> Optional[str]:
  """'No space left on device' / 'Disk quota exceeded' if `e` (or an
  exception it was raised from) is the OS saying so (ENOSPC / EDQUOT), as an
  OSError or as its message forwarded by tensorstore; else None."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in NO_SPACE_ERRNOS:
      return os.strerror(e.errno)
    reason = next((t for t in _NO_SPACE_TEXT if t in str(e)), None)
    if reason:
      return reason
    e = e.__cause__ or e.__context__
  return None


def is_no_space(e: BaseException) -> bool:
  """True if `e` comes from a full device or quota (`no_space_reason`)."""
  return no_space_reason(e) is not None


class LineLog:
  """An append-only text file of lines (metrics.jsonl) at a path or URL.

  Locally the file is opened for appending and flushed after every line.
  Object stores cannot append: the earlier lines are read once and the whole
  object is rewritten by `sync()` (at checkpoints, at close, and at most
  every `sync_seconds` on `write`); lines lost to a kill are those after the
  last sync, which a resumed run (from its last checkpoint) logs again.
  """

  def __init__(self, p: PathLike, sync_seconds: float = 60.0) -> None:
    self.path, self.remote = os.fspath(p), is_url(p)
    self.sync_seconds, self._last = sync_seconds, time.time()
    if self.remote:
      self._lines = read_text(p) if exists(p) else ""
      self._dirty = False
    else:
      self._file = open(p, "a")  # closed by close()

  def write(self, line: str) -> None:
    """Appends `line` (a newline is added)."""
    if not self.remote:
      self._file.write(line + "\n")
      self._file.flush()
      return
    self._lines += line + "\n"
    self._dirty = True
    if time.time() - self._last >= self.sync_seconds:
      self.sync()

  def sync(self) -> None:
    """Makes every written line durable (a no-op locally: flushed already)."""
    if self.remote and self._dirty:
      write_text(self.path, self._lines)
      self._dirty, self._last = False, time.time()

  def close(self) -> None:
    if self.remote:
      self.sync()
    else:
      self._file.close()
