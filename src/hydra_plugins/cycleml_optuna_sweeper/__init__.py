"""Hydra sweeper on a current Optuna: pruning, resumable studies, failure tolerance.

Select it with ``hydra/sweeper=cycleml_optuna`` (``hparams_search=optuna`` does).
"""
