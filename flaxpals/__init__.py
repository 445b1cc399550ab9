"""flaxpals: multi-task fine-tuning of BERT encoders with task-specific adapters, in JAX.

Wings, lowest first: config_lib, data/, workdir_format, model/, mtl/, train/, serve/;
the commands on top: main, predict, export (docs/architecture.md).
"""
