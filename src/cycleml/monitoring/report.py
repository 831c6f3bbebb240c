"""``report.json`` and ``report.html`` of a monitoring run.

The HTML page is self-contained: matplotlib plots over the windows (adjusted
p-value or distance per drift test, estimated vs realised accuracy, class mix) are
embedded as PNGs, followed by one table row per window.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, never a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from cycleml.errors import ConfigError  # noqa: E402


def write_report(
    report: dict[str, Any],
    out_dir: Path,
    render: Callable[[dict[str, Any]], str] | None = None,
) -> tuple[Path, Path]:
    """Write both files into ``out_dir``; returns their paths. ``render`` makes the
    page (default: the monitoring page; other reports pass their own)."""
    json_path, html_path = out_dir / "report.json", out_dir / "report.html"
    page = (render or render_html)(report)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
        html_path.write_text(page, encoding="utf-8")
    except OSError as err:
        raise ConfigError(
            f"cannot write the report to '{out_dir}': {err.strerror or err}; choose another folder"
        ) from err
    return json_path, html_path


def render_html(report: dict[str, Any]) -> str:
    windows = report["windows"]
    title = f"Monitoring: {report['model']} {report['version']}"
    decided = report.get("decided_by")
    which = "the latest window" if decided is None else f"window {decided}"
    verdict = f"DRIFT in {which}" if report["drift"] else f"no drift in {which}"
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:70em}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.2em .5em}"
        ".drift{color:#b00;font-weight:bold}.ok{color:#070}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p class='{'drift' if report['drift'] else 'ok'}'>{verdict}</p>",
        f"<p>{len(windows)} windows ({html.escape(report['window_rule'])}), reference: "
        f"{report['reference_rows']} validation rows; α = {report['alpha']} per window "
        f"({html.escape(report['correction'])} correction).</p>",
    ]
    parts += [f"<p><em>{html.escape(note)}</em></p>" for note in report["notes"]]
    if windows:
        for figure in (
            _drift_figure(windows, report["alpha"]),
            _accuracy_figure(windows),
            _mix_figure(report),
        ):
            parts.append(f"<img alt='' src='data:image/png;base64,{figure_png(figure)}'>")
        parts.append(_window_table(windows))
    parts.append("</body></html>")
    return "\n".join(parts)


def figure_png(figure: plt.Figure) -> str:
    """The figure as base64 PNG text for an ``<img src='data:image/png;base64,…'>``;
    the figure is closed."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(figure)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _drift_figure(windows: list[dict[str, Any]], alpha: float) -> plt.Figure:
    """Adjusted p-value per test over the windows (and the distance tests, when any
    window was large enough for them)."""
    index = [w["index"] for w in windows]
    features = sorted({t["feature"] for w in windows for t in w["tests"]})
    p_series, d_series = {}, {}
    for feature in features:
        tests = [next((t for t in w["tests"] if t["feature"] == feature), None) for w in windows]
        p_values = [t["adjusted_p_value"] if t else None for t in tests]
        distances = [t["statistic"] if t and t["threshold"] is not None else None for t in tests]
        if any(v is not None for v in p_values):
            p_series[feature] = [max(v, 1e-6) if v is not None else np.nan for v in p_values]
        if any(v is not None for v in distances):
            d_series[feature] = [v if v is not None else np.nan for v in distances]
    panels = 2 if d_series else 1
    figure, axes = plt.subplots(1, panels, figsize=(12, 3.5), squeeze=False)
    p_axis = axes[0][0]
    for feature, values in p_series.items():
        p_axis.plot(index, values, marker="o", label=feature)
    p_axis.axhline(alpha, color="red", linestyle="--", label=f"α = {alpha}")
    p_axis.set(yscale="log", title="adjusted p-value per test (drift below α)", xlabel="window")
    p_axis.legend(fontsize=7)
    if d_series:
        d_axis = axes[0][1]
        for feature, values in d_series.items():
            d_axis.plot(index, values, marker="o", label=feature)
        d_axis.set(title="distance tests (windows over the size limit)", xlabel="window")
        d_axis.legend(fontsize=7)
    for axis in axes[0]:
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    return figure


def _accuracy_figure(windows: list[dict[str, Any]]) -> plt.Figure:
    figure, axis = plt.subplots(figsize=(12, 3))
    index = [w["index"] for w in windows]
    estimated = [w["performance"]["estimated_accuracy"] for w in windows]
    realised = [w["performance"]["accuracy"] for w in windows]
    axis.plot(index, [np.nan if v is None else v for v in estimated], marker="o",
              label="estimated (CBPE)")  # fmt: skip
    if any(v is not None for v in realised):
        axis.plot(index, [np.nan if v is None else v for v in realised], marker="s",
                  label="realised (labelled rows)")  # fmt: skip
    axis.set(title="accuracy per window", xlabel="window", ylim=(0, 1.02))
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.legend()
    return figure


def _mix_figure(report: dict[str, Any]) -> plt.Figure:
    windows = report["windows"]
    figure, axis = plt.subplots(figsize=(12, 3))
    bottom = [0.0] * len(windows)
    index = [w["index"] for w in windows]
    for class_id, name in enumerate(report["class_names"]):
        shares = [w["class_mix"][class_id] for w in windows]
        axis.bar(index, shares, bottom=bottom, label=name)
        bottom = [b + s for b, s in zip(bottom, shares, strict=True)]
    axis.set(title="predicted class mix per window", xlabel="window", ylim=(0, 1))
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="class")
    return figure


def _window_table(windows: list[dict[str, Any]]) -> str:
    rows = [
        "<table><tr><th>window</th><th>start</th><th>end</th><th>rows</th><th>drift</th>"
        "<th>estimated acc.</th><th>realised acc. (labelled)</th><th>skipped</th></tr>"
    ]
    for w in windows:
        perf = w["performance"]
        realised = (
            "" if perf["accuracy"] is None else f"{perf['accuracy']:.3f} ({perf['labelled']})"
        )
        estimated = (
            "" if perf["estimated_accuracy"] is None else f"{perf['estimated_accuracy']:.3f}"
        )
        drift = ", ".join(w["drifted"]) if w["drift"] else "no"
        skipped = "; ".join(
            [f"{k}: {v}" for k, v in w["skipped"].items()]
            + [
                f"{k}: {n} rows without a finite value left out"
                for k, n in w.get("left_out", {}).items()
            ]
        )
        cells = [w["index"], w["start"] or "", w["end"] or "", w["rows"], drift, estimated,
                 realised, skipped]  # fmt: skip
        rows.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    rows.append("</table>")
    return "\n".join(rows)
