"""Merging: task vectors and LoRA experts combined into one model.

Three kinds, one registry (`MERGES`, configs name them like routers):

  static.py      pure, jit-able merges over task vectors (arrays, pytrees
                 or `TaskVector`s with their base's fingerprint), with
                 PEFT's numbers (peft.utils.merge_utils): task_arithmetic
                 (Ilharco et al. 2023, arXiv:2212.04089), ties (Yadav et al.
                 2023, arXiv:2306.01708), dare_linear / dare_ties (Yu et al.
                 2024, arXiv:2311.03099), magnitude_prune; trimming per
                 tensor (PEFT) or over the whole task vector (TIES paper).
  lora_merge.py  LoRA experts -> one LoRA of a chosen rank, module by module
                 (a static merge of the updates, then a truncated SVD), in
                 PEFT's format via mtjax.methods.library.export_peft, or
                 folded into the base and saved as an HF folder.
  learned.py     merges whose coefficients are fitted by the one fit loop
                 (mtjax.training.fit.Fitter), as methods whose only
                 trainable leaves are the coefficients: AdaMerging
                 (arXiv:2310.02575), aTLAS (arXiv:2407.03003), Self
                 Positioning, ScaLearn (arXiv:2310.01217).

  merge = MERGES.build({'name': 'ties', 'density': 0.2})
  merged_tv = merge([task_vector(ft, base) for ft in finetuned], weights)
  params = apply_task_vector(base, merged_tv)

  lora, lora_params = merge_lora(experts, {'name': 'ties', 'density': 0.2},
                                 rank=16)
  library.export_peft(model, lora, lora_params, 'merged_adapter')

  ada = MERGES.build({'name': 'adamerging'}, task_vectors=tvs)
  Fitter(ada, model, mesh, optimizer, steps) ...; ada.merge(model, params)

The package sits between mtjax.methods and mtjax.routing: it imports only
the registry, models and methods (not mtjax.data, whose seqio/TensorFlow
import would add ~650 MB to a process that only merges).
"""
from mtjax.merging import learned, lora_merge, static  # noqa: F401
from mtjax.merging.learned import (  # noqa: F401
  ATLAS,
  AdaMerging,
  CoefficientMerge,
  ScaLearn,
  SelfPositioning,
  entropy_loss,
)
from mtjax.merging.lora_merge import (  # noqa: F401
  LoRAExpert,
  experts_from_library,
  lora_delta,
  merge_lora,
  save_merged,
)
from mtjax.merging.static import (  # noqa: F401
  MERGES,
  TaskVector,
  apply_task_vector,
  dare_linear,
  dare_ties,
  magnitude_prune,
  task_arithmetic,
  task_vector,
  ties,
)
