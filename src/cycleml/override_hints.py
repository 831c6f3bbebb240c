"""Misspelled config groups and group options on the command line, with the nearest name.

Checked from the config folder itself before Hydra composes anything, so that
``cycleml train modle=cnn`` answers "did you mean model=cnn?" at once. Only plain
``key=value`` overrides are looked at; ``+key``, ``~key``, ``key@package`` and Hydra's
own groups (``hydra/...``, filled by plugins) are left to Hydra.
"""

from __future__ import annotations

import difflib
from functools import cache
from pathlib import Path

import yaml

from cycleml.configs_path import config_dir
from cycleml.errors import ConfigError

_NULL = {"null", "none", "None"}


@cache
def _groups(root: Path) -> dict[str, list[str]]:
    """Config group path -> its options, for the app's groups under ``root``."""
    groups: dict[str, list[str]] = {}
    for folder in sorted(p for p in root.rglob("*") if p.is_dir()):
        name = folder.relative_to(root).as_posix()
        if name == "hydra" or name.startswith("hydra/"):
            continue
        groups[name] = sorted(f.stem for f in folder.glob("*.yaml"))
    return groups


def _top_level_keys(path: Path) -> set[str]:
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return set()
    return set(loaded) - {"defaults"} if isinstance(loaded, dict) else set()


@cache
def _known_keys(root: Path, config_name: str) -> set[str]:
    """Top-level keys the primary config may have: its own, its groups', and those that
    global-package configs (experiments, debug presets) may add."""
    keys = _top_level_keys(root / f"{config_name}.yaml") | {"hydra"}
    keys |= set(_groups(root))
    for path in root.glob("*/**/*.yaml"):
        if "@package _global_" in path.read_text(encoding="utf-8")[:500]:
            keys |= _top_level_keys(path)
    return keys


def _nearest(word: str, candidates: list[str] | set[str]) -> str | None:
    found = difflib.get_close_matches(word, sorted(candidates), n=1, cutoff=0.6)
    return found[0] if found else None


def check_overrides(config_name: str, args: list[str]) -> None:
    """Raise a :class:`ConfigError` for an override naming a group or option that does not
    exist but is close to one that does."""
    if any(arg.startswith(("hydra.searchpath", "--config-dir", "-cd")) for arg in args):
        return  # configs may come from elsewhere
    root = Path(config_dir())
    groups = _groups(root)
    for arg in args:
        if arg.startswith(("-", "+", "~")) or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        if "@" in key or key.startswith("hydra"):
            continue
        if key in groups:
            _check_option(key, value, groups[key])
            continue
        head = key.split(".", 1)[0]
        if head in _known_keys(root, config_name):
            continue
        near = _nearest(head, _known_keys(root, config_name))
        if near is not None:
            suggestion = near + key[len(head) :]
            raise ConfigError(
                f"'{key}' is not a config group or key of `cycleml "
                f"{config_name.replace('_', ' ')}`; did you mean {suggestion}={value}?"
            )


def _check_option(group: str, value: str, options: list[str]) -> None:
    for option in (part.strip() for part in value.split(",")):
        if option == "null":
            # Hydra stops with a traceback ("must be a string or a list. Got NoneType")
            instead = f" or choose {group}=none" if "none" in options else ""
            raise ConfigError(
                f"{group}=null: a config group is not set to null; leave it out with "
                f"~{group}{instead}"
            )
        if not option or option in _NULL or option in options or "(" in option:
            continue  # empty, null, known, or a sweep function such as choice(...)
        near = _nearest(option, options)
        hint = f"did you mean {group}={near}? " if near else ""
        raise ConfigError(
            f"{group}={option}: no such option; {hint}(options: {', '.join(options)})"
        )
