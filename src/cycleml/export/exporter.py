"""``export_bundle``: network + data spec + validation data → a verified model bundle.

The bundle is assembled in a temporary folder next to ``out_dir`` and moved into
place only after every check has passed, so a failed export leaves nothing behind
that ``load_bundle`` could mistake for a model.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

import cycleml
from cycleml.errors import BundleError, ConfigError
from cycleml.export.embedding import (
    EMBEDDING_OUTPUT,
    MAX_EMBEDDING_DIM,
    MonitoredInferenceNet,
    embedding_parity,
    fit_projection,
    monitored_module,
    split_network,
    torch_outputs,
)
from cycleml.export.graph import ImageInferenceNet, TextInferenceNet
from cycleml.export.onnx_export import OUTPUT_NAME, export_onnx
from cycleml.export.precision import convert_fp16, quantize_int8, resolve_int8_method
from cycleml.export.verify import (
    ExportVerificationError,
    accuracy,
    compare_probabilities,
    onnx_output,
    onnx_probabilities,
    torch_probabilities,
)
from cycleml.inference.bundle import (
    FORMAT_VERSION,
    META_FILE,
    MODEL_FILE,
    TOKENIZER_FILE,
    BundleMeta,
    ImagePreprocess,
    ModelBundle,
    TensorSpec,
    TextPreprocess,
    Variant,
    load_bundle,
)
from cycleml.inference.reference import reference_statistics
from cycleml.monitoring.calibration import fit_temperature
from cycleml.monitoring.reference import (
    MAX_REFERENCE_ROWS,
    REFERENCE_FILE,
    build_reference_sample,
    save_reference_sample,
)
from cycleml.umask import as_if_created

log = logging.getLogger(__name__)

INPUT_NAMES = {"image": "pixels", "text": "input_ids"}


@dataclass(frozen=True)
class ExportSettings:
    """The ``export`` config group."""

    opset: int = 18
    # parity: max |p_torch - p_onnx| over this many validation samples
    tolerance: float = 1e-4
    parity_samples: int = 512
    # precision variants: quantize=int8, fp16=true
    quantize: str | None = None
    int8_method: str = "auto"
    calibration_samples: int = 256
    fp16: bool = False
    # accuracy points (0-100) a variant may lose against fp32 on the validation split
    max_accuracy_drop: float = 1.0
    force: bool = False
    overwrite: bool = False
    batch_size: int = 256
    # monitoring: a second graph output ``embedding`` (penultimate features → PCA) of at
    # most embedding_dim dims, and a reference sample of this many validation rows
    embedding: bool = True
    embedding_dim: int = MAX_EMBEDDING_DIM
    reference_rows: int = MAX_REFERENCE_ROWS

    def __post_init__(self) -> None:
        if self.quantize not in (None, "int8"):
            raise ConfigError(f"export.quantize={self.quantize!r}: expected null or int8")
        positive = (
            self.tolerance, self.parity_samples, self.calibration_samples, self.batch_size,
            self.embedding_dim, self.reference_rows,
        )  # fmt: skip
        if min(positive) <= 0:
            raise ConfigError(
                "export.tolerance, parity_samples, calibration_samples, batch_size, "
                "embedding_dim and reference_rows must be positive"
            )


def export_bundle(
    net: nn.Module,
    data_spec: Mapping[str, Any],
    class_names: Sequence[str],
    out_dir: str | Path,
    *,
    val_inputs: np.ndarray,
    val_labels: np.ndarray,
    name: str = "model",
    version: str | None = None,
    run_id: str | None = None,
    metrics: Mapping[str, float] | None = None,
    source: Mapping[str, Any] | None = None,
    settings: ExportSettings | None = None,
) -> ModelBundle:
    """Export ``net`` (logits) as a verified bundle in ``out_dir`` and return it loaded.

    ``data_spec`` is the checkpoint's (``kind``, image ``image_size``/``channels``/
    ``mean``/``std`` or text ``tokenizer_json``/``max_length``/``pad_id``,
    ``fingerprint``). ``val_inputs`` are validation samples in the bundle's input
    format (uint8 NHWC pixels or int64 token ids) with their ``val_labels``.
    """
    settings = settings or ExportSettings()
    kind = data_spec.get("kind")
    if kind not in INPUT_NAMES:
        raise ConfigError(f"data_spec kind={kind!r}: expected 'image' or 'text'")
    out = Path(out_dir)
    check_target(out, settings.overwrite)
    input_spec, preprocess = _input_spec(kind, data_spec)
    _check_validation_data(val_inputs, val_labels, input_spec, len(class_names))

    module = _inference_module(kind, net, data_spec, val_inputs, settings)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    as_if_created(staging, directory=True)  # mkdtemp's 0700 would make the bundle private
    try:
        meta = _build(
            module, kind, input_spec, preprocess, class_names, staging,
            val_inputs=val_inputs, val_labels=val_labels, data_spec=data_spec,
            name=name, version=version, run_id=run_id, metrics=metrics, source=source,
            settings=settings,
        )  # fmt: skip
        (staging / META_FILE).write_text(_to_json(meta), encoding="utf-8")
        load_bundle(staging)  # the bundle must pass the reader's checks too
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    log.info("bundle %s %s written to %s", meta.name, meta.version, out)
    return load_bundle(out)


def check_target(out_dir: Path, overwrite: bool) -> None:
    """Refuse to replace a non-empty bundle folder unless ``overwrite``."""
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise BundleError(
            f"bundle folder '{out_dir}' already exists and is not empty; choose another "
            "export.out_dir or set export.overwrite=true"
        )


def _build(
    module: nn.Module | MonitoredInferenceNet,
    kind: str,
    input_spec: TensorSpec,
    preprocess: ImagePreprocess | TextPreprocess,
    class_names: Sequence[str],
    folder: Path,
    *,
    val_inputs: np.ndarray,
    val_labels: np.ndarray,
    data_spec: Mapping[str, Any],
    name: str,
    version: str | None,
    run_id: str | None,
    metrics: Mapping[str, float] | None,
    source: Mapping[str, Any] | None,
    settings: ExportSettings,
) -> BundleMeta:
    model_path = folder / MODEL_FILE
    example = torch.from_numpy(np.ascontiguousarray(val_inputs[: min(2, len(val_inputs))]))
    monitored = isinstance(module, MonitoredInferenceNet)
    extra = (EMBEDDING_OUTPUT,) if monitored else ()
    export_onnx(module, example, model_path, input_spec.name, settings.opset, extra)

    # ONNX Runtime on the whole validation split: parity on the first parity_samples,
    # accuracy and reference statistics on all of it
    probabilities = onnx_probabilities(model_path, input_spec.name, val_inputs, settings.batch_size)
    sample = val_inputs[: settings.parity_samples]
    embeddings = None
    if monitored:
        torch_probs, torch_embeddings = torch_outputs(module, sample, settings.batch_size)
        embeddings = onnx_output(
            model_path, input_spec.name, val_inputs, EMBEDDING_OUTPUT, settings.batch_size
        )
    else:
        torch_probs = torch_probabilities(module, sample, settings.batch_size)
    parity = compare_probabilities(torch_probs, probabilities[: len(sample)], settings.tolerance)
    log.info(
        "parity on %d samples: max |diff| %.2e (tolerance %.0e), argmax agreement %.2f%%",
        parity.samples, parity.max_abs_diff, parity.tolerance, 100 * parity.argmax_agreement,
    )  # fmt: skip
    if not parity.passed:
        raise ExportVerificationError(
            f"ONNX Runtime disagrees with PyTorch on {parity.samples} validation samples: "
            f"max |diff| of probabilities {parity.max_abs_diff:.3g} (allowed "
            f"{parity.tolerance:.0e}), argmax agreement {100 * parity.argmax_agreement:.2f}% "
            "(required 100%)"
        )

    verification: dict[str, Any] = {
        "onnx_checker": "full",
        "parity": parity.to_dict(),
        "val_samples": int(len(val_inputs)),
    }
    embedding_meta: dict[str, Any] = {}
    if embeddings is not None:
        emb_parity = embedding_parity(
            torch_embeddings, embeddings[: len(sample)], settings.tolerance
        )
        verification["embedding_parity"] = emb_parity
        if not emb_parity["passed"]:
            raise ExportVerificationError(
                f"ONNX Runtime disagrees with PyTorch on the embedding of {len(sample)} "
                f"validation samples: max |diff| {emb_parity['max_abs_diff']:.3g} (allowed "
                f"{settings.tolerance:.0e} x scale {emb_parity['scale']:.3g})"
            )
        projection = module.components.shape
        embedding_meta = {
            "output": EMBEDDING_OUTPUT,
            "dim": int(projection[1]),
            "source_dim": int(projection[0]),
            "source": "penultimate features (input of the final linear layer)",
            "projection": "pca",
            "explained_variance": float(getattr(module, "explained_variance", 0.0)),
        }
    pad_id = preprocess.pad_id if isinstance(preprocess, TextPreprocess) else 0
    reference_sample = build_reference_sample(
        kind, val_inputs, probabilities, val_labels, embeddings, pad_id, settings.reference_rows
    )
    save_reference_sample(reference_sample, folder / REFERENCE_FILE)

    fp32_accuracy = accuracy(probabilities, val_labels)
    variants = _variants(
        kind, model_path, input_spec.name, fp32_accuracy, val_inputs, val_labels, settings
    )

    if isinstance(preprocess, TextPreprocess):
        (folder / TOKENIZER_FILE).write_text(str(data_spec["tokenizer_json"]), encoding="utf-8")
    all_metrics = {str(k): float(v) for k, v in (metrics or {}).items()}
    all_metrics["bundle/val_acc"] = fp32_accuracy
    for precision, variant in variants.items():
        all_metrics[f"bundle/val_acc_{precision}"] = variant.accuracy
    return BundleMeta(
        format_version=FORMAT_VERSION,
        kind=kind,
        name=name,
        version=version or dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S"),
        class_names=[str(c) for c in class_names],
        input=input_spec,
        output=TensorSpec(OUTPUT_NAME, "float32", [-1, len(class_names)]),
        preprocess=preprocess,
        opset=settings.opset,
        model_file=MODEL_FILE,
        run_id=run_id,
        fingerprint=data_spec.get("fingerprint"),
        created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        metrics=all_metrics,
        verification=verification,
        variants=variants,
        reference=reference_statistics(kind, val_inputs, probabilities, val_labels, pad_id),
        source={
            **dict(source or {}),
            "exporter": "torch.onnx.export(dynamo=True)",
            "torch_version": torch.__version__,
            "onnx_version": onnx.__version__,
            "cycleml_version": cycleml.__version__,
        },
        embedding=embedding_meta,
        calibration=fit_temperature(probabilities, val_labels),
        monitoring_reference=REFERENCE_FILE,
    )


def _variants(
    kind: str,
    model_path: Path,
    input_name: str,
    fp32_accuracy: float,
    val_inputs: np.ndarray,
    val_labels: np.ndarray,
    settings: ExportSettings,
) -> dict[str, Variant]:
    """Build, score and accept or refuse the requested precision variants."""
    requested: list[tuple[str, str]] = []
    if settings.quantize == "int8":
        requested.append(("int8", resolve_int8_method(settings.int8_method, kind)))
    if settings.fp16:
        requested.append(("fp16", "float16"))
    variants: dict[str, Variant] = {}
    for precision, method in requested:
        path = model_path.with_name(f"model.{precision}.onnx")
        if precision == "int8":
            calibration = val_inputs[: settings.calibration_samples]
            quantize_int8(model_path, path, method, input_name, calibration)
        else:
            convert_fp16(model_path, path)
        score = accuracy(
            onnx_probabilities(path, input_name, val_inputs, settings.batch_size), val_labels
        )
        drop = 100.0 * (fp32_accuracy - score)
        log.info(
            "%s variant: val accuracy %.2f%% (fp32 %.2f%%, drop %.2f points)",
            precision, 100 * score, 100 * fp32_accuracy, drop,
        )  # fmt: skip
        if drop > settings.max_accuracy_drop and not settings.force:
            raise ExportVerificationError(
                f"the {precision} variant loses {drop:.2f} accuracy points on the validation "
                f"split ({100 * fp32_accuracy:.2f}% -> {100 * score:.2f}%), more than "
                f"export.max_accuracy_drop={settings.max_accuracy_drop}; set export.force=true "
                "to keep it anyway"
            )
        variants[precision] = Variant(
            file=path.name,
            accuracy=score,
            accuracy_drop=drop,
            forced=drop > settings.max_accuracy_drop,
            method=method,
        )
    return variants


def _inference_module(
    kind: str,
    net: nn.Module,
    data_spec: Mapping[str, Any],
    val_inputs: np.ndarray,
    settings: ExportSettings,
) -> nn.Module | MonitoredInferenceNet:
    """The graph to export: with the ``embedding`` output when the network splits
    before its head (PCA fitted on the validation split), else probabilities only."""
    net = net.cpu().eval()
    check = val_inputs[: settings.parity_samples]
    split = split_network(kind, net, data_spec, check) if settings.embedding else None
    if split is None:
        if kind == "image":
            return ImageInferenceNet(net, data_spec["mean"], data_spec["std"]).eval()
        return TextInferenceNet(net).eval()
    projection = fit_projection(
        split.features(val_inputs, settings.batch_size), settings.embedding_dim
    )
    module = monitored_module(split, projection)
    module.explained_variance = float(projection.explained_variance_ratio_.sum())
    log.info(
        "embedding: %d penultimate features -> %d PCA dims (%.1f%% of the variance)",
        projection.n_features_in_, projection.n_components_, 100 * module.explained_variance,
    )  # fmt: skip
    return module


def _input_spec(
    kind: str, data_spec: Mapping[str, Any]
) -> tuple[TensorSpec, ImagePreprocess | TextPreprocess]:
    try:
        if kind == "image":
            size = data_spec["image_size"]
            height, width = (size, size) if isinstance(size, int) else (size[0], size[1])
            channels = int(data_spec["channels"])
            pre: ImagePreprocess | TextPreprocess = ImagePreprocess(
                image_size=[int(height), int(width)],
                channels=channels,
                mean=[float(m) for m in data_spec["mean"]],
                std=[float(s) for s in data_spec["std"]],
                # checkpoints from before these settings stretched with the bilinear filter
                resize=str(data_spec.get("interpolation", "bilinear")),
                resize_mode=str(data_spec.get("resize_mode", "stretch")),
                crop_fraction=float(data_spec.get("crop_fraction", 1.0)),
            )
            return TensorSpec("pixels", "uint8", [-1, int(height), int(width), channels]), pre
        max_length = int(data_spec["max_length"])
        pre = TextPreprocess(TOKENIZER_FILE, max_length, int(data_spec["pad_id"]))
        if not data_spec.get("tokenizer_json"):
            raise ConfigError("data_spec of a text model has no tokenizer_json")
        return TensorSpec("input_ids", "int64", [-1, max_length]), pre
    except KeyError as err:
        raise ConfigError(f"data_spec of a {kind} model lacks {err}") from err


def _check_validation_data(
    inputs: np.ndarray, labels: np.ndarray, spec: TensorSpec, num_classes: int
) -> None:
    if len(inputs) == 0:
        raise ConfigError("export needs validation samples to verify the model; got none")
    if inputs.dtype != np.dtype(spec.dtype) or list(inputs.shape[1:]) != spec.shape[1:]:
        raise ConfigError(
            f"validation inputs are {inputs.dtype} {tuple(inputs.shape)}, expected "
            f"{spec.dtype} (N, {', '.join(map(str, spec.shape[1:]))})"
        )
    if labels.shape != (len(inputs),):
        raise ConfigError(f"validation labels have shape {labels.shape}, expected ({len(inputs)},)")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ConfigError(f"validation labels fall outside 0..{num_classes - 1}")


def _to_json(meta: BundleMeta) -> str:
    return json.dumps(meta.to_dict(), indent=2) + "\n"
