"""Bad input that had no test of its own (docs/bad_input.md lists every row
and its test): an expert trained on another base, a library mixing ranks or
targets, a tokenizer larger than the model's embedding. Each error names
the input and the fix, and nothing already written changes."""
import os

import flax.linen as nn
import jax
import numpy as np
import pytest

from mtjax import data, methods
from mtjax.methods import library as disk
from mtjax.routing import experts as ex
from mtjax.training import trainer
from tests.test_lora import init_base, model_inputs, randomize_b, tiny_llama


@pytest.fixture(scope="module")
def llama():
  model = tiny_llama()
  return model, init_base(model, model_inputs(model))


def _expert(model, base, rank=2, targets=None, seed=1):
  lora = methods.build({"name": "lora", "rank": rank, "alpha": 4.0,
                        **({"targets": targets} if targets else {})})
  tree = randomize_b(nn.unbox(lora.init(jax.random.key(seed), model, base)),
                     seed=seed)
  return lora, tree["lora"]


def _snapshot(root):
  out = {}
  for d, _, files in os.walk(root):
    for f in files:
      with open(os.path.join(d, f), "rb") as fh:
        out[os.path.join(d, f)] = fh.read()
  return out


def test_expert_from_another_base_is_refused_by_fingerprint(llama, tmp_path):
  model, base = llama
  lora, tree = _expert(model, base)
  lib = ex.add_expert(ex.new_library(), "piqa", tree)
  root = str(tmp_path / "library")
  ex.save_library(lib, root, lora, base_params=base)
  before = _snapshot(root)
  other = jax.tree.map(lambda x: x + 1e-3, base)
  with pytest.raises(ValueError, match=r"'piqa'.*fingerprint.*Use a library "
                     "trained from this base"):
    ex.load_library(root, ["piqa"], base_params=other)
  loaded = ex.load_library(root, ["piqa"], base_params=base)   # same base
  np.testing.assert_array_equal(
      ex.stack_library(loaded, with_gates=False)["model"]["layers_0"][
          "self_attn"]["q_proj"]["lora_a"][0],
      tree["model"]["layers_0"]["self_attn"]["q_proj"]["lora_a"])
  assert _snapshot(root) == before


def test_library_mixing_ranks_or_targets_is_a_clear_error(llama, tmp_path):
  model, base = llama
  _, r2 = _expert(model, base, rank=2)
  _, r4 = _expert(model, base, rank=4, seed=2)
  _, qv = _expert(model, base, targets=[r".*self_attn/q_proj"], seed=3)
  mixed = ex.add_expert(ex.add_expert(ex.new_library(), "a", r2), "b", r4)
  with pytest.raises(ValueError, match="'b'.*mixes LoRA ranks.*merge_lora"):
    ex.stack_library(mixed, with_gates=False)
  other = ex.add_expert(ex.add_expert(ex.new_library(), "a", r2), "c", qv)
  with pytest.raises(ValueError, match="'c' adapts different modules.*same "
                     "LoRA targets"):
    ex.stack_library(other, with_gates=False)
  # The on-disk library: experts of different method configs do not stack.
  lib = disk.Library(str(tmp_path / "disk"))
  lib.add("a", {"name": "lora", "rank": 2}, {"lora": r2})
  lib.add("b", {"name": "lora", "rank": 4}, {"lora": r4})
  with pytest.raises(ValueError, match="different method configs"):
    lib.stack(["a", "b"])


def test_tokenizer_larger_than_the_embedding_is_refused(llama):
  model, _ = llama                      # 64 embedding rows
  vocab = data.vocabulary("byte")       # 259 ids
  with pytest.raises(ValueError, match=r"config.data.vocab: the tokenizer "
                     r"has \d+ ids but the model's embedding has 64 rows.*"
                     "Use the model's own tokenizer"):
    trainer.check_vocab(model, vocab)
  small = tiny_llama(vocab=vocab.vocab_size + 5)   # padded rows are fine
  trainer.check_vocab(small, vocab)
