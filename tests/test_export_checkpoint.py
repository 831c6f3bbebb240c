"""From a real `cycleml train` run to a verified bundle to database rows, image and text."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from PIL import Image

from conftest import FAST_TRAIN, compose_config
from cycleml.batch.runner import PredictSettings, predict_to_database
from cycleml.errors import BundleError, ConfigError
from cycleml.export import ExportSettings, checkpoint
from cycleml.export.checkpoint import export_checkpoint, next_version
from cycleml.export.naming import bundle_name
from cycleml.inference import Predictor, load_bundle
from cycleml.training.train import train
from test_predict_support import DATABASES, database_url, stored

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = PredictSettings(batch_size=64, progress=False, intra_op_threads=1)


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def train_in(folder: Path, *overrides: str) -> Path:
    """A fast `cycleml train` run under ``folder``; returns its run folder."""
    try:
        train(compose_config("train", [*FAST_TRAIN, *overrides], folder))
    finally:  # leave no Hydra state behind for the next test
        HydraConfig.instance().cfg = None
        GlobalHydra.instance().clear()
    return folder / "run"


@pytest.fixture(scope="module")
def image_run(tmp_path_factory) -> Path:
    """One image training run for this module's tests, which only read it."""
    return train_in(tmp_path_factory.mktemp("image-run"), "trainer.limit_train_batches=5")


@pytest.fixture(scope="module")
def text_run(tmp_path_factory) -> tuple[Path, list[dict]]:
    folder = tmp_path_factory.mktemp("text-run")
    demo = _script("make_demo_text")
    reviews = demo.make_reviews(rows=400, seed=1)
    data = demo.write_table(reviews, folder / "reviews.csv")
    run = train_in(
        folder, "experiment=text_sentiment", "model=embedding_bag", f"data.path={data}",
        "data.tokenizer.vocab_size=500", "data.tokenizer.min_frequency=1",
    )  # fmt: skip
    return run, reviews


@pytest.mark.parametrize("database", DATABASES)
def test_image_run_to_bundle_to_rows(image_run, tmp_path, database):
    bundles = tmp_path / "bundles"
    name = f"digits-{uuid.uuid4().hex[:8]}"
    bundle = export_checkpoint(image_run, bundles_dir=bundles, name=name)
    assert bundle.path == bundles / name / "1"
    meta = bundle.meta
    run_info = json.loads((image_run / "run_info.json").read_text())
    summary = json.loads((image_run / "summary.json").read_text())
    assert meta.run_id == run_info["run_id"]
    assert meta.fingerprint == summary["dataset_fingerprint"]
    assert meta.metrics["test/acc"] == pytest.approx(summary["metrics"]["test/acc"])
    assert meta.verification["parity"]["passed"]
    assert meta.input.shape == [-1, 16, 16, 1] and meta.class_names == [str(d) for d in range(10)]
    assert meta.source["checkpoint"].endswith("best.ckpt")

    # the validation images as files → one row per file
    from cycleml.data.images import DigitsDataModule

    datamodule = DigitsDataModule(image_size=16, channels=1, mean=[0.5], std=[0.5])
    datamodule.setup()
    images, _ = datamodule.split_arrays("val")
    folder = tmp_path / "digits"
    folder.mkdir()
    for i, image in enumerate(images[:50]):
        Image.fromarray(image[..., 0]).save(folder / f"{i:03d}.png")
    url = database_url(database, tmp_path, [name])
    result = predict_to_database(bundle, folder, url, SETTINGS)
    assert (result.written, result.failed) == (50, 0)
    rows, _ = stored(url, name)
    expected = Predictor(bundle).predict(images[:50])
    assert [rows[f"{i:03d}.png"]["label"] for i in range(50)] == [p.label for p in expected]

    # the next export of the same model becomes version 2
    assert next_version(bundles / name) == "2"


def test_an_existing_bundle_folder_is_refused_before_the_data_is_rebuilt(
    image_run, tmp_path, monkeypatch
):
    target = tmp_path / "bundle"
    target.mkdir()
    (target / "keep.txt").write_text("mine")

    def no_rebuild(*args: object) -> None:
        raise AssertionError("the validation data was rebuilt")

    monkeypatch.setattr(checkpoint, "validation_split", no_rebuild)
    with pytest.raises(BundleError, match="already exists and is not empty"):
        export_checkpoint(image_run, out_dir=target)
    assert (target / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("database", DATABASES)
def test_text_run_to_bundle_to_rows(text_run, tmp_path, database):
    run_dir, reviews = text_run
    name = f"reviews-{uuid.uuid4().hex[:8]}"
    bundle = export_checkpoint(
        run_dir, out_dir=tmp_path / "bundle", name=name, version="7",
        settings=ExportSettings(quantize="int8", max_accuracy_drop=5.0),
    )  # fmt: skip
    meta = bundle.meta
    assert (meta.kind, meta.version, meta.input.shape) == ("text", "7", [-1, 48])
    assert meta.verification["parity"]["passed"] and "int8" in meta.variants
    assert (bundle.path / "tokenizer.json").is_file()
    # the bundle's own tokenization scores the raw validation texts like training did
    assert meta.metrics["bundle/val_acc"] == pytest.approx(meta.metrics["val/acc"], abs=0.05)

    table = tmp_path / "reviews.jsonl"
    table.write_text(
        "".join(json.dumps({"id": r["id"], "text": r["text"]}) + "\n" for r in reviews[:120])
    )
    url = database_url(database, tmp_path, [name])
    settings = PredictSettings(**{**SETTINGS.__dict__, "key_field": "id"})
    result = predict_to_database(bundle, table, url, settings)
    assert (result.written, result.failed) == (120, 0)
    rows, _ = stored(url, name)
    assert set(rows) == {r["id"] for r in reviews[:120]}
    expected = Predictor(bundle).predict_texts([r["text"] for r in reviews[:120]])
    assert [rows[r["id"]]["label"] for r in reviews[:120]] == [p.label for p in expected]
    assert {row["label"] for row in rows.values()} <= {"negative", "positive"}


@pytest.mark.slow
def test_export_cli(image_run, tmp_path):
    command = [
        sys.executable, "-m", "cycleml.cli", "export", f"ckpt_path={image_run}",
        f"export.bundles_dir={tmp_path / 'bundles'}", "export.name=digits",
        f"hydra.run.dir={tmp_path / 'export_run'}",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    bundle = load_bundle(tmp_path / "bundles" / "digits" / "1")
    assert bundle.meta.name == "digits"
    again = subprocess.run(
        [*command[:-1], "export.version=1", f"hydra.run.dir={tmp_path / 'again'}"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert again.returncode == 2
    assert "already exists and is not empty" in again.stderr and "Traceback" not in again.stderr


def test_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.ckpt"):
        export_checkpoint(tmp_path / "nope.ckpt", bundles_dir=tmp_path)


class _Placed(Exception):
    """Stops an export once its target is known."""


def test_bundle_names_come_from_the_data(image_run, text_run, tmp_path, monkeypatch):
    """A text run on reviews.csv makes bundles/reviews/1 (not a name made from the data
    module's class); a run on data=digits makes bundles/digits/1."""
    targets: list[Path] = []

    def placed(target: Path, overwrite: bool) -> None:
        targets.append(target)
        raise _Placed

    monkeypatch.setattr(checkpoint, "check_target", placed)
    for run in (text_run[0], image_run):
        with pytest.raises(_Placed):
            export_checkpoint(run, bundles_dir=tmp_path / "bundles")
    assert targets == [
        tmp_path / "bundles" / "reviews" / "1",
        tmp_path / "bundles" / "digits" / "1",
    ]
    # what `cycleml train` records of a run names path-less data by its config
    hydra_dir = tmp_path / "run" / ".hydra"
    hydra_dir.mkdir(parents=True)
    (hydra_dir / "hydra.yaml").write_text(
        "hydra:\n  runtime:\n    choices:\n      data: my_digits\n"
    )
    assert bundle_name({"_target_": "x.DigitsDataModule"}, tmp_path / "run") == "my_digits"
    assert bundle_name({"path": "/data/my reviews (v2).parquet"}) == "my-reviews-v2"
