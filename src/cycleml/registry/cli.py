"""`cycleml registry <sub-command> [hydra overrides]`: the model registry's command group.

Each sub-command is a Hydra app on ``configs/registry.yaml``; plain arguments map to
its keys (``show digits@champion`` → ``ref=digits@champion``, ``compare digits 3 4``
→ ``name=digits a=3 b=4``) and ``alias digits champion=3`` to ``name=digits
alias=champion version=3``.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from cycleml.cli import pick_command
from cycleml.cli_args import as_overrides, check_readable
from cycleml.configs_path import config_dir
from cycleml.errors import ConfigError
from cycleml.hydra_app import hydra_app
from cycleml.redaction import redact
from cycleml.registry.aliases import ANY, shown
from cycleml.registry.errors import RegistryError
from cycleml.registry.model_registry import Registry
from cycleml.registry.records import AliasMove, ModelVersion
from cycleml.registry.refs import check_alias, check_version
from cycleml.registry.text import (
    format_compare,
    format_show,
    models_table,
    registered_line,
    versions_table,
)


def open_registry(cfg: DictConfig, must_exist: bool = False) -> Registry:
    """The registry of ``cfg``; ``must_exist``: a missing one is an error, not created."""
    return Registry(cfg.db_url, cfg.root, must_exist=must_exist)


def _required(cfg: DictConfig, command: str, *keys: str) -> None:
    missing = [key for key in keys if cfg.get(key) in (None, "")]
    if missing:
        usage = SUBCOMMANDS[command][2]
        raise ConfigError(f"registry {command} needs {', '.join(missing)}: {usage}")


def _json_mode(cfg: DictConfig) -> bool:
    if cfg.format not in ("table", "json"):
        raise ConfigError(f"format={cfg.format!r}: expected table or json")
    return cfg.format == "json"


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def _expected(value: Any) -> Any:
    """``expect=``: ``any`` (no check), null (the alias must be unset) or a version."""
    if value is None:
        return None
    if isinstance(value, str) and value.lower() == "any":
        return ANY
    return check_version(value)


def _report_move(registry: Registry, cfg: DictConfig, alias: str, move: AliasMove | None) -> None:
    """Print where the alias points now and the move that got it there (if any)."""
    now = registry.aliases(cfg.name).get(cfg.name, {}).get(alias)
    if _json_mode(cfg):
        moved = move.to_dict() if move else None
        _print_json({"name": cfg.name, "alias": alias, "version": now, "move": moved})
    elif move is None:
        print(f"{cfg.name}@{alias} already points to {shown(now)}; nothing changed")
    else:
        print(f"{cfg.name}@{alias}: {shown(move.from_version)} -> {shown(move.to_version)}")


def _with_registry(command: str) -> Callable[[Callable[..., Any]], Callable[[DictConfig], Any]]:
    """Check the sub-command's required keys, open the registry, close it after. Only
    ``register`` creates a registry; the others need one (a mistyped root or db_url
    is named, not answered as an empty registry)."""

    def decorate(work: Callable[[Registry, DictConfig], Any]) -> Callable[[DictConfig], Any]:
        @functools.wraps(work)
        def run(cfg: DictConfig) -> Any:
            _required(cfg, command, *SUBCOMMANDS[command][1])
            _json_mode(cfg)
            registry = open_registry(cfg, must_exist=command != "register")
            try:
                return work(registry, cfg)
            finally:
                registry.close()

        return run

    return decorate


@hydra_app("registry")
@_with_registry("register")
def register_app(registry: Registry, cfg: DictConfig) -> str:
    tags = OmegaConf.to_container(cfg.tags, resolve=True) if cfg.tags else {}
    if not isinstance(tags, dict):
        raise ConfigError("tags must be a mapping, e.g. +tags.team=vision")
    version, created = registry.register(
        cfg.bundle,
        name=cfg.name,
        description=cfg.description or "",
        tags=tags,
        parent=cfg.parent,
    )
    if _json_mode(cfg):
        _print_json({**version.to_dict(), "created": created})
    else:
        print(registered_line(version, created))
    return version.ref


@hydra_app("registry")
@_with_registry("list")
def list_app(registry: Registry, cfg: DictConfig) -> None:
    if cfg.name:
        listed = registry.versions(cfg.name, include_archived=cfg.all)
        pointed = registry.aliases(cfg.name).get(cfg.name, {})
        if _json_mode(cfg):
            _print_json([{**v.to_dict(), "aliases": _aliases_of(v, pointed)} for v in listed])
        else:
            print(versions_table(listed, pointed))
        return
    models = [(name, registry.versions(name, include_archived=True)) for name in registry.models()]
    pointed_all = registry.aliases()
    if _json_mode(cfg):
        _print_json(
            [
                {
                    "name": name,
                    "versions": [v.version for v in found if v.status == "ready"],
                    "archived": [v.version for v in found if v.status != "ready"],
                    "aliases": pointed_all.get(name, {}),
                }
                for name, found in models
            ]
        )
    else:
        print(models_table(models, pointed_all) if models else f"no models in {registry.root}")


@hydra_app("registry")
@_with_registry("show")
def show_app(registry: Registry, cfg: DictConfig) -> str:
    _, version = registry.resolve(cfg.ref)
    pointed = registry.aliases(version.name).get(version.name, {})
    moves = [
        m for m in registry.audit(version.name) if version.version in (m.from_version, m.to_version)
    ]
    gates = registry.evaluations(version.name, version.version)
    if _json_mode(cfg):
        _print_json(
            {
                **version.to_dict(),
                "aliases": _aliases_of(version, pointed),
                "alias_moves": [m.to_dict() for m in moves],
                "gate": gates[-1].to_dict() if gates else None,
                "gate_decisions": len(gates),
            }
        )
    else:
        print(format_show(version, _aliases_of(version, pointed), moves, gates))
    return version.ref


@hydra_app("registry")
@_with_registry("alias")
def alias_app(registry: Registry, cfg: DictConfig) -> None:
    expected = _expected(cfg.expect)
    if cfg.version is None:
        move: AliasMove | None = registry.delete_alias(
            cfg.name, cfg.alias, reason=cfg.reason, expected=expected
        )
    else:
        move = registry.set_alias(
            cfg.name, cfg.alias, cfg.version, reason=cfg.reason, expected=expected
        )
    _report_move(registry, cfg, cfg.alias, move)


@hydra_app("registry")
@_with_registry("promote")
def promote_app(registry: Registry, cfg: DictConfig) -> None:
    move = registry.promote(
        cfg.name,
        cfg.source,
        cfg.target,
        reason=cfg.reason,
        expected=_expected(cfg.expect),
        require_gate=_flag(cfg, "require_gate", True),
        force=_flag(cfg, "force", False),
    )
    _report_move(registry, cfg, cfg.target, move)


def _flag(cfg: DictConfig, key: str, default: bool) -> bool:
    value = cfg.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{key}={value!r}: expected true or false")
    return value


@hydra_app("registry")
@_with_registry("compare")
def compare_app(registry: Registry, cfg: DictConfig) -> None:
    table = registry.compare(cfg.name, str(cfg.a), str(cfg.b))
    if _json_mode(cfg):
        _print_json(table)
    else:
        print(format_compare(table))


@hydra_app("registry")
@_with_registry("archive")
def archive_app(registry: Registry, cfg: DictConfig) -> None:
    version = registry.archive(cfg.name, cfg.version, reason=cfg.reason)
    if _json_mode(cfg):
        _print_json(version.to_dict())
    else:
        print(f"{version.ref} is archived (its folder and record stay)")


def _aliases_of(version: ModelVersion, pointed: dict[str, int]) -> list[str]:
    return sorted(alias for alias, number in pointed.items() if number == version.version)


# sub-command -> (app, required keys, usage line, plain arguments in order)
SUBCOMMANDS: dict[str, tuple[Callable[[], Any], tuple[str, ...], str, list[str]]] = {
    "register": (register_app, ("bundle",), "register bundle=<folder> [name=] [description=] "
                 "[+tags.k=v] [parent=<model ref>]", ["bundle"]),
    "list": (list_app, (), "list [<name>] [all=true] [format=json]", ["name"]),
    "show": (show_app, ("ref",), "show <name | name/version | name@alias>", ["ref"]),
    "alias": (alias_app, ("name", "alias"), "alias <name> <alias>=<version | null> "
              "[reason=] [expect=<version | null>]", ["name"]),
    "promote": (promote_app, ("name", "source", "target"),
                "promote <name> <source alias> <target alias> [reason=] [expect=] "
                "[require_gate=false] [force=true]",
                ["name", "source", "target"]),
    "compare": (compare_app, ("name", "a", "b"), "compare <name> <version | alias> "
                "<version | alias>", ["name", "a", "b"]),
    "archive": (archive_app, ("name", "version"), "archive <name> <version> [reason=]",
                ["name", "version"]),
}  # fmt: skip


def _usage() -> str:
    lines = ["usage: cycleml registry <sub-command> [arguments] [hydra overrides]", ""]
    lines += [f"  {usage}" for _, _, usage, _ in SUBCOMMANDS.values()]
    lines += [
        "",
        "settings: root=<folder> (default ./registry) db_url=<SQLAlchemy URL> "
        "(default SQLite in the root)",
        "examples:",
        "  cycleml registry register bundle=bundles/digits/1 description=first",
        "  cycleml registry alias digits champion=1 reason='first release'",
        "  cycleml registry show digits@champion",
        "  cycleml registry promote digits challenger champion",
    ]
    return "\n".join(lines)


@functools.cache
def _config_keys() -> frozenset[str]:
    text = (Path(config_dir()) / "registry.yaml").read_text(encoding="utf-8")
    return frozenset(yaml.safe_load(text))


def _alias_arguments(args: list[str]) -> list[str]:
    """``champion=3`` (a key that is no setting) → ``alias=champion version=3``."""
    settings = _config_keys() | {"hydra"}
    out: list[str] = []
    for arg in args:
        key, sep, value = arg.partition("=")
        is_alias = sep and key[:1] not in "+~-" and key.split(".")[0] not in settings
        if is_alias and not any(item.startswith("alias=") for item in out):
            check_alias(key)  # a bad alias is named here, not by Hydra
            out += [f"alias='{key}'", f"version={value}"]
        else:
            out.append(arg)
    return out


def registry_overrides(command: str, args: list[str]) -> list[str]:
    """The Hydra overrides of ``cycleml registry <command> <args>``: plain arguments
    named by the sub-command's positionals, ``alias``'s ``champion=3`` form resolved."""
    rest = as_overrides(args, SUBCOMMANDS[command][3])
    rest = _alias_arguments(rest) if command == "alias" else rest
    check_readable(rest, free_text=("reason", "description"))
    return rest


def main(argv: list[str] | None = None) -> None:
    picked = pick_command(
        list(sys.argv[1:] if argv is None else argv), SUBCOMMANDS, _usage(), "cycleml registry"
    )
    if picked is None:
        return
    command, rest = picked
    try:
        rest = registry_overrides(command, rest)
    except (RegistryError, ConfigError) as err:
        print(f"cycleml registry: error: {redact(str(err))}", file=sys.stderr)
        raise SystemExit(2) from None
    sys.argv = [f"cycleml registry {command}", *rest]
    SUBCOMMANDS[command][0]()


if __name__ == "__main__":
    main()
