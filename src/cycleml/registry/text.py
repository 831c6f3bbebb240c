"""Plain-text views of registry records for the terminal (tables, one fact a line)."""

from __future__ import annotations

from typing import Any

from cycleml.registry.records import ARCHIVED, AliasMove, Evaluation, ModelVersion
from cycleml.training.compare import format_table

# metrics worth a column in a version listing, first found wins
_HEADLINE_METRICS = ("bundle/val_acc", "test/acc", "val/acc")


def _when(version: ModelVersion) -> str:
    return version.created_at.strftime("%Y-%m-%d %H:%M:%SZ")


def _headline(version: ModelVersion) -> str:
    metrics = version.lineage.get("metrics") or {}
    for name in _HEADLINE_METRICS:
        if isinstance(metrics.get(name), (int, float)):
            return f"{name} {metrics[name]:.4f}"
    return ""


def registered_line(version: ModelVersion, created: bool) -> str:
    """What a register says: the new version, or the one that already holds the bytes."""
    if created:
        return f"registered {version.ref} at {version.path}"
    return f"{version.ref} ({version.status}) already holds these bytes; nothing registered"


def models_table(
    models: list[tuple[str, list[ModelVersion]]], pointed: dict[str, dict[str, int]]
) -> str:
    rows = []
    for name, found in models:
        ready = [v for v in found if v.status != ARCHIVED]
        rows.append(
            {
                "model": name,
                "versions": len(ready),
                "archived": len(found) - len(ready),
                "latest": ready[-1].version if ready else "",
                "aliases": ", ".join(
                    f"{alias}={number}" for alias, number in sorted(pointed.get(name, {}).items())
                ),
            }
        )
    return format_table(rows, ["model", "versions", "archived", "latest", "aliases"])


def versions_table(found: list[ModelVersion], pointed: dict[str, int]) -> str:
    rows = [
        {
            "version": v.version,
            "status": v.status,
            "aliases": ", ".join(sorted(a for a, n in pointed.items() if n == v.version)),
            "created (UTC)": _when(v),
            "by": v.created_by,
            "metric": _headline(v),
            "fingerprint": (v.lineage.get("fingerprint") or "")[:12],
            "description": v.description,
        }
        for v in found
    ]
    columns = ["version", "status", "aliases", "created (UTC)", "by", "metric", "fingerprint",
               "description"]  # fmt: skip
    return format_table(rows, columns)


def format_show(
    version: ModelVersion,
    aliases: list[str],
    moves: list[AliasMove],
    evaluations: list[Evaluation] | None = None,
) -> str:
    lineage = version.lineage
    parity = lineage.get("parity") or {}
    facts: list[tuple[str, Any]] = [
        ("version", version.ref),
        ("status", version.status + (f" ({version.archive_reason})" if version.archive_reason else "")),
        ("aliases", ", ".join(aliases) or "-"),
        ("path", version.path),
        ("created", f"{_when(version)} by {version.created_by}"),
        ("description", version.description or "-"),
        ("tags", ", ".join(f"{k}={v}" for k, v in sorted(version.tags.items())) or "-"),
        ("content hash", version.content_hash),
        ("size", f"{version.size_bytes} bytes in {len(version.files)} files"),
        ("kind", lineage.get("kind")),
        ("classes", ", ".join(lineage.get("class_names") or [])),
        ("run id", lineage.get("run_id")),
        ("run folder", lineage.get("run_dir")),
        ("data fingerprint", lineage.get("fingerprint")),
        ("git commit", lineage.get("git_commit")),
        ("parent", lineage.get("parent")),
        ("parity", _parity(parity)),
        ("variants", ", ".join(
            f"{p} {100 * v['accuracy']:.2f}% (-{v['accuracy_drop']:.2f})"
            for p, v in sorted((lineage.get("variants") or {}).items())
        )),
    ]  # fmt: skip
    width = max(len(key) for key, _ in facts)
    lines = [f"{key:<{width}}  {'-' if value in (None, '') else value}" for key, value in facts]
    metrics = lineage.get("metrics") or {}
    if metrics:
        lines += ["", "metrics:"]
        lines += [f"  {name:<{width}}  {_number(value)}" for name, value in sorted(metrics.items())]
    if moves:
        lines += ["", "alias moves:"]
        lines += [
            f"  {m.at:%Y-%m-%d %H:%M:%SZ}  {m.alias}: {_v(m.from_version)} -> {_v(m.to_version)}"
            f"  by {m.who}{f'  ({m.reason})' if m.reason else ''}"
            for m in moves
        ]
    if evaluations:
        last = evaluations[-1]
        earlier = len(evaluations) - 1
        lines += [
            "",
            "gate" + (f" (the last of {len(evaluations)} decisions)" if earlier else "") + ":",
        ]
        lines += ["  " + line for line in format_decision(last.decision).splitlines()]
        lines.append(f"  recorded {last.at:%Y-%m-%d %H:%M:%SZ} by {last.who}")
    return "\n".join(lines)


def format_compare(table: dict[str, Any]) -> str:
    first, second = (str(v) for v in table["versions"])
    rows: list[dict[str, Any]] = [
        {"": "status", first: table["status"][0], second: table["status"][1]},
        {"": "created (UTC)", first: table["created_at"][0], second: table["created_at"][1]},
        {"": "run id", first: table["run_id"][0], second: table["run_id"][1]},
        {"": "data fingerprint", first: table["fingerprint"][0], second: table["fingerprint"][1]},
        {"": "git commit", first: table["git_commit"][0], second: table["git_commit"][1]},
        {"": "size (bytes)", first: table["size_bytes"][0], second: table["size_bytes"][1]},
    ]
    rows += [
        {"": f"  {file}", first: sizes[0], second: sizes[1]}
        for file, sizes in table["files"].items()
    ]
    rows += [
        {"": name, first: _number(values[0]), second: _number(values[1]), "change": _change(values)}
        for name, values in table["metrics"].items()
    ]
    head = f"{table['model']} {first} vs {second}: " + (
        "same data" if table["same_data"] else "different data"
    )
    return head + "\n" + format_table(rows, ["", first, second, "change"])


def _parity(parity: dict[str, Any]) -> str:
    if not parity:
        return ""
    return (
        f"{'passed' if parity.get('passed') else 'FAILED'}: max |diff| "
        f"{parity.get('max_abs_diff', float('nan')):.1e}, argmax agreement "
        f"{100 * parity.get('argmax_agreement', 0):.1f}% on {parity.get('samples')} samples"
    )


def _number(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else ("" if value is None else str(value))


def _change(values: list[Any]) -> str:
    a, b = values
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return f"{b - a:+.4f}"
    return ""


def _v(version: int | None) -> str:
    return "-" if version is None else str(version)


def format_decision(decision: dict[str, Any]) -> str:
    """A gate decision as text: the verdict, every reason, the rules and the table of
    accuracies (one row per holdout and model), with the classes' recall."""
    verdict = "PASSED" if decision.get("passed") else "FAILED"
    champion = decision.get("champion") or "none (first run)"
    lines = [
        f"gate {verdict}: {decision.get('challenger')} against {champion}"
        + (f" at {decision['decided_at']}" if decision.get("decided_at") else "")
    ]
    lines += [f"  reason: {reason}" for reason in decision.get("reasons") or []]
    lines += [f"  note: {note}" for note in decision.get("notes") or []]
    rules = decision.get("rules") or {}
    if rules:
        lines.append(
            "  rules: " + ", ".join(f"{k}={'off' if v is None else v}" for k, v in rules.items())
        )
    rows = [
        {
            "holdout": row.get("holdout"),
            "model": f"{row.get('model')} {row.get('ref')}",
            "precision": row.get("precision"),
            "n": row.get("n"),
            "accuracy": _pct(row.get("accuracy")),
            "lowest recall": _lowest(row.get("recall") or {}),
        }
        for row in decision.get("table") or []
    ]
    if rows:
        table = format_table(rows, ["holdout", "model", "precision", "n", "accuracy",
                                    "lowest recall"])  # fmt: skip
        lines += ["  " + line for line in table.splitlines()]
    return "\n".join(lines)


def _pct(value: Any) -> str:
    return f"{100 * value:.2f}%" if isinstance(value, (int, float)) else "-"


def _lowest(recall: dict[str, Any]) -> str:
    numbers = {k: v for k, v in recall.items() if isinstance(v, (int, float))}
    if not numbers:
        return "-"
    worst = min(numbers, key=lambda k: (numbers[k], k))
    return f"{worst} {_pct(numbers[worst])}"
