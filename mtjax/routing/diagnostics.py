"""Routing diagnostics: what a router chose, summarised per module and layer.

Records come from `RoutedLoRA.apply(..., records={})`: {module path: {'idx'
(B, T, k), 'w' (B, T, k), 'entropy' (B, T)}}. Only real (non-padding) tokens
count.
"""
import re
from typing import Optional

import numpy as np

_BLOCK = re.compile(r"(encoder|decoder|model)/(?:block|layers)_(\d+)")


def layer_name(path: str) -> str:
  """'encoder/block_3/...' -> 'enc3', 'decoder/block_0/...' -> 'dec0'."""
  m = _BLOCK.search(path)
  if not m:
    return path
  return {"encoder": "enc", "decoder": "dec", "model": "L"}[m.group(1)] + \
      m.group(2)


def token_mask(path: str, shape: tuple, inputs: dict) -> np.ndarray:
  """Which of a module's (B, T) tokens are real (not padding)."""
  enc = inputs.get("attention_mask")
  dec = inputs.get("decoder_attention_mask")
  reads_encoder = path.startswith("encoder") or re.search(
      r"EncDecAttention/(k|v)$", path)
  mask = enc if (reads_encoder or dec is None) else dec
  if mask is None or tuple(mask.shape) != tuple(shape):
    return np.ones(shape, bool)
  return np.asarray(mask) > 0


def summarize_records(records: dict, inputs: dict, num_experts: int,
                      own_expert: Optional[int] = None) -> dict:
  """Per module: entropy (mean over real tokens), load (E,), oracle agreement.

  own_expert: the task's own expert index (held-in tasks) or None.
  Returns {path: {'entropy', 'load', 'top1_own', 'topk_own', 'tokens'}}.
  """
  out = {}
  for path, rec in records.items():
    idx = np.asarray(rec["idx"])
    mask = token_mask(path, idx.shape[:-1], inputs)
    sel = idx[mask]                                   # (n, k)
    load = np.bincount(sel.reshape(-1), minlength=num_experts).astype(float)
    row = {"tokens": int(mask.sum()), "load": load / max(load.sum(), 1.0)}
    if "entropy" in rec:
      row["entropy"] = float(np.asarray(rec["entropy"])[mask].mean())
    if own_expert is not None:
      row["top1_own"] = float(np.mean(sel[:, 0] == own_expert))
      row["topk_own"] = float(np.mean(np.any(sel == own_expert, -1)))
    out[path] = row
  return out


def by_layer(summary: dict, key: str) -> dict:
  """Mean of a scalar diagnostic over the modules of each layer."""
  acc = {}
  for path, row in summary.items():
    if key in row:
      acc.setdefault(layer_name(path), []).append(row[key])
  return {k: float(np.mean(v)) for k, v in sorted(acc.items(), key=_layer_key)}


def _layer_key(item):
  name = item[0]
  m = re.match(r"([a-zA-Z]+)(\d+)$", name)
  order = {"enc": 0, "L": 0, "dec": 1}
  return ((order.get(m.group(1), 2), int(m.group(2))) if m
          else (3, name))


def layer_loads(summary: dict) -> dict:
  """{layer: (E,) mean load over its modules}."""
  acc = {}
  for path, row in summary.items():
    acc.setdefault(layer_name(path), []).append(row["load"])
  return {k: np.mean(v, 0) for k, v in sorted(acc.items(), key=_layer_key)}
