"""Training state, optimizer and the one jitted train step.

Parameters are handled as flat dicts keyed by '/'-joined paths
('base/encoder/block_0/layer_0/SelfAttention/q/kernel', 'lora/...'). The
method's `trainable` regex (or config.trainable) splits them in two:

  state  = {'step': int32 (), 'params': {path: array} trainable leaves,
            'opt_state': optax state over those leaves only}
  frozen = {path: array}  the rest: passed to the step, never differentiated,
           never given optimizer state, never written by the step.

Every array is placed by the logical-axis rules (mtjax.models.sharding); the
batch is sharded over ('data', 'fsdp') on its leading axis. The mesh shape
comes from config.mesh_shape.
"""
import dataclasses
import re
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mtjax import data
from mtjax.models import gguf, hf, layers, sharding

Model = Any  # a flax linen module (mtjax.models)
Method = Any  # a method object (mtjax.methods / mtjax.routing)
Config = Any  # an ml_collections.ConfigDict


# ----------------------------------------------------------------- models

HF_EXCLUDE = ("hf_path", "gguf_path", "arch", "dtype", "param_dtype")


def build_model(model_config: Config, rng: jax.Array, mesh: Mesh) -> tuple:
  """(model, base_params) from an HF folder, a GGUF file or config sizes,
  sharded (model_config.hf_path / gguf_path / arch + HF config fields).

  `model_config.param_dtype` (default float32) is the dtype the base params
  are stored in; `dtype` stays the compute dtype. An HF folder is read one
  tensor at a time, converted and placed straight onto the mesh (hf.load).
  """
  param_dtype = model_config.get("param_dtype", "float32")
  if model_config.get("hf_path"):
    return hf.load(model_config.hf_path, dtype=model_config.dtype,
                   param_dtype=param_dtype, mesh=mesh)
  if model_config.get("gguf_path"):
    return gguf.load(model_config.gguf_path, dtype=model_config.dtype,
                     param_dtype=param_dtype, mesh=mesh)
  hf_dict = {k: v for k, v in model_config.items() if k not in HF_EXCLUDE}
  hf_dict["model_type"] = model_config.arch
  arch = hf.arch_module(model_config.arch)
  model = arch.Model(arch.config_from_hf(hf_dict, dtype=model_config.dtype))
  params = sharding.init_sharded(model, rng, mesh,
                                 **hf.dummy_inputs(model.config))
  dt = layers.dtype_of(param_dtype)
  if dt != jnp.float32:
    params = jax.jit(lambda p: jax.tree.map(lambda x: x.astype(dt), p),
                     out_shardings=jax.tree.map(lambda x: x.sharding, params))(
                         params)
  return model, params


def check_vocab(model: Model, vocab: Any, where: str = "config.data.vocab"
                ) -> None:
  """Refuses a tokenizer with more ids than the model has embedding rows.

  JAX clamps out-of-range gather indices, so such ids would silently read
  the last embedding row. (Fewer ids is fine: HF models pad their
  embeddings.)
  """
  n, rows = int(vocab.vocab_size), int(model.config.vocab_size)
  if n > rows:
    raise ValueError(
        f"{where}: the tokenizer has {n} ids but the model's embedding has "
        f"{rows} rows, so ids >= {rows} would be read as row {rows - 1}. Use "
        "the model's own tokenizer ('gguf:<file>' or 'hf:<folder>') or a "
        f"model config with vocab_size >= {n}.")


def with_remat(model: Model, policy: str) -> Model:
  """The model with gradient checkpointing per block (models.layers
  REMAT_POLICIES: 'none' | 'full' | 'dots'); same parameters.

  Training steps use it (Fitter(remat=...)); evaluation keeps the plain
  model, whose recorded intermediates (routing records, hidden states) must
  not be traced inside a rematerialised block.
  """
  layers.check_remat(policy)
  if policy == getattr(model.config, "remat", "none"):
    return model
  return model.clone(config=dataclasses.replace(model.config, remat=policy))


def model_kind(model: Model) -> str:
  return "encoder_decoder" if model.config.is_encoder_decoder else "decoder"


# ------------------------------------------------------------- param trees

def flatten(tree: dict) -> dict:
  return traverse_util.flatten_dict(tree, sep="/")


def unflatten(flat: dict) -> dict:
  return traverse_util.unflatten_dict(flat, sep="/")


def split_trainable(flat: dict, pattern: str) -> tuple:
  """(trainable, frozen) flat dicts; `pattern` is fully matched against paths."""
  regex = re.compile(pattern)
  trainable = {k: v for k, v in flat.items() if regex.fullmatch(k)}
  if not trainable:
    raise ValueError(f"trainable regex {pattern!r} matches no parameter; "
                     f"paths look like {sorted(flat)[:5]}")
  return trainable, {k: v for k, v in flat.items() if k not in trainable}


def init_params(model: Model, method: Method, rng: jax.Array, mesh: Mesh,
                base_params: dict) -> tuple:
  """Flat dict of all params {'base/...': ..., '<method>/...': ...} and shardings."""
  base_abstract = sharding.abstract_params(model,
                                           **hf.dummy_inputs(model.config))
  with sharding.use_mesh(mesh):
    method_abstract = jax.eval_shape(lambda r, b: method.init(r, model, b),
                                     rng, base_params)
    method_shardings = sharding.tree_shardings(method_abstract, mesh)
    method_params = jax.jit(
        lambda r, b: nn.unbox(method.init(r, model, b)),
        out_shardings=method_shardings)(rng, base_params)
  shardings = {"base": sharding.tree_shardings(base_abstract, mesh),
               **method_shardings}
  params = {"base": base_params, **method_params}
  return flatten(params), flatten(shardings)


# --------------------------------------------------------------- optimizer

def make_schedule(opt: Config, num_steps: int) -> optax.Schedule:
  """Linear warmup then cosine / linear / rsqrt / constant decay."""
  lr, warmup = opt.learning_rate, opt.get("warmup_steps", 0)
  end = lr * opt.get("end_factor", 0.0)
  decay = opt.get("decay", "cosine")
  rest = max(num_steps - warmup, 1)
  if decay == "cosine":
    after = optax.cosine_decay_schedule(lr, rest, alpha=end / lr if lr else 0.)
  elif decay == "linear":
    after = optax.linear_schedule(lr, end, rest)
  elif decay == "rsqrt":
    after = lambda s: lr * jax.lax.rsqrt(1.0 + s / max(warmup, 1))
  elif decay == "constant":
    after = optax.constant_schedule(lr)
  else:
    raise ValueError(f"optimizer.decay={decay!r}: use cosine, linear, rsqrt "
                     "or constant")
  if not warmup:
    return after
  return optax.join_schedules(
      [optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def make_optimizer(opt: Config, num_steps: int) -> tuple:
  """optax AdamW or Adafactor (config.optimizer), with global-norm clipping."""
  schedule = make_schedule(opt, num_steps)
  if opt.name == "adamw":
    # Weight decay on matrices only, not on norms and biases.
    tx = optax.adamw(schedule, b1=opt.get("b1", 0.9), b2=opt.get("b2", 0.999),
                     eps=opt.get("eps", 1e-8),
                     weight_decay=opt.get("weight_decay", 0.0),
                     mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p))
  elif opt.name == "adafactor":
    tx = optax.adafactor(schedule, decay_rate=opt.get("decay_rate", 0.8),
                         multiply_by_parameter_scale=opt.get(
                             "multiply_by_parameter_scale", False),
                         clipping_threshold=opt.get("clipping_threshold", 1.0),
                         weight_decay_rate=opt.get("weight_decay") or None)
  else:
    raise ValueError(f"optimizer.name={opt.name!r}: use 'adamw' or 'adafactor'")
  if opt.get("grad_clip"):
    tx = optax.chain(optax.clip_by_global_norm(opt.grad_clip), tx)
  return tx, schedule


def opt_state_shardings(tx: optax.GradientTransformation, params: dict,
                        param_shardings: dict, mesh: Mesh) -> Any:
  """Optimizer-state leaves shaped like params follow the params' shardings.

  Others (step counts, Adafactor's factored row/column statistics) are small
  and replicated.
  """
  abstract = jax.eval_shape(tx.init, params)
  replicated = NamedSharding(mesh, PartitionSpec())
  shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype)
            for k, v in params.items()}
  return optax.tree_utils.tree_map_params(
      tx, lambda leaf, s, p: s if leaf.shape == p.shape else replicated,
      abstract, param_shardings, shapes,
      transform_non_params=lambda _: replicated)


def init_state(tx: optax.GradientTransformation, trainable: dict,
               trainable_shardings: dict, mesh: Mesh) -> tuple:
  """{'step', 'params', 'opt_state'} placed by the rules, and its shardings.

  Trainable leaves stored below f32 (e.g. a base loaded with param_dtype
  bfloat16) are trained as f32 copies, the optimizer's master weights: bf16
  updates would round small steps away. Frozen leaves keep their dtype.
  """
  opt_sh = opt_state_shardings(tx, trainable, trainable_shardings, mesh)
  replicated = NamedSharding(mesh, PartitionSpec())
  state_sh = {"step": replicated, "params": trainable_shardings,
              "opt_state": opt_sh}

  def init(p):
    # Every leaf strongly typed (astype): a weak-typed init (jnp.full(n, 0.3))
    # would differ from the step's outputs and compile the step twice.
    p = jax.tree.map(lambda v: v.astype(jnp.float32) if jnp.issubdtype(
        v.dtype, jnp.floating) and jnp.finfo(v.dtype).bits < 32
        else v.astype(v.dtype), p)
    return {"step": jnp.zeros((), jnp.int32), "params": p,
            "opt_state": tx.init(p)}
  state = jax.jit(init, out_shardings=state_sh)(trainable)
  return state, state_sh


# ------------------------------------------------------------------- batch

def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, sharding.logical_to_spec(
      ("batch",), (mesh.shape["data"] * mesh.shape["fsdp"],), mesh))


def put_batch(batch: dict, mesh: Mesh) -> dict:
  """Host numpy batch (this process's rows) -> global arrays sharded on batch."""
  sh = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sh, np.asarray(v))
          for k, v in batch.items()}


def put_global_batch(batch: dict, mesh: Mesh) -> dict:
  """The same global numpy batch on every process -> global arrays.

  Each process copies only the rows of its own devices; in one process it
  equals put_batch.
  """
  sh = batch_sharding(mesh)

  def place(v):
    v = np.asarray(v)
    return jax.make_array_from_callback(v.shape, sh, lambda idx: v[idx])
  return {k: place(v) for k, v in batch.items()}


# -------------------------------------------------------------------- loss

def prompt_ends(method: Method, batch: dict) -> jax.Array:
  """(B,) int32 index into input_ids of each row's last prompt token.

  Decoder-only prefix-LM batches (seqio's PrefixLMFeatureConverter,
  evaluate.score_rows): 'decoder_causal_attention' covers the start slot and
  the inputs, so its last 1 is at len(inputs), where decoder_input_tokens
  holds the last prompt token and whose logits predict the first target (0
  for a row without any). A packed batch ('decoder_segment_ids') has several
  prompts per row: refused.
  """
  if "decoder_segment_ids" in batch:
    raise ValueError(
        f"{type(method).__name__} reads each row's prompt end "
        f"(prompt_end_input={method.prompt_end_input!r}), but this batch is "
        "packed (decoder_segment_ids: several examples per row); build the "
        "batches with pack=False")
  if "decoder_causal_attention" not in batch:
    raise ValueError(f"{type(method).__name__} needs each row's prompt end: "
                     "give the batch 'decoder_causal_attention' (prefix-LM "
                     "layout, see evaluate.score_rows)")
  causal = jnp.asarray(batch["decoder_causal_attention"]) > 0
  last = causal.shape[1] - 1 - jnp.argmax(causal[:, ::-1], axis=1)
  return jnp.where(causal.any(1), last, 0).astype(jnp.int32)


def token_scores(method: Method, model: Model, params: dict, batch: dict,
                 kind: str, rng: Optional[jax.Array] = None) -> tuple:
  """Per-token log-likelihood and correctness of the targets, (B, L) each.

  A method naming a `prompt_end_input` (soft injection) gets each row's last
  prompt position (`prompt_ends`, decoder-only; T5 has its own convention)
  under that key, as evaluation's greedy decoding gives it.
  """
  inputs = data.model_inputs(batch, kind)
  if "adapter_index" in batch:
    inputs["adapter_index"] = batch["adapter_index"]
  key = getattr(method, "prompt_end_input", None)
  if key and kind == "decoder":
    inputs[key] = prompt_ends(method, batch)
  logits = method.apply(model, params, inputs, rng=rng,
                        deterministic=rng is None)
  targets = batch["decoder_target_tokens"]
  logp = jax.nn.log_softmax(logits.astype(jnp.float32))
  token_logp = jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]
  correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
  return token_logp, correct


def target_token_loss(method: Method, model: Model, kind: str, params: dict,
                      batch: dict, rng: Optional[jax.Array]) -> tuple:
  """The default loss: NLL of every target token.

  Returns per-token (nll, correct, weights), each (B, L); a custom loss for
  `make_train_step` returns the same three arrays.
  """
  token_logp, correct = token_scores(method, model, params, batch, kind, rng)
  return -token_logp, correct, batch["decoder_loss_weights"].astype(
      jnp.float32)


def loss_and_metrics(method: Method, model: Model, kind: str, num_tasks: int,
                     trainable: dict, frozen: dict, batch: dict,
                     rng: Optional[jax.Array],
                     loss: Callable = target_token_loss) -> tuple:
  """Summed token NLL (for gradients) and per-task sums (for metrics)."""
  params = unflatten({**trainable, **frozen})
  nll, correct, weights = loss(method, model, kind, params, batch, rng)
  task = batch["token_task_index"] if "token_task_index" in batch else (
      jnp.broadcast_to(batch["task_index"][:, None], weights.shape))
  task = jnp.where(weights > 0, task, num_tasks)  # padding -> dropped bucket
  def per_task(x):
    return jnp.zeros(num_tasks + 1).at[task.reshape(-1)].add(
        x.reshape(-1))[:num_tasks]
  nll = nll * weights
  # Whole-batch totals apart from the per-task bins: a task id outside
  # [0, num_tasks) loses its metrics, never its share of the loss.
  sums = {"nll": per_task(nll), "correct": per_task(correct * weights),
          "all_nll": nll.sum(), "all_correct": (correct * weights).sum(),
          "all_tokens": weights.sum(),
          "tokens": per_task(weights)}
  return nll.sum(), sums


def make_train_step(method: Method, model: Model,
                    tx: optax.GradientTransformation, num_tasks: int,
                    grad_accum: int = 1, seed: int = 0, dropout: bool = False,
                    loss: Callable = target_token_loss) -> Callable:
  """step(state, frozen, batch) -> (state, metrics); jit it with shardings.

  The loss is the mean NLL over all target tokens of the whole batch; with
  grad_accum=k the batch is cut into k microbatches (rows i, i+k, ... so each
  device keeps its own rows) whose summed gradients are divided by the batch's
  total token count: the same update as k=1 up to float summation order.
  """
  kind = model_kind(model)

  def step(state, frozen, batch):
    rng = jax.random.fold_in(jax.random.key(seed), state["step"]) if dropout \
        else None
    micro = jax.tree.map(
        lambda x: jnp.swapaxes(
            x.reshape((x.shape[0] // grad_accum, grad_accum) + x.shape[1:]),
            0, 1), batch)
    grad_fn = jax.value_and_grad(
        lambda p, b, r: loss_and_metrics(method, model, kind, num_tasks, p,
                                         frozen, b, r, loss), has_aux=True)

    def body(carry, xs):
      grads, sums = carry
      i, mb = xs
      r = None if rng is None else jax.random.fold_in(rng, i)
      (_, s), g = grad_fn(state["params"], mb, r)
      return (jax.tree.map(jnp.add, grads, g),
              jax.tree.map(jnp.add, sums, s)), None

    zeros = jax.tree.map(jnp.zeros_like, state["params"])
    zero_sums = {k: jnp.zeros(num_tasks) for k in ("nll", "correct", "tokens")}
    zero_sums.update({k: jnp.zeros(()) for k in ("all_nll", "all_correct",
                                                   "all_tokens")})
    (grads, sums), _ = jax.lax.scan(
        body, (zeros, zero_sums), (jnp.arange(grad_accum), micro))
    total = jnp.maximum(sums.pop("all_tokens"), 1.0)
    grads = jax.tree.map(lambda g: g / total, grads)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = {"loss": sums.pop("all_nll") / total,
               "accuracy": sums.pop("all_correct") / total,
               "grad_norm": optax.tree.norm(grads), **sums}
    return {"step": state["step"] + 1, "params": params,
            "opt_state": opt_state}, metrics

  return step


def jit_train_step(step: Callable, state_sh: dict, frozen_sh: dict,
                   mesh: Mesh) -> Callable:
  replicated = NamedSharding(mesh, PartitionSpec())
  return jax.jit(step, in_shardings=(state_sh, frozen_sh, batch_sharding(mesh)),
                 out_shardings=(state_sh, replicated), donate_argnums=(0,))
