"""Routing among experts: scores and kernels, the stacked library, routers.

  kernels.py      array-level scores (PHATGOOSE, Arrow), top-k, grouped
                  application of the chosen experts (dense / grouped /
                  blocked / ragged)
  experts.py      the in-memory library stacked for routing; PHATGOOSE gate
                  training (`GateTraining`)
  routed.py       `RoutedLoRA` and the router registry `ROUTERS`: phatgoose,
                  arrow, fixed, uniform, merged
  baselines.py    task_gate, retrieval, Poly/MHR (also in `ROUTERS`)
  diagnostics.py  routing entropy, load and own-expert rates per layer
"""
from mtjax.routing import baselines, diagnostics, experts, kernels, routed  # noqa: F401
from mtjax.routing.routed import ROUTERS, build_router, routed_params  # noqa: F401
