"""Data: seqio tasks, mixtures and batches for multitask training and evaluation.

Everything is a real seqio Task/Mixture in seqio's global registries; this
package only builds them. Public API:

  vocab = vocabulary('byte')                       # or 'spm:/path/m.model',
                                                   # 'hf:/path/tokenizer.json',
                                                   # 'gguf:/path/model.gguf'
      -> seqio.Vocabulary (ByteVocabulary, SentencePieceVocabulary, or
         HFTokenizerVocabulary wrapping a Hugging Face `tokenizers` tokenizer,
         from a tokenizer.json or a GGUF file's metadata).
  pad_token_id(vocab), lm_format(vocab): see "Real LM vocabularies" below.
  train_sentencepiece(texts, model_prefix, vocab_size=256) -> path of .model

  reg = register(vocab, data_dir=None)             # idempotent per vocabulary
      -> Registered(held_in, held_out, real, mixtures, names):
         held_in / held_out: suite task names (plain, e.g. 'reverse');
         real: {dataset: [plain task names, one per prompt template]}, e.g.
               real['xcopa.et'] = ['xcopa.et.best_option', ...];
         mixtures: plain mixture names ('held_in', 'held_out', 'suite', ...);
         names: {plain name -> seqio name} for every task and mixture,
               seqio name = f'mtjax.{vocab_key}.{plain}'.
      data_dir defaults to $MTJAX_DATA_DIR or <repo>/../shared/data; when it
      is absent nothing real is registered (reg.real == {}).

  batches = train_batches(mixture_or_task, vocab, feature_lengths, batch_size,
                          model_kind, seed, start_step=0, shard_index=0,
                          num_shards=1, pack=False)
      mixture_or_task: plain or seqio name; feature_lengths: {'inputs': Li,
      'targets': Lt}; model_kind 'encoder_decoder' (seqio EncDecFeatureConverter)
      or 'decoder' (seqio PrefixLMFeatureConverter, loss on targets only).
      -> iterator of numpy dicts, each array (batch_size, ...) per process:
         encoder_decoder: encoder_input_tokens (B,Li), decoder_input_tokens,
           decoder_target_tokens, decoder_loss_weights (B,Lt) and, when packed,
           encoder_segment_ids/positions, decoder_segment_ids/positions;
         decoder: decoder_input_tokens, decoder_target_tokens,
           decoder_loss_weights, decoder_causal_attention (B, Li+Lt) and, when
           packed, decoder_segment_ids/positions;
         both: task_index (B,) int32 = index in batches.task_names of the
           row's (first) example; token_task_index (B, L_target) int32, the
           task of each target token (-1 on padding; differs from task_index
           only within packed rows).
      batches.task_names: list of seqio task names task_index refers to.
      Deterministic given seed. Resuming: start_step=s yields exactly the
      batches s, s+1, ... of the uninterrupted run (the pipeline is a pure
      function of the seed; it skips s batches, costing their preprocessing).
      Sharding: seqio.ShardInfo(shard_index, num_shards) per process; shards
      are disjoint and together cover each epoch. Options: on_too_long=
      'truncate' (`fit_row`, as evaluation cuts rows: a prompt keeps its end,
      a target its start; decoder rows share Li + Lt) | 'error' (ValueError
      naming the task and the example); split='train'; shuffle=True;
      num_epochs=None; trim_to=0 (> 0: each unpacked batch cut to its
      longest row rounded up to this multiple, `trim_batch`).
  fit_row(input_ids, target_ids, model_kind, feature_lengths) -> (inp, tgt,
      cut); count_truncated(mixture_or_task, vocab, feature_lengths,
      model_kind, split='train', max_rows=None) -> (rows cut, rows read).
  model_inputs(batch, model_kind) -> model keyword args (HF names: input_ids,
      attention_mask, decoder_input_ids, decoder_attention_mask, segment ids,
      positions) for mtjax.models; targets and weights stay in the batch.

  eval_examples(task, vocab, split='validation', max_examples=None)
      -> list of dicts: inputs (str), targets (str), input_ids, target_ids
         (lists of int, EOS appended like the task's features) and, for rank
         classification tasks, answer_choices (list of str), choice_ids
         (list of lists of int) and label (int index into answer_choices).
  metric_fns(task) -> the seqio task's metric functions, called as
      fn(targets=[str], predictions=[str]) -> {name: value}.
  task_kind(task) -> 'rank_classification' | 'generation'.
  few_shot(task, k, seed, split='validation', max_examples=None)
      -> suite examples with k train demonstrations prepended (MetaICL style).

  More in mtjax.data.tasks: FileTask + register_file_task (JSONL/TSV rows
  through a template; on_bad_row / on_empty_target = 'error' | 'skip'),
  register_tfds_task (seqio.TfdsDataSource), add_mixture (explicit rates),
  examples_proportional_rates (min(size, cap)), real_tasks(data_dir).

  load_templates(path) -> {template name: Template}; Template.apply(example)
      -> (input, target, answer_choices) rendered by Jinja (promptsource's
      YAML with !Template tags, loaded with a SafeLoader subclass).
  default_data_dir() -> pathlib.Path.

Suite (suite.py): 15 short text-to-text tasks generated from a seed, the
default data everywhere. held_in: copy, reverse, uppercase, sort_letters,
add, subtract, compare*, sentiment*, parity*, kv_lookup, list_max; held_out:
reverse_uppercase, sort_descending, add_compare*, is_palindrome* (* = rank
classification with answer_choices). Splits train/validation/test = 2000/
200/200; validation and test inputs never occur in train.

Real held-out tasks (from data_dir, one seqio task per template): xcopa.<lang>
(SuperGLUE COPA templates), xcopa_mt.<lang> (xP3mt per-language templates),
xcopa_gmt.<lang> (English back-translations), cb, copa, rte, wsc, boolq
(validation + FewGLUE train), winogrande, piqa, arc_easy, arc_challenge,
openbook_qa, commonsense_qa, hellaswag (promptsource templates) and a
'<dataset>.plain' choice format (llm-foundry's query/choices) for the
multiple-choice sets; siqa is plain only (its file keeps 2 of 3 answers).
Inputs carry EOS (seqio/T5 convention) in batches and eval_examples.

Real LM vocabularies (hf: and gguf: specs; `lm_format(vocab)` is True):
tasks are joined as the LM saw text in pretraining: BOS first if the
tokenizer adds one, no EOS after the prompt, the answer's leading space kept
with the answer (tasks.answer_delimiter), EOS after the target for training.
Their id 0 is a real token, so decoder batches carry 'decoder_mask' (1 =
a token of the text; seqio's start slot is not one) and padding holds
pad_token_id(vocab); eval_examples encodes answer choices as lm-eval does
(pipeline.lm_choices: no EOS, 'choice_bytes' for acc_norm).
"""
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence

from mtjax.data import pipeline, suite, tasks, templates
from mtjax.data import vocab as vocab_lib
from mtjax.data.tasks import Registered, default_data_dir  # noqa: F401


def vocabulary(spec: str):
  """seqio.Vocabulary from 'byte', 'spm:/path/model' or 'hf:/path/tokenizer.json'."""
  return vocab_lib.from_spec(spec)


def pad_token_id(vocab) -> int:
  """The id written into padded model-input slots (masks carry the truth)."""
  return vocab_lib.pad_token_id(vocab)


def lm_format(vocab) -> bool:
  """Whether tasks are formatted for a pretrained decoder-only LM."""
  return vocab_lib.lm_format(vocab)


def lm_choices(vocab, context: str, continuations: Sequence[str]
               ) -> Dict[str, Any]:
  """lm-eval's encoding of a prompt and answer choices (pipeline.lm_choices)."""
  return pipeline.lm_choices(vocab, context, list(continuations))


def train_sentencepiece(texts: Sequence[str], model_prefix: str,
                        vocab_size: int = 256, model_type: str = "bpe") -> str:
  """Trains a small sentencepiece model on texts; returns the .model path."""
  return vocab_lib.train_sentencepiece(texts, model_prefix, vocab_size, model_type)


def register(vocab, data_dir=None) -> Registered:
  """Registers suite, real eval tasks and mixtures for vocab (idempotent)."""
  return tasks.register(vocab, data_dir)


def task_names(mixture_or_task: str, vocab) -> List[str]:
  """seqio names of the tasks a batch's task_index refers to."""
  return pipeline.task_names(mixture_or_task, vocab)


def train_batches(mixture_or_task: str, vocab, feature_lengths: Mapping[str, int],
                  batch_size: int, model_kind: str, seed: int,
                  start_step: int = 0, shard_index: int = 0,
                  num_shards: int = 1, pack: bool = False,
                  **options) -> Iterator[Dict[str, Any]]:
  """Infinite iterator of numpy batches; has .task_names (see module doc)."""
  return pipeline.train_batches(
      mixture_or_task, vocab, feature_lengths, batch_size, model_kind, seed,
      start_step=start_step, shard_index=shard_index, num_shards=num_shards,
      pack=pack, **options)


def fit_row(inp: list, tgt: list, kind: str, lengths: Mapping[str, int]
            ) -> tuple:
  """(inputs, targets) ids cut as training and evaluation cut them."""
  return pipeline.fit_row(inp, tgt, kind, lengths)


def count_truncated(mixture_or_task: str, vocab,
                    feature_lengths: Mapping[str, int], model_kind: str,
                    split: str = "train", max_rows: Optional[int] = None
                    ) -> tuple:
  """(rows train_batches truncates, rows read) of a task's or mixture's
  split (see pipeline.count_truncated)."""
  return pipeline.count_truncated(mixture_or_task, vocab, feature_lengths,
                                  model_kind, split, max_rows)


def model_inputs(batch: Mapping[str, Any], model_kind: str) -> Dict[str, Any]:
  """Maps a train_batches batch to mtjax.models keyword arguments."""
  return pipeline.model_inputs(batch, model_kind)


def eval_examples(task: str, vocab, split: str = "validation",
                  max_examples: Optional[int] = None) -> List[Dict[str, Any]]:
  """Evaluation rows with text and token ids (see module doc)."""
  return pipeline.eval_examples(task, vocab, split, max_examples)


def metric_fns(task: str, vocab=None):
  """The seqio task's metric functions (vocab picks the registration)."""
  return pipeline.metric_fns(task, vocab)


def answer_match(task: str, vocab=None):
  """match(prediction, target) -> bool of a generation task."""
  return pipeline.answer_match(task, vocab)


def task_kind(task: str, vocab=None) -> str:
  """'rank_classification' or 'generation'."""
  return pipeline.task_kind(task, vocab)


def few_shot(task: str, k: int, seed: int, split: str = "validation",
             max_examples: Optional[int] = None) -> List[Dict[str, Any]]:
  """Suite examples with k train demonstrations prepended (MetaICL)."""
  return suite.few_shot(task, k, seed, split, max_examples)


def load_templates(path) -> Dict[str, Any]:
  """Promptsource templates.yaml -> {name: Template}."""
  return templates.load(path)
