"""The cleaning report: ``report.json`` for programs and ``report.html`` for people.

Both give, per check, its policy and how many items it flagged, and the near-duplicate
threshold of an image dataset with how it was chosen. ``report.json`` lists a few
examples per check; the HTML report shows every flagged item, as a thumbnail (images)
or a snippet (texts) next to the item it duplicates or conflicts with, with the detail
(for near-duplicate images: how many hash bits differ). Each check shows its first
``PAGE_ROWS`` items in ``report.html``; the rest are on numbered pages under
``report_pages/``.
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
REPORT_PAGES_DIR = "report_pages"
PAGE_ROWS = 50
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
    hamming: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``report.json``, ``report.html`` and ``report_pages/`` under ``output``;
    return the JSON content."""
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
        "near_duplicate_threshold": dict(hamming) if hamming is not None else None,
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
    positions = {item_id: i for i, item_id in enumerate(frame["item_id"])}
    pages_dir = output / REPORT_PAGES_DIR
    pages_dir.mkdir(exist_ok=True)
    for check, found in by_check.items():
        pages = _pages(found)
        for number, rows in enumerate(pages[1:], start=2):
            body = [f"<h1>{check}: items {_span(number, len(found))}</h1>", _page_links(
                check, len(pages), number, in_pages=True)]  # fmt: skip
            body += _issue_table(dataset, rows, positions)
            title = f"{check} {number}"
            (pages_dir / f"{check}-{number}.html").write_text(_document(title, body))
    (output / REPORT_HTML).write_text(_html_page(report, dataset, by_check, positions))
    return report


def _pages(found: Sequence[Issue]) -> list[Sequence[Issue]]:
    return [found[start : start + PAGE_ROWS] for start in range(0, len(found), PAGE_ROWS)]


def _span(number: int, total: int) -> str:
    return f"{(number - 1) * PAGE_ROWS + 1}–{min(number * PAGE_ROWS, total)} of {total}"


def _page_links(check: str, count: int, current: int, in_pages: bool) -> str:
    """Links to every page of a check (page 1 is the section in report.html)."""
    if count < 2:
        return ""
    prefix = "" if in_pages else f"{REPORT_PAGES_DIR}/"
    first = f"../{REPORT_HTML}#{check}" if in_pages else f"#{check}"
    links = [
        f"<b>{n}</b>" if n == current
        else f'<a href="{first if n == 1 else f"{prefix}{check}-{n}.html"}">{n}</a>'
        for n in range(1, count + 1)
    ]  # fmt: skip
    return f"<p>pages: {' '.join(links)}</p>"


def _issue_table(
    dataset: Dataset, rows: Sequence[Issue], positions: Mapping[str, int]
) -> list[str]:
    lines = ["<table><tr><th>item</th><th>detail</th><th>related item</th></tr>"]
    for issue in rows:
        item_id = dataset.manifest["item_id"].iloc[issue.row]
        lines.append(
            "<tr>"
            + _item_cell(dataset, item_id, positions)
            + f"<td>{html.escape(issue.detail)}</td>"
            + _item_cell(dataset, issue.other, positions)
            + "</tr>"
        )
    lines.append("</table>")
    return lines


def _document(title: str, body: Sequence[str]) -> str:
    lines = [
        "<!doctype html>",
        f'<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>',
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top}"
        "img{image-rendering:pixelated}q{font-family:monospace}</style></head><body>",
        *body,
        "</body></html>",
    ]
    return "\n".join(lines) + "\n"


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
    positions: Mapping[str, int],
) -> str:
    inp, out = report["input"], report["output"]
    body = [
        "<h1>Data cleaning report</h1>",
        f"<p>Input <code>{html.escape(inp['path'])}</code>: {inp['items']} items, "
        f"fingerprint <code>{inp['fingerprint']}</code>.<br>"
        f"Output <code>{html.escape(out['path'])}</code>: {out['kept']} kept, "
        f"{out['removed']} removed (see <code>quarantine.parquet</code>), "
        f"fingerprint <code>{out['fingerprint']}</code>.</p>",
    ]
    threshold = report.get("near_duplicate_threshold")
    if threshold is not None:
        how = threshold.get("summary") or f"{threshold['threshold']} bits (configured)"
        body.append(f"<p>Near-duplicate images: at most {html.escape(how)}.</p>")
    body += [
        "<h2>Checks</h2>",
        "<table><tr><th>check</th><th>policy</th><th>items</th></tr>",
    ]
    for check, summary in report["checks"].items():
        name = f'<a href="#{check}">{check}</a>' if summary["items"] else check
        body.append(
            f"<tr><td>{name}</td><td>{summary['policy']}</td><td>{summary['items']}</td></tr>"
        )
    body.append("</table>")
    for check in report["checks"]:
        found = by_check.get(check, [])
        if not found:
            continue
        pages = _pages(found)
        body += [
            f'<h2 id="{check}">{check} ({report["checks"][check]["items"]} items, '
            f"policy {report['checks'][check]['policy']})</h2>",
            f"<p>{_span(1, len(found))} findings</p>" if len(pages) > 1 else "",
            _page_links(check, len(pages), 1, in_pages=False),
        ]
        body += _issue_table(dataset, pages[0], positions)
    return _document("cycleml data clean report", body)
