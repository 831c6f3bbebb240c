"""Hyperparameter sweeps: search spaces, trial pruning, results, W&B sweep commands.

The Optuna sweeper itself is a Hydra plugin (``hydra_plugins.cycleml_optuna_sweeper``);
this package holds what it and the training jobs share.
"""
