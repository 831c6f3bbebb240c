"""What each config key accepts, checked right after Hydra composes the config.

Why a table and not Hydra structured configs: a structured-config schema is one
dataclass per group option (nine models, four data modules, five trainers, every
primary config), each yaml then needs a ``defaults: [schema]`` line, a dataclass
cannot say "a number > 0" or "an int, or a float in [0, 1]", and OmegaConf reports a
mismatch in several lines. Here one entry per key says what it accepts wherever the
key appears: a key missing from the composed config (another group option) is not
checked, so ``model.net.width`` applies to the CNN and is silent for a ResNet. The
yaml files stay plain, and the check runs before torch or Lightning are imported.

A wrong value is reported in one line naming the key, the value and what is expected:
``trainer.max_epochs='abc': expected an integer >= -1``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cycleml.errors import ConfigError


@dataclass(frozen=True)
class Rule:
    """What one key accepts: a predicate and its description for the error message."""

    expected: str
    accepts: Callable[[Any], bool]


def _bounds(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f" in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f" {'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f" {'<' if high_open else '<='} {high:g}"
    return ""


def _within(
    value: float, low: float | None, high: float | None, low_open: bool, high_open: bool
) -> bool:
    if low is not None and (value <= low if low_open else value < low):
        return False
    return high is None or (value < high if high_open else value <= high)


def integer(low: int | None = None, high: int | None = None) -> Rule:
    return Rule(
        f"an integer{_bounds(low, high, False, False)}",
        lambda v: (
            isinstance(v, int) and not isinstance(v, bool) and _within(v, low, high, False, False)
        ),
    )


def number(
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> Rule:
    return Rule(
        f"a number{_bounds(low, high, low_open, high_open)}",
        lambda v: (
            isinstance(v, (int, float))
            and not isinstance(v, bool)
            and _within(v, low, high, low_open, high_open)
        ),
    )


def positive() -> Rule:
    return number(0, low_open=True)


def fraction() -> Rule:
    """A share of something: a number in [0, 1)."""
    return number(0, 1, high_open=True)


def boolean() -> Rule:
    return Rule("true or false", lambda v: isinstance(v, bool))


def text(what: str = "a string") -> Rule:
    return Rule(what, lambda v: isinstance(v, str))


def choice(*values: Any) -> Rule:
    return Rule(
        "one of " + ", ".join(str(v) for v in values),
        lambda v: any(v == c and type(v) is type(c) for c in values),
    )


def optional(rule: Rule) -> Rule:
    return Rule(f"null or {rule.expected}", lambda v: v is None or rule.accepts(v))


def either(*rules: Rule) -> Rule:
    return Rule(", or ".join(r.expected for r in rules), lambda v: any(r.accepts(v) for r in rules))


def list_of(rule: Rule) -> Rule:
    return Rule(
        f"a non-empty list, each item {rule.expected}",
        lambda v: isinstance(v, list) and bool(v) and all(rule.accepts(x) for x in v),
    )


def _is_mapping(value: Any) -> bool:
    return isinstance(value, Mapping)


def _under(prefix: str, table: Mapping[str, Rule]) -> dict[str, Rule]:
    return {f"{prefix}.{key}": rule for key, rule in table.items()}


TRAINER = _under(
    "trainer",
    {
        "max_epochs": integer(-1),
        "min_epochs": optional(integer(0)),
        "accelerator": choice("cpu", "gpu", "cuda", "mps", "tpu", "auto"),
        "devices": either(integer(-1), list_of(integer(0)), text()),
        "num_nodes": integer(1),
        "strategy": text(),
        "precision": choice(
            "32-true",
            "32",
            32,
            "16-mixed",
            "16",
            16,
            "bf16-mixed",
            "bf16",
            "bf16-true",
            "16-true",
            "64-true",
            "64",
            64,
            "transformer-engine",
        ),  # fmt: skip
        "log_every_n_steps": integer(1),
        "check_val_every_n_epoch": optional(integer(1)),
        "deterministic": either(boolean(), choice("warn")),
        "enable_model_summary": boolean(),
        "num_sanity_val_steps": integer(-1),
        "limit_train_batches": optional(either(integer(0), number(0, 1))),
        "limit_val_batches": optional(either(integer(0), number(0, 1))),
        "limit_test_batches": optional(either(integer(0), number(0, 1))),
        "fast_dev_run": either(boolean(), integer(0)),
        "overfit_batches": either(integer(0), number(0, 1)),
        "detect_anomaly": boolean(),
        "gradient_clip_val": optional(number(0)),
        "accumulate_grad_batches": integer(1),
        "sync_batchnorm": boolean(),
    },
)

_IMAGE = {
    # null: an image folder chooses the size from its images
    "image_size": optional(either(integer(1), list_of(integer(1)))),
    "channels": choice(1, 3),
    "mean": list_of(number()),
    "std": list_of(positive()),
    "decode_workers": integer(0),
}
_TEXT = {
    "max_length": integer(1),
    "truncation": boolean(),
    "padding": choice("longest", "max_length"),
    "tokenizer.kind": choice("bpe", "wordpiece"),
    "tokenizer.vocab_size": integer(1),
    "tokenizer.min_frequency": integer(1),
    "tokenizer.lowercase": boolean(),
    "tokenizer.path": optional(text()),
}
DATA = _under(
    "data",
    {
        "path": text(),
        "batch_size": integer(1),
        "eval_batch_size": integer(1),
        "num_workers": integer(0),
        "val_fraction": fraction(),
        "test_fraction": fraction(),
        "split_seed": integer(),
        "augment_seed": optional(integer()),
        "format": optional(choice("csv", "tsv", "jsonl", "parquet")),
        "text_column": text(),
        "label_column": text(),
        "split_column": optional(text()),
        "id_column": optional(text()),
        "class_names": optional(list_of(either(text(), integer()))),
        "bad_rows": choice("error", "skip"),
        **_IMAGE,
        **_TEXT,
        # the former spelling (data.image.*): null unless a user still sets it
        **_under("image", {key: optional(rule) for key, rule in _IMAGE.items()}),
        **_under("text", _TEXT),
    },
)

MODEL = _under(
    "model",
    {
        "baseline": boolean(),
        "optimizer.lr": positive(),
        "optimizer.weight_decay": number(0),
        "scheduler.max_lr": positive(),
        "scheduler.pct_start": number(0, 1, low_open=True, high_open=True),
        "scheduler_interval": choice("step", "epoch"),
        "label_smoothing": fraction(),
        "compile": boolean(),
        "net.width": integer(1),
        "net.dropout": fraction(),
        "net.embed_dim": integer(1),
        "net.hidden_dim": integer(1),
        "net.channels": integer(1),
        "net.kernel_sizes": list_of(integer(1)),
        "net.d_model": integer(1),
        "net.num_heads": integer(1),
        "net.num_layers": integer(1),
        "net.ff_dim": integer(1),
        "net.freeze": boolean(),
        "net.small_input": boolean(),
        "net.name": text(),
        "net.weights_path": optional(text()),
        # scikit-learn baselines
        "C": positive(),
        "max_iter": integer(1),
        "class_weight": optional(either(choice("balanced"), Rule("a mapping", _is_mapping))),
        "tfidf.min_df": either(integer(1), fraction()),
        "tfidf.sublinear_tf": boolean(),
        "tfidf.ngram_range": list_of(integer(1)),
    },
)


CALLBACKS = _under(
    "callbacks",
    {
        "early_stopping.patience_fraction": number(0, 1),
        "early_stopping.min_patience": integer(0),
        "early_stopping.min_val_items": integer(0),
        "early_stopping.mode": choice("min", "max"),
        "early_stopping.min_delta": number(0),
        "model_checkpoint.mode": choice("min", "max"),
        "model_checkpoint.save_top_k": integer(-1),
        "progress_bar.refresh_rate": integer(0),
    },
)

TRAIN = {
    **TRAINER,
    **DATA,
    **MODEL,
    **CALLBACKS,
    "seed": optional(integer()),
    "train": boolean(),
    "test": boolean(),
    "ckpt_path": optional(text()),
    "torch_threads": optional(integer(1)),
    "optimized_metric": optional(text()),
}
CHECKPOINT = text("a .ckpt file or a training run folder")
EVAL = {
    **TRAINER,
    **DATA,
    "ckpt_path": CHECKPOINT,
    "split": choice("test", "val"),
    "num_errors": integer(0),
    "seed": optional(integer()),
}
EXPORT = {
    "ckpt_path": CHECKPOINT,
    **_under(
        "export",
        {
            "name": optional(text()),
            "version": optional(either(text(), integer(1))),
            "out_dir": optional(text()),
            "opset": integer(17),
            "tolerance": positive(),
            "parity_samples": integer(1),
            "quantize": optional(choice("int8")),
            "int8_method": choice("auto", "static", "dynamic"),
            "calibration_samples": integer(1),
            "fp16": boolean(),
            "max_accuracy_drop": number(0),
            "force": boolean(),
            "overwrite": boolean(),
            "batch_size": integer(1),
        },
    ),
}
PREDICT = {
    "bundle": text("a bundle folder (from cycleml export)"),
    "input": text("an image folder or a table file"),
    "db_url": text("an SQLAlchemy URL"),
    "shard": optional(text()),
    "batch_size": integer(1),
    "decode_workers": integer(0),
    "prefetch": integer(1),
    "top_k": integer(1),
    "text_field": text(),
    "image_field": text(),
    "key_field": optional(text()),
    "input_format": optional(choice("csv", "tsv", "jsonl", "parquet")),
    "precision": choice("fp32", "int8", "fp16"),
    "runtime.intra_op_threads": integer(0),
    "runtime.inter_op_threads": integer(0),
    "runtime.spin_wait": boolean(),
    "progress": boolean(),
    "monitoring.enabled": boolean(),
    "monitoring.db_url": optional(text("an SQLAlchemy URL")),
}
SERVE = {
    "path": text("a bundle folder or a model repository"),
    "host": text(),
    "port": integer(0, 65535),
    "workers": integer(1),
    "version_policy": choice("latest", "all"),
    "runtime.instances": integer(0),
    "runtime.intra_op_threads": integer(0),
    "runtime.inter_op_threads": integer(0),
    "runtime.decode_threads": integer(1),
    "runtime.gil_switch_interval_ms": number(0, low_open=True),
    "runtime.spin_wait": boolean(),
    "batching.max_batch_size": integer(1),
    "batching.max_queue_delay_ms": number(0),
    "batching.max_queue_size": integer(1),
    "limits.max_body_bytes": integer(1),
    "limits.max_inflight": integer(1),
    "limits.default_timeout_ms": positive(),
    "limits.max_timeout_ms": positive(),
    "limits.overload_status": choice(429, 503),
    "limits.retry_after_s": number(0),
    "limits.drain_timeout_s": number(0),
    "auth.enabled": boolean(),
    "reload.watch": boolean(),
    "reload.interval_s": positive(),
    "monitoring.enabled": boolean(),
    "monitoring.db_url": optional(text("an SQLAlchemy URL")),
    "monitoring.sample_rate": number(0, 1),
    "monitoring.buffer_rows": integer(1),
    "monitoring.buffer_bytes": integer(1),
    "monitoring.report_interval_s": optional(positive()),
    "monitoring.report_window": integer(1),
    "access_log": boolean(),
}
# `cycleml data gather | clean | diff`
_DATA_RUN = {"overwrite": boolean(), "workers": optional(integer(1)), "progress": boolean()}
DATA_GATHER = {**_DATA_RUN, "files": choice("copy", "hardlink", "symlink")}
DATA_DIFF = {"limit": integer(0)}
# `cycleml data clean`: the clean group's settings (CleanSettings checks them again)
_POLICY = choice("drop", "quarantine", "keep")
DATA_CLEAN = {
    **_DATA_RUN,
    **_under(
        "clean",
        {
            **{
                f"checks.{check}": _POLICY
                for check in (
                    "missing_label",
                    "empty_text",
                    "wrong_type",
                    "out_of_range",
                    "unreadable_image",
                    "too_small",
                    "exact_duplicate",
                    "near_duplicate",
                    "conflicting_label",
                    "leakage",
                )
            },
            "min_width": integer(1),
            "min_height": integer(1),
            "hamming": either(choice("auto"), integer(0, 63)),
            "files": choice("hardlink", "copy"),
            "examples": integer(0),
        },
    ),
}
COMPARE = {
    "folder": text("a folder of training runs or sweep trials"),
    "sort": optional(text("a metric name")),
    "ascending": boolean(),
    "out": optional(text("a CSV file")),
}
MONITOR = {
    "command": choice("report", "labels"),
    "ref": optional(text("a model: name, name/version or name@alias")),
    "db_url": text("an SQLAlchemy URL"),
    "format": choice("text", "json"),
    "input_format": optional(choice("csv", "tsv", "jsonl", "parquet")),
    **_under(
        "window",
        {
            "by": choice("count", "time"),
            "size": integer(1),
            "duration": text("a duration such as 1h, 30min or 1d"),
            "last": optional(integer(1)),
        },
    ),
    **_under(
        "drift",
        {
            "alpha": number(0, 1, low_open=True, high_open=True),
            "correction": choice("holm", "bonferroni"),
            "large_window": integer(1),
            "wasserstein_threshold": positive(),
            "jensenshannon_threshold": number(0, 1, low_open=True),
            "min_rows": integer(1),
            "mmd_reference_rows": integer(2),
            "mmd_window_rows": integer(2),
            "mmd_permutations": integer(1),
            "seed": integer(0),
        },
    ),
}
REGISTRY = {
    "root": text("a registry folder"),
    "db_url": optional(text("an SQLAlchemy URL")),
    "format": choice("table", "json"),
    "description": text(),
    "tags": Rule("a mapping of tag names to values", _is_mapping),
    "all": boolean(),
    "reason": text(),
}
_SHARE = number(0, 1, low_open=True, high_open=True)
AB = {
    "db_url": text("an SQLAlchemy URL"),
    "format": choice("text", "json"),
    "note": text(),
    "mode": choice("split", "shadow"),
    "out": text("a folder"),
    "metric.event": text("an event name (conversion, click, ...) or accuracy"),
    "metric.per": choice("unit", "request"),
    "metric.higher_is_better": boolean(),
    "alpha": _SHARE,
    "test": choice("sequential", "fixed"),
    "min_effect": _SHARE,
    "power": _SHARE,
    "sequential.tau": optional(positive()),
    "srm_alpha": _SHARE,
    "control": text("an arm name"),
    "bucket": optional(text("a duration such as 1h or 15min")),
    "guardrails.error_status": integer(100, 599),
    "guardrails.max_error_rate_increase": number(0),
    "guardrails.max_p99_latency_increase": number(0),
}
PIPELINE = {
    **TRAIN,
    **{
        k: v
        for k, v in EXPORT.items()
        if k.startswith("export.")
        and k not in ("export.name", "export.version", "export.out_dir", "export.overwrite")
    },
    **{k: v for k, v in DATA_GATHER.items() if k != "overwrite"},
    **{k: v for k, v in DATA_CLEAN.items() if k.startswith("clean.")},
    **{f"monitor.{k}": v for k, v in MONITOR.items() if k.startswith(("window.", "drift."))},
    "monitor.db_url": text("an SQLAlchemy URL"),
    "registry.root": text("a registry folder"),
    "registry.db_url": optional(text("an SQLAlchemy URL")),
    "name": text("a model name"),
    "trigger": choice("always", "drift", "labels"),
    "min_new_labels": integer(0),
    "promote": boolean(),
    "resume": boolean(),
    "stop_after": optional(
        choice("gather", "clean", "train", "evaluate", "export", "register", "gate")
    ),
}

# primary config name -> what its keys accept
SCHEMAS: dict[str, dict[str, Rule]] = {
    "train": TRAIN,
    "eval": EVAL,
    "export": EXPORT,
    "predict": PREDICT,
    "serve": SERVE,
    "data_gather": DATA_GATHER,
    "data_clean": DATA_CLEAN,
    "data_diff": DATA_DIFF,
    "compare": COMPARE,
    "monitor": MONITOR,
    "registry": REGISTRY,
    "ab": AB,
    "pipeline": PIPELINE,
}


def check_config(cfg: DictConfig, config_name: str) -> None:
    """Raise a :class:`ConfigError` naming the first key whose value ``cfg`` gets wrong."""
    for key, rule in SCHEMAS.get(config_name, {}).items():
        parent_key, _, leaf = key.rpartition(".")
        try:
            parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
            if not isinstance(parent, DictConfig) or leaf not in parent.keys():  # noqa: SIM118 (`in` skips missing values)
                continue  # not part of this group option
            if OmegaConf.is_missing(parent, leaf):
                raise ConfigError(f"{key} is required: {rule.expected}")
            node = parent[leaf]
            value = (
                OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
            )
        except OmegaConfBaseException as err:
            raise ConfigError(f"{key}: {_first_line(err)}") from None
        if not rule.accepts(value):
            raise ConfigError(f"{key}={value!r}: expected {rule.expected}")


def check_sweep_values(overrides: list[str], config_name: str) -> None:
    """Check every value of a multirun's choice sweeps (``model.optimizer.lr=1e-3,-1``)
    before the first job starts."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep

    rules = SCHEMAS.get(config_name, {})
    for override in OverridesParser.create().parse_overrides(overrides):
        rule = rules.get(override.key_or_group)
        sweep = override.value()
        if rule is None or not isinstance(sweep, ChoiceSweep):
            continue
        for value in sweep.list:
            if not rule.accepts(value):
                raise ConfigError(f"{override.key_or_group}={value!r}: expected {rule.expected}")


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
