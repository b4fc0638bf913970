"""Prompt tuning and multitask prompt tuning, without the model knowing.

Prompt tuning (Lester et al. 2021, "The Power of Scale for Parameter-Efficient
Prompt Tuning", arXiv:2104.08691): P learned vectors are prepended to the input
embeddings (the encoder's for T5, the whole input for decoder-only models).
Here the model is untouched: `apply` prepends P placeholder ids to input_ids
and ones to attention_mask (positions then follow from the mask, as in HF), and
an interceptor on the input `layers.Embed.__call__` overwrites the embeddings
at those P positions with the prompt. Decoder-only logits come back with the P
prompt positions removed, so targets line up exactly as without a prompt.
Init: 'vocab' (embeddings of tokens sampled from the first `sample_vocab`
ids), 'labels' (given answer-choice token ids first, then vocab samples, as
Lester et al.), 'uniform' (U(-0.5, 0.5)), or a source prompt (`init_from`).

Multitask prompt tuning (Wang et al. 2023, "Multitask Prompt Tuning Enables
Parameter-Efficient Transfer Learning", arXiv:2303.02861): a shared prompt
S (P, d) and per-task rank-1 factors u_t (P,), v_t (d,) give the prompt of task
t as S * (u_t v_t^T) ('multiplicative', the paper's) or S + D_t ('additive').
All are trained jointly on a mixture; inputs['adapter_index'] (B,) (the task
index) picks each example's prompt. The learned S initialises target-task
prompts (prompt transfer, `init_from`).

KV-cached decoding (mtjax.methods.transform): decode=PREFILL prepends the
prompt like the plain forward, so the cache holds the P prompt vectors before
the tokens (size it for P more slots: the creation call, cache=None, prepends
them too); decode=STEP runs the new tokens alone. For T5 the prompt goes into
the encoder (method='encode'); a decoder call (method='decode', no input_ids)
with an `encoded` P longer than its `attention_mask` gets P ones prepended to
the mask.
"""
import functools
import re
from typing import Any, Callable, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from mtjax.methods import adapters, transform
from mtjax.models import layers

# Module path/method scopes whose embedding calls are the prompted input.
ENCODER_SCOPE = r"(encoder(/.*)?:.*|:encode)"
EMBED_PATTERN = r"(.*/)?(shared|embed_tokens|word_embeddings|wte)"

Model = Any  # a flax linen module (mtjax.models)


def embedding_path(model: Model, pattern: str = EMBED_PATTERN) -> str:
  """'/'-joined path of the input token embedding module (a layers.Embed)."""
  flat = transform.flatten(nn.unbox(transform.abstract_params(model)))
  paths = sorted(p[:-len("/embedding")] for p in flat
                 if p.endswith("/embedding") or p == "embedding")
  hits = [p for p in paths if re.fullmatch(pattern, p)]
  if len(hits) != 1:
    raise ValueError(f"embedding pattern {pattern!r} matched {hits} among "
                     f"embedding modules {paths}; set config.embedding to one")
  return hits[0]


def embedding_table(model: Model, base_params: dict,
                    pattern: str = EMBED_PATTERN) -> jax.Array:
  path = embedding_path(model, pattern)
  return transform.lookup(base_params, path.split("/"))["embedding"]


def prompt_init(rng: jax.Array, table: ArrayLike, length: int,
                init: str = "vocab", sample_vocab: int = 5000,
                label_ids: Sequence[int] = ()) -> jax.Array:
  """(length, d) initial prompt from an embedding table (vocab, d)."""
  vocab, d = table.shape
  if init == "uniform":
    return jax.random.uniform(rng, (length, d), jnp.float32, -0.5, 0.5)
  if init not in ("vocab", "labels"):
    raise ValueError(f"prompt init {init!r}: use 'vocab', 'labels', 'uniform' "
                     "or init_from=<source prompt>")
  ids = jax.random.randint(rng, (length,), 0, min(sample_vocab, vocab))
  if init == "labels":
    label_ids = np.asarray(label_ids, np.int32).reshape(-1)[:length]
    if not len(label_ids):
      raise ValueError("init='labels' needs label_ids (answer-choice token ids)")
    ids = ids.at[:len(label_ids)].set(label_ids)
  return jnp.asarray(table)[ids].astype(jnp.float32)


@transform.METHODS.register("prompt_tuning")
class PromptTuning:
  """Soft prompt of `length` vectors (one, or one per task with num_tasks)."""
  trainable = r"prompt/.*"
  cached_decoding = True  # the prompt is cached by the prefill (docstring)

  def __init__(self, length: int = 20, init: str = "vocab",
               sample_vocab: int = 5000, label_ids: Sequence[int] = (),
               init_from: Union[str, ArrayLike, None] = None,
               embedding: str = EMBED_PATTERN, scope: Optional[str] = None,
               num_experts: int = 0,
               placeholder_id: Optional[int] = None) -> None:
    if length < 0:
      raise ValueError(f"prompt length must be >= 0, got {length}")
    self.length, self.init_kind, self.sample_vocab = int(length), init, sample_vocab
    self.label_ids = tuple(label_ids)
    self.init_from = None if isinstance(init_from, str) and not init_from \
        else init_from
    self.embedding, self.scope = embedding, scope
    self.num_experts, self.placeholder_id = int(num_experts), placeholder_id

  # -- params ---------------------------------------------------------------
  def _source(self, length):
    src = self.init_from
    if isinstance(src, str):
      src = adapters.source_prompt(src)
    src = jnp.asarray(src, jnp.float32)
    if src.ndim != 2 or src.shape[0] < length:
      raise ValueError(f"init_from prompt has shape {src.shape}; need "
                       f"(P>={length}, d)")
    return src[:length]

  def _initial(self, rng, model, base_params):
    if self.init_from is not None:
      return self._source(self.length)
    if base_params is None and self.init_kind != "uniform":
      raise ValueError(f"init={self.init_kind!r} reads the base embeddings: pass "
                       "base_params to init")
    table = (embedding_table(model, base_params, self.embedding)
             if base_params is not None else
             jnp.zeros((1, model_dim(model))))
    return prompt_init(rng, table, self.length, self.init_kind, self.sample_vocab,
                       self.label_ids)

  def init(self, rng: jax.Array, model: Model,
           base_params: Optional[dict] = None) -> dict:
    prompt = self._initial(rng, model, base_params)
    if self.num_experts:
      prompt = jnp.broadcast_to(prompt, (self.num_experts,) + prompt.shape)
      return {"prompt": {"embedding": transform.boxed(
          prompt, ("adapters", "length", "embed"))}}
    return {"prompt": {"embedding": transform.boxed(prompt, ("length", "embed"))}}


  def prompts(self, params: dict,
              adapter_index: Optional[jax.Array]) -> jax.Array:
    """(P, d) or per-example (B, P, d)."""
    return transform.select(params["prompt"]["embedding"], adapter_index, 2)

  # -- forward --------------------------------------------------------------
  def apply(self, model: Model, params: dict, inputs: dict, *,
            rng: Optional[jax.Array] = None, deterministic: bool = True,
            method: Union[str, Callable, None] = None,
            decode: Optional[str] = None, cache: Optional[dict] = None) -> Any:
    """Logits, or (logits, cache) with `decode` (see the module docstring)."""
    params = {**params, "prompt": nn.unbox(params["prompt"])}
    return prompted_apply(model, params, inputs,
                          self.prompts(params, inputs.get("adapter_index")),
                          embedding=self.embedding, scope=self.scope,
                          placeholder_id=self.placeholder_id,
                          rng=rng, deterministic=deterministic, method=method,
                          decode=decode, cache=cache)


@transform.METHODS.register("multitask_prompt")
class MultitaskPromptTuning(PromptTuning):
  """Shared prompt S (P, d) composed with per-task components (see docstring)."""
  trainable = r"prompt/.*"

  def __init__(self, num_tasks: int, composition: str = "multiplicative",
               **kwargs: Any) -> None:
    super().__init__(**kwargs)
    if composition not in ("multiplicative", "additive"):
      raise ValueError(f"composition {composition!r}: 'multiplicative' "
                       "(S * u v^T, Wang et al.) or 'additive' (S + D_t)")
    if num_tasks < 1:
      raise ValueError("multitask prompt tuning needs num_tasks >= 1")
    self.num_tasks, self.composition = int(num_tasks), composition

  def init(self, rng: jax.Array, model: Model,
           base_params: Optional[dict] = None) -> dict:
    shared = self._initial(rng, model, base_params)
    n, (p, d) = self.num_tasks, shared.shape
    tree = {"shared": transform.boxed(shared, ("length", "embed"))}
    if self.composition == "multiplicative":
      tree["u"] = transform.boxed(jnp.ones((n, p)), ("adapters", "length"))
      tree["v"] = transform.boxed(jnp.ones((n, d)), ("adapters", "embed"))
    else:
      tree["delta"] = transform.boxed(jnp.zeros((n, p, d)),
                                      ("adapters", "length", "embed"))
    return {"prompt": tree}

  def prompts(self, params: dict,
              adapter_index: Optional[jax.Array]) -> jax.Array:
    tree = params["prompt"]
    if adapter_index is None:
      raise ValueError("multitask prompt tuning needs inputs['adapter_index'] "
                       "(B,) int32: each example's task index")
    s = tree["shared"]
    if self.composition == "multiplicative":
      u = jnp.take(tree["u"], adapter_index, axis=0)      # (B, P)
      v = jnp.take(tree["v"], adapter_index, axis=0)      # (B, d)
      return s[None] * u[:, :, None] * v[:, None, :]
    return s[None] + jnp.take(tree["delta"], adapter_index, axis=0)


def model_dim(model: Model) -> int:
  flat = transform.flatten(nn.unbox(transform.abstract_params(model)))
  return next(v.shape[-1] for k, v in flat.items() if k.endswith("embedding"))


def prompted_apply(model: Model, params: dict, inputs: dict, prompt: jax.Array,
                   *, embedding: str = EMBED_PATTERN, scope: Optional[str] = None,
                   placeholder_id: Optional[int] = None,
                   rng: Optional[jax.Array] = None, deterministic: bool = True,
                   method: Union[str, Callable, None] = None,
                   decode: Optional[str] = None,
                   cache: Optional[dict] = None) -> Any:
  """Runs `model` with `prompt` (P, d) or (B, P, d) prepended to the input.

  decode/cache: KV-cached decoding (see the module docstring); then returns
  (logits, cache).
  """
  inputs = dict(transform.model_kwargs(inputs))
  length = prompt.shape[-2]
  enc_dec = model.config.is_encoder_decoder
  plain = functools.partial(transform.run, model, params["base"], rng=rng,
                            deterministic=deterministic, method=method,
                            decode=decode, cache=cache)
  if enc_dec and "input_ids" not in inputs:  # T5.decode on a prompted encoding
    mask = inputs.get("attention_mask")
    encoded = inputs.get("encoded")
    if (length and mask is not None and encoded is not None
        and encoded.shape[1] == mask.shape[1] + length):
      mask = jnp.asarray(mask)
      inputs["attention_mask"] = jnp.concatenate(
          [jnp.ones((mask.shape[0], length), mask.dtype), mask], axis=1)
    return plain(inputs, [])
  if length == 0 or transform.check_decode(decode) == transform.STEP:
    return plain(inputs, [])
  for key in (("encoder_segment_ids", "encoder_positions") if enc_dec
              else ("segment_ids", "positions")):
    if inputs.get(key) is not None:
      raise ValueError(f"prompt tuning prepends to every row and cannot be "
                       f"combined with packed inputs ({key}); train unpacked")
  ids = jnp.asarray(inputs["input_ids"])
  batch = ids.shape[0]
  fill = model.config.pad_token_id if placeholder_id is None else placeholder_id
  fill = 0 if fill is None else fill
  inputs["input_ids"] = jnp.concatenate(
      [jnp.full((batch, length), fill, ids.dtype), ids], axis=1)
  mask = inputs.get("attention_mask")
  mask = jnp.ones_like(ids) if mask is None else jnp.asarray(mask)
  inputs["attention_mask"] = jnp.concatenate(
      [jnp.ones((batch, length), mask.dtype), mask], axis=1)
  total = inputs["input_ids"].shape[1]
  scope = (ENCODER_SCOPE if enc_dec else None) if scope is None else scope
  hits = []
  icpt = embed_interceptor(prompt, total, embedding_path(model, embedding),
                           scope, hits)
  out = plain(inputs, [icpt])
  if not hits:
    raise ValueError(
        f"no call of the embedding module {embedding!r} with length {total} "
        f"inside scope {scope!r} was "
        "seen, so the prompt was not inserted; set the method's scope to a "
        "regex over 'module/path:method' of the call that embeds input_ids")
  logits, cache = out if decode else (out, None)
  if not enc_dec and method is None:
    logits = logits[:, length:]
  return (logits, cache) if decode else logits


def embed_interceptor(prompt: jax.Array, total_length: int, embed_path: str,
                      scope: Optional[str], hits: list) -> Callable:
  """Overwrites the first P positions of the prompted input's embeddings.

  Tracks the stack of intercepted calls so that, for T5, only embedding calls
  made inside the encoder (`scope`, a regex over 'path:method' of any
  enclosing call) are prompted; the decoder's calls to the shared embedding
  are left alone.
  """
  stack = []
  scope_re = None if scope is None else re.compile(scope)

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    is_embed = (isinstance(module, layers.Embed)
                and context.method_name == "__call__"
                and "/".join(module.path) == embed_path)
    if not is_embed:
      stack.append(f"{'/'.join(module.path)}:{context.method_name}")
      try:
        return next_fun(*args, **kwargs)
      finally:
        stack.pop()
    out = next_fun(*args, **kwargs)
    in_scope = scope_re is None or any(scope_re.fullmatch(s) for s in stack)
    if not in_scope or out.ndim != 3 or out.shape[1] != total_length:
      return out
    hits.append("/".join(module.path))
    p = prompt.astype(out.dtype)
    length = p.shape[-2]
    if p.ndim == 2:
      p = jnp.broadcast_to(p, (out.shape[0],) + p.shape)
    return jnp.concatenate([p, out[:, length:]], axis=1)
  return interceptor
