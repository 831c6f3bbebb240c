"""The model bundle: ``model.onnx`` + ``bundle.json`` (+ ``tokenizer.json`` for text).

``bundle.json`` is the one contract between training and inference. This module
holds its schema (:class:`BundleMeta`, written by ``cycleml.export`` and read by
everything downstream) and :func:`load_bundle`, which refuses a bundle whose files,
format version, opset or tensor shapes do not agree, naming what is wrong.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cycleml.errors import BundleError
from cycleml.inference.onnx_header import OnnxFormatError, read_onnx_header

FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = (1,)
META_FILE = "bundle.json"
MODEL_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
KINDS = ("image", "text")
INPUT_DTYPES = {"image": "uint8", "text": "int64"}
PRECISIONS = ("fp32", "int8", "fp16")


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output. ``shape[0] == -1`` is the dynamic batch axis."""

    name: str
    dtype: str
    shape: list[int]


@dataclass(frozen=True)
class ImagePreprocess:
    """Clients decode and resize to ``image_size`` (H, W) with ``channels`` channels;
    the graph does the scaling (``/255``), ``mean``/``std`` normalisation and layout.

    ``resize`` is the resampling filter (``bilinear``, ``bicubic``); ``resize_mode`` is
    ``stretch`` (the whole image) or ``shorter_side_crop`` (the centre ``crop_fraction``,
    aspect ratio kept), as :class:`~cycleml.inference.preprocess.ImagePreprocessor`
    applies them. Bundles written before these two fields stretch the whole image."""

    image_size: list[int]
    channels: int
    mean: list[float]
    std: list[float]
    resize: str = "bilinear"
    resize_mode: str = "stretch"
    crop_fraction: float = 1.0


@dataclass(frozen=True)
class TextPreprocess:
    """Texts become ``max_length`` token ids (truncated, padded with ``pad_id``)."""

    tokenizer_file: str
    max_length: int
    pad_id: int


@dataclass(frozen=True)
class Variant:
    """An extra precision of the model (``int8``, ``fp16``) and how it scored."""

    file: str
    accuracy: float
    accuracy_drop: float
    forced: bool = False
    method: str = ""


@dataclass(frozen=True)
class BundleMeta:
    """Everything in ``bundle.json``."""

    format_version: int
    kind: str
    name: str
    version: str
    class_names: list[str]
    input: TensorSpec
    output: TensorSpec
    preprocess: ImagePreprocess | TextPreprocess
    opset: int
    model_file: str = MODEL_FILE
    run_id: str | None = None
    fingerprint: str | None = None
    created_at: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    verification: dict[str, Any] = field(default_factory=dict)
    variants: dict[str, Variant] = field(default_factory=dict)
    reference: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    # monitoring (absent in older bundles): the graph's second output ``embedding``
    # ({"output", "dim", "source_dim", "projection", "explained_variance"}), the
    # temperature scaling of the probabilities, and the .npz reference sample
    embedding: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)
    monitoring_reference: str | None = None

    @property
    def embedding_spec(self) -> TensorSpec | None:
        """The ``embedding`` output's spec, or None for a bundle without one."""
        if not self.embedding:
            return None
        return TensorSpec(
            str(self.embedding["output"]), "float32", [-1, int(self.embedding["dim"])]
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = META_FILE) -> BundleMeta:
        """Parse and check ``bundle.json`` content; ``where`` names the file in errors."""
        if not isinstance(data, dict):
            raise BundleError(f"{where}: expected a JSON object, got {type(data).__name__}")
        version = data.get("format_version")
        if version not in SUPPORTED_FORMAT_VERSIONS:
            raise BundleError(
                f"{where}: unsupported format_version {version!r}; this cycleml reads "
                f"{', '.join(map(str, SUPPORTED_FORMAT_VERSIONS))} (re-export the model "
                "or install a matching cycleml)"
            )
        kind = _get(data, "kind", str, where)
        if kind not in KINDS:
            raise BundleError(f"{where}: kind={kind!r}, expected one of {', '.join(KINDS)}")
        class_names = _get(data, "class_names", list, where)
        if not class_names or not all(isinstance(c, str) for c in class_names):
            raise BundleError(f"{where}: class_names must be a non-empty list of strings")
        pre = _get(data, "preprocess", dict, where)
        try:
            preprocess: ImagePreprocess | TextPreprocess = (
                ImagePreprocess(**pre) if kind == "image" else TextPreprocess(**pre)
            )
            variants = {
                str(k): Variant(**v) for k, v in _get(data, "variants", dict, where, {}).items()
            }
            meta = cls(
                format_version=int(version),
                kind=kind,
                name=_get(data, "name", str, where),
                version=str(_get(data, "version", (str, int), where)),
                class_names=list(class_names),
                input=TensorSpec(**_get(data, "input", dict, where)),
                output=TensorSpec(**_get(data, "output", dict, where)),
                preprocess=preprocess,
                opset=_get(data, "opset", int, where),
                model_file=_get(data, "model_file", str, where, MODEL_FILE),
                run_id=data.get("run_id"),
                fingerprint=data.get("fingerprint"),
                created_at=data.get("created_at", ""),
                metrics=_get(data, "metrics", dict, where, {}),
                verification=_get(data, "verification", dict, where, {}),
                variants=variants,
                reference=_get(data, "reference", dict, where, {}),
                source=_get(data, "source", dict, where, {}),
                embedding=_get(data, "embedding", dict, where, {}),
                calibration=_get(data, "calibration", dict, where, {}),
                monitoring_reference=_get(data, "monitoring_reference", str, where, None),
            )
        except TypeError as err:  # unknown or missing keys in a nested object
            raise BundleError(f"{where}: malformed entry: {err}") from err
        meta.check_consistency(where)
        return meta

    def check_consistency(self, where: str = META_FILE) -> None:
        """Check the types of the nested entries, then that input spec, output spec,
        preprocessing and classes agree."""
        problems = self._type_problems()
        if problems:
            raise BundleError(f"{where}: " + "; ".join(problems))
        expected_dtype = INPUT_DTYPES[self.kind]
        spec = self.input
        if spec.dtype != expected_dtype:
            raise BundleError(
                f"{where}: input dtype {spec.dtype!r} does not fit a {self.kind} model "
                f"(expected {expected_dtype!r})"
            )
        rank = 4 if self.kind == "image" else 2
        if len(spec.shape) != rank or spec.shape[0] != -1 or min(spec.shape[1:]) < 1:
            raise BundleError(
                f"{where}: input shape {spec.shape} must be {rank}-d with a dynamic batch "
                "axis (-1) first and positive sizes after it"
            )
        pre = self.preprocess
        if isinstance(pre, ImagePreprocess):
            expected = [-1, *pre.image_size, pre.channels]
            if len(pre.mean) != pre.channels or len(pre.std) != pre.channels:
                raise BundleError(f"{where}: preprocess mean/std need {pre.channels} values")
        else:
            expected = [-1, pre.max_length]
        if list(spec.shape) != expected:
            raise BundleError(
                f"{where}: input shape {spec.shape} does not match the preprocessing "
                f"(expected {expected})"
            )
        if list(self.output.shape) != [-1, len(self.class_names)]:
            raise BundleError(
                f"{where}: output shape {self.output.shape} does not match "
                f"{len(self.class_names)} class names (expected [-1, {len(self.class_names)}])"
            )
        unknown = sorted(set(self.variants) - set(PRECISIONS[1:]))
        if unknown:
            raise BundleError(f"{where}: unknown precision variant(s) {unknown}")

    def _type_problems(self) -> list[str]:
        problems = []
        for role, spec in (("input", self.input), ("output", self.output)):
            if not (isinstance(spec.name, str) and isinstance(spec.dtype, str)):
                problems.append(f"{role} name and dtype must be strings")
            if not _integers(spec.shape):
                problems.append(f"{role} shape must be a list of integers, got {spec.shape!r}")
        pre = self.preprocess
        if isinstance(pre, ImagePreprocess):
            if not (_integers(pre.image_size) and len(pre.image_size) == 2):
                problems.append(f"preprocess image_size must be [H, W], got {pre.image_size!r}")
            if not (_integers([pre.channels]) and _numbers(pre.mean) and _numbers(pre.std)):
                problems.append("preprocess channels must be an integer, mean and std lists")
            from cycleml.inference.preprocess import check_resize

            problems.extend(
                f"preprocess {problem}"
                for problem in check_resize(pre.resize_mode, pre.crop_fraction, pre.resize)
            )
        elif not (_file_name(pre.tokenizer_file) and _integers([pre.max_length, pre.pad_id])):
            problems.append(
                "preprocess needs a tokenizer_file in the bundle folder and integer "
                "max_length and pad_id"
            )
        files = {"model_file": self.model_file}
        if self.monitoring_reference is not None:
            files["monitoring_reference"] = self.monitoring_reference
        if self.embedding and not (
            isinstance(self.embedding.get("output"), str) and _integers([self.embedding.get("dim")])
        ):
            problems.append("embedding needs an output name and an integer dim")
        temperature = self.calibration.get("temperature", 1.0)
        if not (_numbers([temperature]) and temperature > 0):
            problems.append(
                f"calibration temperature must be a positive number, got {temperature!r}"
            )
        files.update({f"variants.{p}.file": v.file for p, v in self.variants.items()})
        for key, file in files.items():
            if not _file_name(file):
                problems.append(f"{key} must name a file in the bundle folder, got {file!r}")
        for precision, variant in self.variants.items():
            if not _numbers([variant.accuracy, variant.accuracy_drop]):
                problems.append(f"variants.{precision} accuracy and accuracy_drop must be numbers")
        return problems


@dataclass(frozen=True)
class ModelBundle:
    """A validated bundle directory."""

    path: Path
    meta: BundleMeta

    @property
    def model_path(self) -> Path:
        return self.path / self.meta.model_file

    def variant_path(self, precision: str = "fp32") -> Path:
        """The ONNX file of a precision: ``fp32`` (the main model), ``int8`` or ``fp16``."""
        if precision == "fp32":
            return self.model_path
        if precision not in self.meta.variants:
            have = ", ".join(["fp32", *self.meta.variants])
            raise BundleError(
                f"bundle '{self.path}' has no {precision!r} variant (it has: {have}); "
                f"export with export.quantize=int8 or export.fp16=true"
            )
        return self.path / self.meta.variants[precision].file

    @property
    def tokenizer_path(self) -> Path | None:
        pre = self.meta.preprocess
        return self.path / pre.tokenizer_file if isinstance(pre, TextPreprocess) else None


def load_bundle(path: str | Path) -> ModelBundle:
    """Open and validate a bundle directory (or its ``bundle.json``).

    Raises :class:`BundleError` naming the problem: a missing directory or file,
    malformed JSON, an unsupported format version, or a ``model.onnx`` whose opset,
    input or output disagree with ``bundle.json``.
    """
    root = Path(path)
    if root.name == META_FILE and root.is_file():
        root = root.parent
    if not root.exists():
        raise BundleError(f"bundle not found: '{root}' does not exist")
    if not root.is_dir():
        raise BundleError(f"bundle '{root}' is a file; expected a directory with {META_FILE}")
    meta_path = root / META_FILE
    if not meta_path.is_file():
        raise BundleError(f"bundle '{root}' has no {META_FILE} (is this a bundle directory?)")
    try:
        data = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BundleError(f"{meta_path}: not valid JSON: {err}") from err
    meta = BundleMeta.from_dict(data, where=str(meta_path))
    bundle = ModelBundle(path=root, meta=meta)
    if bundle.tokenizer_path is not None and not bundle.tokenizer_path.is_file():
        raise BundleError(
            f"bundle '{root}' is missing its tokenizer file {bundle.tokenizer_path.name}"
        )
    for precision in ("fp32", *meta.variants):
        check_model_file(bundle.variant_path(precision), meta, precision)
    if meta.monitoring_reference and not (root / meta.monitoring_reference).is_file():
        raise BundleError(
            f"bundle '{root}' is missing its monitoring reference {meta.monitoring_reference}"
        )
    return bundle


def check_model_file(model_path: Path, meta: BundleMeta, precision: str = "fp32") -> None:
    """Check an ONNX file against ``meta``: opset, one input, the output, shapes, dtypes."""
    if not model_path.is_file():
        raise BundleError(f"bundle is missing its {precision} model file '{model_path}'")
    try:
        header = read_onnx_header(model_path)
    except OnnxFormatError as err:
        raise BundleError(f"'{model_path}' is not a valid ONNX model: {err}") from err
    if header.default_opset != meta.opset:
        raise BundleError(
            f"'{model_path}' uses opset {header.default_opset} but {META_FILE} says "
            f"{meta.opset}; the bundle is inconsistent, re-export it"
        )
    _check_tensor(model_path, "input", header.inputs, meta.input)
    _check_tensor(model_path, "output", header.outputs, meta.output)
    if meta.embedding_spec is not None:
        _check_tensor(model_path, "output", header.outputs, meta.embedding_spec)


def _check_tensor(model_path: Path, role: str, found: tuple, spec: TensorSpec) -> None:
    if role == "input" and len(found) != 1:
        raise BundleError(
            f"'{model_path}' has {len(found)} inputs ({', '.join(t.name for t in found)}); "
            "a bundle model takes exactly one"
        )
    by_name = {t.name: t for t in found}
    if spec.name not in by_name:
        raise BundleError(
            f"'{model_path}' has no {role} named {spec.name!r} "
            f"(it has: {', '.join(by_name) or 'none'})"
        )
    tensor = by_name[spec.name]
    if tensor.dtype != spec.dtype:
        raise BundleError(
            f"'{model_path}' {role} {spec.name!r} is {tensor.dtype}, {META_FILE} says {spec.dtype}"
        )
    if list(tensor.shape) != list(spec.shape):
        raise BundleError(
            f"'{model_path}' {role} {spec.name!r} has shape {list(tensor.shape)}, "
            f"{META_FILE} says {spec.shape}"
        )


_REQUIRED = object()


def _get(
    data: dict[str, Any],
    key: str,
    kind: type | tuple[type, ...],
    where: str,
    default: Any = _REQUIRED,
) -> Any:
    """``data[key]`` checked to be a ``kind``; a missing key is an error unless there is a
    ``default`` (null counts as missing for optional keys)."""
    if data.get(key) is None and default is not _REQUIRED:
        return default
    if key not in data:
        raise BundleError(f"{where}: missing required key '{key}'")
    value = data[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise BundleError(f"{where}: '{key}' has the wrong type ({type(value).__name__})")
    return value


def _integers(values: Any) -> bool:
    return isinstance(values, list) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in values
    )


def _numbers(values: Any) -> bool:
    return isinstance(values, list) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in values
    )


def _file_name(value: Any) -> bool:
    """A plain file name (no folder part), so a bundle never points outside itself."""
    return isinstance(value, str) and value not in ("", ".", "..") and Path(value).name == value
