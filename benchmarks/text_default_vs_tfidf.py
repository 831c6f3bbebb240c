#!/usr/bin/env python
"""Test accuracy of `experiment=text` against TF-IDF + logistic regression, several seeds.

Two tables: the demo reviews (``scripts/make_demo_text.py``, 6,000 rows, 2 classes)
and a generated 4-topic table (3,000 short texts whose topic word is ambiguous in a
share of them, 8 % label noise). Each seed sets both the split (``data.split_seed``)
and the training seed, so both models see the same split per seed and the spread
covers split and training noise. Deep and baseline runs alternate per seed.

    python benchmarks/text_default_vs_tfidf.py [--seeds 0,1,2] [--tables reviews,topics]
        [overrides for the deep model ...]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from cycleml.configs_path import config_dir
from cycleml.training.train import train

ROOT = Path(__file__).resolve().parents[1]
TOPICS = {
    "sports": ["match", "league", "coach", "goal", "season", "stadium"],
    "science": ["lab", "study", "physics", "genome", "telescope", "experiment"],
    "business": ["market", "shares", "profit", "startup", "merger", "bank"],
    "travel": ["flight", "beach", "passport", "tour", "island", "airport"],
}


def _demo_module():
    spec = importlib.util.spec_from_file_location(
        "make_demo_text", ROOT / "scripts/make_demo_text.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def topics_table(path: Path, rows: int = 3000, ambiguous: float = 0.4, noise: float = 0.08) -> Path:
    """Short reviews tagged with a topic word: from the label's topic, or (a share
    ``ambiguous``) from any topic; a share ``noise`` of labels is then redrawn."""
    demo = _demo_module()
    rng = random.Random(0)
    names = sorted(TOPICS)
    records = []
    for i, review in enumerate(demo.make_reviews(rows=rows, seed=1)):
        label = names[i % len(names)]
        source = rng.choice(names) if rng.random() < ambiguous else label
        text = f"{rng.choice(TOPICS[source])}: {review['text']}"
        if rng.random() < noise:
            label = rng.choice(names)
        records.append({"id": review["id"], "text": text, "label": label})
    return demo.write_table(records, path)


def reviews_table(path: Path) -> Path:
    demo = _demo_module()
    return demo.write_table(demo.make_reviews(), path)


def run(overrides: list[str], out: Path) -> tuple[dict[str, float], float]:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
        cfg.paths.log_dir = str(out / "logs")
        del cfg["hydra"]
    start = time.perf_counter()
    metrics = train(cfg)
    return metrics, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--tables", default="reviews,topics")
    parser.add_argument("--baseline", default="logreg", help="'' to skip the baseline")
    parser.add_argument("overrides", nargs="*", help="extra overrides for the deep model")
    args = parser.parse_args()
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    seeds = [int(s) for s in args.seeds.split(",")]
    common = ["experiment=text", "logger=csv", "callbacks.progress_bar=null", "torch_threads=1"]
    with tempfile.TemporaryDirectory() as tmp:
        tables = {
            "reviews": reviews_table(Path(tmp) / "reviews.csv"),
            "topics": topics_table(Path(tmp) / "topics.csv"),
        }
        for name in args.tables.split(","):
            results: dict[str, list[float]] = {"deep": [], args.baseline: []}
            times: list[float] = []
            for seed in seeds:
                split = [f"data.path={tables[name]}", f"seed={seed}", f"data.split_seed={seed}"]
                out = Path(tmp) / f"{name}-{seed}"
                deep, seconds = run([*common, *split, *args.overrides], out / "deep")
                results["deep"].append(deep["test/acc"])
                times.append(seconds)
                if args.baseline:
                    base, _ = run([*common, *split, f"model={args.baseline}"], out / "base")
                    results[args.baseline].append(base["test/acc"])
                print(json.dumps({"table": name, "seed": seed, "deep": deep["test/acc"],
                                  "base": results[args.baseline][-1] if args.baseline else None,
                                  "epochs": deep.get("epoch"), "seconds": round(seconds, 1)}),
                      flush=True)  # fmt: skip
            for model, accs in results.items():
                if accs:
                    print(
                        f"{name:8s} {model:8s} test acc mean {statistics.mean(accs):.4f} "
                        f"range {min(accs):.4f}-{max(accs):.4f} per seed {[round(a, 4) for a in accs]}",
                        flush=True,
                    )
            print(f"{name:8s} deep seconds per run {statistics.mean(times):.0f}", flush=True)


if __name__ == "__main__":
    main()
