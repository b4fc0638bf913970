"""Soft injection of task embeddings into attention heads.

Paper: "Soft Injection of Task Embeddings Outperforms Prompt-Based In-Context
Learning" (2025).

A task embedding is the mean, over M few-shot prompts of N demonstrations each,
of every attention head's output at the prompt's last position, shape
(layers, heads, head_dim). At inference the prompt is zero-shot and, at its last
position only, each head's output is mixed with the embedding before the
attention output projection:

    head <- (1 - alpha) * head + alpha * embedding,   alpha = sigmoid(logit)

with one learned logit per (layer, head) (init 0, alpha = 0.5), fitted with the
model frozen on the cross-entropy of the first target token (`first_token_loss`,
a custom loss for the one fit loop; the fitting itself, `fit_alpha`, lives in
mtjax.experiments.soft_injection because methods sit below training). The KV
cache carries the edited position into generation, so inference costs one
zero-shot forward pass.

The base models know nothing about this: every head output is read or edited by
intercepting the attention output projection (a `layers.Linear` whose input is
(B, T, heads * head_dim), head-major) with `nn.intercept_methods`.

Arrays:
  embedding  (L, H, D) for one task; (K, L, H, D) for a bank of K tasks.
  alpha_logits (L, H); (K, L, H) for a bank.
  positions  (B,) int32, the injection position of each row.
"""
import functools
import re
from typing import Any, Callable, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from mtjax import paths
from mtjax.methods import transform
from mtjax.models import decoder, decoding, layers

# Decoder-only self-attention output projections (Llama/Qwen2/Gemma/Mistral
# 'o_proj', BLOOM 'dense'); T5's decoder self-attention 'o'.
# Patterns are fully matched against '/'-joined module paths (as in
# mtjax.methods.transform and PEFT's target_modules).
DECODER_PATTERN = r".*(self_attn/o_proj|self_attention/dense)"
T5_PATTERN = r"(.*/)?decoder/.*SelfAttention/o"

Model = Any  # a flax linen module (mtjax.models)
Config = Any  # a model config (decoder.DecoderConfig, t5.T5Config)
# edit(layer, heads (B, T, H, D)) -> heads
HeadEdit = Callable[[int, jax.Array], jax.Array]
# prefill(model, params, input_ids, attention_mask, extra, max_new_tokens)
#     -> (last-position logits (B, V), cache)
PrefillFn = Callable[[Model, dict, jax.Array, jax.Array, Any, int],
                     Tuple[jax.Array, dict]]


def default_pattern(config: Config) -> str:
  return T5_PATTERN if config.is_encoder_decoder else DECODER_PATTERN


def num_heads_of(config: Config) -> int:
  for name in ("num_attention_heads", "num_heads", "n_head"):
    if getattr(config, name, None):
      return int(getattr(config, name))
  raise ValueError(f"{type(config).__name__} has none of num_attention_heads/"
                   "num_heads/n_head; pass num_heads= explicitly.")


def layer_index(path: Tuple[str, ...]) -> int:
  """('model', 'layers_3', 'self_attn', 'o_proj') -> 3 (first '<name>_<int>')."""
  for part in path:
    m = re.fullmatch(r".*_(\d+)", part)
    if m:
      return int(m.group(1))
  raise ValueError(f"no layer number in module path {'/'.join(path)}: soft "
                   "injection needs one output projection per numbered layer.")


def head_hook(pattern: str, num_heads: int,
              edit: HeadEdit) -> Callable[..., Any]:
  """Interceptor calling edit(layer, heads (B, T, H, D)) -> heads on o-proj inputs."""
  regex = re.compile(pattern)

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if (context.method_name != "__call__"
        or not isinstance(module, layers.Linear)
        or not regex.fullmatch("/".join(module.path))):
      return next_fun(*args, **kwargs)
    x = args[0]
    *lead, width = x.shape
    if width % num_heads:
      raise ValueError(f"{'/'.join(module.path)} input width {width} is not "
                       f"divisible by num_heads={num_heads}")
    heads = x.reshape(*lead, num_heads, width // num_heads)
    heads = edit(layer_index(module.path), heads).astype(x.dtype)
    return next_fun(heads.reshape(x.shape), *args[1:], **kwargs)

  return interceptor


def last_positions(attention_mask: ArrayLike) -> jax.Array:
  """(B, T) 1/0 mask -> (B,) index of each row's last real token (any padding side)."""
  mask = jnp.asarray(attention_mask)
  t = mask.shape[1]
  return (t - 1 - jnp.argmax(mask[:, ::-1] > 0, axis=1)).astype(jnp.int32)


def injection_positions(model: Model, inputs: dict) -> jax.Array:
  """Where to inject: decoder-only, the last real prompt token; T5, decoder step 0."""
  if "injection_position" in inputs:
    return jnp.asarray(inputs["injection_position"], jnp.int32)
  if model.config.is_encoder_decoder:
    return jnp.zeros((inputs["decoder_input_ids"].shape[0],), jnp.int32)
  mask = inputs.get("attention_mask")
  if mask is None:
    mask = jnp.ones(inputs["input_ids"].shape, jnp.int32)
  return last_positions(mask)


def _model_kwargs(inputs):
  drop = ("injection_position", "adapter_index", "task_index")
  return {k: v for k, v in inputs.items() if k not in drop}


# ----------------------------------------------------------------- capture --


def capture(model: Model, params: dict, inputs: dict,
            positions: Optional[jax.Array] = None, *,
            pattern: Optional[str] = None, num_heads: Optional[int] = None,
            method: Optional[Callable[..., Any]] = None) -> Tuple[jax.Array, jax.Array]:
  """Runs the model; returns (logits, heads (B, L, H, D) at `positions`).

  inputs: model keyword args; positions (B,) default `injection_positions`.
  """
  pattern = pattern or default_pattern(model.config)
  num_heads = num_heads or num_heads_of(model.config)
  positions = injection_positions(model, inputs) if positions is None else positions
  store = {}

  def edit(layer, heads):
    if layer in store:
      raise ValueError(f"pattern {pattern!r} matches two projections in layer "
                       f"{layer}; make it match one per layer.")
    store[layer] = jnp.take_along_axis(
        heads, positions[:, None, None, None], axis=1)[:, 0].astype(jnp.float32)
    return heads

  with nn.intercept_methods(head_hook(pattern, num_heads, edit)):
    out = model.apply({"params": params}, **_model_kwargs(inputs), method=method)
  if not store:
    raise ValueError(f"no layers.Linear path matches {pattern!r}; set the "
                     "soft-injection pattern to the attention output projection.")
  if sorted(store) != list(range(len(store))):
    raise ValueError(f"captured layers {sorted(store)} are not 0..L-1")
  return out, jnp.stack([store[i] for i in range(len(store))], axis=1)


def task_embedding(model: Model, params: dict, prompts: dict, *,
                   batch_size: int = 8, pattern: Optional[str] = None,
                   num_heads: Optional[int] = None) -> jax.Array:
  """Mean head output at the last prompt position over prompts -> (L, H, D) f32.

  prompts: model inputs dict of arrays with leading dim M (e.g. input_ids and
    attention_mask (M, T) for decoder-only; T5 also decoder_input_ids (M, 1)).
  """
  pattern = pattern or default_pattern(model.config)
  fn = jax.jit(lambda p, x: capture(model, p, x, pattern=pattern,
                                    num_heads=num_heads)[1].sum(0))
  m = len(next(iter(prompts.values())))
  total = 0.0
  for start in range(0, m, batch_size):
    chunk = {k: jnp.asarray(v[start:start + batch_size]) for k, v in prompts.items()}
    total = total + fn(params, chunk)
  return total / m


# --------------------------------------------------------------- injection --


def inject_edit(embedding: jax.Array, alpha: jax.Array,
                positions: jax.Array) -> HeadEdit:
  """edit(layer, heads) mixing per-row embedding (B,L,H,D) with alpha (B,L,H)
  at positions (B,)."""

  def edit(layer, heads):
    t = heads.shape[1]
    at = (jnp.arange(t)[None, :] == positions[:, None])[:, :, None, None]
    a = alpha[:, layer][:, None, :, None].astype(jnp.float32)
    e = embedding[:, layer][:, None].astype(jnp.float32)
    mixed = (1.0 - a) * heads.astype(jnp.float32) + a * e
    return jnp.where(at, mixed.astype(heads.dtype), heads)

  return edit


def select(bank: ArrayLike, task_index: Optional[ArrayLike], batch: int) -> jax.Array:
  """(K, ...) bank or (...) single task -> (B, ...) per row by task_index (B,)."""
  bank = jnp.asarray(bank)
  if task_index is None:
    return jnp.broadcast_to(bank, (batch,) + bank.shape)
  return jnp.take(bank, jnp.asarray(task_index), axis=0)


def apply_injected(model: Model, params: dict, inputs: dict,
                   embedding: ArrayLike, alpha: ArrayLike, *,
                   task_index: Optional[ArrayLike] = None,
                   positions: Optional[jax.Array] = None,
                   pattern: Optional[str] = None, num_heads: Optional[int] = None,
                   method: Optional[Callable[..., Any]] = None,
                   cache: Optional[dict] = None, **apply_kwargs: Any) -> Any:
  """model.apply with heads mixed at `positions`.

  embedding (L,H,D) or a bank (K,L,H,D); alpha (L,H) or (K,L,H) in [0,1];
  task_index (B,) picks each row's task from the banks; cache: a 'cache'
  collection for incremental decoding (pass decode=True, mutable=['cache']).
  """
  pattern = pattern or default_pattern(model.config)
  num_heads = num_heads or num_heads_of(model.config)
  positions = injection_positions(model, inputs) if positions is None else positions
  batch = positions.shape[0]
  edit = inject_edit(select(embedding, task_index, batch),
                     select(alpha, task_index, batch), positions)
  variables = {"params": params} if cache is None else {"params": params,
                                                         "cache": cache}
  with nn.intercept_methods(head_hook(pattern, num_heads, edit)):
    return model.apply(variables, **_model_kwargs(inputs), method=method,
                       **apply_kwargs)


def alpha_of(alpha_logits: ArrayLike) -> jax.Array:
  return jax.nn.sigmoid(jnp.asarray(alpha_logits, jnp.float32))


# ---------------------------------------------------------- fitting alpha --


def first_token_loss(method: Any, model: Model, kind: str, params: dict,
                     batch: dict, rng: Optional[jax.Array]
                     ) -> Tuple[jax.Array, jax.Array, jax.Array]:
  """Fitter loss (trainer.make_train_step's `loss=`): cross-entropy of the
  first target token, predicted at each prompt's last real token.

  batch: model inputs ('input_ids', 'attention_mask' (B, T), left- or
  right-padded prompts; optional 'adapter_index', 'injection_position' (B,))
  + 'first_target' (B,) int32 (+ 'task_index' (B,) for the metrics).
  The prediction is read where soft injection injects (`injection_positions`:
  the last real prompt token; T5: decoder step 0). Returns per-token (nll,
  correct, weights), each (B, 1): one target token per row. Works for any
  method; mtjax.experiments.soft_injection.fit_alpha fits alpha with it.
  """
  del kind
  inputs = {k: v for k, v in batch.items()
            if k not in ("first_target", "task_index")}
  positions = injection_positions(model, inputs)
  logits = method.apply(model, params, inputs, rng=rng,
                        deterministic=rng is None)
  last = jnp.take_along_axis(logits, positions[:, None, None], axis=1)
  logp = jax.nn.log_softmax(last[:, 0].astype(jnp.float32))
  target = jnp.asarray(batch["first_target"], jnp.int32)[:, None]
  nll = -jnp.take_along_axis(logp, target, axis=-1)
  correct = (jnp.argmax(logp, -1)[:, None] == target).astype(jnp.float32)
  return nll, correct, jnp.ones_like(nll)


# ------------------------------------------------------ the method object --


class SoftInjection:
  """Method (see mtjax.methods): a bank of K frozen task embeddings and their
  trainable head-selection logits; rows pick their task by 'adapter_index'.

  params['soft_injection'] = {'alpha_logits': (K, L, H), 'embedding': (K, L, H, D)}.
  Inputs may carry 'injection_position' (B,) (e.g. when targets follow the
  prompt in input_ids); the default is `injection_positions`. Evaluation's
  greedy decoding passes each row's last prompt slot there
  (`prompt_end_input`), so generated tokens are never injected.

  KV-cached decoding (mtjax.methods.transform): decode=PREFILL injects like the
  plain forward (the edited heads shape the cached keys/values of later
  layers); decode=STEP runs the new tokens on the plain model, which is what
  a recomputation with the injection fixed at the prompt's end gives.
  """
  trainable = r"soft_injection/alpha_logits"
  cached_decoding = True
  prompt_end_input = "injection_position"

  def __init__(self, embeddings: ArrayLike, pattern: Optional[str] = None,
               alpha_logits: Optional[ArrayLike] = None) -> None:
    self.embeddings = np.asarray(embeddings, np.float32)
    if self.embeddings.ndim == 3:
      self.embeddings = self.embeddings[None]
    if self.embeddings.ndim != 4:
      raise ValueError("embeddings must be (L, H, D) or (K, L, H, D), got "
                       f"{self.embeddings.shape}")
    self.alpha_logits = (np.zeros(self.embeddings.shape[:3], np.float32)
                         if alpha_logits is None else
                         np.asarray(alpha_logits, np.float32).reshape(
                             self.embeddings.shape[:3]))
    self.pattern = pattern

  def init(self, rng: jax.Array, model: Model, base_params: dict) -> dict:
    del rng, model, base_params
    names = ("adapters", "layers", "heads")  # 'adapters': replicated
    return {"soft_injection": {
        "alpha_logits": nn.LogicallyPartitioned(
            jnp.asarray(self.alpha_logits), names),
        "embedding": nn.LogicallyPartitioned(
            jnp.asarray(self.embeddings), names + ("kv",))}}

  def apply(self, model: Model, params: dict, inputs: dict, *,
            rng: Optional[jax.Array] = None,
            deterministic: bool = True,
            method: Optional[Callable[..., Any]] = None,
            decode: Optional[str] = None,
            cache: Optional[dict] = None) -> Any:
    """Logits, or (logits, cache) with `decode` (see the class docstring)."""
    del rng, deterministic  # the base model runs frozen and deterministic
    tree = params["soft_injection"]
    inputs = dict(inputs)
    index = inputs.pop("adapter_index", None)
    decode = transform.check_decode(decode)
    if decode == transform.STEP:
      return transform.apply_model(model, params["base"],
                                   _model_kwargs(inputs), method=method,
                                   decode=decode, cache=cache)
    if index is None:
      # One task: every row is it. A bank of K > 1 needs each row's task
      # (a default of task 0 would score every task with task 0's
      # embedding and alpha).
      if tree["alpha_logits"].shape[0] > 1:
        transform.check_adapter_index(tree["alpha_logits"], None)
      index = jnp.zeros((next(iter(inputs.values())).shape[0],), jnp.int32)
    kwargs = {} if decode is None else {"decode": True, "mutable": ["cache"]}
    out = apply_injected(model, params["base"], inputs,
                         jax.lax.stop_gradient(tree["embedding"]),
                         alpha_of(tree["alpha_logits"]), task_index=index,
                         pattern=self.pattern, method=method, cache=cache,
                         **kwargs)
    return out if decode is None else (out[0], out[1]["cache"])


@transform.METHODS.register("soft_injection")
def build(library: str = "", tasks: tuple = (),
          embeddings: Optional[ArrayLike] = None,
          pattern: Optional[str] = None) -> SoftInjection:
  """SoftInjection from config options: `library` (a folder written by `save`)
  and `tasks` (their order defines adapter_index), or `embeddings`
  (K, L, H, D); optional `pattern`. Stored alpha logits initialise the
  trainable ones."""
  alphas = None
  if library:
    if not tasks:
      raise ValueError("soft_injection with a library needs tasks=[...] "
                       "(their order defines adapter_index)")
    loaded = [load(library, t) for t in tasks]
    embeddings = np.stack([e for e, _, _ in loaded])
    if all(a is not None for _, a, _ in loaded):
      alphas = np.stack([a for _, a, _ in loaded])
  elif embeddings is None:
    raise ValueError("soft_injection needs library= and tasks=, or embeddings=")
  return SoftInjection(embeddings, pattern=pattern, alpha_logits=alphas)


# ------------------------------------------------------------ generation --


def greedy_with_prefill(model: Model, params: dict, input_ids: jax.Array,
                        attention_mask: jax.Array, extra: Any,
                        prefill: PrefillFn, max_new_tokens: int,
                        eos_ids: decoding.EosIds = None,
                        pad_id: int = 0) -> jax.Array:
  """Greedy decoding (decoder-only) whose prefill call is `prefill`.

  prefill(model, params, input_ids, attention_mask, extra, max_new_tokens)
  -> (last-position logits (B, V), cache); `extra` is a pytree of arrays it
  reads (e.g. embedding and alpha). Every decoding step is a plain cached
  model call (decoder.decode_step) in the shared loop `decoding.decode`, so
  methods that differ only in their prefill (zero-shot, ICL, soft injection,
  prompt tuning) are timed on the same loop. Jitted with the model and
  prefill static: refuses to run inside `nn.intercept_methods`.
  """
  decoding.no_interceptors("soft_injection.greedy_with_prefill")
  return _greedy_with_prefill(model, params, input_ids, attention_mask, extra,
                              prefill, int(max_new_tokens),
                              decoding.eos_tuple(eos_ids), int(pad_id))


@functools.partial(jax.jit, static_argnames=("model", "prefill",
                                             "max_new_tokens", "eos_ids",
                                             "pad_id"))
def _greedy_with_prefill(model, params, input_ids, attention_mask, extra,
                         prefill, max_new_tokens, eos_ids, pad_id):
  return decoding.decode(
      lambda: prefill(model, params, input_ids, attention_mask, extra,
                      max_new_tokens),
      decoder.decode_step(model, params), max_new_tokens, eos_ids=eos_ids,
      pad_id=pad_id)


def plain_prefill(model: Model, params: dict, input_ids: jax.Array,
                  attention_mask: jax.Array, extra: Any,
                  max_new_tokens: int) -> Tuple[jax.Array, dict]:
  """Zero-shot / ICL prefill: the unchanged model."""
  del extra
  return decoder.prefill(model, params, input_ids, attention_mask,
                         max_new_tokens)


def injected_prefill(model: Model, params: dict, input_ids: jax.Array,
                     attention_mask: jax.Array,
                     extra: Tuple[jax.Array, jax.Array, Optional[jax.Array]],
                     max_new_tokens: int) -> Tuple[jax.Array, dict]:
  """Prefill with the injection at the last (left-padded) prompt column.

  extra = (embedding, alpha, task_index or None); the edited head outputs
  shape the cached keys/values of later layers, which carries the injection
  into every generated token.
  """
  embedding, alpha, task_index = extra
  b, p = input_ids.shape
  cache = decoder.init_cache(model, params, b, p + max_new_tokens)
  logits, mut = apply_injected(
      model, params, {"input_ids": input_ids, "attention_mask": attention_mask},
      embedding, alpha, task_index=task_index,
      positions=jnp.full((b,), p - 1, jnp.int32), cache=cache, decode=True,
      mutable=["cache"])
  return logits[:, -1], mut["cache"]


def _eos_pad(model, eos_id):
  eos_ids = decoding.eos_tuple(eos_id)
  pad_id = model.config.pad_token_id
  if pad_id is None:
    pad_id = eos_ids[0] if eos_ids else 0
  return eos_ids, int(pad_id)


def _left_padded(model, input_ids, attention_mask):
  if model.config.is_encoder_decoder:
    raise NotImplementedError("cached injected generation is decoder-only; "
                              "for T5 use apply_injected at decoder step 0")
  input_ids = jnp.asarray(input_ids, jnp.int32)
  attention_mask = (jnp.ones_like(input_ids) if attention_mask is None
                    else jnp.asarray(attention_mask, jnp.int32))
  if bool((attention_mask[:, -1] == 0).any()):
    raise ValueError("generate needs left-padded prompts: the last column of "
                     "attention_mask must be 1 for every row")
  return input_ids, attention_mask


def generate(model: Model, params: dict, input_ids: ArrayLike,
             attention_mask: Optional[ArrayLike], embedding: ArrayLike,
             alpha: ArrayLike, max_new_tokens: int = 16, *,
             task_index: Optional[ArrayLike] = None,
             eos_id: decoding.EosIds = None) -> jax.Array:
  """Greedy continuations (B, max_new_tokens) int32 with the KV cache.

  Decoder-only, left-padded prompts. The injection happens once, in the
  prefill at the prompt's last position; decoding steps are plain model
  calls, so the cost equals zero-shot generation. embedding/alpha as in
  `apply_injected` (banks + task_index (B,) for per-row tasks). After `eos_id`
  a row emits the pad id (like decoder.generate). Uses the default o-proj
  pattern of the model's family.
  """
  input_ids, attention_mask = _left_padded(model, input_ids, attention_mask)
  eos_ids, pad_id = _eos_pad(model, eos_id)
  extra = (jnp.asarray(embedding), jnp.asarray(alpha),
           None if task_index is None else jnp.asarray(task_index, jnp.int32))
  return greedy_with_prefill(model, params, input_ids, attention_mask, extra,
                             injected_prefill, int(max_new_tokens), eos_ids,
                             pad_id)


def generate_plain(model: Model, params: dict, input_ids: ArrayLike,
                   attention_mask: Optional[ArrayLike], max_new_tokens: int = 16,
                   *, eos_id: decoding.EosIds = None) -> jax.Array:
  """Zero-shot/ICL greedy generation on the same loop as `generate`."""
  input_ids, attention_mask = _left_padded(model, input_ids, attention_mask)
  eos_ids, pad_id = _eos_pad(model, eos_id)
  return greedy_with_prefill(model, params, input_ids, attention_mask, (),
                             plain_prefill, int(max_new_tokens), eos_ids, pad_id)


def generate_uncached(model: Model, params: dict, input_ids: ArrayLike,
                      attention_mask: ArrayLike, embedding: ArrayLike,
                      alpha: ArrayLike, max_new_tokens: int, *,
                      task_index: Optional[ArrayLike] = None,
                      pattern: Optional[str] = None) -> jax.Array:
  """Greedy decoding recomputing the full forward each step (decoder-only).

  Injection stays at the original last prompt position. Returns
  (B, max_new_tokens) int32; the reference for the cached `generate`.
  """
  ids = jnp.asarray(input_ids, jnp.int32)
  mask = jnp.asarray(attention_mask, jnp.int32)
  positions = last_positions(mask)
  fn = jax.jit(lambda i, m: apply_injected(
      model, params, {"input_ids": i, "attention_mask": m}, embedding, alpha,
      task_index=task_index, positions=positions, pattern=pattern)[:, -1])
  out = []
  for _ in range(max_new_tokens):
    nxt = jnp.argmax(fn(ids, mask), -1).astype(jnp.int32)
    out.append(nxt)
    ids = jnp.concatenate([ids, nxt[:, None]], 1)
    mask = jnp.concatenate([mask, jnp.ones_like(mask[:, :1])], 1)
  return jnp.stack(out, 1)


# --------------------------------------------------------------- storage --


def save(directory: str, task: str, embedding: ArrayLike,
         alpha_logits: Optional[ArrayLike] = None, **meta: Any) -> str:
  """Writes <directory>/<task>/soft_injection.{safetensors,json} (directory:
  a path or a gs:// URL, mtjax.paths)."""
  path = paths.join(directory, task)
  paths.makedirs(path)
  tensors = {"embedding": np.asarray(embedding, np.float32)}
  if alpha_logits is not None:
    tensors["alpha_logits"] = np.asarray(alpha_logits, np.float32)
  paths.write_safetensors(paths.join(path, "soft_injection.safetensors"),
                          tensors)
  info = {"method": "soft_injection", "task": task,
          "shape": list(tensors["embedding"].shape), **meta}
  paths.write_json(paths.join(path, "soft_injection.json"), info, indent=1,
                   default=str)
  return path


def load(directory: str, task: str) -> Tuple[np.ndarray, Optional[np.ndarray], dict]:
  """-> (embedding (L,H,D), alpha_logits (L,H) or None, meta dict)."""
  path = paths.join(directory, task)
  file = paths.join(path, "soft_injection.safetensors")
  if not paths.exists(file):
    raise FileNotFoundError(f"no soft-injection embedding for task {task!r} "
                            f"at {file}; build it with task_embedding() + save().")
  tensors = paths.read_safetensors(file)
  meta = paths.read_json(paths.join(path, "soft_injection.json"))
  return tensors["embedding"], tensors.get("alpha_logits"), meta
