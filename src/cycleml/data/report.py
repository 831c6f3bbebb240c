"""The cleaning report: ``report.json`` for programs and ``report.html`` for people.

Both give, per check, its policy, how many items it flagged and a few examples; the
HTML page shows examples as thumbnails (images) or snippets (texts), next to the item
each one duplicates or conflicts with.
"""

from __future__ import annotations

import base64
import html
import json
from collections import defaultdict
from collections.abc import Mapping, Sequence
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cycleml.data.manifest import SPLIT_COLUMN, Dataset

if TYPE_CHECKING:
    from cycleml.data.clean import Issue

REPORT_JSON = "report.json"
REPORT_HTML = "report.html"
THUMBNAIL_PIXELS = 72
SNIPPET_CHARS = 160


def write_report(
    output: Path,
    dataset: Dataset,
    issues: Sequence[Issue],
    policies: Mapping[str, str],
    num_kept: int,
    num_removed: int,
    fingerprint: str,
    examples: int,
) -> dict[str, Any]:
    """Write ``report.json`` and ``report.html`` under ``output``; return the JSON content."""
    frame = dataset.manifest
    by_check: dict[str, list[Issue]] = defaultdict(list)
    for issue in issues:
        by_check[issue.check].append(issue)
    report: dict[str, Any] = {
        "input": {
            "path": str(dataset.root),
            "fingerprint": dataset.fingerprint,
            "items": len(frame),
        },
        "output": {
            "path": str(output.resolve()),
            "fingerprint": fingerprint,
            "kept": num_kept,
            "removed": num_removed,
        },
        "kind": dataset.kind,
        "checks": {
            check: {
                "policy": policy,
                "items": len({i.row for i in by_check[check]}),
                "examples": [_example(frame, i) for i in by_check[check][:examples]],
            }
            for check, policy in policies.items()
        },
    }
    (output / REPORT_JSON).write_text(json.dumps(report, indent=2) + "\n")
    (output / REPORT_HTML).write_text(_html_page(report, dataset, by_check, examples))
    return report


def _example(frame: Any, issue: Issue) -> dict[str, Any]:
    row = frame.iloc[issue.row]
    example = {
        "item_id": row["item_id"],
        "label": row["label"],
        "split": row[SPLIT_COLUMN] if SPLIT_COLUMN in frame.columns else None,
        "detail": issue.detail,
        "other": issue.other,
    }
    if row["path"] is None:
        text = row["text"]
        example["text"] = None if text is None else str(text)[:SNIPPET_CHARS]
    return example


def thumbnail_data_uri(path: Path, size: int = THUMBNAIL_PIXELS) -> str | None:
    """A PNG thumbnail of the image at ``path`` as a ``data:`` URI, or None if unreadable."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
            image = image.convert("RGB")
    except (OSError, ValueError, SyntaxError):
        return None
    scale = size / max(image.width, image.height)
    resample = Image.Resampling.NEAREST if scale > 1 else Image.Resampling.BILINEAR
    image = image.resize(
        (max(1, round(image.width * scale)), max(1, round(image.height * scale))), resample
    )
    buffer = BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _item_cell(dataset: Dataset, item_id: str | None, positions: Mapping[str, int]) -> str:
    if item_id is None or item_id not in positions:
        return "<td></td>"
    row = dataset.manifest.iloc[positions[item_id]]
    caption = html.escape(f"{item_id} · {row['label']}")
    if row["path"] is None:
        text = "" if row["text"] is None else str(row["text"])[:SNIPPET_CHARS]
        return f"<td><q>{html.escape(text)}</q><br><small>{caption}</small></td>"
    uri = thumbnail_data_uri(dataset.file_path(row["path"]))
    picture = f'<img src="{uri}" alt="{caption}">' if uri else "<em>unreadable</em>"
    return f"<td>{picture}<br><small>{caption}</small></td>"


def _html_page(
    report: Mapping[str, Any],
    dataset: Dataset,
    by_check: Mapping[str, Sequence[Issue]],
    examples: int,
) -> str:
    positions = {item_id: i for i, item_id in enumerate(dataset.manifest["item_id"])}
    inp, out = report["input"], report["output"]
    lines = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8"><title>cycleml data clean report</title>',
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top}"
        "img{image-rendering:pixelated}q{font-family:monospace}</style></head><body>",
        "<h1>Data cleaning report</h1>",
        f"<p>Input <code>{html.escape(inp['path'])}</code>: {inp['items']} items, "
        f"fingerprint <code>{inp['fingerprint']}</code>.<br>"
        f"Output <code>{html.escape(out['path'])}</code>: {out['kept']} kept, "
        f"{out['removed']} removed (see <code>quarantine.parquet</code>), "
        f"fingerprint <code>{out['fingerprint']}</code>.</p>",
        "<h2>Checks</h2>",
        "<table><tr><th>check</th><th>policy</th><th>items</th></tr>",
    ]
    for check, summary in report["checks"].items():
        name = f'<a href="#{check}">{check}</a>' if summary["items"] else check
        lines.append(
            f"<tr><td>{name}</td><td>{summary['policy']}</td><td>{summary['items']}</td></tr>"
        )
    lines.append("</table>")
    for check in report["checks"]:
        found = by_check.get(check, [])
        if not found:
            continue
        lines += [
            f'<h2 id="{check}">{check} ({report["checks"][check]["items"]} items, '
            f"policy {report['checks'][check]['policy']})</h2>",
            "<table><tr><th>item</th><th>detail</th><th>related item</th></tr>",
        ]
        for issue in found[:examples]:
            item_id = dataset.manifest["item_id"].iloc[issue.row]
            lines.append(
                "<tr>"
                + _item_cell(dataset, item_id, positions)
                + f"<td>{html.escape(issue.detail)}</td>"
                + _item_cell(dataset, issue.other, positions)
                + "</tr>"
            )
        lines.append("</table>")
    lines.append("</body></html>")
    return "\n".join(lines) + "\n"
