"""Baselines for routing among specialised experts, on the PHATGOOSE machinery.

All but Poly/MHR reuse one stacked LoRA library and `routed.RoutedLoRA`:
  oracle      the task's own expert (held-in); on held-out tasks the best
              single expert measured on the evaluation set (an upper bound
              that looks at labels) -- `one_hot`.
  uniform     the mean of all experts' updates (the averaged delta W).
  merged      the mean of the LoRA parameters (A and B averaged separately),
              "Merged Experts" in Muqeeth et al. 2024.
  arrow       Arrow routing (Ostapenko et al. 2024, "Towards Modular LLMs by
              Building and Reusing a Library of LoRAs", arXiv:2405.11157):
              per token, |<x, u_e>| with u_e the top singular vector of expert
              e's update, softmax over the top k.
  task_gate   learned task-level gating, as task-level MoE (Kudugunta et al.
              2021, "Beyond Distillation: Task-level Mixture-of-Experts",
              arXiv:2110.03742) routes: one learned logit vector per task
              and module picks the top-k experts for every token of that
              task's examples (`TaskGateRouting`); trained on the held-in
              mixture with the experts frozen. A held-out task has no learned
              row: it uses the mean of the held-in rows (zero-shot).
  avg_activation  the PHATGOOSE paper's "average activation" baseline
              (Muqeeth et al. 2024, arXiv:2402.05859): each expert's router
              vector in a module is the mean input of that module over the
              expert's own training data (`average_activations`, the expert
              applied, as when its gate is trained), then per-token top-k
              routing exactly as PHATGOOSE's (its gates replaced).
  phatgoose_task_avg  task-level PHATGOOSE (ours, not a paper baseline):
              PHATGOOSE's per-token routing averaged over all tokens of a
              task's unlabeled inputs (the prompts alone, never the gold
              targets), then one fixed top-k mixture per module for the whole
              task (`task_level_weights`).
  retrieval   per-example retrieval by example centroid (after Jang et al.
              2023, "Exploring the Benefits of Training Expert Language Models
              over Instruction Tuning", arXiv:2302.03202): the base model's
              mean-pooled representation of the example's prompt is compared
              (cosine) to each expert's centroid over its training prompts;
              the nearest expert is used for the whole example, all its answer
              choices and generated tokens (`RetrievalRouting`).
  multitask   one LoRA trained on the mixture of all held-in tasks (plain
              mtjax.methods.lora.LoRA).
Poly and MHR (Ponti et al. 2023, "Combining Parameter-efficient Modules for
Task-level Generalisation", arXiv:2202.13914; Caccia et al. 2023, "Multi-Head
Adapter Routing for Cross-Task Generalization", arXiv:2211.03831) train their
own inventory of S LoRA skills jointly with a task-by-skill allocation
(`PolyLoRA`, heads=1 is Poly, heads>1 is MHR); in training the allocation
is a relaxed-Bernoulli sample (`allocation`), in evaluation its sigmoid.
Zero-shot on a new task:
MHR-mu averages the skills uniformly; MHR-z fits only the new task's allocation
logits on a few of its training examples (uses target-task data, so it is
few-shot, not zero-shot).
"""
import zlib
from typing import Any, Callable, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from mtjax.methods import transform
from mtjax.routing import diagnostics, experts
from mtjax.routing.routed import ROUTERS, FixedRouter, fixed_choices

LoRAMethod = Any  # a mtjax.methods.lora.LoRA (rank, alpha, targets, scale)
Model = Any  # a flax linen module (mtjax.models)


def one_hot(index: int, num_experts: int) -> jax.Array:
  return jnp.zeros((num_experts,), jnp.float32).at[index].set(1.0)


def task_level_weights(records: list, inputs: list, num_experts: int,
                       top_k: int) -> dict:
  """{path: (E,)} fixed weights: mean routing load of the task, top k kept.

  Task-level PHATGOOSE (Muqeeth et al. 2024, arXiv:2402.05859, the 'task_avg'
  row). records: per-module PHATGOOSE routing of the task's unlabeled inputs
  (a list of record dicts, one per batch, each {path: {'idx' (B, T, k), ...}}),
  inputs: the model inputs they came from, whose masks say which tokens
  count (the prompts only: see mtjax.experiments.phatgoose.task_avg_weights).
  A module that saw no token gets uniform weights over its first top_k.
  """
  sums = {}
  for rec, inp in zip(records, inputs, strict=True):
    for path, row in diagnostics.summarize_records(rec, inp, num_experts).items():
      sums[path] = sums.get(path, 0.0) + row["load"] * row["tokens"]
  out = {}
  for path, load in sums.items():
    load = np.asarray(load, np.float64)
    if load.sum() <= 0:
      load = np.ones(num_experts)
    keep = np.argsort(-load, kind="stable")[:top_k]
    w = np.zeros(num_experts, np.float32)
    w[keep] = load[keep] / max(load[keep].sum(), 1e-9)
    out[path] = w
  return out


@ROUTERS.register("task_gate")
class TaskGateRouting(FixedRouter):
  """Learned task-level gating over a frozen stacked library (task-level MoE,
  Kudugunta et al. 2021, arXiv:2110.03742).

  params: {'base', 'experts': {path: {'lora_a': (E, d, r), 'lora_b': (E, r,
  o), 'task_logits': (T, E)}}}; only 'task_logits' is trained. With
  inputs['adapter_index'] (B,) (training) each example mixes all E experts
  with softmax(task_logits[task]), so every expert's logit gets a gradient
  (top-k from zero logits would never leave its first k); without it
  (evaluation) row 0 of task_logits is used, top-k renormalised
  (`task_gate_eval_params` puts a task's row, or the mean row, there).
  """
  trainable = r"experts/.*/task_logits"
  name = "task_gate"

  def __init__(self, lora: LoRAMethod, stacked: dict, num_tasks: int,
               top_k: int = 2, impl: str = "auto") -> None:
    super().__init__(lora, top_k=top_k, impl=impl)
    self.stacked, self.num_tasks = stacked, int(num_tasks)

  def init(self, rng: Optional[jax.Array], model: Model,
           base_params: Optional[dict] = None) -> dict:
    del rng, base_params
    targets = transform.linear_modules(transform.abstract_params(model))
    out = {}
    for path, x in transform.flatten(self.stacked).items():
      mod, leaf = path.rsplit("/", 1)
      if leaf in ("lora_a", "lora_b"):
        # 'adapters' (no sharding rule): replicated, like PolyLoRA's skills.
        out[path] = transform.boxed(
            x, ("adapters",) + experts.LOGICAL[leaf](targets[mod])[1:])
        if leaf == "lora_a":
          out[mod + "/task_logits"] = transform.boxed(
              jnp.zeros((self.num_tasks, x.shape[0]), jnp.float32),
              (None, "adapters"))
    return {"experts": transform.nest(out)}

  def routing_inputs(self, inputs: dict) -> Optional[jax.Array]:
    return inputs.get("adapter_index")   # (B,) task rows, or None

  def impl_for(self, task: Optional[jax.Array]) -> str:
    # Training mixes all E experts: the dense product is that mixture.
    return "dense" if task is not None else self.impl

  def route(self, h: jax.Array, leaf: dict, task: Optional[jax.Array],
            batch: int) -> tuple:
    logits = leaf["task_logits"]
    rows = logits[task] if task is not None else logits[:1]     # (B|1, E)
    num_e = logits.shape[-1]
    k = num_e if task is not None else min(self.top_k, num_e)
    probs = jax.nn.softmax(rows.astype(jnp.float32), axis=-1)
    return fixed_choices(probs, k, h.shape[0]) + (None,)


def task_gate_eval_params(params: dict, task: Optional[int] = None) -> dict:
  """params whose task_logits is one row: a trained task's, or the mean."""
  def row(path, x):
    if not path[-1].key == "task_logits":
      return x
    return (x[task] if task is not None else x.mean(0))[None]
  return dict(params, experts=jax.tree_util.tree_map_with_path(
      row, params["experts"]))


# ---------------------------------------------------------------- retrieval

# The model input that carries each row's last prompt position (B,) int32, an
# index into input_ids (decoder-only models): the last slot where seqio's
# prefix-LM decoder_causal_attention is 1 (mtjax.training.trainer.prompt_ends).
PROMPT_END = "prompt_end"
# RetrievalRouting's entry in a KV cache: the expert weights (B, E) its prefill
# chose from the prompt, which every decoding step reuses.
CHOICE = "retrieval_expert_weights"


def example_embedding(model: Model, base: dict, inputs: dict,
                      prompt_end: Optional[ArrayLike] = None) -> jax.Array:
  """Mean-pooled base representation of each example's prompt: (B, d).

  Jang et al. 2023 (arXiv:2302.03202) retrieve by the example's input.
  Encoder-decoder models: the encoder's output over input_ids (the prompt).
  Decoder-only: the token embeddings (the model exposes no hidden-state API)
  of input_ids (B, T) at positions <= prompt_end (B,) (the prompt; answer
  tokens in the same row never count); without prompt_end, every real token.
  """
  ids = inputs["input_ids"]
  mask = ids != model.config.pad_token_id
  if inputs.get("attention_mask") is not None:
    # Greedy decoding of a decoder-only model attends over its whole buffer,
    # not yet filled slots included: those hold padding and must not pool.
    mask = mask & (inputs["attention_mask"] > 0)
  if prompt_end is not None and not model.config.is_encoder_decoder:
    pos = jnp.arange(ids.shape[1])[None, :]
    mask = mask & (pos <= jnp.asarray(prompt_end, jnp.int32)[:, None])
  mask = mask.astype(jnp.float32)
  if model.config.is_encoder_decoder:
    h = model.apply({"params": base}, ids, mask.astype(jnp.int32),
                    method="encode")
  else:
    table = [v for k, v in transform.flatten(base).items()
             if k.endswith("embedding")][0]
    h = jnp.take(table, ids, axis=0)
  h = h.astype(jnp.float32)
  return (h * mask[..., None]).sum(1) / jnp.maximum(mask.sum(1), 1.0)[:, None]


@ROUTERS.register("retrieval")
class RetrievalRouting(FixedRouter):
  """Per-example nearest-centroid expert (Jang et al. 2023, arXiv:2302.03202).

  params add {'retrieval': {'centroids': (E, d)}}. One expert per example,
  chosen from its prompt alone (`example_embedding`): decoder-only inputs
  carry inputs['prompt_end'] (B,) (`prompt_end_input`: the trainer's
  token_scores fills it from decoder_causal_attention, evaluation's greedy
  decoding with each row's last prompt slot), so every answer choice of an
  example and every generated token use the same expert. Without it, every
  real token of the row pools (the behaviour before prompt_end existed).

  KV-cached decoding (cached_decoding=True, decoder-only models): decode=
  PREFILL chooses from the prompt and stores the choice in the cache
  (`CHOICE`); decode=STEP reuses it, as a recomputation with the expert fixed
  by the prompt gives. Encoder-decoder models (cached_decoding=False, the
  default): the decoder's cached calls do not see the encoder inputs the
  choice is made from, so greedy decoding recomputes the forward.
  """
  name = "retrieval"
  prompt_end_input = PROMPT_END

  def __init__(self, lora: LoRAMethod, impl: str = "auto",
               cached_decoding: bool = False) -> None:
    super().__init__(lora, top_k=1, impl=impl)
    self.cached_decoding = bool(cached_decoding)

  def choose(self, model: Model, params: dict, inputs: dict) -> jax.Array:
    """(B, E) one-hot: the expert whose centroid is nearest (cosine)."""
    emb = example_embedding(model, params["base"], inputs,
                            inputs.get(self.prompt_end_input))
    cen = params["retrieval"]["centroids"]
    cos = (emb / jnp.linalg.norm(emb, axis=-1, keepdims=True).clip(1e-9)) @ (
        cen / jnp.linalg.norm(cen, axis=-1, keepdims=True).clip(1e-9)).T
    return jax.nn.one_hot(jnp.argmax(cos, -1), cen.shape[0])

  def apply(self, model: Model, params: dict, inputs: dict, *,
            rng: Optional[jax.Array] = None, deterministic: bool = True,
            method: Union[str, Callable, None] = None,
            records: Optional[dict] = None, decode: Optional[str] = None,
            cache: Optional[dict] = None) -> Any:
    """Logits, or (logits, cache) with `decode` (see the class docstring)."""
    decode = transform.check_decode(decode)
    kw = dict(rng=rng, deterministic=deterministic, method=method,
              records=records)
    if decode is None:
      inputs = dict(inputs, expert_weights=self.choose(model, params, inputs))
      return super().apply(model, params, inputs, **kw)
    if "input_ids" not in inputs:
      raise ValueError(
          "retrieval routing chooses its expert from input_ids; the cached "
          "decoder calls of an encoder-decoder model do not have them: "
          "decode it by recomputation (cached_decoding=False)")
    if decode == transform.PREFILL:
      choice = self.choose(model, params, inputs)
    else:
      choice = cache[CHOICE]          # the prefill's choice, (B, E)
    model_cache = None if cache is None else {
        k: v for k, v in cache.items() if k != CHOICE}
    logits, new_cache = super().apply(
        model, params, dict(inputs, expert_weights=choice), decode=decode,
        cache=model_cache, **kw)
    return logits, {**new_cache, CHOICE: choice}


def centroids(model: Model, base: dict, batches: list) -> jax.Array:
  """(E, d) centroid per expert from lists of model-input batches.

  Decoder-only batches should carry PROMPT_END (B,) so only the prompts pool
  (`example_embedding`).
  """
  fn = jax.jit(lambda b, inp: example_embedding(
      model, b, inp, inp.get(PROMPT_END)).sum(0))
  out = []
  for expert_batches in batches:
    tot, n = 0.0, 0
    for inp in expert_batches:
      tot = tot + fn(base, inp)
      n += inp["input_ids"].shape[0]
    out.append(tot / max(n, 1))
  return jnp.stack(out)


def _token_mask(inputs: dict, shape: tuple) -> jax.Array:
  """(B, T) float mask of the real tokens a module call of `shape` reads:
  the attention mask of the sequence of that length (T5: encoder or
  decoder), all ones when none matches."""
  for key in ("attention_mask", "decoder_attention_mask"):
    m = inputs.get(key)
    if m is not None and tuple(m.shape) == tuple(shape[:2]):
      return m.astype(jnp.float32)
  return jnp.ones(shape[:2], jnp.float32)


def average_activations(model: Model, base: dict, lora: LoRAMethod,
                        expert: dict, batches: list) -> dict:
  """{module path: (d,)} mean input of every LoRA-adapted module over the
  real tokens of `batches` (model-input dicts: the expert's training rows),
  with the expert applied: its "average activation" router vector.

  expert: the expert's single LoRA tree ({path: {'lora_a', 'lora_b'}}).
  """
  tree = nn.unbox(expert)

  @jax.jit
  def sums(inp):
    out = {}

    def hook(next_fun, x, leaf, ctx):
      mask = _token_mask(inp, x.shape)
      out[ctx.path] = ((x.astype(jnp.float32) * mask[..., None]).sum((0, 1)),
                       mask.sum())
      return lora.hook(next_fun, x, leaf, ctx)
    icpt = transform.linear_interceptor(tree, hook)
    transform.run(model, base, transform.model_kwargs(inp), [icpt])
    return out

  total = None
  for inp in batches:
    s = sums(inp)
    total = s if total is None else jax.tree.map(jnp.add, total, s)
  if total is None:
    raise ValueError("average_activations needs at least one batch")
  return {p: x / jnp.maximum(n, 1.0) for p, (x, n) in total.items()}


def with_gates(stacked: dict, gates: list) -> dict:
  """The stacked library with its 'gate' leaves (E, d) replaced by one
  {module path: (d,)} per expert (e.g. `average_activations`)."""
  flat = transform.flatten(stacked)
  for key in [k for k in flat if k.endswith("/gate")]:
    path = key[:-len("/gate")]
    missing = [i for i, g in enumerate(gates) if path not in g]
    if missing:
      raise ValueError(f"router vectors of experts {missing} have no module "
                       f"{path!r}")
    flat[key] = jnp.stack([jnp.asarray(g[path], flat[key].dtype)
                           for g in gates])
  return transform.nest(flat)


# ----------------------------------------------------------------- Poly/MHR

def allocation(logits: jax.Array, rng: Optional[jax.Array] = None,
               temperature: float = 1.0) -> jax.Array:
  """Poly/MHR mixture weights (B, S, H) from allocation logits (B, S, H).

  Poly (Ponti et al. 2023, arXiv:2202.13914) and MHR (Caccia et al. 2023,
  arXiv:2211.03831), as mttl's `poly` selector: in training (`rng` given) a
  relaxed-Bernoulli (Gumbel-sigmoid) sample sigmoid((logits + log u -
  log(1 - u)) / temperature), u ~ U(0, 1) per entry; in evaluation (rng None)
  the deterministic sigmoid(logits). Normalised over the skills S.
  """
  logits = logits.astype(jnp.float32)
  if rng is not None:
    u = jax.random.uniform(rng, logits.shape, jnp.float32, 1e-6, 1.0 - 1e-6)
    w = jax.nn.sigmoid((logits + jnp.log(u) - jnp.log1p(-u)) / temperature)
  else:
    w = jax.nn.sigmoid(logits)
  return w / (w.sum(1, keepdims=True) + 1e-12)


@ROUTERS.register("poly")
class PolyLoRA:
  """Poly (heads=1) / MHR (heads>1): per-task mixtures of S LoRA skills.

  Ponti et al. 2023 (arXiv:2202.13914), Caccia et al. 2023 (arXiv:2211.03831).
  params: {'skills': {path: {'lora_a': (S, d, r), 'lora_b': (S, r, o)}},
           'alloc': {path: {'logits': (T, S, H)}},
           'alloc_eval': {path: {'logits': (S, H)}}}
  A row's task comes from inputs['adapter_index'] (training); without it
  'alloc_eval' is used (evaluation: set it to a task's row, to zeros for
  MHR-mu's uniform average, or fit it for MHR-z). Mixture weights are
  `allocation`: a relaxed-Bernoulli sample per row and module when apply gets
  an rng with deterministic=False (training: Fitter(dropout=True)), else the
  deterministic sigmoid, normalised over skills. Head h mixes rows h*d/H.. of
  A and columns h*o/H.. of B separately. The base model itself runs
  deterministic (no model dropout) unless model_dropout=True: only the
  allocation is stochastic.
  """
  trainable = r"(skills|alloc)/.*"
  name = "poly"
  cached_decoding = True  # per-example mixtures (mtjax.methods.transform)

  def __init__(self, lora: LoRAMethod, num_tasks: int, num_skills: int = 4,
               heads: int = 1, temperature: float = 1.0,
               model_dropout: bool = False) -> None:
    self.lora, self.num_tasks = lora, int(num_tasks)
    self.num_skills, self.heads = int(num_skills), int(heads)
    self.temperature, self.model_dropout = float(temperature), model_dropout

  def init(self, rng: Optional[jax.Array], model: Model,
           base_params: Optional[dict] = None) -> dict:
    del base_params
    skills = nn.unbox(type(self.lora)(
        rank=self.lora.rank, alpha=self.lora.alpha, targets=self.lora.targets,
        num_experts=self.num_skills).init(rng, model))["lora"]
    # Poly initialises B at zero like LoRA; mixtures of zero are zero, so
    # skills start identical in effect and diverge through the allocation.
    flat = transform.flatten(skills)
    targets = transform.linear_modules(transform.abstract_params(model))
    alloc, alloc_eval, sk = {}, {}, {}
    for path, x in flat.items():
      mod, leaf = path.rsplit("/", 1)
      t = targets[mod]
      for h_dim in (t.shape[0], t.shape[1]):
        if h_dim % self.heads:
          raise ValueError(f"{mod}: dim {h_dim} not divisible by MHR heads "
                           f"{self.heads}")
      # 'adapters' (not in sharding.RULES) keeps the skill axis replicated
      # under any mesh; the routed library uses 'experts' (see experts.py).
      sk[path] = transform.boxed(
          x, ("adapters",) + experts.LOGICAL[leaf](t)[1:])
      alloc[mod + "/logits"] = jnp.zeros(
          (self.num_tasks, self.num_skills, self.heads))
      alloc_eval[mod + "/logits"] = jnp.zeros((self.num_skills, self.heads))
    return {"skills": transform.nest(sk), "alloc": transform.nest(alloc),
            "alloc_eval": transform.nest(alloc_eval)}

  def _mix(self, x, heads_w):
    """x (S, n, m) mixed along S per head over axis `n` -> (B, n, m)."""
    s, n, m = x.shape
    xh = x.reshape(s, self.heads, n // self.heads, m)
    return jnp.einsum("bsh,shnm->bhnm", heads_w, xh).reshape(-1, n, m)

  def hook(self, next_fun: Callable, x: jax.Array, leaf: dict,
           ctx: transform.HookContext, task: Optional[jax.Array],
           rng: Optional[jax.Array] = None) -> jax.Array:
    """y + x A_mix B_mix for x (B, ..., d); rng: sample the allocation."""
    y = next_fun(x)
    logits = leaf["logits"]
    if logits.ndim == 3:
      logits = logits[task]                           # (B, S, H)
    else:
      logits = jnp.broadcast_to(logits, (x.shape[0],) + logits.shape)
    if rng is not None:   # one sample per module: fold in its path
      rng = jax.random.fold_in(rng, zlib.crc32(ctx.path.encode()))
    w = allocation(logits, rng, self.temperature)
    dtype = ctx.module.dtype
    a = self._mix(leaf["lora_a"], w).astype(dtype)              # (B, d, r)
    bt = jnp.swapaxes(leaf["lora_b"], 1, 2)                      # (S, o, r)
    b = jnp.swapaxes(self._mix(bt, w), 1, 2).astype(dtype)      # (B, r, o)
    h = x.astype(dtype).reshape(x.shape[0], -1, x.shape[-1])
    delta = jnp.einsum("bnr,bro->bno", jnp.einsum("bnd,bdr->bnr", h, a), b)
    return y + (delta.reshape(y.shape) * self.lora.scale).astype(y.dtype)

  def apply(self, model: Model, params: dict, inputs: dict, *,
            rng: Optional[jax.Array] = None, deterministic: bool = True,
            method: Union[str, Callable, None] = None,
            decode: Optional[str] = None, cache: Optional[dict] = None) -> Any:
    """Logits, or (logits, cache) with `decode` (mtjax.methods.transform).

    rng with deterministic=False samples the allocation (training); the base
    model gets them only with model_dropout=True.
    """
    task = inputs.get("adapter_index")
    inputs = transform.model_kwargs(inputs)
    alloc = params["alloc"] if task is not None else params["alloc_eval"]
    tree = experts.merge_leaves(params["skills"], alloc)
    sample = rng if (rng is not None and not deterministic) else None
    if not self.model_dropout:
      rng, deterministic = None, True
    icpt = transform.linear_interceptor(
        tree, lambda nf, x, leaf, ctx: self.hook(nf, x, leaf, ctx, task,
                                                 sample),
        None, rng, deterministic)
    return transform.run(model, params["base"], inputs, [icpt], rng=rng,
                         deterministic=deterministic, method=method,
                         decode=decode, cache=cache)


def poly_eval_params(params: dict, task: Optional[int] = None) -> dict:
  """params with 'alloc_eval' = a trained task's row, or zeros (MHR-mu: the
  uniform average of the skills, Caccia et al. 2023, arXiv:2211.03831)."""
  def row(x):
    return x[task] if task is not None else jnp.zeros_like(x[0])
  return dict(params, alloc_eval=jax.tree.map(row, params["alloc"]))
