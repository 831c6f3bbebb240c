"""A/B experiments between model versions: specs, stable assignment and their store.

:mod:`cycleml.experiments.assign` maps a unit id (a user, a session) to an arm with a
stable hash, :mod:`cycleml.experiments.store` keeps the experiments and every change
to them in the project's database, and :mod:`cycleml.experiments.tables` declares the
tables (assignments and outcome events included) on the shared metadata.
"""
