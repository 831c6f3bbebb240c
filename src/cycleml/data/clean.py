"""Find problems in a dataset directory and write a cleaned copy plus a quarantine.

Checks (each has a policy: ``drop``, ``keep`` or ``quarantine``):

======================  ==============================================================
``missing_label``       no label, or an empty one
``empty_text``          a text item with no text, or only white space
``wrong_type``          a ``schema`` column whose value does not parse as its type
``out_of_range``        a ``schema`` column below ``min``, above ``max`` or not in ``choices``
``unreadable_image``    a file that is missing, not an image, or truncated
``too_small``           an image narrower than ``min_width`` or lower than ``min_height``
``exact_duplicate``     the same content hash and label as an earlier item of its split
``near_duplicate``      an image within ``hamming`` bits (64-bit pHash; ``auto``: calibrated
                        on the dataset's own random pairs), or a text equal after
                        normalisation, of an earlier item with its label and split
``conflicting_label``   the same (or near-same) content carrying different labels
``leakage``             the same (or near-same) content in more than one split; the copy
                        in the later split (train < val < test) is flagged
======================  ==============================================================

Items that fail the first six checks with a policy other than ``keep`` do not take part
in the duplicate checks. ``drop`` and ``quarantine`` both remove an item from the
cleaned dataset and list it, with every reason, in ``quarantine.parquet``;
``quarantine`` also keeps a copy of its file under ``quarantine/files`` for review.
Nothing is lost: kept + quarantined = input.
"""

from __future__ import annotations

import logging
import math
import re
import unicodedata
from collections import defaultdict
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from cycleml.data.image_facts import (
    MAX_AUTO_HAMMING,
    ImageFacts,
    calibrate_hamming,
    inspect_images,
    near_links,
)
from cycleml.data.manifest import (
    DATASET_FILE,
    FILES_DIR,
    MANIFEST_FILE,
    SPLIT_COLUMN,
    Dataset,
    place_file,
    prepare_output,
    read_dataset,
    write_dataset,
)
from cycleml.data.parallel import map_in_chunks
from cycleml.data.report import REPORT_HTML, REPORT_JSON, REPORT_PAGES_DIR, write_report
from cycleml.errors import ConfigError

log = logging.getLogger(__name__)

VALIDITY_CHECKS = (
    "missing_label",
    "empty_text",
    "wrong_type",
    "out_of_range",
    "unreadable_image",
    "too_small",
)
DUPLICATE_CHECKS = ("exact_duplicate", "near_duplicate", "conflicting_label", "leakage")
CHECKS = VALIDITY_CHECKS + DUPLICATE_CHECKS
POLICIES = ("keep", "drop", "quarantine")
# duplicates are dropped (another copy stays); broken or contradictory items are
# quarantined, so their files stay reviewable
DEFAULT_POLICIES = {
    **{check: "quarantine" for check in CHECKS},
    "exact_duplicate": "drop",
    "near_duplicate": "drop",
    "leakage": "drop",
}
QUARANTINE_FILE = "quarantine.parquet"
QUARANTINE_DIR = "quarantine"
ISSUES_FILE = "issues.parquet"
SPLIT_ORDER = {"train": 0, "val": 1, "test": 2}
_SCHEMA_KEYS = {"type", "min", "max", "choices"}
_TYPES = ("int", "float", "bool", "str")
_BOOL_WORDS = {"true", "false", "1", "0", "yes", "no"}


@dataclass(frozen=True)
class CleanSettings:
    """What to check and what to do with each finding."""

    policies: Mapping[str, str] = field(default_factory=dict)
    min_width: int = 8
    min_height: int = 8
    # bits of the 64-bit pHash, or "auto" (see image_facts.calibrate_hamming)
    hamming: int | str = "auto"
    schema: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    files: str = "hardlink"
    workers: int | None = None
    examples: int = 8
    progress: bool = True

    def __post_init__(self) -> None:
        unknown = set(self.policies) - set(CHECKS)
        if unknown:
            raise ConfigError(f"checks: unknown check(s) {sorted(unknown)}; known: {list(CHECKS)}")
        for check, policy in self.policies.items():
            if policy not in POLICIES:
                raise ConfigError(f"checks.{check}={policy!r}; use one of {list(POLICIES)}")
        if self.hamming != "auto" and (
            isinstance(self.hamming, bool)
            or not isinstance(self.hamming, int)
            or not 0 <= self.hamming < 64
        ):
            raise ConfigError(
                f"hamming={self.hamming!r}; use auto or 0..63 bits of the 64-bit pHash"
            )
        if self.files not in ("copy", "hardlink"):
            raise ConfigError(f"files={self.files!r}; use copy or hardlink")
        for column, spec in self.schema.items():
            unknown = set(spec) - _SCHEMA_KEYS
            if unknown:
                raise ConfigError(f"schema.{column}: unknown key(s) {sorted(unknown)}")
            kind = spec.get("type", "str")
            if kind not in _TYPES:
                raise ConfigError(f"schema.{column}.type={kind!r}; use one of {list(_TYPES)}")
            bounds = [key for key in ("min", "max") if spec.get(key) is not None]
            if bounds and kind not in ("int", "float"):
                raise ConfigError(
                    f"schema.{column}: bounds {bounds} need type int or float, not {kind}"
                )

    def policy(self, check: str) -> str:
        return self.policies.get(check, DEFAULT_POLICIES[check])


@dataclass(frozen=True)
class Issue:
    """One finding about one item (``row`` is its position in the input manifest)."""

    row: int
    check: str
    detail: str
    other: str | None = None  # the item this one duplicates or conflicts with


@dataclass(frozen=True)
class CleanResult:
    """What ``clean`` wrote."""

    root: Path
    fingerprint: str
    num_input: int
    num_kept: int
    num_removed: int
    counts: dict[str, int]  # items flagged per check
    # the near-duplicate threshold of an image dataset and how it was chosen
    hamming: dict[str, Any] | None = None


@dataclass(frozen=True)
class Findings:
    issues: list[Issue]
    hamming: dict[str, Any] | None = None


# --------------------------------------------------------------------------- checks


def normalise_text(text: str) -> str:
    """Case-folded NFKC text without punctuation and with single spaces."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = "".join(" " if unicodedata.category(ch).startswith("P") else ch for ch in text)
    return " ".join(text.split())


def _blank(value: Any) -> bool:
    return (
        value is None or (isinstance(value, float) and math.isnan(value)) or not str(value).strip()
    )


def _parse(value: str, kind: str) -> float | bool | str | None:
    """``value`` as ``kind``, or None when it is not one."""
    text = value.strip()
    if kind == "int":
        return float(int(text)) if re.fullmatch(r"[+-]?\d+", text) else None
    if kind == "float":
        try:
            number = float(text)
        except ValueError:
            return None
        return number if math.isfinite(number) else None
    if kind == "bool":
        return text.casefold() in {"true", "1", "yes"} if text.casefold() in _BOOL_WORDS else None
    return value


def validity_issues(dataset: Dataset, settings: CleanSettings) -> list[Issue]:
    """Missing labels and texts, schema types and ranges (not the image files)."""
    frame = dataset.manifest
    issues = [
        Issue(i, "missing_label", "no label") for i, v in enumerate(frame["label"]) if _blank(v)
    ]
    if dataset.kind == "text":
        issues += [
            Issue(i, "empty_text", "empty text") for i, v in enumerate(frame["text"]) if _blank(v)
        ]
    for column, spec in settings.schema.items():
        if column not in frame.columns:
            raise ConfigError(
                f"schema.{column}: the manifest has no such column; it has {list(frame.columns)}"
            )
        kind = spec.get("type", "str")
        choices = {str(c) for c in spec["choices"]} if spec.get("choices") is not None else None
        for i, raw in enumerate(frame[column]):
            if _blank(raw):
                continue
            value = _parse(str(raw), kind)
            if value is None:
                issues.append(Issue(i, "wrong_type", f"{column}={raw!r} is not {kind}"))
            elif choices is not None and str(raw).strip() not in choices:
                issues.append(
                    Issue(i, "out_of_range", f"{column}={raw!r} not in {sorted(choices)}")
                )
            elif spec.get("min") is not None and value < spec["min"]:
                issues.append(Issue(i, "out_of_range", f"{column}={raw!r} < min {spec['min']}"))
            elif spec.get("max") is not None and value > spec["max"]:
                issues.append(Issue(i, "out_of_range", f"{column}={raw!r} > max {spec['max']}"))
    return issues


def image_issues(facts: list[ImageFacts], settings: CleanSettings) -> list[Issue]:
    """Unreadable files and images below the minimum size."""
    issues = []
    for i, fact in enumerate(facts):
        if fact.error is not None:
            issues.append(Issue(i, "unreadable_image", fact.error))
        elif fact.width < settings.min_width or fact.height < settings.min_height:
            issues.append(
                Issue(
                    i,
                    "too_small",
                    f"{fact.width}×{fact.height} is below {settings.min_width}×{settings.min_height}",
                )
            )
    return issues


def duplicate_issues(
    dataset: Dataset,
    rows: Sequence[int],
    near_keys: Mapping[int, Hashable],
    near_links: Mapping[Hashable, set[Hashable]],
    preference: Mapping[int, float] | None = None,
) -> list[Issue]:
    """Duplicates, conflicting labels and leakage among ``rows``.

    Of a group of duplicates the item in the earliest split is kept, then the one with
    the highest ``preference`` (the pixel count, for images), then the first one.

    Two items are the same content when their content hashes are equal, and near-same
    when their near keys (pHash, normalised text) are equal or linked in ``near_links``.
    The relation is not transitive: an item is a duplicate only of an item that is
    kept, so a chain of small changes does not swallow distinct items.
    """
    frame = dataset.manifest
    ids, hashes = frame["item_id"].tolist(), frame["content_hash"].tolist()
    labels = [None if _blank(v) else str(v) for v in frame["label"]]
    splits = frame[SPLIT_COLUMN].tolist() if SPLIT_COLUMN in frame.columns else [None] * len(frame)

    def neighbour_keys(row: int) -> list[tuple[str, Hashable]]:
        keys: list[tuple[str, Hashable]] = [("hash", hashes[row])]
        if row in near_keys:
            key = near_keys[row]
            keys += [("near", key)] + [("near", k) for k in near_links.get(key, ())]
        return keys

    # conflicting labels: any same or near-same item with another label
    labelled_by_key: dict[tuple[str, Hashable], dict[str, int]] = defaultdict(dict)
    for row in rows:
        if labels[row] is not None:
            labelled_by_key[("hash", hashes[row])].setdefault(labels[row], row)
            if row in near_keys:
                labelled_by_key[("near", near_keys[row])].setdefault(labels[row], row)
    issues: list[Issue] = []
    conflicting = set()
    for row in rows:
        if labels[row] is None:
            continue
        found = {
            label: other
            for key in neighbour_keys(row)
            for label, other in labelled_by_key.get(key, {}).items()
            if label != labels[row]
        }
        if found:
            conflicting.add(row)
            names = sorted({labels[row], *found})
            first = min(found.values())
            issues.append(
                Issue(row, "conflicting_label", f"labels {names} on the same content", ids[first])
            )

    # duplicates and leakage: compare each item with the kept items before it
    def rank(row: int) -> int:
        return -1 if splits[row] is None else SPLIT_ORDER.get(str(splits[row]), len(SPLIT_ORDER))

    kept_by_key: dict[tuple[str, Hashable], int] = {}
    preference = preference or {}
    order = sorted(
        (r for r in rows if r not in conflicting),
        key=lambda r: (rank(r), -preference.get(r, 0.0), r),
    )
    for row in order:
        keys = neighbour_keys(row)
        earlier = [kept_by_key[k] for k in keys if k in kept_by_key]
        if not earlier:
            kept_by_key[keys[0]] = row
            if len(keys) > 1:
                kept_by_key[keys[1]] = row
            continue
        leaked = [r for r in earlier if rank(r) != rank(row)]
        exact = [r for r in earlier if hashes[r] == hashes[row]]
        if leaked:
            other = leaked[0]
            issues.append(
                Issue(
                    row,
                    "leakage",
                    f"in {splits[row]} and in {splits[other] or 'no split'}",
                    ids[other],
                )
            )
        elif exact:
            issues.append(Issue(row, "exact_duplicate", "same content", ids[exact[0]]))
        else:
            other = earlier[0]
            issues.append(
                Issue(row, "near_duplicate", _near_detail(near_keys, row, other), ids[other])
            )
    return issues


def _near_detail(near_keys: Mapping[int, Hashable], row: int, other: int) -> str:
    """How near: the bits two perceptual hashes differ in (texts are equal once normalised)."""
    a, b = near_keys.get(row), near_keys.get(other)
    if isinstance(a, int) and isinstance(b, int):
        return f"near-same content: {(a ^ b).bit_count()} of 64 hash bits differ"
    return "near-same content: the same text once normalised"


# --------------------------------------------------------------------------- run


def find_issues(dataset: Dataset, settings: CleanSettings) -> Findings:
    """Every finding about ``dataset``, and the near-duplicate threshold used on images."""
    issues = validity_issues(dataset, settings)
    facts = None
    if dataset.kind == "image" and len(dataset.manifest):
        paths = [str(dataset.root / p) for p in dataset.manifest["path"]]
        facts = map_in_chunks(inspect_images, paths, settings.workers, "inspect", settings.progress)
        issues += image_issues(facts, settings)
    removed = {i.row for i in issues if settings.policy(i.check) != "keep"}
    rows = [r for r in range(len(dataset.manifest)) if r not in removed]
    preference: dict[int, float] = {}
    hamming: dict[str, Any] | None = None
    if facts is not None:
        near_keys: dict[int, Hashable] = {r: facts[r].phash for r in rows if facts[r].error is None}
        hamming = _hamming_threshold(dataset, near_keys, settings)
        links = near_links(near_keys.values(), hamming["threshold"])
        preference = {r: float(facts[r].width * facts[r].height) for r in near_keys}
    else:
        texts = dataset.manifest["text"].tolist()
        near_keys = {r: normalise_text(str(texts[r] or "")) for r in rows}
        links = {}
    issues += duplicate_issues(dataset, rows, near_keys, links, preference)
    return Findings(issues, hamming)


def _hamming_threshold(
    dataset: Dataset, near_keys: Mapping[int, Hashable], settings: CleanSettings
) -> dict[str, Any]:
    """The near-duplicate threshold: as configured, or calibrated on one hash per
    distinct content (exact copies would pose as close random pairs)."""
    if settings.hamming != "auto":
        return {"threshold": int(settings.hamming), "mode": "configured"}
    content = dataset.manifest["content_hash"].tolist()
    by_content = {content[row]: key for row, key in near_keys.items()}
    calibration = calibrate_hamming(by_content.values(), MAX_AUTO_HAMMING)  # type: ignore[arg-type]
    log.info("near-duplicate threshold: %s", calibration.describe())
    return {**calibration.to_dict(), "summary": calibration.describe()}


def clean(
    input_dir: str | Path,
    output_dir: str | Path | None,
    settings: CleanSettings,
    overwrite: bool = False,
) -> CleanResult:
    """Check the dataset at ``input_dir``; write the cleaned dataset and report to ``output_dir``."""
    dataset = read_dataset(input_dir)
    output = (
        Path(output_dir) if output_dir else dataset.root.with_name(f"{dataset.root.name}-clean")
    )
    output = output.expanduser()
    if output.resolve() == dataset.root:
        raise ConfigError(f"output {output} is the input; clean writes a new dataset directory")
    written = (MANIFEST_FILE, DATASET_FILE, FILES_DIR, QUARANTINE_FILE, QUARANTINE_DIR,
               ISSUES_FILE, REPORT_JSON, REPORT_HTML, REPORT_PAGES_DIR)  # fmt: skip
    prepare_output(output, overwrite, written)
    findings = find_issues(dataset, settings)
    issues = findings.issues
    frame = dataset.manifest
    by_row: dict[int, list[Issue]] = defaultdict(list)
    for issue in issues:
        by_row[issue.row].append(issue)
    action = {
        row: max((settings.policy(i.check) for i in found), key=POLICIES.index)
        for row, found in by_row.items()
    }
    removed = sorted(r for r, a in action.items() if a != "keep")
    kept = frame.drop(index=frame.index[removed]).reset_index(drop=True)

    if dataset.kind == "image":
        for relative in kept["path"]:
            place_file(dataset.root / relative, output / relative, settings.files)
    quarantine = frame.iloc[removed].copy()
    quarantine["action"] = [action[r] for r in removed]
    quarantine["checks"] = [",".join(sorted({i.check for i in by_row[r]})) for r in removed]
    quarantine["reasons"] = ["; ".join(_describe(i) for i in by_row[r]) for r in removed]
    if dataset.kind == "image":
        stored = []
        for row, relative in zip(removed, quarantine["path"], strict=True):
            if action[row] == "quarantine" and (dataset.root / relative).is_file():
                place_file(dataset.root / relative, output / QUARANTINE_DIR / relative)
                stored.append(f"{QUARANTINE_DIR}/{relative}")
            else:
                stored.append(None)
        quarantine["path"] = stored
    quarantine.to_parquet(output / QUARANTINE_FILE, index=False)
    ids = frame["item_id"].tolist()
    pd.DataFrame(
        {
            "item_id": [ids[i.row] for i in issues],
            "check": [i.check for i in issues],
            "detail": [i.detail for i in issues],
            "other": [i.other for i in issues],
            "action": [settings.policy(i.check) for i in issues],
        }
    ).to_parquet(output / ISSUES_FILE, index=False)

    flagged: dict[str, set[int]] = {check: set() for check in CHECKS}
    for issue in issues:
        flagged[issue.check].add(issue.row)
    counts = {check: len(rows) for check, rows in flagged.items()}
    fingerprint = write_dataset(
        output,
        kept,
        {
            "cleaned_from": {"path": str(dataset.root), "fingerprint": dataset.fingerprint},
            "issues": counts,
        },
    )
    write_report(
        output,
        dataset=dataset,
        issues=issues,
        policies={c: settings.policy(c) for c in CHECKS},
        num_kept=len(kept),
        num_removed=len(removed),
        fingerprint=fingerprint,
        examples=settings.examples,
        hamming=findings.hamming,
    )
    log.info(
        "cleaned %s: %d items in, %d kept, %d removed (%s)",
        dataset.root,
        len(frame),
        len(kept),
        len(removed),
        ", ".join(f"{c}={n}" for c, n in counts.items() if n) or "no issues",
    )
    return CleanResult(
        output, fingerprint, len(frame), len(kept), len(removed), counts, findings.hamming
    )


def _describe(issue: Issue) -> str:
    return f"{issue.check}: {issue.detail}" + (f" ({issue.other})" if issue.other else "")
