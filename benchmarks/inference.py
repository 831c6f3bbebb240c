"""Inference benchmark: ONNX Runtime vs PyTorch eager, int8 vs fp32, and `cycleml predict`
end to end vs in-process ONNX Runtime.

    .venv/bin/python benchmarks/inference.py                      # digits CNN at 32x32
    .venv/bin/python benchmarks/inference.py --image-size 16      # the default digits setup
    .venv/bin/python benchmarks/inference.py --ckpt logs/train/runs/<run>
    .venv/bin/python benchmarks/inference.py --model efficientnet_lite0 --threads 2 --rounds 0

Without ``--ckpt`` it trains the small CNN (``cycleml.models.cnn.SmallCNN``) on the
bundled digits for a few epochs, or, with ``--model efficientnet_lite0``, takes
EfficientNet-Lite0 with its ImageNet weights at 224x224 (timm's centre crop, bicubic)
and fits its head to crops of the three photos that ship inside scikit-learn and
matplotlib (a linear probe: logistic regression on the pooled features). Either way it
exports a bundle with an int8 variant (parity-verified, accuracies recorded), then
measures, in this one process and with the same number of threads for PyTorch and ONNX
Runtime:

1. latency of one image (median of many batch-1 calls) and throughput at batch 32,
   PyTorch eager (inference mode) vs the bundle's ONNX Runtime session;
2. int8 vs fp32 throughput at each ``--batches`` size, in ``--turns`` turns that
   alternate the two (median of the turns' ratios), and validation accuracy of each;
3. ``cycleml predict`` end to end (a PNG folder into SQLite) against ONNX Runtime on
   the same images already decoded, at the same batch size and thread count. On a
   shared machine the load changes from second to second, so this runs in rounds,
   each measuring the baseline right before a prediction run into a fresh database,
   and reports the median ratio; it also prints the CPU time per row of both, which
   the load does not change (where other jobs take every core, the ratio tends to
   ONNX Runtime's share of the pipeline's CPU time).

Every ratio compares figures measured here, in one run, on this machine.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from cycleml.batch.runner import PredictSettings, predict_to_database
from cycleml.export import ExportSettings, export_bundle
from cycleml.export.graph import ImageInferenceNet
from cycleml.inference import ModelBundle, Predictor


def train_digits_cnn(image_size: int, epochs: int) -> tuple[nn.Module, dict, list[str], tuple]:
    """A SmallCNN trained on the digits; returns net, data spec, classes, splits."""
    from cycleml.data.images import DigitsDataModule
    from cycleml.models.cnn import SmallCNN

    data = DigitsDataModule(image_size=image_size, channels=1, mean=[0.5], std=[0.5])
    data.setup()
    train_x, train_y = data.split_arrays("train")
    val_x, val_y = data.split_arrays("val")
    torch.manual_seed(0)
    net = SmallCNN(in_channels=1, num_classes=10, width=32)
    optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=5e-4)
    x = (torch.from_numpy(train_x).permute(0, 3, 1, 2).float() / 255.0 - 0.5) / 0.5
    y = torch.from_numpy(train_y)
    net.train()
    for _ in range(epochs):
        order = torch.randperm(len(x))
        for start in range(0, len(x), 64):
            idx = order[start : start + 64]
            optimizer.zero_grad()
            nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
            optimizer.step()
    spec = {**data.spec(), "kind": "image"}
    return net.eval(), spec, list(data.class_names), (val_x, val_y, data.images)


def pretrained_photo_probe(image_size: int) -> tuple[nn.Module, dict, list[str], tuple]:
    """EfficientNet-Lite0 with ImageNet weights, its head fitted to crops of three photos
    (one class per photo; crops of 20-60 % of the photo, any aspect ratio, so the centre
    crop matters); returns net, data spec, classes, splits."""
    from sklearn.linear_model import LogisticRegression

    from cycleml.data.images import ImageFolderDataModule
    from cycleml.models.efficientnet_lite import EfficientNetLite0

    folder = Path(tempfile.mkdtemp(prefix="cycleml-photos-"))
    rng = np.random.default_rng(0)
    for name, path in _package_photos().items():
        with Image.open(path) as opened:
            photo = opened.convert("RGB")
        (folder / name).mkdir()
        for i in range(40):
            w, h = (int(rng.uniform(0.2, 0.6) * side) for side in photo.size)
            x, y = int(rng.integers(0, photo.width - w)), int(rng.integers(0, photo.height - h))
            photo.crop((x, y, x + w, y + h)).save(folder / name / f"{i:03d}.png")
    data = ImageFolderDataModule(
        path=str(folder), image_size=image_size, channels=3, mean=[0.5] * 3, std=[0.5] * 3,
        val_fraction=0.5, test_fraction=0.0, resize_mode="shorter_side_crop",
        crop_fraction=0.875, interpolation="bicubic",
    )  # fmt: skip
    data.setup()
    shutil.rmtree(folder, ignore_errors=True)
    train_x, train_y = data.split_arrays("train")
    val_x, val_y = data.split_arrays("val")
    net = EfficientNetLite0(num_classes=data.num_classes).eval()
    x = torch.from_numpy(train_x).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    features = torch.cat([net.features(x[i : i + 32]) for i in range(0, len(x), 32)])
    probe = LogisticRegression(max_iter=2000, C=0.1).fit(features.numpy(), train_y)
    with torch.no_grad():
        net.model.classifier.weight.copy_(torch.from_numpy(probe.coef_))
        net.model.classifier.bias.copy_(torch.from_numpy(probe.intercept_))
    spec = {**data.spec(), "kind": "image"}
    return net, spec, list(data.class_names), (val_x, val_y, data.images)


def _package_photos() -> dict[str, Path]:
    """Real photos that ship inside installed packages."""
    import matplotlib
    import sklearn

    sklearn_images = Path(sklearn.__file__).parent / "datasets" / "images"
    return {
        "flower": sklearn_images / "flower.jpg",
        "portrait": Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg",
        "temple": sklearn_images / "china.jpg",
    }


def from_checkpoint(path: str) -> tuple[nn.Module, dict, list[str], tuple]:
    from cycleml.export.checkpoint import validation_split
    from cycleml.models.module import ClassifierModule
    from cycleml.training.evaluate import resolve_checkpoint

    module = ClassifierModule.from_checkpoint(resolve_checkpoint(path))
    spec = dict(module.hparams.data_spec)
    if spec.get("kind") != "image":
        raise SystemExit("the benchmark needs an image checkpoint")
    val_x, val_y = validation_split(spec["data_config"], spec)
    return module.net.eval(), spec, list(module.hparams.class_names), (val_x, val_y, val_x)


def median_latency(fn: Callable[[], object], seconds: float) -> float:
    fn()
    times = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 20:
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def throughput(
    run: Callable[[np.ndarray], object], images: np.ndarray, batch: int, seconds: float
) -> float:
    """Rows/s running ``images`` in batches of ``batch`` for about ``seconds``."""
    return timed_throughput(run, images, batch, seconds)[0]


def timed_throughput(
    run: Callable[[np.ndarray], object], images: np.ndarray, batch: int, seconds: float
) -> tuple[float, float]:
    """``(rows/s, CPU seconds per row)`` running ``images`` in batches of ``batch``."""
    run(images[:batch])
    rows, start, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        for offset in range(0, len(images) - batch + 1, batch):
            run(images[offset : offset + batch])
            rows += batch
    return rows / (time.perf_counter() - start), (time.process_time() - cpu) / rows


def int8_vs_fp32(
    fp32: Predictor, int8: Predictor, images: np.ndarray, batch: int, seconds: float, turns: int
) -> tuple[list[float], list[float]]:
    """Rows/s of each precision in ``turns`` turns, fp32 then int8 in odd turns and the
    other way round in even ones, so a change of the machine's load hits both alike."""
    tiled = np.concatenate([images] * max(1, -(-batch // len(images))))
    fp32_rates: list[float] = []
    int8_rates: list[float] = []
    for turn in range(turns):
        order = [(fp32, fp32_rates), (int8, int8_rates)]
        for predictor, rates in order if turn % 2 == 0 else order[::-1]:
            rates.append(throughput(predictor.run, tiled, batch, seconds))
    return fp32_rates, int8_rates


def cpu_seconds() -> float:
    """CPU time of this process and of its children that have exited."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


@dataclass
class PredictRound:
    baseline: float  # ONNX Runtime on decoded images, rows/s
    baseline_cpu: float  # its CPU seconds per row
    predict: float  # cycleml predict, rows/s over the run (as its summary reports)
    predict_wall: float  # rows/s over the whole call, start-up included
    predict_cpu: float  # CPU seconds per row, decode workers included
    load: float

    @property
    def ratio(self) -> float:
        return self.predict / self.baseline


def predict_round(
    predictor: Predictor, bundle: ModelBundle, images: np.ndarray, folder: Path, db: Path,
    settings: PredictSettings, seconds: float,
) -> PredictRound:  # fmt: skip
    """The baseline, then ``cycleml predict`` on the PNG copies of ``images``."""
    baseline, baseline_cpu = timed_throughput(predictor.run, images, settings.batch_size, seconds)
    start, cpu = time.perf_counter(), cpu_seconds()
    summary = predict_to_database(bundle, folder, f"sqlite:///{db}", settings)
    wall, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    if summary.written != len(images):
        raise SystemExit(f"predict wrote {summary.written} rows for {len(images)} images")
    return PredictRound(
        baseline, baseline_cpu, summary.written / summary.seconds, summary.written / wall,
        cpu / summary.written, os.getloadavg()[0],
    )  # fmt: skip


def write_pngs(images: np.ndarray, folder: Path, copies: int) -> np.ndarray:
    folder.mkdir(parents=True)
    stacked = np.concatenate([images] * copies)
    for i, image in enumerate(stacked):
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(
            folder / f"{i:06d}.png"
        )
    return stacked


def row(name: str, value: str, target: str = "", met: bool | None = None) -> None:
    verdict = "" if met is None else ("met" if met else "MISSED")
    print(f"  {name:<52} {value:>14}   {target:<10} {verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", help="a cycleml image checkpoint or run folder")
    parser.add_argument(
        "--model", choices=("digits", "efficientnet_lite0"), default="digits",
        help="without --ckpt: the digits CNN, or EfficientNet-Lite0 (ImageNet weights, "
        "head fitted to photo crops)",
    )  # fmt: skip
    parser.add_argument(
        "--image-size", type=int, default=None, help="default 32 (digits), 224 (efficientnet)"
    )
    parser.add_argument(
        "--batches", default="1,8,32", help="batch sizes of the int8 vs fp32 comparison"
    )
    parser.add_argument("--turns", type=int, default=3, help="int8/fp32 turns per batch size")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="PyTorch and ORT threads")
    parser.add_argument("--batch", type=int, default=256, help="predict batch size")
    parser.add_argument("--decode-workers", type=int, default=2)
    parser.add_argument("--copies", type=int, default=3, help="copies of the digits on disk")
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="baseline + predict rounds")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    started = time.perf_counter()
    if args.ckpt:
        net, spec, classes, (val_x, val_y, all_images) = from_checkpoint(args.ckpt)
    elif args.model == "efficientnet_lite0":
        net, spec, classes, (val_x, val_y, all_images) = pretrained_photo_probe(
            args.image_size or 224
        )
    else:
        net, spec, classes, (val_x, val_y, all_images) = train_digits_cnn(
            args.image_size or 32, args.epochs
        )
    print(f"model ready in {time.perf_counter() - started:.0f} s; input {val_x.shape[1:]}")

    work = Path(tempfile.mkdtemp(prefix="cycleml-bench-"))
    bundle: ModelBundle = export_bundle(
        net, spec, classes, work / "bundle", val_inputs=val_x, val_labels=val_y,
        name="bench", version="1",
        # keep the int8 variant whatever it loses: the accuracy row below reports it
        settings=ExportSettings(quantize="int8", force=True),
    )  # fmt: skip
    meta = bundle.meta
    print(
        f"bundle: parity max |diff| {meta.verification['parity']['max_abs_diff']:.1e}, "
        f"val accuracy fp32 {100 * meta.metrics['bundle/val_acc']:.2f}%, "
        f"int8 {100 * meta.variants['int8'].accuracy:.2f}%"
    )

    torch.set_num_threads(args.threads)
    eager = ImageInferenceNet(net, spec["mean"], spec["std"]).eval()
    fp32 = Predictor(bundle, intra_op_threads=args.threads)
    int8 = Predictor(bundle, intra_op_threads=args.threads, precision="int8")

    def eager_run(batch: np.ndarray) -> object:
        with torch.inference_mode():
            return eager(torch.from_numpy(batch))

    one = val_x[:1]
    lat_eager = median_latency(lambda: eager_run(one), args.seconds)
    lat_ort = median_latency(lambda: fp32.run(one), args.seconds)
    tp_eager = throughput(eager_run, val_x, 32, args.seconds)
    batches = [int(b) for b in args.batches.split(",")]
    precision_turns = {
        b: int8_vs_fp32(fp32, int8, val_x, b, args.seconds, args.turns) for b in batches
    }
    acc_fp32 = float((fp32.run(val_x).argmax(1) == val_y).mean())
    acc_int8 = float((int8.run(val_x).argmax(1) == val_y).mean())

    print(f"\n{args.threads} thread(s), {len(val_x)} validation images; load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}")  # fmt: skip
    images = write_pngs(all_images, work / "images", args.copies) if args.rounds else val_x
    settings = PredictSettings(
        batch_size=args.batch, decode_workers=args.decode_workers, progress=False,
        intra_op_threads=args.threads,
    )  # fmt: skip
    load_before = os.getloadavg()[0]
    rounds = []
    for i in range(args.rounds):
        database = work / f"predictions-{i}.db"
        rounds.append(
            predict_round(fp32, bundle, images, work / "images", database, settings, args.seconds)
        )

    print("1. ONNX Runtime vs PyTorch eager (fp32)")
    row("latency batch 1, eager", f"{1e3 * lat_eager:.3f} ms")
    row("latency batch 1, ONNX Runtime", f"{1e3 * lat_ort:.3f} ms")
    row("speed-up at batch 1 (eager / ORT latency)", f"{lat_eager / lat_ort:.2f}x", ">= 2x",
        lat_eager / lat_ort >= 2)  # fmt: skip
    row("throughput batch 32, eager", f"{tp_eager:,.0f} rows/s")
    tp_ort = statistics.median(precision_turns.get(32, next(iter(precision_turns.values())))[0])
    row("throughput batch 32, ONNX Runtime", f"{tp_ort:,.0f} rows/s")
    row("speed-up at batch 32", f"{tp_ort / tp_eager:.2f}x")
    print(f"2. int8 vs fp32 (ONNX Runtime, {args.turns} alternating turns per batch size)")
    for b, (fp32_rates, int8_rates) in precision_turns.items():
        ratios = [i / f for f, i in zip(fp32_rates, int8_rates, strict=True)]
        row(f"batch {b}: fp32 / int8 rows/s (median of turns)",
            f"{statistics.median(fp32_rates):,.0f}/{statistics.median(int8_rates):,.0f}")  # fmt: skip
        ratio = statistics.median(ratios)
        row(f"batch {b}: int8 / fp32, turns {' '.join(f'{r:.2f}' for r in ratios)}",
            f"{ratio:.2f}x", ">= 1.3x", ratio >= 1.3)  # fmt: skip
    row("val accuracy fp32 / int8", f"{100 * acc_fp32:.2f}/{100 * acc_int8:.2f}%")
    drop = 100 * (acc_fp32 - acc_int8)
    row("accuracy lost by int8", f"{drop:.2f} points", "<= 1", drop <= 1.0)
    if rounds:
        predict_rows(rounds, args, load_before)
    shutil.rmtree(work, ignore_errors=True)


def predict_rows(rounds: list[PredictRound], args: argparse.Namespace, load_before: float) -> None:
    median = statistics.median(r.ratio for r in rounds)
    print(
        f"3. cycleml predict end to end (batch {args.batch}, {args.decode_workers} decoders; "
        f"{args.rounds} rounds, load average {load_before:.1f} before)"
    )
    for i, r in enumerate(rounds, 1):
        row(f"round {i}: ORT on decoded images / predict", f"{r.baseline:,.0f}/{r.predict:,.0f}",
            f"{r.ratio:.2f}, load {r.load:.1f}")  # fmt: skip
    row(
        "predict with start-up (median)",
        f"{statistics.median(r.predict_wall for r in rounds):,.0f} rows/s",
    )
    row("CPU per row: ORT alone / predict (median)",
        f"{1e6 * statistics.median(r.baseline_cpu for r in rounds):.0f}/"
        f"{1e6 * statistics.median(r.predict_cpu for r in rounds):.0f} us")  # fmt: skip
    row("end to end / in-process (median of rounds)", f"{median:.2f}", ">= 0.7", median >= 0.7)


if __name__ == "__main__":
    main()
