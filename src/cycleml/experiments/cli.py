"""`cycleml experiment <sub-command> [hydra overrides]`: A/B experiments' command group.

Each sub-command is a Hydra app on ``configs/ab.yaml``. The experiments live in the
project's database (``db_url``: the server's ``monitoring.db_url``); ``start``,
``ramp`` and ``stop`` write it through
:class:`~cycleml.experiments.store.ExperimentStore`, and a running server follows
within its poll interval. A plain first argument is the experiment's name
(``report new-cnn`` → ``name=new-cnn``); ``weights.<arm>=`` and ``arms.<arm>=`` need
no ``+``.

``report`` exits with status 0 whatever the verdict (read it from the output or
``report.json``); an unknown experiment, empty data or a bad setting exit with 2 and
one line naming the problem.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cycleml.cli import pick_command
from cycleml.cli_args import as_overrides
from cycleml.errors import ConfigError
from cycleml.experiments.store import ExperimentSpec, ExperimentStore
from cycleml.hydra_app import hydra_app

SOURCE = "cli"
# overrides that add keys to an empty mapping of the config: Hydra wants a "+" there
_MAPPINGS = ("weights.", "arms.")


def _json_mode(cfg: DictConfig) -> bool:
    if cfg.format not in ("text", "json"):
        raise ConfigError(f"format={cfg.format!r}: expected text or json")
    return cfg.format == "json"


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def _with_store(command: str) -> Callable[[Callable[..., Any]], Callable[[DictConfig], Any]]:
    """Check the name (where needed) and the format, open the store, close it after.
    Only ``start`` creates the database; the others need it to exist."""

    def decorate(work: Callable[[ExperimentStore, DictConfig], Any]) -> Callable[[DictConfig], Any]:
        @functools.wraps(work)
        def run(cfg: DictConfig) -> Any:
            if command != "list" and cfg.name in (None, ""):
                raise ConfigError(f"experiment {command} needs a name: {SUBCOMMANDS[command][1]}")
            _json_mode(cfg)
            store = ExperimentStore(cfg.db_url, must_exist=command != "start")
            try:
                return work(store, cfg)
            finally:
                store.close()

        return run

    return decorate


def _weights_text(weights: dict[str, float]) -> str:
    return ", ".join(f"{arm} {value:g}" for arm, value in weights.items())


def _print_spec(cfg: DictConfig, spec: ExperimentSpec, what: str) -> None:
    if _json_mode(cfg):
        print(json.dumps(spec.to_dict(), indent=2))
    else:
        arms = ", ".join(f"{arm}={ref}" for arm, ref in spec.arms.items())
        print(f"experiment {spec.name} {what} (revision {spec.revision}): model {spec.model}, "
              f"{spec.mode}, {spec.status}; arms {arms}; weights {_weights_text(dict(spec.weights))}")  # fmt: skip


@hydra_app("ab", "experiment")
@_with_store("start")
def start_app(store: ExperimentStore, cfg: DictConfig) -> None:
    data: dict[str, Any] = {
        "name": cfg.name,
        "model": cfg.model_name,
        "arms": _plain(cfg.arms),
        "unit": _plain(cfg.unit),
        "mode": cfg.mode,
    }
    if cfg.weights:
        data["weights"] = _plain(cfg.weights)
    if cfg.salt:
        data["salt"] = cfg.salt
    spec = store.start(ExperimentSpec.from_dict(data), source=SOURCE, note=cfg.note)
    _print_spec(cfg, spec, "is running")


@hydra_app("ab", "experiment")
@_with_store("list")
def list_app(store: ExperimentStore, cfg: DictConfig) -> None:
    specs = store.list()
    if _json_mode(cfg):
        print(json.dumps([spec.to_dict() for spec in specs], indent=2))
        return
    if not specs:
        print("no experiments; start one with `cycleml experiment start` (see --help)")
        return
    rows = [("name", "model", "mode", "status", "rev", "weights", "arms")]
    rows += [
        (s.name, s.model, s.mode, s.status, str(s.revision), _weights_text(dict(s.weights)),
         ", ".join(f"{a}={r}" for a, r in s.arms.items()))
        for s in specs
    ]  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False))
              + "  " + row[-1])  # fmt: skip


@hydra_app("ab", "experiment")
@_with_store("ramp")
def ramp_app(store: ExperimentStore, cfg: DictConfig) -> None:
    weights = _plain(cfg.weights)
    if not weights:
        raise ConfigError(f"experiment ramp needs new weights: {SUBCOMMANDS['ramp'][1]}")
    before = dict(store.get(cfg.name).weights)
    spec = store.ramp(cfg.name, weights, source=SOURCE, note=cfg.note)
    if _json_mode(cfg):
        print(json.dumps({**spec.to_dict(), "weights_before": before}, indent=2))
    else:
        print(f"experiment {spec.name} (revision {spec.revision}): weights "
              f"{_weights_text(before)} -> {_weights_text(dict(spec.weights))}")  # fmt: skip


@hydra_app("ab", "experiment")
@_with_store("stop")
def stop_app(store: ExperimentStore, cfg: DictConfig) -> None:
    spec = store.stop(cfg.name, source=SOURCE, note=cfg.note)
    _print_spec(cfg, spec, "is stopped")


def report_settings(cfg: DictConfig) -> Any:
    """The report's settings from ``configs/ab.yaml``."""
    from cycleml.experiments.report import ReportSettings

    guard = cfg.guardrails
    return ReportSettings(
        event=str(cfg.metric.event),
        per=cfg.metric.per,
        higher_is_better=bool(cfg.metric.higher_is_better),
        alpha=float(cfg.alpha),
        test=cfg.test,
        min_effect=float(cfg.min_effect),
        power=float(cfg.power),
        tau=None if cfg.sequential.tau is None else float(cfg.sequential.tau),
        srm_alpha=float(cfg.srm_alpha),
        control=str(cfg.control),
        bucket=None if cfg.bucket is None else str(cfg.bucket),
        error_status=int(guard.error_status),
        max_error_rate_increase=float(guard.max_error_rate_increase),
        max_p99_latency_increase=float(guard.max_p99_latency_increase),
    )


@hydra_app("ab", "experiment")
@_with_store("report")
def report_app(store: ExperimentStore, cfg: DictConfig) -> dict[str, Any]:
    # the statistics and plotting stack loads when a report starts, not for --help
    from cycleml.experiments.report import build_report, write_experiment_report

    report = build_report(store, cfg.name, report_settings(cfg))
    json_path, html_path = write_experiment_report(report, Path(cfg.out))
    if _json_mode(cfg):
        keys = ("metric", "arms", "comparisons", "srm", "guardrails", "verdict", "notes")
        print(json.dumps({k: report[k] for k in keys}
                         | {"report": str(json_path), "html": str(html_path)}, indent=2))  # fmt: skip
    else:
        print_summary(report, html_path)
    return report


def print_summary(report: dict[str, Any], html_path: Path) -> None:
    exp = report["experiment"]
    print(f"experiment {exp['name']} on {exp['model']} ({exp['mode']}, {exp['status']}): "
          f"{report['metric']['name']}")  # fmt: skip
    for arm, a in report["arms"].items():
        rate = "–" if a["rate"] is None else f"{a['rate']:.4f}"
        line = (f"  {arm}: {a['units']} units, {a['requests']} requests, "
                f"{a['successes']}/{a['trials']} = {rate}")  # fmt: skip
        if a.get("accuracy"):
            line += f", accuracy {a['accuracy']['accuracy']:.3f} on {a['accuracy']['labelled']}"
        error_rate, p99 = a["error_rate"], a["p99_latency_ms"]
        if error_rate is not None:
            line += f", errors {error_rate:.2%}, p99 {p99:.1f} ms"
        print(line)
    for c in report["comparisons"]:
        low, high = c["difference_ci"]
        diff = "–" if c["difference"] is None else f"{c['difference']:+.4f}"
        interval = "" if low is None else f" [{low:+.4f}, {high:+.4f}]"
        relative = ""
        if c["relative_difference"] is not None:
            rel_low, rel_high = c["relative_ci"]
            relative = (
                f", relative {c['relative_difference']:+.1%} [{rel_low:+.1%}, {rel_high:+.1%}]"
            )
        print(f"  {c['treatment']} - {c['control']}: {diff}{interval}{relative}; "
              f"p = {c['p_value']:.3g} (fixed), {c['sequential_p_value']:.3g} (sequential)")  # fmt: skip
    srm = report["srm"]
    print(f"  sample ratio: p = {srm['p_value']:.3g}"
          f"{' MISMATCH' if srm['mismatch'] else ' (no mismatch)'}")  # fmt: skip
    for breach in report["guardrails"]["breaches"]:
        print(f"  guardrail: {breach}")
    for note in report["notes"]:
        print(f"note: {note}")
    print(f"verdict: {report['verdict']['text']}")
    print(f"report: {html_path}")


# sub-command -> (app, usage line)
SUBCOMMANDS: dict[str, tuple[Callable[[], Any], str]] = {
    "start": (start_app, "start <name> <model> arms.control=<ref> arms.<arm>=<ref> "
              "[weights.<arm>=<w>] [unit=header:X-User-Id | unit=parameter:user_id] "
              "[mode=split|shadow] [salt=] [note=]"),
    "list": (list_app, "list [format=json]"),
    "report": (report_app, "report <name> [metric.event=conversion|click|accuracy] "
               "[metric.per=unit|request] [min_effect=0.01] [test=sequential|fixed] [out=<folder>]"),
    "ramp": (ramp_app, "ramp <name> weights.<arm>=<w> ... [note=]"),
    "stop": (stop_app, "stop <name> [note=]"),
}  # fmt: skip


def _usage() -> str:
    lines = ["usage: cycleml experiment <sub-command> [arguments] [hydra overrides]", ""]
    lines += [f"  {usage}" for _, usage in SUBCOMMANDS.values()]
    lines += [
        "",
        "settings: db_url=<SQLAlchemy URL> (default: the server's monitoring.db, "
        "sqlite:///monitoring.db) format=text|json",
        "examples:",
        "  cycleml experiment start new-cnn digits arms.control=digits@champion "
        "arms.treatment=digits/2",
        "  cycleml experiment ramp new-cnn weights.control=0.5 weights.treatment=0.5",
        "  cycleml experiment report new-cnn",
        "  cycleml experiment stop new-cnn note='treatment wins'",
    ]
    return "\n".join(lines)


def experiment_overrides(command: str, args: list[str]) -> list[str]:
    """The Hydra overrides of ``cycleml experiment <command> <args>``: a plain first
    argument is the name (``start``: the second the model), ``model=`` sets
    ``model_name`` (``model`` is the training's config group), ``weights.<arm>=`` /
    ``arms.<arm>=`` get their ``+``."""
    out = []
    positional = ["name", "model_name"] if command == "start" else ["name"]
    for arg in as_overrides(args, positional):
        if arg.startswith("model="):
            arg = "model_name=" + arg.removeprefix("model=")
        out.append(f"+{arg}" if arg.startswith(_MAPPINGS) and "=" in arg else arg)
    return out


def main(argv: list[str] | None = None) -> None:
    picked = pick_command(
        list(sys.argv[1:] if argv is None else argv), SUBCOMMANDS, _usage(), "cycleml experiment"
    )
    if picked is None:
        return
    command, rest = picked
    sys.argv = [f"cycleml experiment {command}", *experiment_overrides(command, rest)]
    SUBCOMMANDS[command][0]()


if __name__ == "__main__":
    main()
