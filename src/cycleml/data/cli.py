"""`cycleml data <gather|clean|diff> [hydra overrides]`: the data command group.

Each sub-command is a Hydra app with its own primary config
(``configs/data_gather.yaml``, ``data_clean.yaml``, ``data_diff.yaml``). ``diff``
also takes the two dataset directories as plain arguments: ``cycleml data diff A B``.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cycleml.cli import pick_command
from cycleml.cli_args import as_overrides
from cycleml.hydra_app import hydra_app

log = logging.getLogger(__name__)


def _container(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if node is not None else None


@hydra_app("data_gather", "data gather")
def gather_app(cfg: DictConfig) -> str:
    from cycleml.data.gather import REJECTED_FILE, gather

    result = gather(
        sources=_container(cfg.sources) or {},
        output=cfg.output,
        label_map=_container(cfg.get("label_map")),
        files=cfg.files,
        workers=cfg.workers,
        overwrite=cfg.overwrite,
        progress=cfg.progress,
    )
    rejected = (
        f"; {result.num_rejected} rejected (see {REJECTED_FILE})" if result.num_rejected else ""
    )
    print(
        f"gathered {result.num_items} items into {result.root} (fingerprint {result.fingerprint}){rejected}"
    )
    return result.fingerprint


@hydra_app("data_clean", "data clean")
def clean_app(cfg: DictConfig) -> str:
    from cycleml.data.clean import CleanSettings, clean
    from cycleml.data.report import REPORT_HTML

    options = _container(cfg.clean)
    settings = CleanSettings(
        policies=options.pop("checks", None) or {},
        schema=options.pop("schema", None) or {},
        workers=cfg.workers,
        progress=cfg.progress,
        **options,
    )
    result = clean(cfg.input, cfg.output, settings, overwrite=cfg.overwrite)
    found = ", ".join(f"{check} {n}" for check, n in result.counts.items() if n) or "no issues"
    near = ""
    if result.hamming is not None:
        mode = "auto" if result.hamming["mode"] == "auto" else "set"
        near = f"; near-duplicate threshold {result.hamming['threshold']} bits ({mode})"
    print(
        f"cleaned {result.num_input} items: {result.num_kept} kept, {result.num_removed} removed "
        f"({found}){near} -> {result.root} (fingerprint {result.fingerprint}); "
        f"report: {result.root / REPORT_HTML}"
    )
    return result.fingerprint


@hydra_app("data_diff", "data diff")
def diff_app(cfg: DictConfig) -> bool:
    from cycleml.data.diff import diff_datasets

    result = diff_datasets(cfg.old, cfg.new)
    if cfg.output:
        path = Path(cfg.output)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
        log.info("wrote the diff to %s", path)
    print("\n".join(result.lines(cfg.limit)))
    return result.identical


SUBCOMMANDS: dict[str, tuple[Callable[[], Any], str]] = {
    "gather": (gather_app, "merge sources into one dataset directory (configs/data_gather.yaml)"),
    "clean": (clean_app, "check a dataset, write a cleaned copy, quarantine and report"),
    "diff": (diff_app, "items added, removed, relabelled between two dataset directories"),
}


def _usage() -> str:
    lines = ["usage: cycleml data <sub-command> [hydra overrides | --help | --cfg job]", ""]
    lines += [f"  {name:<7} {text}" for name, (_, text) in SUBCOMMANDS.items()]
    lines += [
        "",
        "examples:",
        "  cycleml data gather output=data/gathered",
        "  cycleml data clean input=data/gathered clean.hamming=4",
        "  cycleml data diff data/gathered data/gathered-clean",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    picked = pick_command(
        list(sys.argv[1:] if argv is None else argv), SUBCOMMANDS, _usage(), "cycleml data"
    )
    if picked is None:
        return
    command, rest = picked
    if command == "diff":
        rest = as_overrides(rest, ["old", "new"])  # `diff A B` → old=A new=B
    app, _ = SUBCOMMANDS[command]
    sys.argv = [f"cycleml data {command}", *rest]
    app()


if __name__ == "__main__":
    main()
