"""Training batches and evaluation examples from registered seqio tasks.

Resuming: the pipeline is a pure function of (mixture, seed, shard): seqio
shuffles each task with the seed and samples the mixture with it, so skipping
the first start_step batches (`Dataset.skip`) reproduces the uninterrupted
order exactly, at the cost of re-running their preprocessing once. This needs
no iterator state in checkpoints; the step number is enough.
"""
import collections
import re
from typing import Any, Callable, Dict, List, Mapping, Optional

import numpy as np
import seqio
import tensorflow as tf

from mtjax.data import tasks as tasks_lib

_TASK_IDS = "task_ids"
_SPEC = seqio.FeatureConverter.FeatureSpec


class EncDecWithTaskIds(seqio.EncDecFeatureConverter):
  """seqio's encoder-decoder converter that also packs/pads 'task_ids'.

  'task_ids' (a task id on every target token) is packed like the targets, so
  'decoder_task_ids' stays aligned with decoder_target_tokens. seqio's
  passthrough_features cannot do this: it refuses packing.
  """
  TASK_FEATURES = {**seqio.EncDecFeatureConverter.TASK_FEATURES,
                   _TASK_IDS: _SPEC(dtype=tf.int32)}
  MODEL_FEATURES = {**seqio.EncDecFeatureConverter.MODEL_FEATURES,
                    "decoder_task_ids": _SPEC(dtype=tf.int32)}

  def _convert_example(self, features):
    d = dict(super()._convert_example(features))
    d["decoder_task_ids"] = features[_TASK_IDS]
    return d

  def get_model_feature_lengths(self, task_feature_lengths):
    out = dict(super().get_model_feature_lengths(task_feature_lengths))
    out["decoder_task_ids"] = task_feature_lengths["targets"]
    return out


class PrefixLMWithTaskIds(seqio.PrefixLMFeatureConverter):
  """seqio's prefix-LM converter (loss on targets only) with 'task_ids'.

  Every token of the concatenated inputs+targets gets the example's task id.
  """
  TASK_FEATURES = {**seqio.PrefixLMFeatureConverter.TASK_FEATURES,
                   _TASK_IDS: _SPEC(dtype=tf.int32)}
  MODEL_FEATURES = {**seqio.PrefixLMFeatureConverter.MODEL_FEATURES,
                    "decoder_task_ids": _SPEC(dtype=tf.int32)}

  def _concat_and_add_masks(self, features):
    d = dict(super()._concat_and_add_masks(features))
    d[_TASK_IDS] = tf.fill(tf.shape(d["targets"]),
                           tf.reduce_max(features[_TASK_IDS]))
    return d

  def _concat_task_feature_lengths(self, task_feature_lengths):
    lengths = {k: v for k, v in task_feature_lengths.items() if k != _TASK_IDS}
    out = dict(super()._concat_task_feature_lengths(lengths))
    out[_TASK_IDS] = out["targets"]
    return out

  def _convert_example(self, features):
    d = dict(super()._convert_example(features))
    d["decoder_task_ids"] = features[_TASK_IDS]
    return d

  def get_model_feature_lengths(self, task_feature_lengths):
    lengths = {k: v for k, v in task_feature_lengths.items() if k != _TASK_IDS}
    out = dict(super().get_model_feature_lengths(lengths))
    out["decoder_task_ids"] = out["decoder_target_tokens"]
    return out


def feature_converter(model_kind: str, pack: bool) -> seqio.FeatureConverter:
  if model_kind == "encoder_decoder":
    return EncDecWithTaskIds(pack=pack)
  if model_kind == "decoder":
    # No per-feature length check: rows share the budget Li + Lt (`fit_row`).
    return PrefixLMWithTaskIds(pack=pack, loss_on_targets_only=True,
                               apply_length_check=False)
  raise ValueError(f"model_kind must be 'encoder_decoder' or 'decoder', got "
                   f"{model_kind!r}")


def _lookup(name):
  if name in seqio.TaskRegistry.names() or name in seqio.MixtureRegistry.names():
    return seqio.get_mixture_or_task(name)
  return None


def resolve(name: str, vocab) -> seqio.DatasetProviderBase:
  """A plain or seqio task/mixture name -> the registered seqio provider."""
  for candidate in (name, tasks_lib.seqio_name(vocab, name)):
    provider = _lookup(candidate)
    if provider is not None:
      return provider
  tasks_lib.register(vocab)
  provider = _lookup(tasks_lib.seqio_name(vocab, name))
  if provider is None:
    raise KeyError(f"no task or mixture {name!r} for vocabulary "
                   f"{tasks_lib.vocab_lib.key(vocab)}; see register(vocab)"
                   ".names")
  return provider


class Batches:
  """Iterator of numpy batches; .task_names lists what task_index indexes."""

  def __init__(self, dataset: tf.data.Dataset, task_names: List[str],
               unshift_pad: Optional[int] = None, trim_to: int = 0):
    """unshift_pad: the dataset holds ids + 1 (see `_shift`); emit real ids
    with this pad id, and the masks that say which slots are tokens.
    trim_to: > 0 cuts each batch's sequence axes to its longest row rounded
    up to this multiple (`trim_batch`)."""
    self.task_names = task_names
    self._unshift_pad = unshift_pad
    self._trim_to = trim_to
    self.dataset = dataset
    ids = np.array([tasks_lib.task_id(tasks_lib.plain_name(n))
                    for n in task_names])
    if len(set(ids.tolist())) != len(ids):
      raise ValueError(f"task id collision among {task_names}")
    order = np.argsort(ids)
    self._ids, self._index = ids[order], order.astype(np.int32)
    self._it = dataset.as_numpy_iterator()

  def __iter__(self):
    return self

  def __next__(self) -> Dict[str, np.ndarray]:
    try:
      batch = dict(next(self._it))
    except tf.errors.InvalidArgumentError as e:
      if "TooLongExample" in e.message:
        raise ValueError(_too_long_message(e.message)) from None
      raise
    ids = batch.pop("decoder_task_ids")
    pos = np.clip(np.searchsorted(self._ids, ids), 0, len(self._ids) - 1)
    token_index = np.where(ids == 0, -1, self._index[pos]).astype(np.int32)
    first = np.argmax(ids != 0, axis=1)
    batch["token_task_index"] = token_index
    batch["task_index"] = token_index[np.arange(len(ids)), first]
    if self._unshift_pad is not None:
      batch = unshift(batch, self._unshift_pad)
    if self._trim_to:
      batch = trim_batch(batch, self._trim_to)
    return batch


def trim_batch(batch: Dict[str, np.ndarray], multiple: int
               ) -> Dict[str, np.ndarray]:
  """An unpacked batch cut to its longest row, rounded up to `multiple`.

  Only padding is removed, so every loss and gradient is the one of the full
  batch; a batch of short rows stops paying for the configured length (the
  step compiles once per width). Real slots: the prompt
  ('decoder_causal_attention') and targets ('decoder_loss_weights') of
  decoder rows; encoder-decoder rows cut 'encoder_*' at the last encoder
  token and 'decoder_*' at the last loss weight. Packed batches (full rows)
  are returned as they are.
  """
  if "decoder_segment_ids" in batch:
    return batch
  up = lambda n: -(-max(int(n), 1) // multiple) * multiple

  def last(mask):   # (B, L) -> slots up to the last nonzero one of any row
    cols = np.nonzero(np.asarray(mask).any(0))[0]
    return cols[-1] + 1 if cols.size else 1

  out = dict(batch)
  if "encoder_input_tokens" in batch:
    enc = up(last(batch["encoder_input_tokens"] != 0))
    dec = up(last(batch["decoder_loss_weights"]))
    for k, v in batch.items():
      if k.startswith("encoder_") and v.ndim == 2:
        out[k] = v[:, :enc]
      elif (k.startswith("decoder_") or k == "token_task_index") and (
          v.ndim == 2):
        out[k] = v[:, :dec]
    return out
  width = up(last(np.maximum(batch["decoder_causal_attention"],
                             batch["decoder_loss_weights"])))
  for k, v in batch.items():
    if v.ndim == 2 and v.shape[1] == batch["decoder_loss_weights"].shape[1]:
      out[k] = v[:, :width]
  return out


_TOKEN_KEYS = ("decoder_input_tokens", "decoder_target_tokens")


def _shift(ex):
  """ids + 1, so seqio's 0 = padding holds for vocabularies whose id 0 is a
  token (SmolLM2's <|endoftext|>, Llama-3's '!'); `unshift` undoes it."""
  return dict(ex, inputs=ex["inputs"] + 1, targets=ex["targets"] + 1)


def unshift(batch: Dict[str, np.ndarray], pad_id: int) -> Dict[str, np.ndarray]:
  """Decoder batch of shifted ids -> real ids, pad_id on padding, and
  'decoder_mask' (B, L): 1 where decoder_input_tokens holds a token of the
  text. seqio's start slot (a 0 before each sequence) is not one: the LM
  reads the text as in pretraining, BOS first only if its tokenizer adds it.
  Packed positions are shifted to start at 0 on the first text token."""
  out = dict(batch)
  out["decoder_mask"] = (batch["decoder_input_tokens"] != 0).astype(np.int32)
  for k in _TOKEN_KEYS:
    out[k] = np.where(batch[k] != 0, batch[k] - 1, pad_id).astype(np.int32)
  if "decoder_positions" in batch:
    out["decoder_positions"] = np.maximum(batch["decoder_positions"] - 1, 0)
  return out


def _too_long_message(message):
  detail = message.split("TooLongExample", 1)[1].split("\n\t [[", 1)[0]
  parts = re.findall(r"\[([^\[\]]*)\]", detail)
  if len(parts) >= 11:  # the fields _check_lengths asserts with
    detail = (f" task {parts[0]}: inputs {parts[2]} tokens (limit {parts[4]}),"
              f" targets {parts[6]} tokens (limit {parts[8]}) incl. EOS;"
              f" example inputs: {parts[10]!r}")
  return ("example longer than the sequence length with train_batches("
          "on_too_long='error'):" + detail + " -- raise feature_lengths or "
          "use on_too_long='truncate' (seqio's default: trim, keep EOS)")


def _check_lengths(lengths, id_to_name):
  def fn(ex):
    name = id_to_name.lookup(ex[_TASK_IDS][0])
    ok = tf.logical_and(ex["inputs_length"] <= lengths["inputs"],
                        ex["targets_length"] <= lengths["targets"])
    check = tf.debugging.Assert(ok, [
        "TooLongExample task", name, "inputs", ex["inputs_length"], "limit",
        lengths["inputs"], "targets", ex["targets_length"], "limit",
        lengths["targets"], "inputs:", ex["inputs_pretokenized"]],
                                summarize=-1)
    with tf.control_dependencies([check]):
      return {k: tf.identity(v) for k, v in ex.items()}
  return fn


def fit_row(inp: list, tgt: list, kind: str, lengths: Mapping[str, int]
            ) -> tuple:
  """(inputs, targets) ids cut to the configured lengths -> (inp, tgt, cut).

  Prompts lose their *start* (left truncation, as lm-eval does: the end of a
  prompt is next to the answer); targets keep their start. Decoder-only rows
  share one budget Li + Lt, so a short answer leaves room for a long prompt.
  Training (`train_batches`) and evaluation cut rows alike.
  cut: whether anything was removed.
  """
  li, lt = lengths["inputs"], lengths["targets"]
  inp, tgt = list(inp), list(tgt)
  if kind == "encoder_decoder":
    new_inp, new_tgt = inp[max(0, len(inp) - li):], tgt[:lt]
  else:
    new_tgt = tgt[:li + lt]
    room = li + lt - len(new_tgt)
    new_inp = inp[max(0, len(inp) - room):] if room else []
  return new_inp, new_tgt, (len(new_inp), len(new_tgt)) != (len(inp), len(tgt))


def _fit_rows(lengths, model_kind):
  """`fit_row` on tf.data rows (its 'task_ids' follow the targets)."""
  li, lt = lengths["inputs"], lengths["targets"]

  def fn(ex):
    inp, tgt = ex["inputs"], ex["targets"]
    if model_kind == "encoder_decoder":
      tgt = tgt[:lt]
      keep = tf.minimum(tf.size(inp), li)
    else:
      tgt = tgt[:li + lt]
      keep = tf.minimum(tf.size(inp), li + lt - tf.size(tgt))
    return dict(ex, inputs=inp[tf.size(inp) - keep:], targets=tgt,
                **{_TASK_IDS: ex[_TASK_IDS][:tf.size(tgt)]})
  return fn


def count_truncated(mixture_or_task: str, vocab,
                    feature_lengths: Mapping[str, int], model_kind: str,
                    split: str = "train", max_rows: Optional[int] = None
                    ) -> tuple:
  """(rows `fit_row` cuts, rows read) over the split of a task or of every
  task of a mixture (the first max_rows of each): what `train_batches`
  truncates, for the training log."""
  lengths = {"inputs": int(feature_lengths["inputs"]),
             "targets": int(feature_lengths["targets"])}
  cut = total = 0
  for name in task_names(mixture_or_task, vocab):
    for ex in eval_examples(name, vocab, split, max_rows):
      cut += fit_row(ex["input_ids"], ex["target_ids"], model_kind,
                     lengths)[2]
      total += 1
  return cut, total


def task_names(mixture_or_task: str, vocab) -> List[str]:
  """seqio names of the tasks that a batch's task_index refers to."""
  provider = resolve(mixture_or_task, vocab)
  subtasks = (provider.tasks if isinstance(provider, seqio.Mixture)
              else [provider])
  return [t.name for t in subtasks]


def train_batches(mixture_or_task: str, vocab, feature_lengths: Mapping[str, int],
                  batch_size: int, model_kind: str, seed: int,
                  start_step: int = 0, shard_index: int = 0,
                  num_shards: int = 1, pack: bool = False,
                  on_too_long: str = "truncate", split: str = "train",
                  shuffle: bool = True, num_epochs: Optional[int] = None,
                  trim_to: int = 0) -> Batches:
  """Batches of a task or mixture for one process (see mtjax.data)."""
  if on_too_long not in ("truncate", "error"):
    raise ValueError(f"on_too_long must be 'truncate' or 'error', got "
                     f"{on_too_long!r}")
  if not 0 <= shard_index < num_shards:
    raise ValueError(f"shard_index {shard_index} not in [0, {num_shards})")
  provider = resolve(mixture_or_task, vocab)
  subtasks = (provider.tasks if isinstance(provider, seqio.Mixture)
              else [provider])
  task_names = [t.name for t in subtasks]
  lengths = {"inputs": int(feature_lengths["inputs"]),
             "targets": int(feature_lengths["targets"])}
  keep = ["inputs", "targets", _TASK_IDS]
  extra = [_TASK_IDS, "inputs_length", "targets_length", "inputs_pretokenized"]
  kwargs = dict(split=split, shuffle=shuffle, seed=seed,
                shard_info=seqio.ShardInfo(shard_index, num_shards),
                num_epochs=num_epochs)
  # Untrimmed rows (seqio would keep a long prompt's start); `_fit_rows` cuts
  # them as evaluation does.
  if isinstance(provider, seqio.Mixture):
    ds = provider.get_dataset(None, passthrough_features=extra, **kwargs)
  else:
    ds = provider.get_dataset(None, **kwargs)
  if on_too_long == "error":
    table = tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(
        tf.constant([tasks_lib.task_id(tasks_lib.plain_name(n))
                     for n in task_names], tf.int32),
        tf.constant(task_names)), default_value="?")
    ds = ds.map(_check_lengths(lengths, table))
  ds = ds.map(lambda ex: {k: ex[k] for k in keep})
  ds = ds.map(_fit_rows(lengths, model_kind))
  shift = model_kind == "decoder" and tasks_lib.vocab_lib.shifts_ids(vocab)
  if shift:
    ds = ds.map(_shift)
  ds = feature_converter(model_kind, pack)(
      ds, task_feature_lengths={**lengths, _TASK_IDS: lengths["targets"]})
  ds = ds.batch(batch_size, drop_remainder=True).skip(start_step).prefetch(2)
  return Batches(ds, task_names, unshift_pad=(
      tasks_lib.vocab_lib.pad_token_id(vocab) if shift else None),
                 trim_to=trim_to)


def model_inputs(batch: Mapping[str, Any], model_kind: str) -> Dict[str, Any]:
  """mtjax.models keyword arguments (HF names) for a train_batches batch.

  The decoder-only models attend causally everywhere (HF parity), so the
  prefix-LM 'decoder_causal_attention' is not passed; loss weights still
  restrict the loss to targets. Masks come from 'encoder_mask'/'decoder_mask'
  when the batch has them (real LM vocabularies, evaluation rows), else from
  `token != 0` (seqio vocabularies, whose id 0 is padding).
  """
  packed = "decoder_segment_ids" in batch
  real = lambda k: (batch[k] != 0).astype(np.int32)
  if model_kind == "encoder_decoder":
    enc_mask = (batch["encoder_mask"] if "encoder_mask" in batch
                else real("encoder_segment_ids" if packed
                          else "encoder_input_tokens"))
    dec_mask = (batch["decoder_mask"] if "decoder_mask" in batch
                else real("decoder_segment_ids" if packed
                          else "decoder_target_tokens"))
    out = dict(input_ids=batch["encoder_input_tokens"], attention_mask=enc_mask,
               decoder_input_ids=batch["decoder_input_tokens"],
               decoder_attention_mask=dec_mask)
    if packed:
      out.update(encoder_segment_ids=batch["encoder_segment_ids"],
                 decoder_segment_ids=batch["decoder_segment_ids"],
                 encoder_positions=batch["encoder_positions"],
                 decoder_positions=batch["decoder_positions"])
    return out
  if model_kind == "decoder":
    mask = (batch["decoder_mask"] if "decoder_mask" in batch
            else real("decoder_segment_ids" if packed
                      else "decoder_target_tokens"))
    out = dict(input_ids=batch["decoder_input_tokens"], attention_mask=mask)
    if packed:
      out.update(segment_ids=batch["decoder_segment_ids"],
                 positions=batch["decoder_positions"])
    return out
  raise ValueError(f"model_kind must be 'encoder_decoder' or 'decoder', got "
                   f"{model_kind!r}")


def _task(task: str, vocab) -> seqio.Task:
  if vocab is None:
    if _lookup(task) is not None:
      return _lookup(task)
    matches = [n for n in seqio.TaskRegistry.names()
               if n.startswith("mtjax.") and tasks_lib.plain_name(n) == task]
    if matches:
      return seqio.get_mixture_or_task(sorted(matches)[0])
    vocab = seqio.ByteVocabulary()
  provider = resolve(task, vocab)
  if not isinstance(provider, seqio.Task):
    raise ValueError(f"{task} is a mixture; evaluation works per task: "
                     f"{[t.name for t in provider.tasks]}")
  return provider


# Tokenized evaluation rows and task kinds, per registered seqio.Task object
# (a re-registered task is a new object, so a stale entry is never read).
# Building them goes through tf.data (~0.5 s a call); an experiment asks for
# the same rows many times (every row of its table, the routing records).
_EVAL_CACHE: "collections.OrderedDict[tuple, tuple]" = collections.OrderedDict()
_EVAL_CACHE_SIZE = 512


def _cached(key: tuple, t: seqio.Task, build):
  hit = _EVAL_CACHE.get(key)
  if hit is not None and hit[0] is t:
    _EVAL_CACHE.move_to_end(key)
    return hit[1]
  value = build()
  _EVAL_CACHE[key] = (t, value)
  while len(_EVAL_CACHE) > _EVAL_CACHE_SIZE:
    _EVAL_CACHE.popitem(last=False)
  return value


def eval_examples(task: str, vocab, split: str = "validation",
                  max_examples: Optional[int] = None) -> List[Dict[str, Any]]:
  """Rows of a task's split, in file order, with text and token ids.

  Cached per task, split and max_examples; each call returns fresh row
  dicts (their lists are shared: read, do not modify them)."""
  t = _task(task, vocab)
  if split not in t.splits:
    raise KeyError(f"task {t.name} has splits {list(t.splits)}, not {split!r}")
  rows = _cached((id(t), "rows", split, max_examples), t,
                 lambda: _read_eval_examples(t, split, max_examples))
  return [dict(r) for r in rows]


def _read_eval_examples(t: seqio.Task, split: str,
                        max_examples: Optional[int]) -> List[Dict[str, Any]]:
  vocab = t.output_features["targets"].vocabulary
  ds = t.get_dataset(sequence_length=None, split=split, shuffle=False,
                     num_epochs=1)
  if max_examples is not None:
    ds = ds.take(max_examples)
  out = []
  eos = [vocab.eos_id] if vocab.eos_id is not None else []
  lm = tasks_lib.vocab_lib.lm_format(vocab)
  for ex in ds.as_numpy_iterator():
    row = dict(inputs=ex["inputs_pretokenized"].decode("utf-8"),
               targets=ex["targets_pretokenized"].decode("utf-8"),
               input_ids=ex["inputs"].tolist(), target_ids=ex["targets"].tolist())
    choices = [c.decode("utf-8") for c in ex["answer_choices"]]
    if choices and lm:
      row.update(answer_choices=choices, label=int(ex["label"]),
                 **lm_choices(vocab, row["inputs"], choices))
    elif choices:
      row.update(answer_choices=choices, label=int(ex["label"]),
                 choice_ids=[list(vocab.encode(c)) + eos for c in choices],
                 choice_bytes=[len(c.encode("utf-8")) for c in choices])
    out.append(row)
  return out


def lm_choices(vocab, context: str, continuations: List[str]) -> Dict[str, Any]:
  """lm-evaluation-harness's (context, continuation) encoding for an LM.

  Each continuation (its leading space included, see tasks.answer_delimiter)
  is scored by its own tokens: the pair is encoded whole and split after the
  context's tokens, with the context's trailing spaces moved to the
  continuation first (lm-eval's `_encode_pair`). No EOS anywhere.
  -> {'input_ids': [BOS] + context ids, 'choice_ids': [[ids] per choice],
      'choice_bytes': [UTF-8 length of each choice without the delimiter]}.
  """
  bos = [vocab.bos_id] if getattr(vocab, "bos_id", None) is not None else []
  spaces = len(context) - len(context.rstrip(" "))
  ctx = context[:len(context) - spaces]
  ctx_ids = list(vocab.encode(ctx)) if ctx else []
  choice_ids, choice_bytes = [], []
  for c in continuations:
    cont = context[len(ctx):] + c
    whole = list(vocab.encode(ctx + cont))
    choice_ids.append(whole[len(ctx_ids):])
    raw = c[1:] if c.startswith(" ") and tasks_lib.answer_delimiter(
        context, c[1:]) == " " else c
    choice_bytes.append(len(raw.encode("utf-8")))
  return dict(input_ids=bos + ctx_ids, choice_ids=choice_ids,
              choice_bytes=choice_bytes)


def metric_fns(task: str, vocab=None):
  return list(_task(task, vocab).metric_fns)


def answer_match(task: str, vocab=None) -> Callable[[str, str], bool]:
  """match(prediction, target) of a generation task: its metric fn's own
  `.match` when it has one (the Soft Injection tasks' exact match), else
  equality of the stripped texts."""
  for fn in metric_fns(task, vocab):
    if hasattr(fn, "match"):
      return fn.match
  return lambda prediction, target: prediction.strip() == target.strip()


def task_kind(task: str, vocab=None) -> str:
  """'rank_classification' if the task's rows carry answer_choices."""
  t = _task(task, vocab)
  return _cached((id(t), "kind"), t, lambda: _read_task_kind(t))


def _read_task_kind(t: seqio.Task) -> str:
  split = "validation" if "validation" in t.splits else list(t.splits)[0]
  ds = t.get_dataset(sequence_length=None, split=split, shuffle=False)
  for ex in ds.take(1).as_numpy_iterator():
    if "answer_choices" in ex and len(ex["answer_choices"]):
      return "rank_classification"
  return "generation"
