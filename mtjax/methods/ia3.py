"""(IA)3: learned vectors rescaling keys, values and FFN activations.

Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper
than In-Context Learning" (arXiv:2205.05638). For targeted key/value
projections the output is rescaled, k' = l_k * (x W_k); for the FFN the
intermediate activation is rescaled, i.e. the *input* of the down projection
(T5 'wo', Llama 'down_proj'): y = (l_ff * h) W_o. Vectors start at one, so a
fresh (IA)3 leaves the model unchanged (as PEFT's IA3 with init_ia3_weights).

Params: {'ia3': nested-by-module-path {'scale': (out,) or (in,)}} with the
target kernel's out (resp. in) logical axis; a library stacks (E, features)
and inputs['adapter_index'] picks one per example: each example's tokens are
assignments to its adapter (k = 1, weight 1), as in mixed-adapter LoRA
batches (mtjax.methods.grouped); an (IA)3 adapter has no rank, so its whole
application is the per-example gather of one vector (grouped.scale_per_example,
B*F numbers, one activation row per example), then a product.

Config: targets (output-rescaled regexes), ff_targets (input-rescaled regexes),
num_experts=0.
"""
from typing import Any, Callable, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtjax.methods import grouped, transform

DEFAULTS = {
    "t5": ((r".*(SelfAttention|EncDecAttention)/(k|v)",), (r".*/wo",)),
    "mt5": ((r".*(SelfAttention|EncDecAttention)/(k|v)",), (r".*/wo",)),
}
DECODER_DEFAULTS = ((r".*self_attn/(k_proj|v_proj)",), (r".*mlp/down_proj",))

Model = Any  # a flax linen module (mtjax.models)


@transform.METHODS.register("ia3")
class IA3:
  """The (IA)3 method (see module docstring)."""
  trainable = r"ia3/.*"
  cached_decoding = True  # per-token hooks: a step sees only its new token

  def __init__(self, targets: Union[str, Sequence[str], None] = None,
               ff_targets: Union[str, Sequence[str], None] = None,
               num_experts: int = 0) -> None:
    self.targets = None if targets is None else tuple(
        [targets] if isinstance(targets, str) else targets)
    self.ff_targets = None if ff_targets is None else tuple(
        [ff_targets] if isinstance(ff_targets, str) else ff_targets)
    self.num_experts = int(num_experts)

  def _targets(self, model):
    out_pat, ff_pat = DEFAULTS.get(model.config.model_type, DECODER_DEFAULTS)
    abstract = transform.abstract_params(model)
    out = transform.resolve_targets(model, self.targets or out_pat, abstract)
    ff = transform.resolve_targets(model, self.ff_targets or ff_pat, abstract)
    both = set(out) & set(ff)
    if both:
      raise ValueError(f"(IA)3 modules {sorted(both)} are in both targets and "
                       "ff_targets; a module is rescaled at its output or input")
    return out, ff

  def init(self, rng: Optional[jax.Array], model: Model,
           base_params: Optional[dict] = None) -> dict:
    del rng, base_params  # (IA)3 vectors start at one
    lead = (self.num_experts,) if self.num_experts else ()
    lead_axes = ("adapters",) if self.num_experts else ()
    out, ff = self._targets(model)
    flat = {}
    for path, t in out.items():
      flat[path] = {"scale": transform.boxed(
          jnp.ones(lead + (t.shape[1],)), lead_axes + (t.out_axis,))}
    for path, t in ff.items():
      flat[path] = {"scale_in": transform.boxed(
          jnp.ones(lead + (t.shape[0],)), lead_axes + (t.in_axis,))}
    return {"ia3": transform.nest(flat)}


  @staticmethod
  def _scale(x, vec, adapter_index):
    """x (B, .., F) times vec (F,), or each example's row of vec (E, F)."""
    if vec.ndim == 1:
      return x * vec.astype(x.dtype)
    transform.check_adapter_index(vec, adapter_index)
    return grouped.scale_per_example(x, vec, adapter_index)

  def hook(self, next_fun: Callable, x: jax.Array, leaf: dict,
           ctx: transform.HookContext) -> jax.Array:
    if "scale_in" in leaf:
      return next_fun(self._scale(x, leaf["scale_in"], ctx.adapter_index))
    return self._scale(next_fun(x), leaf["scale"], ctx.adapter_index)

  def apply(self, model: Model, params: dict, inputs: dict, *,
            rng: Optional[jax.Array] = None, deterministic: bool = True,
            method: Union[str, Callable, None] = None,
            decode: Optional[str] = None, cache: Optional[dict] = None) -> Any:
    """Logits, or (logits, cache) with `decode` (see transform's docstring)."""
    inputs = transform.model_kwargs(inputs)
    icpt = transform.linear_interceptor(
        nn.unbox(params["ia3"]), self.hook, inputs.get("adapter_index"), rng,
        deterministic)
    return transform.run(model, params["base"], inputs, [icpt], rng=rng,
                         deterministic=deterministic, method=method,
                         decode=decode, cache=cache)
