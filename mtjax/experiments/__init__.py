"""Experiments: one module per pipeline, each registering its jobs in JOBS.

  train.py           'train': train one method, evaluate (the trainer job)
  library.py         'library', 'prompt_transfer': multi-run jobs
  phatgoose.py       'phatgoose': experts, gates, every router on one table
  phatgoose_rows.py  its reference rows that are no routers (ICL, merges
                     with a hyper-parameter chosen on validation data)
  soft_injection.py  'soft_injection': zero-shot vs ICL vs soft injection
  zero_shot.py       'zero_shot': a pretrained LM on the real tasks

mtjax.main runs config.job through JOBS; a new experiment is one module here
whose job function is decorated with @JOBS.register('name').
"""
from mtjax.experiments import (  # noqa: F401
    library,
    phatgoose,
    phatgoose_rows,
    soft_injection,
    train,
    zero_shot,
)
from mtjax.experiments.train import JOBS  # noqa: F401
