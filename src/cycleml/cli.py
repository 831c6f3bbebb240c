"""`cycleml <command> [hydra overrides]`: dispatch to one Hydra app per command."""

from __future__ import annotations

import runpy
import sys
from collections.abc import Iterable

# command -> (module run as __main__, one-line help). Each module is a Hydra app
# with its own primary config, so everything after the command is Hydra's.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("cycleml.training.train", "train a model (Lightning) or a classical baseline"),
    "eval": ("cycleml.training.evaluate", "evaluate a checkpoint: metrics, reports, plots"),
    "compare": ("cycleml.training.compare", "leaderboard of runs or sweep trials under a folder"),
    "export": ("cycleml.export.cli", "export a checkpoint to a verified ONNX model bundle"),
    "predict": ("cycleml.batch.cli", "offline batch prediction into a database"),
    "serve": ("cycleml.serving.cli", "serve model bundles over HTTP (KServe v2)"),
    "data": ("cycleml.data.cli", "data gather | clean | diff"),
    "monitor": (
        "cycleml.monitoring.cli",
        "drift and accuracy report of the prediction log | labels: attach true labels",
    ),
    "registry": (
        "cycleml.registry.cli",
        "model registry: register | list | show | alias | promote | compare | archive",
    ),
    "pipeline": (
        "cycleml.pipeline.cli",
        "continuous training: gather, clean, train, export, gate, promote (resumable)",
    ),
    "experiment": (
        "cycleml.experiments.cli",
        "A/B experiments between model versions: start | list | report | ramp | stop",
    ),
}


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = [
        "usage: cycleml <command> [hydra overrides | --help | --cfg job | -m ...]",
        "",
        "commands:",
    ]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    lines += [
        "",
        "examples:",
        "  cycleml train experiment=digits trainer.max_epochs=3 model.optimizer.lr=1e-3",
        "  cycleml train -m model.optimizer.lr=1e-3,1e-2",
        "  cycleml eval ckpt_path=logs/train/runs/<run>/checkpoints/best.ckpt",
        "  cycleml compare logs/train",
        "  cycleml train -m hparams_search=optuna",
        "  cycleml export ckpt_path=logs/train/runs/<run> export.quantize=int8",
        "  cycleml predict bundle=bundles/digits/1 input=photos/ db_url=sqlite:///predictions.db",
        "  cycleml serve path=bundles",
        "  cycleml data gather && cycleml data clean",
        "  cycleml registry register bundle=bundles/digits/1 && cycleml registry list",
        "  cycleml monitor digits@champion window.size=500",
        "  cycleml pipeline pipeline=digits trigger=drift",
        "  cycleml experiment report new-cnn",
    ]
    return "\n".join(lines)


def pick_command(
    args: list[str], names: Iterable[str], usage: str, prog: str
) -> tuple[str, list[str]] | None:
    """Split ``args`` into a known command and the rest; None after printing help.

    An unknown command prints the usage to stderr and exits with status 2.
    """
    if not args or args[0] in {"-h", "--help", "help"}:
        print(usage)
        return None
    if args[0] not in names:
        print(f"{prog}: unknown command '{args[0]}'.\n\n{usage}", file=sys.stderr)
        raise SystemExit(2)
    return args[0], args[1:]


def main(argv: list[str] | None = None) -> None:
    picked = pick_command(
        list(sys.argv[1:] if argv is None else argv), COMMANDS, _usage(), "cycleml"
    )
    if picked is None:
        return
    command, rest = picked
    module, _ = COMMANDS[command]
    # Run the command module as __main__ so that tools which re-launch the program
    # (Lightning's DDP launcher) start `python -m <module> <overrides>` again.
    sys.argv = [module, *rest]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
