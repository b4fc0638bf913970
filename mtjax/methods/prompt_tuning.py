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

MPT's prompt distillation (Wang et al. 2023, Sec. 3.2): per-task teacher
prompts (K, P, d), trained first by vanilla prompt tuning (e.g. PromptTuning
with num_experts=K on the same mixture, rows choosing their task's prompt),
supervise the multiplicative student: the task loss gains
lambda_kl * KL(teacher || student) of the next-token distributions and
lambda_mse * the mean squared difference of the final hidden states, per
target token (`distillation_loss`, a custom loss for the one fit loop; a
multitask prompt configured with `teacher_prompts` gives it as
`method.training_loss(task_loss)`). The final hidden state is the input of
the output projection (lm_head, or the tied embedding's `attend`), read with
an interceptor (`final_hidden_hook`).

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

# MPT's weight of the distillation terms, L_PLM + lambda * (L_logits +
# L_hidden) (Wang et al. 2023, Sec. 3.2; 0.9 in its experimental set-up).
MPT_LAMBDA = 0.9

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
               teacher_prompts: Union[str, Sequence[str], ArrayLike,
                                      None] = None,
               lambda_kl: float = MPT_LAMBDA, lambda_mse: float = MPT_LAMBDA,
               temperature: float = 1.0, **kwargs: Any) -> None:
    """teacher_prompts (MPT distillation, see `training_loss`): a (K, P, d)
    array or what `load_teacher_prompts` reads; lambda_kl, lambda_mse and
    temperature weight its terms (`distillation_loss`)."""
    super().__init__(**kwargs)
    if composition not in ("multiplicative", "additive"):
      raise ValueError(f"composition {composition!r}: 'multiplicative' "
                       "(S * u v^T, Wang et al.) or 'additive' (S + D_t)")
    if num_tasks < 1:
      raise ValueError("multitask prompt tuning needs num_tasks >= 1")
    self.num_tasks, self.composition = int(num_tasks), composition
    empty = isinstance(teacher_prompts, str) and not teacher_prompts
    self.teacher_prompts = None if empty else teacher_prompts
    self.lambda_kl, self.lambda_mse = float(lambda_kl), float(lambda_mse)
    self.temperature = float(temperature)

  def training_loss(self, task_loss: Callable) -> Callable:
    """The fit loop's loss: `task_loss` plus MPT's distillation from the
    configured teacher prompts (`distillation_loss`), or `task_loss` itself
    when none are configured."""
    if self.teacher_prompts is None:
      return task_loss
    teacher = load_teacher_prompts(self.teacher_prompts)
    if teacher.shape[0] != self.num_tasks:
      raise ValueError(f"{teacher.shape[0]} teacher prompts for num_tasks="
                       f"{self.num_tasks}: give one per task")
    return distillation_loss(teacher, task_loss, lambda_kl=self.lambda_kl,
                             lambda_mse=self.lambda_mse,
                             temperature=self.temperature)

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


# ------------------------------------------------------ MPT distillation --


def load_teacher_prompts(source: Union[str, Sequence[str], ArrayLike]
                         ) -> np.ndarray:
  """(K, P, d) float32 teacher prompts, one per task (task order = index).

  source: a (K, P, d) array; a .npy file; a saved prompt-tuning adapter
  holding one prompt per task (num_experts=K); or a sequence of K single
  prompts (adapters or (P, d) arrays), stacked.
  """
  if isinstance(source, str):
    if source.endswith(".npy"):
      out = np.load(source)
    else:
      tree = adapters.load_adapter(source)
      if "embedding" not in tree.get("prompt", {}):
        raise ValueError(f"{source} holds no vanilla prompt-tuning prompt "
                         f"(params {sorted(tree)}); teachers come from "
                         "PromptTuning")
      out = tree["prompt"]["embedding"]
  elif (isinstance(source, (list, tuple)) and source
        and isinstance(source[0], str)):
    out = np.stack([load_teacher_prompts(s) for s in source])
    out = out.reshape((-1,) + out.shape[-2:])
  else:
    out = np.asarray(source)
  out = np.asarray(out, np.float32)
  if out.ndim == 2:
    out = out[None]
  if out.ndim != 3:
    raise ValueError(f"teacher prompts must be (K, P, d), got {out.shape}")
  return out


def final_hidden_hook(store: list) -> Callable:
  """Interceptor appending the final hidden state (B, T, d) to `store`.

  It is the input of the output projection: an `lm_head` layers.Linear, or
  the tied embedding's `attend` (decoder-only models with tied embeddings,
  BLOOM; original T5, whose decoder output is scaled by d_model**-0.5 first).
  """
  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if ((isinstance(module, layers.Embed) and context.method_name == "attend")
        or (isinstance(module, layers.Linear)
            and context.method_name == "__call__"
            and module.path[-1:] == ("lm_head",))):
      store.append(args[0])
    return next_fun(*args, **kwargs)
  return interceptor


def _with_hidden(fn):
  """(fn() logits (B, T, V), final hidden (B, T, d) at the logits' positions)."""
  store = []
  with nn.intercept_methods(final_hidden_hook(store)):
    logits = fn()
  if len(store) != 1:
    raise ValueError(f"saw {len(store)} output projections (lm_head or a tied "
                     "embedding's attend) in one forward; need exactly one")
  # Decoder-only prompts add P leading positions to the hidden states only.
  return logits, store[0][:, store[0].shape[1] - logits.shape[1]:]


def distillation_terms(method: PromptTuning, model: Model, params: dict,
                       inputs: dict, teacher: jax.Array, *,
                       rng: Optional[jax.Array] = None,
                       deterministic: bool = True,
                       temperature: float = 1.0) -> tuple:
  """Student logits (B, T, V) and per-token KL, MSE (B, T) to the teachers.

  inputs: method.apply inputs with 'adapter_index' (B,) choosing each row's
  teacher prompt from teacher (K, P, d). KL(teacher || student) of the
  next-token distributions at `temperature` (times temperature**2, Hinton et
  al.'s gradient scale); MSE: the squared difference of the final hidden
  states, averaged over d. The teacher runs deterministically, without
  gradients.
  """
  if inputs.get("adapter_index") is None:
    raise ValueError("MPT distillation needs inputs['adapter_index'] (B,) "
                     "int32: each example's task, choosing its teacher prompt")
  logits, hidden = _with_hidden(lambda: method.apply(
      model, params, inputs, rng=rng, deterministic=deterministic))
  prompt = jnp.take(jnp.asarray(teacher, jnp.float32),
                    inputs["adapter_index"], axis=0)
  t_logits, t_hidden = jax.lax.stop_gradient(_with_hidden(
      lambda: prompted_apply(model, params, inputs, prompt,
                             embedding=method.embedding, scope=method.scope,
                             placeholder_id=method.placeholder_id)))
  t = jnp.float32(temperature)
  t_logp = jax.nn.log_softmax(t_logits.astype(jnp.float32) / t)
  s_logp = jax.nn.log_softmax(logits.astype(jnp.float32) / t)
  kl = (jnp.exp(t_logp) * (t_logp - s_logp)).sum(-1) * t * t
  diff = hidden.astype(jnp.float32) - t_hidden.astype(jnp.float32)
  return logits, kl, jnp.mean(diff * diff, axis=-1)


class _Distilling:
  """The student method for a task loss: its `apply` also computes the
  distillation terms of the same forward (`distillation_terms`) into `seen`."""

  def __init__(self, method, teacher, temperature, seen):
    self._method, self._teacher = method, teacher
    self._temperature, self._seen = temperature, seen

  def __getattr__(self, name):
    return getattr(self._method, name)

  def apply(self, model, params, inputs, *, rng=None, deterministic=True,
            **kwargs):
    if kwargs or self._seen:
      raise ValueError("the distillation loss wraps one plain forward of the "
                       "task loss (no decoding, one method.apply call)")
    logits, kl, mse = distillation_terms(
        self._method, model, params, inputs, self._teacher, rng=rng,
        deterministic=deterministic, temperature=self._temperature)
    self._seen.update(kl=kl, mse=mse)
    return logits


def distillation_loss(teacher_prompts: Union[str, Sequence[str], ArrayLike],
                      task_loss: Callable, *, lambda_kl: float = MPT_LAMBDA,
                      lambda_mse: float = MPT_LAMBDA,
                      temperature: float = 1.0) -> Callable:
  """MPT's prompt distillation as a loss for the one fit loop.

  Wang et al. 2023, "Multitask Prompt Tuning Enables Parameter-Efficient
  Transfer Learning" (arXiv:2303.02861), Sec. 3.2: the student (a
  MultitaskPromptTuning, S * u_k v_k^T) is trained with its task loss plus
  lambda (KL(teacher || student) + MSE of the final hidden states), the
  teacher being the frozen model with task k's vanilla prompt-tuning prompt.

  task_loss: loss(method, model, kind, params, batch, rng) -> per-token (nll,
  correct, weights) (B, L), e.g. trainer.target_token_loss; it must call
  method.apply once, and its (B, L) must be the logits' positions. Returns a
  loss of the same signature whose nll adds lambda_kl * KL + lambda_mse * MSE
  per token (`distillation_terms`), so they count on the task loss's
  weighted (target) tokens; with both lambdas 0 it equals `task_loss`.
  teacher_prompts: (K, P, d) or what `load_teacher_prompts` reads.
  """
  teacher = load_teacher_prompts(teacher_prompts)

  def loss(method, model, kind, params, batch, rng):
    if not isinstance(method, PromptTuning):
      raise ValueError(f"MPT distillation trains a prompt; got "
                       f"{type(method).__name__}")
    seen = {}
    nll, correct, weights = task_loss(
        _Distilling(method, teacher, temperature, seen), model, kind, params,
        batch, rng)
    if not seen:
      raise ValueError("the task loss never called method.apply")
    if seen["kl"].shape != nll.shape:
      raise ValueError(f"the task loss's per-token nll {nll.shape} is not at "
                       f"the logits' positions {seen['kl'].shape}")
    return (nll + lambda_kl * seen["kl"] + lambda_mse * seen["mse"], correct,
            weights)
  return loss
