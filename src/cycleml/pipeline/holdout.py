"""The labelled items a gate scores champion and challenger on.

A holdout is one split of a data module built exactly as ``cycleml train`` builds it
(the same ``data`` config, the same split seed and fractions), so the new data's
test split is the very one the challenger's training run held out, and the
champion's own test split is rebuilt from the config its training run recorded.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cycleml.errors import ConfigError, CycleMLError

log = logging.getLogger(__name__)

NEW = "new"
CHAMPION_DATA = "champion"
ROLES = (NEW, CHAMPION_DATA)
_SPLITS = ("train", "val", "test")


@dataclass
class Holdout:
    """Labelled items in the form a bundle's predictor accepts.

    ``inputs`` are uint8 ``(H, W, C)`` image arrays (or image file paths) for image
    data, texts for text data; ``labels`` are the true class names. ``role`` says
    which gate rules apply: ``new`` (the new data: the absolute floor and the
    minimum change) or ``champion`` (the champion's own data: the regression limit).
    """

    name: str
    inputs: list[Any]
    labels: list[str]
    item_ids: list[str]
    role: str = NEW
    kind: str = "image"
    # where it came from (data target, path, split, fingerprint), for the decision
    source: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ConfigError(
                f"holdout '{self.name}': role {self.role!r}, expected new or champion"
            )
        if not (len(self.inputs) == len(self.labels) == len(self.item_ids)):
            raise ConfigError(
                f"holdout '{self.name}': {len(self.inputs)} inputs, {len(self.labels)} labels "
                f"and {len(self.item_ids)} ids; they must be as many"
            )
        if not self.inputs:
            raise ConfigError(f"holdout '{self.name}' holds no items; a gate cannot score on it")

    def __len__(self) -> int:
        return len(self.labels)


def holdout_from_config(
    cfg: DictConfig, split: str = "test", name: str | None = None, role: str = NEW
) -> Holdout:
    """One split of the data module of ``cfg.data``, built as ``cycleml train`` builds it.

    ``cfg`` is a composed training config (or any mapping with a ``data`` node holding
    a ``_target_``). Augmentation is not used: it touches the training split only.
    """
    import hydra

    if split not in _SPLITS:
        raise ConfigError(f"holdout split must be one of {', '.join(_SPLITS)}, got {split!r}")
    data = cfg.get("data") if isinstance(cfg, (DictConfig, Mapping)) else None
    if not data or not data.get("_target_"):
        raise ConfigError("the holdout needs a data config with a _target_ (e.g. data=digits)")
    try:
        datamodule = hydra.utils.instantiate(data)
    except hydra.errors.InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, CycleMLError):
            raise cause from None
        raise ConfigError(f"cannot build the data of the holdout: {err}") from err
    datamodule.setup()
    class_names = list(datamodule.class_names)
    if getattr(datamodule, "kind", "image") == "text" or hasattr(datamodule, "split_texts"):
        inputs: list[Any] = datamodule.split_texts(split)
        label_ids = datamodule.split_labels(split).tolist()
        kind = "text"
    else:
        images, labels = datamodule.split_arrays(split)
        inputs, label_ids, kind = list(images), labels.tolist(), "image"
    target = str(data.get("_target_"))
    return Holdout(
        name=name or f"{target.rsplit('.', 1)[-1]}: {split}",
        inputs=inputs,
        labels=[class_names[i] for i in label_ids],
        item_ids=[str(i) for i in datamodule.split_ids(split)],
        role=role,
        kind=kind,
        source={
            "data": target,
            "path": _plain(data.get("path")),
            "split": split,
            "fingerprint": getattr(datamodule, "fingerprint", None),
        },
    )


def champion_holdout(bundle_dir: Path, split: str = "test") -> Holdout | None:
    """The champion's own test split, rebuilt from the data config its training run
    recorded (``bundle.json`` ``source.checkpoint`` → run folder → ``summary.json``
    config, else ``.hydra/config.yaml``). None, with the reason logged, when the run
    folder, its config or its data are no longer there."""
    data, where = champion_data_config(Path(bundle_dir))
    if data is None:
        log.info("champion's own holdout not reachable: %s", where)
        return None
    try:
        holdout = holdout_from_config(
            OmegaConf.create({"data": data}), split, name=f"champion's data: {split}",
            role=CHAMPION_DATA,
        )  # fmt: skip
    except (CycleMLError, OSError, ValueError) as err:
        log.info("champion's own holdout not reachable: the data in %s cannot be built: %s",
                 where, err)  # fmt: skip
        return None
    holdout.source["config"] = str(where)
    return holdout


def gate_holdouts(new: Holdout, champion_bundle: Path | None, split: str = "test") -> list[Holdout]:
    """The holdouts of a gate: the new data's, and the champion's own split when it is
    reachable and not the very same items (the same data fingerprint: scoring it twice
    would say nothing more)."""
    if champion_bundle is None:
        return [new]
    own = champion_holdout(Path(champion_bundle), split)
    if own is None:
        return [new]
    same_fingerprint = own.source.get("fingerprint") and (
        own.source.get("fingerprint") == new.source.get("fingerprint")
    )
    if same_fingerprint or (own.item_ids == new.item_ids and own.labels == new.labels):
        log.info("the champion's own %s split is the new data's: scored once", split)
        return [new]
    return [new, own]


def champion_data_config(bundle_dir: Path) -> tuple[dict[str, Any] | None, str]:
    """``(data config, where it was read)`` of the run that trained the bundle, or
    ``(None, why not)``."""
    try:
        meta = json.loads((bundle_dir / "bundle.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return None, f"cannot read {bundle_dir / 'bundle.json'}: {err}"
    checkpoint = (meta.get("source") or {}).get("checkpoint") if isinstance(meta, dict) else None
    if not isinstance(checkpoint, str) or not checkpoint:
        return None, f"{bundle_dir / 'bundle.json'} names no source checkpoint"
    ckpt = Path(checkpoint)
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    if not run_dir.is_dir():
        return None, f"the training run folder {run_dir} is not there"
    summary = run_dir / "summary.json"
    try:
        recorded = json.loads(summary.read_text(encoding="utf-8")).get("config") or {}
        data = recorded.get("data") if isinstance(recorded, dict) else None
        if isinstance(data, dict) and data.get("_target_"):
            return data, str(summary)
    except (OSError, ValueError, AttributeError):
        pass
    saved = run_dir / ".hydra" / "config.yaml"
    if saved.is_file():
        try:
            loaded = OmegaConf.load(saved)
            data_node = loaded.get("data") if isinstance(loaded, DictConfig) else None
            if data_node is not None:
                resolved = OmegaConf.to_container(data_node, resolve=True)
                if isinstance(resolved, dict) and resolved.get("_target_"):
                    return resolved, str(saved)
        except Exception as err:  # OmegaConf raises several unrelated types for bad files
            return None, f"{saved} cannot be read or resolved: {err}"
    return (
        None,
        f"the run folder {run_dir} records no data config (summary.json, .hydra/config.yaml)",
    )


def _plain(value: Any) -> Any:
    return None if value is None else str(value)
