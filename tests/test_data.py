"""mtjax.data with real seqio: suite, mixtures, converters, shards, resume,
vocabularies, tfds (mock_data) and bad-input handling."""
import collections
import json

import numpy as np
import pytest

seqio = pytest.importorskip("seqio")

from mtjax import data  # noqa: E402
from mtjax.data import suite, tasks, templates  # noqa: E402
from mtjax.evaluation import evaluate  # noqa: E402

LENGTHS = {"inputs": 64, "targets": 16}


@pytest.fixture(scope="module")
def byte():
  vocab = data.vocabulary("byte")
  data.register(vocab, data_dir="/nonexistent/shared/data")
  return vocab


@pytest.fixture(scope="module")
def two_tasks(byte):
  """A small mixture (a generation and a classification task): fast to build."""
  return tasks.add_mixture("mtjax.byte.test_two", {
      tasks.seqio_name(byte, "reverse_uppercase"): 1.0,
      tasks.seqio_name(byte, "add_compare"): 1.0})


def _decode(vocab, ids):
  return vocab.decode([int(i) for i in ids if i > 0])


# ------------------------------------------------------------------ suite


def test_suite_deterministic_groups_and_lengths():
  assert len(suite.TASKS) >= 12
  assert not set(suite.HELD_IN) & set(suite.HELD_OUT)
  for name in suite.TASKS:
    a, b = suite.examples(name, "train", seed=0), suite.examples(name, "train")
    assert a == b
    assert suite.examples(name, "train", seed=1) != a
    train = {ex["inputs"] for ex in a}
    for split in suite.SPLIT_SIZES:   # register's mixing rates read these
      assert suite.num_examples(name, split) == len(suite.examples(name, split))
    for split in ("validation", "test"):
      rows = suite.examples(name, split)
      assert len(rows) == suite.SPLIT_SIZES[split]
      assert not train & {ex["inputs"] for ex in rows}, (name, split)
    for ex in a:
      assert len(ex["inputs"].encode()) <= suite.MAX_INPUT_BYTES
      assert 0 < len(ex["targets"].encode()) <= suite.MAX_TARGET_BYTES
      if ex["answer_choices"]:
        assert ex["answer_choices"][ex["label"]] == ex["targets"]
  # Held-out tasks compose held-in skills: recompute their targets.
  for ex in suite.examples("reverse_uppercase", "validation"):
    assert ex["targets"] == ex["inputs"].split(": ")[1][::-1].upper()
  for ex in suite.examples("sort_descending", "validation"):
    assert ex["targets"] == "".join(sorted(ex["inputs"].split(": ")[1]))[::-1]
  for ex in suite.examples("add_compare", "validation"):
    a, _, b, _, _, c = ex["inputs"][3:-1].split(" ")
    assert ex["targets"] == ("yes" if int(a) + int(b) > int(c) else "no")


def test_few_shot_prepends_train_demonstrations():
  rows = suite.few_shot("add", k=3, seed=0, max_examples=5)
  train = {ex["inputs"]: ex["targets"] for ex in suite.examples("add", "train")}
  plain = suite.examples("add", "validation", max_examples=5)
  assert rows == suite.few_shot("add", k=3, seed=0, max_examples=5)
  for row, ex in zip(rows, plain):
    assert len(row["demonstrations"]) == 3
    assert all(train[d["inputs"]] == d["targets"] for d in row["demonstrations"])
    assert row["inputs"].endswith("\n\n" + ex["inputs"])
    assert row["inputs"].startswith(row["demonstrations"][0]["inputs"] + "\n")
    assert row["targets"] == ex["targets"]


def test_register_idempotent(byte):
  a = data.register(byte, data_dir="/nonexistent")
  b = data.register(byte, data_dir="/nonexistent")
  assert a == b and a.real == {}
  assert a.mixtures == ["held_in", "held_out", "suite"]
  for plain in a.held_in + a.held_out + a.mixtures:
    assert seqio.get_mixture_or_task(a.seqio_name(plain)) is not None
  assert a.seqio_name("copy") == "mtjax.byte.copy"


# ---------------------------------------------------------------- mixtures


def test_mixture_rates_within_three_sigma(byte):
  names = [tasks.seqio_name(byte, t) for t in ("copy", "add", "parity")]
  rates = dict(zip(names, (1.0, 3.0, 4.0)))
  mix = tasks.add_mixture("mtjax.byte.test_rates", rates)
  batches = data.train_batches(mix, byte, LENGTHS, 100, "encoder_decoder",
                               seed=0)
  counts = collections.Counter()
  for _ in range(30):
    counts.update(np.asarray(batches.task_names)[next(batches)["task_index"]])
  n = sum(counts.values())
  assert n == 3000
  for name, rate in rates.items():
    p = rate / sum(rates.values())
    sigma = np.sqrt(p * (1 - p) / n)
    assert abs(counts[name] / n - p) < 3 * sigma, (name, counts)


def test_examples_proportional_cap(byte, tmp_path):
  path = tmp_path / "small.jsonl"
  path.write_text("".join(json.dumps(dict(query=f"q{i}", choices=["a", "b"],
                                          gold=i % 2)) + "\n"
                          for i in range(40)))
  small = tasks.register_file_task(tasks.FileTask(
      "test_small", (("train", str(path)),), "jsonl",
      tasks._plain_mc_row("x")), byte)
  copy = tasks.seqio_name(byte, "copy")
  assert tasks.examples_proportional_rates([small, copy], cap=500) == {
      small: 40.0, copy: 500.0}
  assert tasks.examples_proportional_rates([small, copy], cap=10**6) == {
      small: 40.0, copy: 2000.0}
  reg = data.register(byte, data_dir="/nonexistent")
  mix = seqio.get_mixture_or_task(reg.seqio_name("held_in"))
  assert {mix.get_rate(t) for t in mix.tasks} == {2000.0}  # cap 3000 > 2000


# ------------------------------------------------------ converters, shards


@pytest.mark.parametrize("kind", ["encoder_decoder", "decoder"])
def test_padding_and_packing(byte, two_tasks, kind):
  task = two_tasks
  lengths = {"inputs": 128, "targets": 32}  # room for several examples
  padded = next(data.train_batches(task, byte, lengths, 8, kind, seed=1))
  packed = next(data.train_batches(task, byte, lengths, 8, kind, seed=1,
                                   pack=True))
  total = sum(lengths.values()) if kind == "decoder" else lengths["targets"]
  for b in (padded, packed):
    assert b["decoder_target_tokens"].shape == (8, total)
    assert b["task_index"].shape == (8,)
    real = b["decoder_target_tokens"] != 0
    np.testing.assert_array_equal(b["token_task_index"] >= 0, real)
    weights = b["decoder_loss_weights"]
    assert not (weights & ~real).any()  # never a loss on padding
  segments = packed["decoder_segment_ids"]
  assert segments.max() > 1  # rows hold several examples
  assert "decoder_segment_ids" not in padded
  for row in range(8):
    # padded rows: one example; the loss covers exactly its target tokens.
    target = padded["decoder_target_tokens"][row]
    ti = padded["token_task_index"][row]
    assert len(set(ti[ti >= 0])) == 1
    if kind == "decoder":
      causal = padded["decoder_causal_attention"][row]
      n_in = causal.sum() - 1  # prefix = inputs (+ 1 position, seqio)
      assert padded["decoder_loss_weights"][row, :n_in].sum() == 0
      n_target = (target != 0).sum() - n_in
      assert padded["decoder_loss_weights"][row].sum() == n_target
    # packed rows: positions restart per segment and task ids follow them.
    seg, pos = segments[row], packed["decoder_positions"][row]
    for s in set(seg[seg > 0]):
      idx = np.where(seg == s)[0]
      np.testing.assert_array_equal(pos[idx], np.arange(len(idx)))
      assert len(set(packed["token_task_index"][row, idx])) == 1
  inputs = data.model_inputs(packed, kind)
  key = "segment_ids" if kind == "decoder" else "decoder_segment_ids"
  np.testing.assert_array_equal(inputs[key], segments)


def test_shards_are_disjoint_and_cover(byte):
  task = tasks.seqio_name(byte, "compare")
  everything = {ex["inputs"] for ex in suite.examples("compare", "validation")}
  seen = []
  for index in range(3):
    b = data.train_batches(task, byte, LENGTHS, 1, "encoder_decoder", seed=0,
                           shard_index=index, num_shards=3, split="validation",
                           num_epochs=1)
    seen.append([_decode(byte, x["encoder_input_tokens"][0]) for x in b])
  sets = [set(s) for s in seen]
  assert sum(len(s) for s in seen) == len(everything)
  assert set.union(*sets) == everything
  assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])


@pytest.mark.parametrize("kind,pack", [("encoder_decoder", False),
                                       ("decoder", True)])
def test_resume_equals_uninterrupted(byte, two_tasks, kind, pack):
  task = two_tasks
  full = data.train_batches(task, byte, LENGTHS, 4, kind, seed=7, pack=pack)
  full = [next(full) for _ in range(6)]
  resumed = data.train_batches(task, byte, LENGTHS, 4, kind, seed=7,
                               pack=pack, start_step=4)
  for want in full[4:]:
    got = next(resumed)
    assert got.keys() == want.keys()
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  if not pack:
    other = next(data.train_batches(task, byte, LENGTHS, 4, kind, seed=8))
    assert not np.array_equal(other["decoder_target_tokens"],
                              full[0]["decoder_target_tokens"])


# ------------------------------------------------------------ vocabularies


def _bundled_text():
  return [ex["inputs"] + " " + ex["targets"] for t in suite.TASKS
          for ex in suite.examples(t, "train", max_examples=100)]


def test_vocabularies_round_trip(tmp_path):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tokenizers  # pylint: disable=g-import-not-at-top
  from tokenizers import decoders, models, pre_tokenizers, trainers  # pylint: disable=g-import-not-at-top
  text = _bundled_text()
  spm_path = data.train_sentencepiece(text, str(tmp_path / "spm"), 200)
  tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(text, trainers.BpeTrainer(
      vocab_size=400, special_tokens=["<pad>", "</s>", "<unk>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tok.save(str(tmp_path / "tokenizer.json"))
  samples = ["Reverse the letters: hello", "What is 12 plus 30?", "ab ba"]
  for spec in ("byte", f"spm:{spm_path}", f"hf:{tmp_path}/tokenizer.json"):
    vocab = data.vocabulary(spec)
    assert vocab.pad_id == 0 and vocab.eos_id == 1
    assert data.pad_token_id(vocab) == (1 if spec.startswith("hf:") else 0)
    for s in samples:
      ids = vocab.encode(s)
      assert vocab.decode(ids) == s
      assert vocab.decode(list(ids) + [vocab.eos_id, 7, 7]) == s  # stop at EOS
      tf_ids = vocab.encode_tf(tf.constant(s)).numpy().tolist()
      assert tf_ids == list(ids), spec
      assert vocab.decode_tf(tf.constant(ids)).numpy().decode() == s
    if spec != "byte":
      assert len(vocab.encode(samples[0])) < len(samples[0].encode())
  with pytest.raises(ValueError, match="unknown vocabulary spec"):
    data.vocabulary("gpt2")
  # A seqio task tokenized by the HF vocabulary, end to end.
  hf = data.vocabulary(f"hf:{tmp_path}/tokenizer.json")
  rows = data.eval_examples("copy", hf, max_examples=3)
  for row in rows:  # LM formatting: no EOS after the prompt; EOS ends targets
    assert hf.decode(row["input_ids"]) == row["inputs"]
    assert hf.eos_id not in row["input_ids"]
    assert row["target_ids"][-1] == hf.eos_id
    assert row["targets"].startswith(" ")


# ------------------------------------------------------------ eval helpers


def test_eval_examples_and_metrics(byte):
  rows = data.eval_examples("parity", byte, max_examples=20)
  want = suite.examples("parity", "validation", max_examples=20)
  assert [r["inputs"] for r in rows] == [w["inputs"] for w in want]
  for r, w in zip(rows, want):
    assert r["answer_choices"] == ["even", "odd"] and r["label"] == w["label"]
    assert _decode(byte, r["choice_ids"][r["label"]]) == r["targets"]
    assert r["choice_ids"][0][-1] == byte.eos_id
  assert data.task_kind("parity", byte) == "rank_classification"
  assert data.task_kind("add", byte) == "generation"
  gen = data.eval_examples("add", byte, split="test", max_examples=2)
  assert "answer_choices" not in gen[0]
  assert _decode(byte, gen[0]["target_ids"]) == gen[0]["targets"]
  (fn,) = data.metric_fns("parity", byte)
  assert fn(targets=["odd", "even"], predictions=["odd", "odd"]) == {
      "accuracy": 0.5}


# ----------------------------------------------------------------- tfds


def test_tfds_task_with_mock_data(byte):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  def to_text(ex):
    label = tf.gather(tf.constant(["negative", "positive"]), ex["label"])
    return {"inputs": tf.strings.join(["Review: ", ex["text"]]),
            "targets": label}
  name = tasks.register_tfds_task("imdb_mock", "imdb_reviews/plain_text:1.0.0",
                                  byte, to_text, ["negative", "positive"])
  with tfds.testing.mock_data(num_examples=6):
    rows = data.eval_examples(name, byte, split="test")
    batch = next(data.train_batches(name, byte, {"inputs": 32, "targets": 8},
                                    4, "encoder_decoder", seed=0))
  assert len(rows) == 6
  for r in rows:
    assert r["inputs"].startswith("Review: ")
    assert r["answer_choices"][r["label"]] == r["targets"]
  assert batch["encoder_input_tokens"].shape == (4, 32)
  assert (batch["task_index"] == 0).all()


# ------------------------------------------------------------ bad input


def _jsonl(path, rows):
  path.write_text("".join(r if isinstance(r, str) else json.dumps(r) + "\n"
                          for r in rows))
  return str(path)


COPA_ROW = dict(premise="It rained.", choice1="The grass got wet.",
                choice2="The sun shone.", question="effect", label=0)


def _copa_template():
  return templates.Template(
      id="t", name="plain copa", path="inline.yaml",
      answer_choices="{{choice1}} ||| {{choice2}}",
      jinja="{{premise}} What happened? ||| {{answer_choices[label]}}")


def test_malformed_jsonl_line_is_named_or_skipped(tmp_path):
  path = _jsonl(tmp_path / "bad.jsonl", [COPA_ROW, "{not json\n", COPA_ROW])
  task = tasks.FileTask("bad", (("validation", path),), "jsonl", dict,
                        _copa_template())
  with pytest.raises(tasks.BadRowError, match=rf"{path}:2: malformed JSON"):
    tasks.render(task, "validation")
  skip = tasks.FileTask("bad", (("validation", path),), "jsonl", dict,
                        _copa_template(), on_bad_row="skip")
  rows, skipped = tasks.render(skip, "validation")
  assert len(rows) == 2 and skipped == {"malformed JSON": 1}


def test_template_missing_field_names_template_file_line_field(tmp_path):
  row = {k: v for k, v in COPA_ROW.items() if k != "premise"}
  path = _jsonl(tmp_path / "rows.jsonl", [COPA_ROW, row])
  task = tasks.FileTask("missing", (("validation", path),), "jsonl", dict,
                        _copa_template())
  with pytest.raises(templates.TemplateFieldError) as e:
    tasks.render(task, "validation")
  message = str(e.value)
  for part in ("'plain copa'", "inline.yaml", f"{path}:2", "'premise'"):
    assert part in message


def test_empty_target_is_named_or_skipped(tmp_path):
  path = _jsonl(tmp_path / "rows.jsonl",
                [COPA_ROW, dict(COPA_ROW, choice1=" "), COPA_ROW])
  task = tasks.FileTask("empty", (("validation", path),), "jsonl", dict,
                        _copa_template())
  with pytest.raises(tasks.BadRowError, match=rf"{path}:2: empty target"):
    tasks.render(task, "validation")
  rows, skipped = tasks.render(tasks.FileTask(
      "empty", (("validation", path),), "jsonl", dict, _copa_template(),
      on_empty_target="skip"), "validation")
  assert len(rows) == 2 and skipped == {"empty target (task empty)": 1}


def test_too_long_truncates_by_default_or_errors(byte):
  task = tasks.seqio_name(byte, "sentiment")
  short = {"inputs": 12, "targets": 16}
  b = next(data.train_batches(task, byte, short, 4, "encoder_decoder", seed=0))
  np.testing.assert_array_equal(b["encoder_input_tokens"][:, -1], byte.eos_id)
  with pytest.raises(ValueError) as e:
    next(data.train_batches(task, byte, short, 4, "encoder_decoder", seed=0,
                            on_too_long="error"))
  message = str(e.value)
  assert "mtjax.byte.sentiment" in message and "Review:" in message
  assert "limit 12" in message


@pytest.mark.parametrize("kind", ["encoder_decoder", "decoder"])
def test_training_cuts_rows_as_evaluation_does(byte, kind):
  """A long prompt keeps its end (the question next to the answer) in
  training exactly as in evaluation's score_rows, and count_truncated counts
  the rows that lose tokens."""
  task = tasks.seqio_name(byte, "sentiment")
  short = {"inputs": 12, "targets": 4}
  b = next(data.train_batches(task, byte, short, 8, kind, seed=0,
                              shuffle=False))
  rows = data.eval_examples(task, byte, split="train", max_examples=8)
  ref = evaluate.score_rows([(r["input_ids"], r["target_ids"]) for r in rows],
                            kind, short)
  keys = (["encoder_input_tokens", "decoder_target_tokens"]
          if kind == "encoder_decoder" else ["decoder_target_tokens"])
  for k in keys:
    np.testing.assert_array_equal(b[k], ref[k])
  np.testing.assert_array_equal(b["decoder_loss_weights"],
                                ref["decoder_loss_weights"])
  long = [i for i, r in enumerate(rows) if len(r["input_ids"]) > 12]
  assert long
  for i in long:   # the prompt's last tokens survive, not its first
    kept = (b["encoder_input_tokens"][i] if kind == "encoder_decoder"
            else b["decoder_target_tokens"][i])
    width = 12 if kind == "encoder_decoder" else 16 - len(
        rows[i]["target_ids"][:16])
    np.testing.assert_array_equal(kept[:width],
                                  rows[i]["input_ids"][-width:])
  cut, total = data.count_truncated(task, byte, short, kind, max_rows=8)
  assert total == 8 and cut == sum(
      data.fit_row(r["input_ids"], r["target_ids"], kind, short)[2]
      for r in rows) and cut > 0


@pytest.mark.parametrize("kind", ["encoder_decoder", "decoder"])
def test_trimmed_batches_drop_only_padding(byte, kind):
  """trim_to cuts a batch to its longest row (rounded up): the kept slots are
  the full batch's, every dropped slot is padding (no loss, no attention)."""
  task = tasks.seqio_name(byte, "copy")
  full = next(data.train_batches(task, byte, LENGTHS, 8, kind, seed=0))
  cut = next(data.train_batches(task, byte, LENGTHS, 8, kind, seed=0,
                                trim_to=8))
  assert set(cut) == set(full)
  shorter = 0
  for k, v in cut.items():
    np.testing.assert_array_equal(v, full[k][:, :v.shape[1]] if v.ndim == 2
                                  else full[k])
    if v.ndim == 2 and v.shape[1] < full[k].shape[1]:
      shorter += 1
      assert v.shape[1] % 8 == 0
      dropped = full[k][:, v.shape[1]:]
      if k in ("decoder_loss_weights", "decoder_causal_attention",
               "encoder_input_tokens", "decoder_target_tokens"):
        assert not dropped.any(), k
  assert shorter, "copy rows are shorter than LENGTHS: something is cut"
