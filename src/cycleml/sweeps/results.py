"""What a sweep leaves in its folder: the leaderboard, the best trial, a plot per parameter.

``<sweep dir>/sweep.yaml``        what was searched (study, storage, metric, direction, space)
``<sweep dir>/leaderboard.csv``   one row per trial: state, metric, epochs, duration,
                                  parameters (``param.<name>``), W&B run id, run folder
``<sweep dir>/best.yaml``         the best complete trial: value and the overrides to rerun it
``<sweep dir>/sweep.png``         the metric against each searched parameter
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import yaml
from optuna.trial import FrozenTrial, TrialState

from cycleml.sweeps.study import INTERRUPTED

SWEEP_INFO = "sweep.yaml"
LEADERBOARD = "leaderboard.csv"
BEST = "best.yaml"
PLOT = "sweep.png"
PARAM_PREFIX = "param."
STATE_ORDER = ("complete", "pruned", "failed", "interrupted", "running")


def write_sweep_info(sweep_dir: Path, info: Mapping[str, Any]) -> Path:
    """Write ``sweep.yaml``: marks the folder as a sweep and says what it searches."""
    path = Path(sweep_dir) / SWEEP_INFO
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(dict(info), sort_keys=False))
    return path


def trial_state(trial: FrozenTrial) -> str:
    if trial.state == TrialState.FAIL:
        return "interrupted" if trial.user_attrs.get(INTERRUPTED) else "failed"
    return {
        TrialState.COMPLETE: "complete",
        TrialState.PRUNED: "pruned",
        TrialState.RUNNING: "running",
        TrialState.WAITING: "waiting",
    }[trial.state]


def _trial_value(trial: FrozenTrial) -> float | None:
    """The final value of a complete trial; the last reported one of a pruned trial."""
    if trial.state == TrialState.COMPLETE:
        return trial.value
    if trial.state == TrialState.PRUNED and trial.intermediate_values:
        return trial.intermediate_values[max(trial.intermediate_values)]
    return None


def leaderboard(study: optuna.Study, metric: str) -> pd.DataFrame:
    """One row per trial of ``study``, best first (complete, then pruned, then the rest)."""
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    names = list(dict.fromkeys(n for t in study.get_trials(deepcopy=False) for n in t.params))
    rows = []
    for trial in study.get_trials(deepcopy=False):
        if trial.state == TrialState.WAITING:
            continue
        duration = trial.duration.total_seconds() if trial.duration else None
        error = str(trial.user_attrs.get("error", ""))
        row: dict[str, Any] = {
            "trial": trial.number,
            "state": trial_state(trial),
            metric: _trial_value(trial),
            "epochs": len(trial.intermediate_values),
            "duration_s": round(duration, 1) if duration is not None else None,
        }
        row.update({PARAM_PREFIX + n: trial.params.get(n) for n in names})
        row["wandb_id"] = trial.user_attrs.get("wandb_id")
        row["run_dir"] = trial.user_attrs.get("run_dir")
        row["error"] = error.splitlines()[0][:120] if error else None
        rows.append(row)
    columns = ["trial", "state", metric, "epochs", "duration_s"]
    columns += [PARAM_PREFIX + n for n in names] + ["wandb_id", "run_dir", "error"]
    table = pd.DataFrame(rows, columns=columns)
    if len(table):
        rank = table["state"].map(STATE_ORDER.index)
        score = table[metric].astype(float) * (-1 if maximize else 1)
        table = (
            table.assign(_rank=rank, _score=score)
            .sort_values(["_rank", "_score", "trial"], na_position="last")
            .drop(columns=["_rank", "_score"])
        )
    return table.reset_index(drop=True)


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    """The best complete trial, or None while no trial completed."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return study.best_trial if complete else None


def write_results(sweep_dir: Path, study: optuna.Study, metric: str) -> float | None:
    """Write ``leaderboard.csv`` and (once a trial completed) ``best.yaml``; return the best value."""
    sweep_dir = Path(sweep_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    leaderboard(study, metric).to_csv(sweep_dir / LEADERBOARD, index=False)
    best = best_trial(study)
    if best is None:
        return None
    summary = {
        "study_name": study.study_name,
        "metric": metric,
        "direction": study.direction.name.lower(),
        "best_trial": best.number,
        "best_value": float(best.value) if best.value is not None else None,
        "params": {k: _plain(v) for k, v in best.params.items()},
        # rerun the best trial: cycleml train <overrides>
        "overrides": list(best.user_attrs.get("overrides", [])),
        "run_dir": best.user_attrs.get("run_dir"),
        "wandb_id": best.user_attrs.get("wandb_id"),
    }
    (sweep_dir / BEST).write_text(yaml.safe_dump(summary, sort_keys=False))
    return summary["best_value"]


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def load_sweep(sweep_dir: Path) -> pd.DataFrame | None:
    """The leaderboard of the sweep in ``sweep_dir``; None if the folder holds no sweep.

    ``table.attrs`` carries ``metric``, ``direction`` and ``log_params`` (parameters
    searched on a log scale) from ``sweep.yaml``.
    """
    sweep_dir = Path(sweep_dir)
    info_path, board_path = sweep_dir / SWEEP_INFO, sweep_dir / LEADERBOARD
    if not (info_path.is_file() and board_path.is_file()):
        return None
    info = yaml.safe_load(info_path.read_text()) or {}
    table = pd.read_csv(board_path)
    table.attrs["metric"] = info.get("metric", "value")
    table.attrs["direction"] = info.get("direction", "maximize")
    space = info.get("search_space") or {}
    table.attrs["log_params"] = [
        n for n, d in space.items() if isinstance(d, dict) and d.get("log")
    ]
    return table


def plot_sweep(sweep_dir: Path, table: pd.DataFrame) -> Path:
    """Plot the metric against each searched parameter into ``<sweep dir>/sweep.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = table.attrs.get("metric") or next((c for c in table.columns if "/" in c), "value")
    log_params = set(table.attrs.get("log_params", []))
    params = [c for c in table.columns if c.startswith(PARAM_PREFIX)]
    columns = max(1, min(3, len(params)))
    rows = max(1, math.ceil(len(params) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.set_visible(False)
    styles = {"complete": ("tab:blue", "o"), "pruned": ("tab:orange", "x")}
    for ax, column in zip(axes.flat, params, strict=False):
        ax.set_visible(True)
        name = column[len(PARAM_PREFIX) :]
        shown = table[table["state"].isin(list(styles)) & table[metric].notna()]
        numeric = pd.api.types.is_numeric_dtype(table[column])
        categories = sorted({str(v) for v in table[column].dropna()}) if not numeric else []
        for state, (color, marker) in styles.items():
            part = shown[shown["state"] == state]
            if part.empty:
                continue
            x = part[column] if numeric else part[column].astype(str).map(categories.index)
            ax.scatter(x, part[metric], c=color, marker=marker, label=state, alpha=0.8)
        if numeric and name in log_params:
            ax.set_xscale("log")
        if not numeric:
            ax.set_xticks(range(len(categories)), categories, rotation=30, ha="right")
        ax.set_xlabel(name)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    if params:
        axes.flat[0].legend(fontsize=8)
    else:
        axes.flat[0].set_visible(True)
        axes.flat[0].text(0.5, 0.5, "no searched parameters", ha="center", va="center")
    fig.suptitle(f"{metric}: {len(table)} trial(s)")
    fig.tight_layout()
    path = Path(sweep_dir) / PLOT
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
