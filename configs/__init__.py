"""Experiment configs: `--config=configs/NAME.py[:VARIANT]` (mtjax.main).

A package so that configs share blocks (`from configs import common`) and
build on each other (`from configs import quickstart`). Importable from the
repository root, once installed (setup.py lists it), and from any directory
through mtjax.main, which puts a config's package on sys.path first.
"""
