"""The report of one A/B experiment: per arm counts, the comparison, SRM, guardrails,
the verdict, and how they developed over time (``report.json`` + ``report.html``).

What is counted, from the project's database:

- ``ab_assignments`` (mode ``split``): requests, and units per arm. A unit is its
  unit id; a request without one (unit null, assigned at random) is a unit of its
  own. A unit counts in the arm of its *first* request (intention to treat); units
  later seen in another arm (a ramp moved their bucket, the salt changed) are
  counted as crossovers and flagged.
- the outcome (``metric.event``, e.g. ``conversion`` or ``click``) from
  ``ab_events``: per unit (``metric.per=unit``, a conversion rate: the share of
  units with at least one event of value > 0) or per request (``metric.per=request``,
  a click-through rate: the share of requests with an event sent by request id).
  ``metric.event=accuracy`` uses the true labels of the prediction log
  (``monitoring_predictions``): the share of labelled requests predicted right.
- guardrails per arm from ``ab_assignments``: the error rate (status ≥
  ``guardrails.error_status``, 500 by default: server errors; 4xx answers are the
  client's bad input and the same for every arm) and the p99 latency of all calls.
- in shadow mode every user saw the control's answers, so outcome events cannot
  tell the arms apart: the metric is the accuracy on the mirrored requests (the
  control's answer to the original and the treatment's to its ``:shadow`` copy,
  judged against the original's label) and the guardrails compare the mirrored calls
  with the control's.

The looks over time are the ends of equal time buckets (``bucket``: a duration, or
null for 20 buckets over the experiment); the sequential p-value is the running
minimum over those looks (:func:`cycleml.experiments.stats.sequential_p_values`),
valid however many looks there are.
"""

from __future__ import annotations

import datetime as dt
import html
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sqlalchemy import inspect, select

from cycleml.db import safe_url, utc_now
from cycleml.errors import ConfigError, DataError
from cycleml.experiments import stats
from cycleml.experiments.store import CONTROL, ExperimentSpec, ExperimentStore
from cycleml.experiments.tables import assignments, events

ACCURACY = "accuracy"
PERS = ("unit", "request")
_NO_UNIT = "\x00request\x00"  # unit key of a request without a unit id
DEFAULT_LOOKS = 20


@dataclass(frozen=True)
class ReportSettings:
    """The report's settings (``configs/ab.yaml``)."""

    # the outcome: an ab_events event name, or "accuracy" (labels of the prediction log)
    event: str = "conversion"
    per: str = "unit"
    higher_is_better: bool = True
    alpha: float = 0.05
    # the test that decides the verdict: sequential (valid at every look) or fixed
    test: str = "sequential"
    # the smallest absolute difference worth detecting (sample size, and τ by default)
    min_effect: float = 0.01
    power: float = 0.8
    # mixing standard deviation of the sequential test; None: min_effect
    tau: float | None = None
    srm_alpha: float = stats.SRM_ALPHA
    control: str = CONTROL
    # the looks over time: a pandas duration ("1h", "15min") or None (20 buckets)
    bucket: str | None = None
    error_status: int = 500
    # a treatment arm breaks a guardrail when its error rate exceeds the control's by
    # more than this (absolute), or its p99 latency the control's by more than this
    # share (0.25: 25% slower)
    max_error_rate_increase: float = 0.01
    max_p99_latency_increase: float = 0.25

    def __post_init__(self) -> None:
        if not self.event:
            raise ConfigError("metric.event must name an event (e.g. conversion) or accuracy")
        if self.per not in PERS:
            raise ConfigError(f"metric.per={self.per!r}: expected one of {', '.join(PERS)}")
        if self.test not in stats.TESTS:
            raise ConfigError(f"test={self.test!r}: expected one of {', '.join(stats.TESTS)}")
        for key in ("alpha", "power", "srm_alpha"):
            if not 0 < getattr(self, key) < 1:
                raise ConfigError(f"{key}={getattr(self, key)}: expected a number in (0, 1)")
        if not 0 < self.min_effect < 1:
            raise ConfigError(f"min_effect={self.min_effect}: expected a number in (0, 1)")
        if self.tau is not None and not self.tau > 0:
            raise ConfigError(f"sequential.tau={self.tau}: expected a positive number or null")
        if self.bucket is not None:
            try:
                if pd.Timedelta(self.bucket) <= pd.Timedelta(0):
                    raise ValueError("not positive")
            except ValueError as err:
                raise ConfigError(
                    f"bucket={self.bucket!r}: expected a duration like 1h or 15min ({err})"
                ) from None
        if self.max_error_rate_increase < 0 or self.max_p99_latency_increase < 0:
            raise ConfigError("guardrails margins must be ≥ 0")

    @property
    def mixing_tau(self) -> float:
        return self.tau if self.tau is not None else self.min_effect


def build_report(
    store: ExperimentStore, name: str, settings: ReportSettings | None = None
) -> dict[str, Any]:
    """Everything about experiment ``name`` as one JSON-able dict.

    Raises :class:`~cycleml.experiments.store.ExperimentError` for an unknown name
    (naming the known ones) and :class:`DataError` when nothing was logged yet.
    """
    settings = settings or ReportSettings()
    spec = store.get(name)
    if settings.control not in spec.arms:
        raise ConfigError(
            f"control={settings.control!r} is no arm of experiment '{name}'; its arms are "
            f"{sorted(spec.arms)}"
        )
    calls = _assignments(store, name)
    if calls.empty:
        raise DataError(
            f"experiment '{name}' has no logged requests yet in {safe_url(store.db_url)}: "
            f"send requests to model '{spec.model}' with a unit id "
            f"({_unit_hint(spec)}) first"
        )
    notes: list[str] = []
    split = calls[calls["mode"] == "split"].copy()
    split["unit_key"] = split["unit"].where(split["unit"].notna(), _NO_UNIT + split["request_id"])
    units = _units(split)
    crossovers = int(units["arms_seen"].gt(1).sum())
    if crossovers:
        notes.append(
            f"{crossovers} units were seen in more than one arm (a ramp moves the units at "
            "the bucket boundary); each counts in the arm of its first request"
        )
    shadow = spec.mode == "shadow"
    metric = ACCURACY if shadow else settings.event
    if shadow and settings.event != ACCURACY:
        notes.append(
            "shadow mode: every user saw the control's answers, so outcome events "
            f"('{settings.event}') cannot compare the arms; the metric is the accuracy on "
            "the mirrored requests"
        )
    if shadow:
        unit_arm, srm_units = _shadow_units(split, calls)
    else:
        unit_arm, srm_units = units["arm"], units
    changes = store.changes(name)
    srm = stats.srm_test(
        srm_units["arm"].value_counts().to_dict(),
        _expected_shares(spec, changes, srm_units["first_seen"]),
        settings.srm_alpha,
    )
    ramps = [c for c in changes if c["action"] in ("ramp", "update")]
    if ramps:
        notes.append(
            f"the weights changed {len(ramps)} times during the experiment: the SRM test "
            "expects each unit's arm by the weights when it arrived, and the comparison "
            "pools periods with different splits"
        )

    if metric == ACCURACY:
        trials, accuracy_note = _accuracy_trials(store, calls, shadow)
        if accuracy_note:
            notes.append(accuracy_note)
    else:
        trials, matched_note = _event_trials(store, name, settings, split, units)
        if matched_note:
            notes.append(matched_note)
    arms = list(spec.arms)
    treatments = [arm for arm in arms if arm != settings.control]
    edges = _look_edges(calls, trials, settings.bucket)
    looks = _looks(trials, arms, edges)
    tau = settings.mixing_tau
    comparisons, over_time = [], {}
    for arm in treatments:
        x_c, n_c = looks[settings.control]["x"], looks[settings.control]["n"]
        x_t, n_t = looks[arm]["x"], looks[arm]["n"]
        sequential = stats.sequential_p_values(x_c, n_c, x_t, n_t, tau)
        _, fixed = stats.z_test(x_c, n_c, x_t, n_t)
        comparison = stats.compare(
            settings.control, arm, int(x_c[-1]), int(n_c[-1]), int(x_t[-1]), int(n_t[-1]),
            settings.alpha, float(sequential[-1]), tau,
        )  # fmt: skip
        comparisons.append(comparison)
        over_time[arm] = {"p_value": fixed.tolist(), "sequential_p_value": sequential.tolist()}
    # arms ramped to weight 0 get no units now: their data are shown, but they neither
    # split alpha with the others nor set the units still needed
    idle = sorted(arm for arm in arms if not spec.weights.get(arm, 0) > 0)
    judged = {c.treatment for c in stats.judged_comparisons(comparisons, idle)}
    level = settings.alpha / max(1, len(judged))
    left_out = [arm for arm in treatments if arm not in judged]
    if left_out:
        notes.append(
            f"weight 0 now: {', '.join(left_out)} (ramped out); shown, but not part of "
            "the verdict nor of the split of alpha over the treatments"
        )
    verdict = stats.verdict(
        comparisons, srm, alpha=settings.alpha, test=settings.test,
        min_effect=settings.min_effect, power=settings.power, tau=tau,
        higher_is_better=settings.higher_is_better, idle_arms=idle,
    )  # fmt: skip
    guardrails = _guardrails(calls, spec, settings)
    verdict_dict = verdict.to_dict()
    if verdict.code == "treatment_wins" and not guardrails["ok"]:
        verdict_dict["text"] += "; but guardrails are breached: " + "; ".join(
            guardrails["breaches"]
        )
    per_arm = _per_arm(calls, spec, units, unit_arm, trials, guardrails, shadow)
    labelled = None if metric == ACCURACY else _accuracy_summary(store, calls, shadow)
    if labelled:
        for arm, values in labelled.items():
            per_arm.setdefault(arm, {})["accuracy"] = values
    return {
        "experiment": spec.to_dict(),
        "generated_at": utc_now().isoformat(),
        "metric": {
            "name": _metric_name(metric, settings.per),
            "event": metric,
            "per": "labelled request" if metric == ACCURACY else settings.per,
            "higher_is_better": settings.higher_is_better,
        },
        "settings": {**asdict(settings), "tau": tau},
        "arms": per_arm,
        "comparisons": [
            {
                **c.to_dict(),
                "significant_fixed": c.p_value < level,
                "significant_sequential": c.sequential_p_value < level,
                "in_verdict": c.treatment in judged,
            }
            for c in comparisons
        ],
        "srm": srm.to_dict(),
        "crossover_units": crossovers,
        "guardrails": guardrails,
        "verdict": verdict_dict,
        "looks": {
            "end": [edge.isoformat() for edge in edges],
            "arms": {
                arm: {"n": looks[arm]["n"].tolist(), "x": looks[arm]["x"].tolist()} for arm in arms
            },
            "comparisons": over_time,
        },
        "changes": [{**c, "changed_at": c["changed_at"].isoformat()} for c in changes],
        "notes": notes,
    }


def _unit_hint(spec: ExperimentSpec) -> str:
    if spec.unit_header:
        return f"header {spec.unit_header}"
    return f"parameter {spec.unit_parameter}"


def _metric_name(metric: str, per: str) -> str:
    if metric == ACCURACY:
        return "accuracy (labelled requests)"
    return f"{metric} rate per {per}"


def _assignments(store: ExperimentStore, name: str) -> pd.DataFrame:
    columns = ["request_id", "arm", "unit", "version", "mode", "logged_at", "status_code",
               "latency_ms"]  # fmt: skip
    with store.engine.connect() as conn:
        rows = conn.execute(
            select(*(assignments.c[c] for c in columns))
            .where(assignments.c.experiment == name)
            .order_by(assignments.c.logged_at, assignments.c.id)
        ).all()
    frame = pd.DataFrame.from_records([tuple(row) for row in rows], columns=columns)
    frame["logged_at"] = pd.to_datetime(frame["logged_at"], utc=True)
    return frame


def _units(split: pd.DataFrame) -> pd.DataFrame:
    """One row per unit key: the arm and time of its first request, arms seen."""
    grouped = split.groupby("unit_key", sort=False)
    first = grouped.first()  # rows are in time order
    return pd.DataFrame(
        {
            "arm": first["arm"],
            "first_seen": first["logged_at"],
            "arms_seen": grouped["arm"].nunique(),
        }
    )


def _shadow_units(split: pd.DataFrame, calls: pd.DataFrame) -> tuple[pd.Series, pd.DataFrame]:
    """Shadow mode: a unit is in the treatment when it has a mirrored call."""
    mirrored = calls[calls["mode"] == "shadow"]
    originals = set(mirrored["request_id"].str.removesuffix(":shadow"))
    split = split.assign(mirrored=split["request_id"].isin(originals))
    grouped = split.groupby("unit_key", sort=False)
    first = grouped.first()
    treatment_arm = next(iter(set(mirrored["arm"])), "treatment")
    arm = np.where(grouped["mirrored"].any(), treatment_arm, CONTROL)
    frame = pd.DataFrame({"arm": arm, "first_seen": first["logged_at"]}, index=first.index)
    return frame["arm"], frame


def _expected_shares(
    spec: ExperimentSpec, changes: list[dict[str, Any]], first_seen: pd.Series
) -> dict[str, float]:
    """Expected units per arm: each unit by the weights in force when it arrived."""
    steps = sorted((c["changed_at"], c["weights_after"]) for c in changes if c.get("weights_after"))
    if not steps:
        total = math.fsum(spec.weights.values())
        return {arm: w / total for arm, w in spec.weights.items()}
    times = pd.to_datetime([t for t, _ in steps], utc=True)
    # a unit before the first recorded change gets the first weights
    index = np.clip(np.searchsorted(times.values, first_seen.values, side="right") - 1, 0, None)
    counts = np.bincount(index, minlength=len(steps))
    expected: dict[str, float] = {arm: 0.0 for arm in spec.arms}
    for count, (_, weights) in zip(counts, steps, strict=True):
        total = math.fsum(float(w) for w in weights.values())
        for arm, weight in weights.items():
            expected[arm] = expected.get(arm, 0.0) + count * float(weight) / total
    return expected


def _event_trials(
    store: ExperimentStore,
    name: str,
    settings: ReportSettings,
    split: pd.DataFrame,
    units: pd.DataFrame,
) -> tuple[pd.DataFrame, str | None]:
    """One row per trial (unit or request): arm, trial_at, success_at (NaT if none)."""
    with store.engine.connect() as conn:
        rows = conn.execute(
            select(events.c.received_at, events.c.request_id, events.c.unit, events.c.value).where(
                events.c.experiment == name, events.c.event == settings.event
            )
        ).all()
    found = pd.DataFrame.from_records(
        [tuple(row) for row in rows], columns=["received_at", "request_id", "unit", "value"]
    )
    found["received_at"] = pd.to_datetime(found["received_at"], utc=True)
    positive = found[found["value"] > 0]
    if settings.per == "unit":
        key_of_request = split.set_index("request_id")["unit_key"]
        by_request = positive["request_id"].map(key_of_request)
        by_unit = positive["unit"].map(pd.Series(units.index, index=units.index))
        keys = by_request.fillna(by_unit)
        trials = pd.DataFrame({"arm": units["arm"], "trial_at": units["first_seen"]})
    else:
        by_id = split.set_index("request_id")
        keys = positive["request_id"].map(pd.Series(by_id.index, index=by_id.index))
        trials = pd.DataFrame({"arm": by_id["arm"], "trial_at": by_id["logged_at"]})
    matched = positive.assign(key=keys).dropna(subset=["key"])
    first_success = matched.groupby("key")["received_at"].min()
    trials["success_at"] = first_success.reindex(trials.index)
    unmatched = len(positive) - len(matched)
    note = None
    if unmatched:
        what = "sent by unit (per-request metric)" if settings.per == "request" else "unmatched"
        note = (
            f"{unmatched} of {len(positive)} '{settings.event}' events are not counted: "
            f"{what} — no logged request of this experiment has their request id or unit"
        )
    if found.empty:
        note = (
            f"no '{settings.event}' events for experiment '{name}' yet: send them to "
            "POST /v1/feedback as {request_id | unit, event}"
        )
        with store.engine.connect() as conn:
            recorded = sorted(
                conn.execute(
                    select(events.c.event).where(events.c.experiment == name).distinct()
                ).scalars()
            )
        if recorded:  # a misspelled metric.event reads as "no successes" otherwise
            note += f"; events recorded for it: {', '.join(recorded)} (metric.event=...)"
    return trials, note


def _labelled(store: ExperimentStore, request_ids: list[str]) -> pd.DataFrame:
    """predicted_label, label, labeled_at of the labelled rows among ``request_ids``."""
    from cycleml.monitoring.tables import predictions

    columns = ["request_id", "predicted_label", "label", "labeled_at"]
    if not request_ids or not inspect(store.engine).has_table(predictions.name):
        return pd.DataFrame(columns=columns)
    rows: list[Any] = []
    with store.engine.connect() as conn:
        for start in range(0, len(request_ids), 500):
            part = request_ids[start : start + 500]
            rows += conn.execute(
                select(*(predictions.c[c] for c in columns)).where(
                    predictions.c.request_id.in_(part)
                )
            ).all()
    frame = pd.DataFrame.from_records([tuple(row) for row in rows], columns=columns)
    frame["labeled_at"] = pd.to_datetime(frame["labeled_at"], utc=True)
    return frame.set_index("request_id")


def _accuracy_frame(
    store: ExperimentStore, calls: pd.DataFrame, shadow: bool
) -> pd.DataFrame:  # fmt: skip
    """arm, correct, labeled_at per labelled request (shadow: per mirrored call and
    its original, both judged by the original's label)."""
    if shadow:
        mirrored = calls[calls["mode"] == "shadow"]
        originals = mirrored["request_id"].str.removesuffix(":shadow").tolist()
        found = _labelled(store, originals + mirrored["request_id"].tolist())
        labels = found.loc[found.index.isin(originals)].dropna(subset=["label"])
        parts = []
        for ids, arm in ((originals, CONTROL), (mirrored["request_id"].tolist(), None)):
            base = [i.removesuffix(":shadow") for i in ids]
            frame = pd.DataFrame({"id": ids, "base": base})
            frame = frame[frame["base"].isin(labels.index) & frame["id"].isin(found.index)]
            arms = (
                arm if arm else mirrored.set_index("request_id").loc[frame["id"], "arm"].to_numpy()
            )
            parts.append(
                pd.DataFrame(
                    {
                        "arm": arms,
                        "correct": found.loc[frame["id"], "predicted_label"].to_numpy()
                        == labels.loc[frame["base"], "label"].to_numpy(),
                        "labeled_at": labels.loc[frame["base"], "labeled_at"].to_numpy(),
                    }
                )
            )
        return pd.concat(parts, ignore_index=True)
    split = calls[calls["mode"] == "split"]
    found = _labelled(store, split["request_id"].tolist()).dropna(subset=["label"])
    arm = split.set_index("request_id")["arm"]
    return pd.DataFrame(
        {
            "arm": arm.reindex(found.index).to_numpy(),
            "correct": (found["predicted_label"] == found["label"]).to_numpy(),
            "labeled_at": found["labeled_at"].to_numpy(),
        }
    )


def _accuracy_trials(
    store: ExperimentStore, calls: pd.DataFrame, shadow: bool
) -> tuple[pd.DataFrame, str | None]:
    frame = _accuracy_frame(store, calls, shadow)
    trials = pd.DataFrame(
        {
            "arm": frame["arm"],
            "trial_at": pd.to_datetime(frame["labeled_at"], utc=True),
            "success_at": pd.to_datetime(frame["labeled_at"], utc=True).where(frame["correct"]),
        }
    )
    note = None
    if trials.empty:
        note = (
            "no labelled predictions of this experiment yet: the accuracy needs the "
            "prediction log (monitoring) on and labels sent to POST /v1/feedback"
        )
    return trials, note


def _accuracy_summary(
    store: ExperimentStore, calls: pd.DataFrame, shadow: bool
) -> dict[str, dict[str, Any]]:
    frame = _accuracy_frame(store, calls, shadow)
    out = {}
    for arm, group in frame.groupby("arm"):
        out[str(arm)] = {"labelled": len(group), "accuracy": float(group["correct"].mean())}
    return out


def _look_edges(calls: pd.DataFrame, trials: pd.DataFrame, bucket: str | None) -> pd.DatetimeIndex:
    times = [calls["logged_at"].min(), calls["logged_at"].max()]
    for column in ("trial_at", "success_at"):
        if column in trials and trials[column].notna().any():
            times += [trials[column].min(), trials[column].max()]
    start, end = min(times), max(times)
    if bucket is None:
        if end <= start:
            return pd.DatetimeIndex([end])
        return pd.date_range(start, end, periods=DEFAULT_LOOKS + 1)[1:]
    step = pd.Timedelta(bucket)
    edges = pd.date_range(start.floor(step) + step, end.ceil(step) + step, freq=step)
    return edges[: int(np.searchsorted(edges, end, side="left")) + 1]


def _looks(
    trials: pd.DataFrame, arms: list[str], edges: pd.DatetimeIndex
) -> dict[str, dict[str, np.ndarray]]:
    """Cumulative trials ``n`` and successes ``x`` per arm at each look's end."""
    out = {}
    bounds = edges.values
    for arm in arms:
        mine = trials[trials["arm"] == arm]
        trial_times = np.sort(mine["trial_at"].dropna().values)
        success_times = np.sort(mine["success_at"].dropna().values)
        out[arm] = {
            "n": np.searchsorted(trial_times, bounds, side="right"),
            "x": np.searchsorted(success_times, bounds, side="right"),
        }
    return out


def _guardrails(
    calls: pd.DataFrame, spec: ExperimentSpec, settings: ReportSettings
) -> dict[str, Any]:
    """Error rate and p99 latency per arm; breaches of the treatment arms."""
    per_arm: dict[str, dict[str, Any]] = {}
    for arm in spec.arms:
        # shadow: the treatment's calls are the mirrored ones
        mode = "shadow" if spec.mode == "shadow" and arm != CONTROL else "split"
        mine = calls[(calls["arm"] == arm) & (calls["mode"] == mode)]
        errors = int((mine["status_code"] >= settings.error_status).sum())
        per_arm[arm] = {
            "calls": len(mine),
            "errors": errors,
            "error_rate": errors / len(mine) if len(mine) else None,
            "p50_latency_ms": _percentile(mine["latency_ms"], 50),
            "p99_latency_ms": _percentile(mine["latency_ms"], 99),
        }
    control = per_arm[settings.control]
    breaches = []
    for arm, values in per_arm.items():
        if arm == settings.control or not values["calls"] or not control["calls"]:
            continue
        increase = values["error_rate"] - control["error_rate"]
        _, p_value = stats.z_test(control["errors"], control["calls"], values["errors"],
                                  values["calls"])  # fmt: skip
        values["error_rate_p_value"] = float(p_value)
        if increase > settings.max_error_rate_increase:
            breaches.append(
                f"{arm} error rate {values['error_rate']:.2%} vs {control['error_rate']:.2%} "
                f"(limit +{settings.max_error_rate_increase:.2%})"
            )
        slow, base = values["p99_latency_ms"], control["p99_latency_ms"]
        if (
            base is not None
            and slow is not None
            and slow > base * (1 + settings.max_p99_latency_increase)
        ):
            breaches.append(
                f"{arm} p99 latency {slow:.1f} ms vs {base:.1f} ms "
                f"(limit +{settings.max_p99_latency_increase:.0%})"
            )
    return {
        "error_status": settings.error_status,
        "max_error_rate_increase": settings.max_error_rate_increase,
        "max_p99_latency_increase": settings.max_p99_latency_increase,
        "arms": per_arm,
        "breaches": breaches,
        "ok": not breaches,
    }


def _percentile(values: pd.Series, q: float) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None


def _per_arm(
    calls: pd.DataFrame,
    spec: ExperimentSpec,
    units: pd.DataFrame,
    unit_arm: pd.Series,
    trials: pd.DataFrame,
    guardrails: dict[str, Any],
    shadow: bool,
) -> dict[str, dict[str, Any]]:
    out = {}
    for arm, ref in spec.arms.items():
        mode = "shadow" if shadow and arm != CONTROL else "split"
        mine = calls[(calls["arm"] == arm) & (calls["mode"] == mode)]
        arm_trials = trials[trials["arm"] == arm]
        successes = int(arm_trials["success_at"].notna().sum())
        out[arm] = {
            "model": ref,
            "weight": spec.weights.get(arm),
            "versions": sorted(set(mine["version"].astype(str)) - {""}),
            "requests": len(mine),
            "units": int((unit_arm == arm).sum()),
            "trials": len(arm_trials),
            "successes": successes,
            "rate": successes / len(arm_trials) if len(arm_trials) else None,
            "error_rate": guardrails["arms"][arm]["error_rate"],
            "p99_latency_ms": guardrails["arms"][arm]["p99_latency_ms"],
        }
    return out


def write_experiment_report(report: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """``report.json`` and ``report.html`` in ``out_dir``."""
    from cycleml.monitoring.report import write_report

    return write_report(report, out_dir, render_html)


# -- the page ---------------------------------------------------------------------------


def _fmt(value: Any, spec: str = ".4g") -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return format(value, spec)


def render_html(report: dict[str, Any]) -> str:
    """A self-contained page: verdict, per-arm table, comparisons, SRM, guardrails, plots."""
    from cycleml.monitoring.report import figure_png

    exp = report["experiment"]
    title = f"Experiment {exp['name']} on {exp['model']}"
    code = report["verdict"]["code"]
    css_class = {"treatment_wins": "ok", "control_wins": "warn", "invalid": "bad"}.get(code, "")
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:75em}"
        "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;"
        "padding:.2em .5em;text-align:right}th:first-child,td:first-child{text-align:left}"
        ".bad{color:#b00;font-weight:bold}.warn{color:#a60;font-weight:bold}"
        ".ok{color:#070;font-weight:bold}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p>{html.escape(exp['mode'])} mode, {html.escape(exp['status'])}, revision "
        f"{exp['revision']}; metric: {html.escape(report['metric']['name'])}; generated "
        f"{html.escape(report['generated_at'])}</p>",
        f"<p class='{css_class}'>Verdict: {html.escape(report['verdict']['text'])}</p>",
    ]
    parts += [f"<p><em>{html.escape(note)}</em></p>" for note in report["notes"]]
    parts.append(_arm_table(report))
    parts.append(_comparison_table(report))
    srm = report["srm"]
    srm_class = "bad" if srm["mismatch"] else "ok"
    expected = ", ".join(f"{a} {v:.0f}" for a, v in srm["expected"].items())
    parts.append(
        f"<h2>Sample ratio</h2><p class='{srm_class}'>units {html.escape(str(srm['counts']))}"
        f", expected {html.escape(expected)}: chi-square {_fmt(srm['chi2'])}, p = "
        f"{_fmt(srm['p_value'], '.3g')} ({'MISMATCH' if srm['mismatch'] else 'no mismatch'} "
        f"at p &lt; {srm['alpha']:g})</p>"
    )
    guard = report["guardrails"]
    parts.append(
        "<h2>Guardrails</h2>"
        + (
            "<p class='ok'>all within limits</p>"
            if guard["ok"]
            else "".join(f"<p class='bad'>{html.escape(b)}</p>" for b in guard["breaches"])
        )
    )
    if len(report["looks"]["end"]) > 0:
        parts.append(f"<img alt='' src='data:image/png;base64,{figure_png(_figure(report))}'>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _arm_table(report: dict[str, Any]) -> str:
    rows = [
        "<h2>Arms</h2><table><tr><th>arm</th><th>model</th><th>weight</th><th>versions</th>"
        "<th>requests</th><th>units</th><th>trials</th><th>successes</th><th>rate</th>"
        "<th>accuracy (labelled)</th><th>error rate</th><th>p99 latency ms</th></tr>"
    ]
    for arm, a in report["arms"].items():
        accuracy = a.get("accuracy")
        shown_accuracy = f"{accuracy['accuracy']:.3f} ({accuracy['labelled']})" if accuracy else "–"
        cells = [arm, a["model"], _fmt(a["weight"]), ", ".join(a["versions"]), a["requests"],
                 a["units"], a["trials"], a["successes"], _fmt(a["rate"]), shown_accuracy,
                 _fmt(a["error_rate"], ".2%"), _fmt(a["p99_latency_ms"], ".1f")]  # fmt: skip
        rows.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    rows.append("</table>")
    return "\n".join(rows)


def _comparison_table(report: dict[str, Any]) -> str:
    rows = [
        "<h2>Comparison with control</h2><table><tr><th>arm</th><th>difference [95% CI]</th>"
        "<th>relative [95% CI]</th><th>z</th><th>p (fixed)</th><th>p (sequential)</th></tr>"
    ]
    for c in report["comparisons"]:
        low, high = c["difference_ci"]
        rel_low, rel_high = c["relative_ci"]
        cells = [
            c["treatment"],
            f"{_fmt(c['difference'], '+.4f')} [{_fmt(low, '+.4f')}, {_fmt(high, '+.4f')}]",
            f"{_fmt(c['relative_difference'], '+.1%')} [{_fmt(rel_low, '+.1%')}, "
            f"{_fmt(rel_high, '+.1%')}]",
            f"{c['z']:.2f}",
            f"{c['p_value']:.3g}",
            f"{c['sequential_p_value']:.3g}",
        ]
        rows.append("<tr>" + "".join(f"<td>{html.escape(str(x))}</td>" for x in cells) + "</tr>")
    rows.append("</table>")
    return "\n".join(rows)


def _figure(report: dict[str, Any]) -> Any:
    """Cumulative metric per arm (with 95% bands) and both p-values over the looks."""
    import matplotlib.pyplot as plt

    looks = report["looks"]
    ends = [dt.datetime.fromisoformat(e) for e in looks["end"]]
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 3.8))
    for arm, counts in looks["arms"].items():
        n, x = np.asarray(counts["n"], float), np.asarray(counts["x"], float)
        with np.errstate(divide="ignore", invalid="ignore"):
            rate = np.where(n > 0, x / n, np.nan)
            half = 1.96 * np.sqrt(rate * (1 - rate) / n)
        (line,) = left.plot(ends, rate, marker="o", markersize=3, label=_plain_text(arm))
        left.fill_between(ends, rate - half, rate + half, alpha=0.15, color=line.get_color())
    # the metric names an event a client sent: "$" must not start matplotlib's mathtext
    left.set(title=_plain_text(f"cumulative {report['metric']['name']}"), xlabel="time (UTC)")
    left.legend(fontsize=8)
    alpha = report["settings"]["alpha"]
    for arm, series in looks["comparisons"].items():
        right.plot(ends, np.maximum(series["p_value"], 1e-12), linestyle="--",
                   label=_plain_text(f"{arm}: fixed-horizon p"))  # fmt: skip
        right.plot(ends, np.maximum(series["sequential_p_value"], 1e-12),
                   label=_plain_text(f"{arm}: sequential p"))  # fmt: skip
    right.axhline(alpha, color="red", linestyle=":", label=f"α = {alpha}")
    right.set(yscale="log", title="p-value over time (sequential: valid at every look)",
              xlabel="time (UTC)")  # fmt: skip
    right.legend(fontsize=8)
    for axis in (left, right):
        axis.tick_params(axis="x", labelrotation=30, labelsize=7)
    return figure


def _plain_text(text: str) -> str:
    """``text`` as matplotlib draws it literally: a "$" escaped, so that an event name
    such as ``a$^$b`` is not parsed as mathtext (which fails on it)."""
    return text.replace("$", r"\$")
