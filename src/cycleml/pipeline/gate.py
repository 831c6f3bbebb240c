"""The gate: champion and challenger bundles scored on the same holdouts, through
ONNX Runtime exactly as they are served, and judged by the rules in config.

Rules (``configs/pipeline/gate/default.yaml``, :class:`GateRules`):

* ``min_accuracy`` — the challenger's accuracy on the new data's holdout (a fraction);
* ``min_delta`` — accuracy points the challenger must gain over the champion on the
  new data's holdout (negative: it may lose that many); on the champion's own
  holdout too when ``max_regression`` is null;
* ``max_recall_drop`` — points any class's recall may lose against the champion, on
  every holdout;
* ``max_regression`` — points the challenger may lose against the champion on the
  champion's own holdout;
* ``max_quantized_drop`` — points the challenger's int8 variant (when exported) may
  score below its fp32 model, on every holdout.

A first run (no champion) is judged by the floor and the int8 rule only. Every failed
rule is a reason naming the rule, the holdout and the figures.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cycleml.errors import ConfigError, CycleMLError
from cycleml.pipeline.holdout import CHAMPION_DATA, NEW, Holdout
from cycleml.registry.model_registry import Registry
from cycleml.registry.records import Evaluation
from cycleml.registry.text import format_decision

log = logging.getLogger(__name__)

DECISION_JSON = "gate.json"
DECISION_TEXT = "gate.txt"
QUANTIZED = "int8"
_BATCH = 256
# figures equal to the limit pass: accuracies are ratios of counts, compared in points
_EPS = 1e-9


class GateFailed(CycleMLError):
    """The challenger did not pass the gate; ``decision`` says why."""

    def __init__(self, decision: GateDecision) -> None:
        super().__init__(f"gate failed for {decision.challenger}: " + "; ".join(decision.reasons))
        self.decision = decision


class _RulesSchema(BaseModel):
    """Validation of the rules: unknown keys and out-of-range values are errors."""

    model_config = ConfigDict(extra="forbid", strict=False)

    min_accuracy: float = Field(0.9, ge=0.0, le=1.0)
    min_delta: float = Field(0.0, ge=-100.0, le=100.0)
    max_recall_drop: float | None = Field(5.0, ge=0.0, le=100.0)
    max_regression: float | None = Field(1.0, ge=0.0, le=100.0)
    max_quantized_drop: float | None = Field(None, ge=0.0, le=100.0)


@dataclass
class GateRules:
    """The gate's rules. ``min_accuracy`` is a fraction (0.9 = 90 %); the others are
    accuracy or recall points (1.0 = one percentage point). None turns a rule off."""

    min_accuracy: float = 0.9
    min_delta: float = 0.0
    max_recall_drop: float | None = 5.0
    max_regression: float | None = 1.0
    max_quantized_drop: float | None = None

    def __post_init__(self) -> None:
        checked = _validate(asdict(self), "GateRules")
        for key, value in checked.items():
            setattr(self, key, value)

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | Any | None) -> GateRules:
        """Rules from a config node (``pipeline.gate``); missing keys keep their
        defaults, an unknown key or an out-of-range value is a :class:`ConfigError`."""
        if config is None:
            return cls()
        if not isinstance(config, Mapping):
            from omegaconf import DictConfig, OmegaConf

            if not isinstance(config, DictConfig):
                raise ConfigError(
                    f"gate rules must be a mapping of rule: value, got {type(config).__name__}"
                )
            config = OmegaConf.to_container(config, resolve=True)
        return cls(**_validate(dict(config), "gate"))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _validate(values: dict[str, Any], where: str) -> dict[str, Any]:
    try:
        return _RulesSchema(**values).model_dump()
    except ValidationError as err:
        known = ", ".join(f.name for f in fields(GateRules))
        problems = []
        for error in err.errors():
            key = ".".join(str(p) for p in error["loc"]) or "rules"
            if error["type"] == "extra_forbidden":
                problems.append(f"{where}.{key} is not a gate rule (rules: {known})")
            else:
                problems.append(f"{where}.{key}={error.get('input')!r}: {error['msg'].lower()}")
        raise ConfigError("; ".join(problems)) from None


@dataclass
class Score:
    """How one model (or variant) did on one holdout."""

    accuracy: float
    recall: dict[str, float]
    support: dict[str, int]
    n: int
    predictions: list[str] = field(repr=False, default_factory=list)


@dataclass
class GateDecision:
    """The gate's verdict and the figures that led to it.

    ``table`` has one row per (holdout, model/variant): ``holdout``, ``role``,
    ``model`` (challenger/champion), ``ref``, ``precision``, ``n``, ``accuracy``,
    ``recall`` ({class: recall}) and ``support`` ({class: items})."""

    passed: bool
    reasons: list[str]
    table: list[dict[str, Any]]
    challenger: str
    champion: str | None
    rules: dict[str, Any] = field(default_factory=dict)
    holdouts: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    decided_at: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GateDecision:
        """A decision read back from ``gate.json`` or a registry evaluation."""
        known = {f.name for f in fields(cls)}
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as err:
            raise ConfigError(f"not a gate decision: {err}") from None

    def summary(self) -> str:
        """One line: passed, or failed with every reason."""
        if self.passed:
            return f"gate passed: {self.challenger} " + (
                f"against {self.champion}" if self.champion else "(no champion yet)"
            )
        return f"gate failed: {self.challenger}: " + "; ".join(self.reasons)

    def format(self) -> str:
        """The decision as text: verdict, reasons, rules, the table."""
        return format_decision(self.to_dict())


def score(bundle: Path | Any, holdout: Holdout, precision: str = "fp32", threads: int = 0) -> Score:
    """Accuracy and per-class recall of a bundle (a folder or a loaded ``Predictor``) on
    a holdout, through ONNX Runtime with the serving path's preprocessing."""
    from cycleml.inference.predictor import Predictor
    from cycleml.training.evaluate import per_class_report

    predictor = (
        bundle
        if isinstance(bundle, Predictor)
        else Predictor(bundle, precision=precision, warmup=False, intra_op_threads=threads)
    )
    if predictor.kind != holdout.kind:
        raise ConfigError(
            f"holdout '{holdout.name}' holds {holdout.kind} data but "
            f"{predictor.bundle.path} is a {predictor.kind} model"
        )
    predicted: list[str] = []
    for start in range(0, len(holdout.inputs), _BATCH):
        chunk = holdout.inputs[start : start + _BATCH]
        batch = _batch(predictor, chunk)
        ids = predictor.run(batch).argmax(axis=1)
        predicted += [predictor.class_names[i] for i in ids.tolist()]
    # class ids over the model's classes, then any the holdout has that the model lacks
    names = list(predictor.class_names)
    names += sorted(set(holdout.labels) - set(names))
    index = {name: i for i, name in enumerate(names)}
    y_true = np.asarray([index[label] for label in holdout.labels])
    y_pred = np.asarray([index[label] for label in predicted])
    report = per_class_report(y_true, y_pred, names)
    present = {row["class"]: row for row in report if row["support"] > 0}
    return Score(
        accuracy=float((y_true == y_pred).mean()),
        recall={name: row["recall"] for name, row in present.items()},
        support={name: row["support"] for name, row in present.items()},
        n=len(y_true),
        predictions=predicted,
    )


def _batch(predictor: Any, items: list[Any]) -> np.ndarray:
    if predictor.kind == "text":
        return predictor.preprocess_texts([str(t) for t in items])
    shape = tuple(predictor.input_shape[1:])
    arrays = [
        item
        if isinstance(item, np.ndarray) and item.shape == shape and item.dtype == np.uint8
        else predictor.preprocess_image(item)
        for item in items
    ]
    return np.stack(arrays)


def run_gate(
    challenger: Path,
    champion: Path | None,
    holdouts: list[Holdout],
    rules: GateRules,
    challenger_ref: str,
    champion_ref: str | None,
    threads: int = 0,
) -> GateDecision:
    """Score challenger (fp32, and its int8 variant when exported) and champion on
    every holdout and judge the figures by ``rules``. ``champion`` None (a first run):
    passes when the floor (and the int8 rule) holds. The holdouts are the new data's
    (role ``new``, at least one) and, when reachable, the champion's own (see
    :func:`~cycleml.pipeline.holdout.gate_holdouts`). ``threads``: ONNX Runtime's
    intra-op threads (0: its choice)."""
    from cycleml.inference.bundle import load_bundle
    from cycleml.inference.predictor import Predictor

    if not any(h.role == NEW for h in holdouts):
        raise ConfigError("the gate needs the new data's holdout (a Holdout with role 'new')")
    rules = rules if isinstance(rules, GateRules) else GateRules.from_config(rules)
    notes: list[str] = []
    models: list[tuple[str, str, str, Any]] = []  # (model, ref, precision, predictor)
    challenger_bundle = load_bundle(challenger)
    models.append(("challenger", challenger_ref, "fp32", challenger_bundle))
    if QUANTIZED in challenger_bundle.meta.variants:
        models.append(("challenger", challenger_ref, QUANTIZED, challenger_bundle))
    elif rules.max_quantized_drop is not None:
        notes.append(f"{challenger_ref} has no int8 variant: max_quantized_drop not applied")
    if champion is not None:
        models.append(("champion", champion_ref or str(champion), "fp32", load_bundle(champion)))
    else:
        notes.append("no champion: only the floor and the int8 rule apply")
    if champion is not None and not any(h.role == CHAMPION_DATA for h in holdouts):
        notes.append(
            "the champion's own holdout is not reachable (or is the new data's): "
            "max_regression not applied"
        )

    scores: dict[tuple[str, str, str], Score] = {}
    table: list[dict[str, Any]] = []
    for model, ref, precision, bundle in models:
        predictor = Predictor(bundle, precision=precision, warmup=False, intra_op_threads=threads)
        for holdout in holdouts:
            result = score(predictor, holdout)
            scores[(holdout.name, model, precision)] = result
            table.append(
                {
                    "holdout": holdout.name,
                    "role": holdout.role,
                    "model": model,
                    "ref": ref,
                    "precision": precision,
                    "n": result.n,
                    "accuracy": result.accuracy,
                    "recall": result.recall,
                    "support": result.support,
                }
            )
    reasons = _judge(rules, holdouts, scores, champion is not None, challenger_ref)
    decision = GateDecision(
        passed=not reasons,
        reasons=reasons,
        table=table,
        challenger=challenger_ref,
        champion=champion_ref if champion is not None else None,
        rules=rules.to_dict(),
        holdouts=[
            {"name": h.name, "role": h.role, "kind": h.kind, "n": len(h), "source": h.source}
            for h in holdouts
        ],
        notes=notes,
        decided_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    )
    log.info("%s", decision.summary())
    return decision


def _judge(
    rules: GateRules,
    holdouts: list[Holdout],
    scores: dict[tuple[str, str, str], Score],
    have_champion: bool,
    challenger_ref: str,
) -> list[str]:
    """Every failed rule, named with its figures."""
    reasons: list[str] = []
    for holdout in holdouts:
        name = holdout.name
        mine = scores[(name, "challenger", "fp32")]
        if holdout.role == NEW and mine.accuracy + _EPS < rules.min_accuracy:
            reasons.append(
                f"min_accuracy: {challenger_ref} scores {_pct(mine.accuracy)} on '{name}', "
                f"below the floor {_pct(rules.min_accuracy)}"
            )
        quantized = scores.get((name, "challenger", QUANTIZED))
        if quantized is not None and rules.max_quantized_drop is not None:
            drop = _points(mine.accuracy - quantized.accuracy)
            if drop > rules.max_quantized_drop + _EPS:
                reasons.append(
                    f"max_quantized_drop: {challenger_ref}'s int8 variant scores "
                    f"{_pct(quantized.accuracy)} on '{name}' against {_pct(mine.accuracy)} for "
                    f"fp32 ({drop:.2f} points lost; at most {rules.max_quantized_drop:.2f})"
                )
        if not have_champion:
            continue
        theirs = scores[(name, "champion", "fp32")]
        delta = _points(mine.accuracy - theirs.accuracy)
        compared = f"{_pct(mine.accuracy)} against the champion's {_pct(theirs.accuracy)}"
        if holdout.role == CHAMPION_DATA and rules.max_regression is not None:
            if -delta > rules.max_regression + _EPS:
                reasons.append(
                    f"max_regression: on the champion's own holdout '{name}' the challenger "
                    f"scores {compared} ({-delta:.2f} points lost; at most "
                    f"{rules.max_regression:.2f})"
                )
        elif delta + _EPS < rules.min_delta:
            reasons.append(
                f"min_delta: on '{name}' the challenger scores {compared} ({delta:+.2f} "
                f"points; the rule asks for at least {rules.min_delta:+.2f})"
            )
        if rules.max_recall_drop is not None:
            for cls, recall in mine.recall.items():
                before = theirs.recall.get(cls, 0.0)
                drop = _points(before - recall)
                if drop > rules.max_recall_drop + _EPS:
                    reasons.append(
                        f"max_recall_drop: on '{name}' class '{cls}' recall falls from "
                        f"{_pct(before)} to {_pct(recall)} ({drop:.2f} points; at most "
                        f"{rules.max_recall_drop:.2f}, {mine.support[cls]} items)"
                    )
    return reasons


def record_decision(
    registry: Registry, name: str, version: int, decision: GateDecision
) -> Evaluation:
    """Store the decision on the challenger's registry version (``registry_evaluations``)."""
    return registry.record_evaluation(name, version, decision.to_dict())


def write_decision(decision: GateDecision, folder: str | Path) -> Path:
    """Write ``gate.json`` (the whole decision) and ``gate.txt`` (as text) into the run
    folder; returns the JSON file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / DECISION_JSON
    path.write_text(json.dumps(decision.to_dict(), indent=2) + "\n", encoding="utf-8")
    (folder / DECISION_TEXT).write_text(decision.format() + "\n", encoding="utf-8")
    return path


def read_decision(folder: str | Path) -> GateDecision | None:
    """The decision a gate wrote into a run folder, or None when there is none."""
    path = Path(folder) / DECISION_JSON
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot read the gate decision {path}: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path} does not hold a gate decision")
    return GateDecision.from_dict(data)


def _pct(fraction: float) -> str:
    return f"{100 * fraction:.2f}%"


def _points(fraction: float) -> float:
    return 100.0 * fraction
