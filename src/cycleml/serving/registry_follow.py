"""What a model registry tells a server to serve.

A registry root (``<root>/<model>/<version>/`` plus the registry's database) is a model
repository whose aliases choose the versions: a model is served at every version one
of its aliases points to, and a model without aliases at its newest non-archived
version. The server reads this view at start-up and then polls it, off the event loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cycleml.registry import CHAMPION, Registry


@dataclass(frozen=True)
class FollowedModel:
    """One model as the registry has it: ``alias -> version``, and its newest
    non-archived version (None: only archived ones)."""

    aliases: dict[str, str] = field(default_factory=dict)
    newest: str | None = None

    @property
    def versions(self) -> set[str]:
        """The versions to serve: those aliases point to, else the newest."""
        if self.aliases:
            return set(self.aliases.values())
        return {self.newest} if self.newest is not None else set()

    @property
    def default_alias(self) -> str | None:
        """The alias a bare model name means (``champion``), when the model has it."""
        return CHAMPION if CHAMPION in self.aliases else None


class RegistryFollower:
    """Reads a registry's aliases and versions into ``{model: FollowedModel}``."""

    def __init__(self, root: Path, db_url: str | None) -> None:
        self.registry = Registry(db_url=db_url, root=root)

    def read(self) -> dict[str, FollowedModel]:
        """The registry's view now: one query for every alias, and one per model
        without aliases for its newest version."""
        table = self.registry.aliases()
        followed: dict[str, FollowedModel] = {}
        for name in self.registry.models():
            aliases = {alias: str(version) for alias, version in table.get(name, {}).items()}
            if aliases:
                followed[name] = FollowedModel(aliases)
            else:
                ready = self.registry.versions(name)
                followed[name] = FollowedModel({}, str(ready[-1].version) if ready else None)
        return followed

    def close(self) -> None:
        self.registry.close()
