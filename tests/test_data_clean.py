"""`cycleml data clean` on datasets with planted problems: what it finds and what it keeps."""

from __future__ import annotations

import csv
import io
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cycleml.data.clean import CleanSettings, clean, normalise_text
from cycleml.data.gather import gather
from cycleml.data.image_facts import calibrate_hamming, near_links, perceptual_hash
from cycleml.data.manifest import read_dataset
from cycleml.errors import ConfigError

CLASSES = ("ant", "bee", "cat", "dog")


def _picture(rng: np.random.Generator) -> Image.Image:
    """A distinct smooth colour picture (a random 6×6 grid, upsampled)."""
    grid = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    return Image.fromarray(grid).resize((40, 40), Image.Resampling.BICUBIC)


def _near_copy(image: Image.Image, rng: np.random.Generator) -> bytes:
    """The same picture a little brighter or darker, with noise, as a JPEG."""
    pixels = np.asarray(image, dtype=np.float64) * rng.uniform(0.95, 1.05)
    pixels += rng.normal(0, 2, pixels.shape)
    buffer = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def build_dirty_images(root: Path, seed: int = 0) -> dict[str, set[str]]:
    """An image folder ``<root>/<split>/<class>/<name>`` with planted problems.

    Returns, keyed by the check that should find them, the item ids (as gathering names
    them, source ``photos``) of each planted problem; duplicates are planted as pairs of
    ids, of which one should be flagged.
    """
    rng = np.random.default_rng(seed)
    files: dict[str, bytes] = {}  # "<split>/<class>/<name>" -> bytes
    originals: list[tuple[str, str, str, Image.Image]] = []
    for i in range(400):
        split = "train" if i % 20 < 14 else ("val" if i % 20 < 17 else "test")
        label = CLASSES[i % len(CLASSES)]
        image = _picture(rng)
        files[f"{split}/{label}/img{i:03d}.png"] = _png(image)
        originals.append((split, label, f"{split}/{label}/img{i:03d}.png", image))
    chosen = rng.permutation(len(originals))
    planted: dict[str, set] = defaultdict(set)
    take = iter(chosen)

    def add(kind: str, key: str, data: bytes) -> None:
        files[key] = data
        planted[kind].add(f"photos:{key}")

    def add_pair(kind: str, key: str, data: bytes, original: str) -> None:
        files[key] = data
        planted[kind].add(frozenset({f"photos:{key}", f"photos:{original}"}))

    for n in range(12):  # exact copies, same split and class
        split, label, key, _ = originals[next(take)]
        add_pair("exact_duplicate", f"{split}/{label}/copy{n}.png", files[key], key)
    for n in range(12):  # re-encoded, brightened, noisy copies
        split, label, key, image = originals[next(take)]
        add_pair("near_duplicate", f"{split}/{label}/near{n}.jpg", _near_copy(image, rng), key)
    for n in range(5):  # the same picture under another class
        split, label, key, _ = originals[next(take)]
        other = CLASSES[(CLASSES.index(label) + 1) % len(CLASSES)]
        add("conflicting_label", f"{split}/{other}/relabel{n}.png", files[key])
        planted["conflicting_label"].add(f"photos:{key}")
    for n in range(6):  # training pictures that also sit in val or test
        index = next(take)
        while originals[index][0] != "train":
            index = next(take)
        _, label, key, image = originals[index]
        target = "test" if n % 2 else "val"
        data = files[key] if n < 3 else _near_copy(image, rng)
        add("leakage", f"{target}/{label}/leak{n}.{'png' if n < 3 else 'jpg'}", data)
    for n in range(9):  # truncated, garbage and empty files
        label = CLASSES[n % len(CLASSES)]
        whole = _png(_picture(rng))
        data = [whole[: len(whole) // 2], rng.bytes(300), b""][n % 3]
        add("unreadable_image", f"train/{label}/broken{n}.png", data)
    for n in range(4):  # tiny images
        tiny = Image.fromarray(rng.integers(0, 256, (5, 5, 3), dtype=np.uint8))
        add("too_small", f"train/{CLASSES[n]}/tiny{n}.png", _png(tiny))
    for key, data in files.items():
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / key).write_bytes(data)
    return dict(planted)


def _words(rng: np.random.Generator, vocabulary: list[str]) -> str:
    return " ".join(rng.choice(vocabulary, size=9))


def build_dirty_texts(path: Path, seed: int = 0) -> dict[str, set[str]]:
    """A CSV of reviews (id, text, label, split, rating) with planted problems."""
    rng = np.random.default_rng(seed)
    vocabulary = [f"w{i}" for i in range(300)]
    rows: list[dict[str, str]] = []
    planted: dict[str, set] = defaultdict(set)
    for i in range(300):
        split = "train" if i % 10 < 7 else ("val" if i % 10 < 9 else "test")
        rows.append(
            {"id": f"r{i}", "text": _words(rng, vocabulary), "label": ("pos", "neg")[i % 2],
             "split": split, "rating": str(1 + i % 5)}
        )  # fmt: skip
    originals = list(rows)
    take = iter(rng.permutation(len(originals)))

    def add(kind: str, base: dict[str, str], **changes: str) -> None:
        row = {**base, "id": f"p{len(rows)}", **changes}
        rows.append(row)
        planted[kind].add(f"reviews:{row['id']}")

    def add_pair(kind: str, base: dict[str, str], **changes: str) -> None:
        add(kind, base, **changes)
        copy = f"reviews:p{len(rows) - 1}"
        planted[kind].remove(copy)
        planted[kind].add(frozenset({copy, f"reviews:{base['id']}"}))

    for _ in range(8):
        add_pair("exact_duplicate", originals[next(take)])
    for _ in range(8):
        base = originals[next(take)]
        add_pair(
            "near_duplicate", base, text="  " + base["text"].upper().replace(" ", ",  ") + "!! "
        )
    for _ in range(3):
        base = originals[next(take)]
        add("conflicting_label", base, label="neg" if base["label"] == "pos" else "pos")
        planted["conflicting_label"].add(f"reviews:{base['id']}")
    leaked = 0
    for index in take:
        if originals[index]["split"] == "train":
            add("leakage", originals[index], split="test")
            leaked += 1
            if leaked == 5:
                break
    for n in range(6):
        add("empty_text", originals[0], text=["", "   ", "\t"][n % 3])
    for _ in range(4):
        add("missing_label", originals[0], text=_words(rng, vocabulary), label="")
    for _ in range(3):
        add("wrong_type", originals[0], text=_words(rng, vocabulary), rating="five")
    for _ in range(3):
        add("out_of_range", originals[0], text=_words(rng, vocabulary), rating="9")
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["id", "text", "label", "split", "rating"])
        writer.writeheader()
        writer.writerows(rows)
    return dict(planted)


def _flagged(output: Path) -> dict[str, set[str]]:
    issues = pd.read_parquet(output / "issues.parquet")
    return {check: set(group["item_id"]) for check, group in issues.groupby("check")}


def _assert_found(planted: dict[str, set], flagged: dict[str, set[str]]) -> None:
    """Precision and recall >= 0.95 per planted kind; a pair counts when one of it is found."""
    for kind, expected in planted.items():
        found = flagged.get(kind, set())
        pairs = [e for e in expected if isinstance(e, frozenset)]
        items = {e for e in expected if isinstance(e, str)} | set().union(*pairs)
        precision = len(found & items) / len(found) if found else 0.0
        recall = (
            sum(len(pair & found) == 1 for pair in pairs) / len(pairs)
            if pairs
            else len(found & items) / len(items)
        )
        assert precision >= 0.95 and recall >= 0.95, (
            f"{kind}: precision {precision:.2f}, recall {recall:.2f}; "
            f"missed {sorted(expected - found)}, wrongly flagged {sorted(found - expected)}"
        )
    unplanted = set(flagged) - set(planted)
    assert not unplanted, f"checks that should have found nothing: {unplanted}"


def _assert_nothing_lost(source: Path, output: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    before = read_dataset(source).manifest
    kept = read_dataset(output).manifest
    quarantined = pd.read_parquet(output / "quarantine.parquet")
    assert len(kept) + len(quarantined) == len(before)
    assert set(kept["item_id"]) | set(quarantined["item_id"]) == set(before["item_id"])
    assert not set(kept["item_id"]) & set(quarantined["item_id"])
    assert quarantined["reasons"].str.len().min() > 0
    return kept, quarantined


def test_clean_finds_planted_image_problems(tmp_path: Path) -> None:
    planted = build_dirty_images(tmp_path / "raw")
    sources = {"photos": {"kind": "image_folder", "path": str(tmp_path / "raw"),
                          "layout": "split_class_folders"}}  # fmt: skip
    gather(sources, tmp_path / "gathered", workers=1, progress=False)
    result = clean(
        tmp_path / "gathered", tmp_path / "cleaned", CleanSettings(workers=1, progress=False)
    )

    _assert_found(planted, _flagged(tmp_path / "cleaned"))
    kept, quarantined = _assert_nothing_lost(tmp_path / "gathered", tmp_path / "cleaned")
    # one item removed per planted problem (a pair's copy, or the planted item itself)
    assert result.num_removed == len(quarantined) == len(set().union(*planted.values()))
    # every kept file is in the cleaned directory and decodes
    for relative in kept["path"]:
        with Image.open(tmp_path / "cleaned" / relative) as image:
            image.load()
    # quarantined items keep a reviewable copy; dropped ones (duplicates) do not
    by_action = quarantined.groupby("action")["path"]
    assert (
        by_action.get_group("quarantine").map(lambda p: (tmp_path / "cleaned" / p).is_file()).all()
    )
    assert by_action.get_group("drop").isna().all()
    assert set(quarantined.loc[quarantined["action"] == "drop", "checks"]) <= {
        "exact_duplicate", "near_duplicate", "leakage"}  # fmt: skip

    report = json.loads((tmp_path / "cleaned" / "report.json").read_text())
    assert report["output"]["kept"] == len(kept)
    assert report["checks"]["unreadable_image"]["items"] == 9
    assert report["checks"]["conflicting_label"]["policy"] == "quarantine"
    page = (tmp_path / "cleaned" / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 20
    assert 'id="near_duplicate"' in page and "unreadable" in page


def test_clean_finds_planted_text_problems(tmp_path: Path) -> None:
    planted = build_dirty_texts(tmp_path / "reviews.csv")
    sources = {"reviews": {"kind": "table", "path": str(tmp_path / "reviews.csv"),
                           "text_column": "text", "label_column": "label",
                           "split_column": "split", "id_column": "id", "columns": ["rating"]}}  # fmt: skip
    gather(sources, tmp_path / "gathered", workers=1, progress=False)
    settings = CleanSettings(schema={"rating": {"type": "int", "min": 1, "max": 5}}, progress=False)
    clean(tmp_path / "gathered", tmp_path / "cleaned", settings)

    _assert_found(planted, _flagged(tmp_path / "cleaned"))
    kept, quarantined = _assert_nothing_lost(tmp_path / "gathered", tmp_path / "cleaned")
    assert kept["text"].str.strip().str.len().min() > 0
    page = (tmp_path / "cleaned" / "report.html").read_text()
    assert "W1" in page.upper() and 'id="empty_text"' in page


def test_parallel_workers_find_the_same_as_one(tmp_path: Path) -> None:
    build_dirty_images(tmp_path / "raw", seed=1)
    sources = {"photos": {"kind": "image_folder", "path": str(tmp_path / "raw"),
                          "layout": "split_class_folders"}}  # fmt: skip
    gather(sources, tmp_path / "gathered", workers=2, progress=False)
    one = clean(tmp_path / "gathered", tmp_path / "one", CleanSettings(workers=1, progress=False))
    two = clean(tmp_path / "gathered", tmp_path / "two", CleanSettings(workers=2, progress=False))
    assert one.counts == two.counts and one.fingerprint == two.fingerprint
    assert _flagged(tmp_path / "one") == _flagged(tmp_path / "two")


def test_keep_policy_reports_but_removes_nothing(tmp_path: Path) -> None:
    planted = build_dirty_texts(tmp_path / "reviews.csv")
    sources = {"reviews": {"kind": "table", "path": str(tmp_path / "reviews.csv"),
                           "text_column": "text", "split_column": "split", "id_column": "id",
                           "columns": ["rating"]}}  # fmt: skip
    gather(sources, tmp_path / "gathered", progress=False)
    keep_all = CleanSettings(
        policies={check: "keep" for check in planted},
        schema={"rating": {"type": "int", "choices": [1, 2, 3, 4, 5]}},
        progress=False,
    )
    result = clean(tmp_path / "gathered", tmp_path / "cleaned", keep_all)
    assert result.num_removed == 0 and result.num_kept == result.num_input
    assert result.fingerprint == read_dataset(tmp_path / "gathered").fingerprint
    # with nothing removed up front, blank texts also count as duplicates of each other
    assert all(result.counts[kind] >= len(expected) for kind, expected in planted.items())
    assert len(pd.read_parquet(tmp_path / "cleaned" / "quarantine.parquet")) == 0


def test_duplicates_are_not_chained_across_distinct_items() -> None:
    # a ~ b and b ~ c, but a and c are far apart: c is kept once b is removed
    a, b, c = 0, 0b111, 0b111111
    links = near_links([a, b, c], threshold=3)
    assert links == {a: {b}, b: {a, c}, c: {b}}


def test_perceptual_hash_is_stable_under_small_changes_and_differs_between_pictures() -> None:
    rng = np.random.default_rng(3)
    pictures = [_picture(rng) for _ in range(50)]
    hashes = np.array([perceptual_hash(p) for p in pictures], dtype=np.uint64)
    near = np.array(
        [perceptual_hash(Image.open(io.BytesIO(_near_copy(p, rng)))) for p in pictures],
        dtype=np.uint64,
    )
    assert np.median(np.bitwise_count(hashes ^ near)) <= 2
    apart = np.bitwise_count(hashes[:, None] ^ hashes[None, :])[np.triu_indices(50, k=1)]
    assert apart.min() > 6 and 24 <= np.median(apart) <= 40


def test_normalise_text_ignores_case_punctuation_and_spacing() -> None:
    assert normalise_text("  Great  phone!!\n") == normalise_text("great, PHONE") == "great phone"
    assert normalise_text("ﬁne") == "fine"  # NFKC folds the ligature


def test_bad_settings_and_outputs_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown check"):
        CleanSettings(policies={"duplicates": "drop"})
    with pytest.raises(ConfigError, match="near_duplicate='delete'"):
        CleanSettings(policies={"near_duplicate": "delete"})
    with pytest.raises(ConfigError, match="schema.rating.type"):
        CleanSettings(schema={"rating": {"type": "integer"}})
    with pytest.raises(
        ConfigError, match=r"schema.lang: bounds \['min'\] need type int or float, not str"
    ):
        CleanSettings(schema={"lang": {"min": 2}})
    gather({"digits": {"kind": "digits", "limit": 20}}, tmp_path / "d", progress=False)
    with pytest.raises(ConfigError, match="is the input"):
        clean(tmp_path / "d", tmp_path / "d", CleanSettings(progress=False))
    with pytest.raises(ConfigError, match="schema.rating: the manifest has no such column"):
        clean(
            tmp_path / "d", tmp_path / "out", CleanSettings(schema={"rating": {}}, progress=False)
        )
    (tmp_path / "out2").mkdir()  # an empty folder is a fine output
    clean(tmp_path / "d", tmp_path / "out2", CleanSettings(progress=False))
    with pytest.raises(ConfigError, match="overwrite=true"):
        clean(tmp_path / "d", tmp_path / "out2", CleanSettings(progress=False))
    # overwriting replaces what clean wrote and leaves anything else in the folder alone
    (tmp_path / "out2" / "notes.txt").write_text("mine")
    (tmp_path / "out2" / "report.html").write_text("stale")
    clean(tmp_path / "d", tmp_path / "out2", CleanSettings(progress=False), overwrite=True)
    assert (tmp_path / "out2" / "notes.txt").read_text() == "mine"
    assert "stale" not in (tmp_path / "out2" / "report.html").read_text()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not a dataset directory"):
        clean(tmp_path / "d", tmp_path / "mine", CleanSettings(progress=False), overwrite=True)


def _digits_with_near_copies(root: Path, copies: int) -> set[frozenset[str]]:
    """The 1,797 digits as 8×8 PNGs in class folders, plus ``copies`` near-identical
    copies (a few grey levels brighter); returns the planted pairs' item ids."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    for i, (image, label) in enumerate(zip(pixels, digits.target, strict=True)):
        (root / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image, "L").save(root / str(label) / f"{i:04d}.png")
    planted = set()
    for i in range(0, copies * 97, 97):
        label = digits.target[i]
        brighter = np.clip(pixels[i].astype(int) + 3, 0, 255).astype(np.uint8)
        Image.fromarray(brighter, "L").save(root / str(label) / f"near{i:04d}.png")
        planted.add(frozenset({f"d:{label}/{i:04d}.png", f"d:{label}/near{i:04d}.png"}))
    return planted


def test_digits_are_not_taken_for_near_duplicates(tmp_path: Path) -> None:
    """Unrelated 8×8 digits look alike to a 64-bit pHash: the calibrated threshold
    flags at most 1 % of them, and still finds near-identical copies."""
    planted = _digits_with_near_copies(tmp_path / "raw", copies=10)
    sources = {"d": {"kind": "image_folder", "path": str(tmp_path / "raw")}}
    gather(sources, tmp_path / "gathered", workers=1, progress=False)
    result = clean(
        tmp_path / "gathered", tmp_path / "cleaned", CleanSettings(workers=1, progress=False)
    )
    flagged = _flagged(tmp_path / "cleaned").get("near_duplicate", set())
    found = sum(len(pair & flagged) == 1 for pair in planted)
    unplanted = flagged - set().union(*planted)
    assert found >= 9 and len(unplanted) <= 0.01 * 1797, (found, len(unplanted))
    assert result.hamming is not None and result.hamming["mode"] == "auto"
    threshold = result.hamming["threshold"]
    assert 0 <= threshold < 6
    report = json.loads((tmp_path / "cleaned" / "report.json").read_text())
    assert report["near_duplicate_threshold"]["threshold"] == threshold
    page = (tmp_path / "cleaned" / "report.html").read_text()
    assert f"Near-duplicate images: at most {threshold} bits (auto:" in page


def test_calibration_keeps_the_full_threshold_for_unrelated_pictures() -> None:
    rng = np.random.default_rng(4)
    pictures = rng.integers(0, 2**63, 3000, dtype=np.int64).tolist()
    assert calibrate_hamming(pictures).threshold == 6
    assert calibrate_hamming(pictures, max_bits=4).threshold == 4
    # hashes that share most bits (a dataset of look-alikes) get a lower threshold
    alike = [h & 0xFFFF for h in pictures]
    assert calibrate_hamming(alike).threshold < 6


def test_report_shows_every_flagged_pair_with_its_distance(tmp_path: Path) -> None:
    """A set threshold is used as is; the report pages through every finding."""
    _digits_with_near_copies(tmp_path / "raw", copies=0)
    sources = {"d": {"kind": "image_folder", "path": str(tmp_path / "raw")}}
    gather(sources, tmp_path / "gathered", workers=1, progress=False)
    settings = CleanSettings(hamming=6, workers=1, progress=False)
    result = clean(tmp_path / "gathered", tmp_path / "cleaned", settings)
    assert result.hamming == {"threshold": 6, "mode": "configured"}
    flagged = result.counts["near_duplicate"]
    assert flagged > 100  # these look-alike digits are what the calibration avoids
    output = tmp_path / "cleaned"
    pages = [output / "report.html"] + sorted(
        (output / "report_pages").glob("near_duplicate-*.html"),
        key=lambda p: int(p.stem.split("-")[1]),
    )
    assert len(pages) == -(-flagged // 50)
    rows = [
        line for page in pages for line in page.read_text().splitlines()
        if "hash bits differ" in line
    ]  # fmt: skip
    assert len(rows) == flagged
    distances = [int(row.split("near-same content: ")[1].split(" of 64")[0]) for row in rows]
    assert all(0 <= d <= 6 for d in distances)
    assert 'href="report_pages/near_duplicate-2.html"' in pages[0].read_text()
