"""Errors of the model registry: each names the model, version, alias or folder at fault."""

from cycleml.errors import CycleMLError


class RegistryError(CycleMLError):
    """A registry operation that cannot be done: unknown model, version or alias, a bad
    name, a bundle that fails validation, a root that cannot be written."""


class AliasConflict(RegistryError):
    """An alias moved between reading it and changing it (a lost compare-and-set)."""


class GateRefused(RegistryError):
    """A promotion refused because the version's last gate decision failed."""
