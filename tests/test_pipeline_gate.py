"""The gate between champion and challenger: real bundles scored through ONNX Runtime on
the same holdouts, the rules in config, decisions stored in a real registry and shown by
`cycleml registry show`, and `cycleml registry promote` refusing a failed version."""

from __future__ import annotations

import copy
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from conftest import FAST_TRAIN, compose_config
from cycleml.errors import ConfigError
from cycleml.export import ExportSettings, export_bundle
from cycleml.pipeline.gate import (
    DECISION_JSON,
    DECISION_TEXT,
    GateDecision,
    GateFailed,
    GateRules,
    read_decision,
    record_decision,
    run_gate,
    write_decision,
)
from cycleml.pipeline.holdout import (
    CHAMPION_DATA,
    Holdout,
    champion_holdout,
    gate_holdouts,
    holdout_from_config,
)
from cycleml.registry import GateRefused, Registry
from test_export_support import (
    IMAGE_CLASSES,
    TEXT_CLASSES,
    cached_bundle,
    image_spec,
    rewrite_meta,
    synthetic_images,
    synthetic_texts,
    train_image_net,
)
from test_predict_support import DATABASES, POSTGRES_URL
from test_registry_cli import error, ok
from test_registry_support import postgres_schema_url, variant_of

RIGHT = IMAGE_CLASSES.index("right")


@pytest.fixture(scope="module")
def blind(tmp_path_factory) -> Path:
    """A bundle of the good network that never answers 'right' (its logit pushed down)."""
    net = copy.deepcopy(train_image_net())
    net.head.bias.data[RIGHT] -= 100.0
    images, labels = synthetic_images(120, seed=2)
    bundle = export_bundle(
        net, image_spec(), IMAGE_CLASSES, tmp_path_factory.mktemp("blind") / "bundle",
        val_inputs=images, val_labels=labels, name="tiny-image", version="blind",
        settings=ExportSettings(),
    )  # fmt: skip
    return bundle.path


def holdout(n: int = 90, seed: int = 5, right: int | None = None, **kwargs) -> Holdout:
    """Synthetic labelled images; ``right`` keeps only that many 'right' items."""
    images, labels = synthetic_images(n, seed=seed)
    keep = np.arange(n)
    if right is not None:
        rights = keep[labels == RIGHT]
        keep = np.sort(np.concatenate([keep[labels != RIGHT], rights[:right]]))
    return Holdout(
        name=kwargs.pop("name", "new data: test"),
        inputs=list(images[keep]),
        labels=[IMAGE_CLASSES[i] for i in labels[keep]],
        item_ids=[f"item-{i}" for i in keep],
        **kwargs,
    )


# --- rules --------------------------------------------------------------------------


def test_better_challenger_passes_with_its_table(blind):
    good = cached_bundle("image")
    decision = run_gate(good, blind, [holdout()], GateRules(), "digits/4", "digits/3")
    assert decision.passed and decision.reasons == []
    assert (decision.challenger, decision.champion) == ("digits/4", "digits/3")
    rows = {(r["model"], r["precision"]): r for r in decision.table}
    assert set(rows) == {("challenger", "fp32"), ("challenger", "int8"), ("champion", "fp32")}
    assert rows["challenger", "fp32"]["accuracy"] == 1.0
    # the champion never answers 'right': about a third wrong, that class's recall 0
    assert rows["champion", "fp32"]["recall"]["right"] == 0.0
    assert 0.5 < rows["champion", "fp32"]["accuracy"] < 0.8
    assert rows["challenger", "fp32"]["n"] == 90
    assert sum(rows["challenger", "fp32"]["support"].values()) == 90
    assert "the champion's own holdout is not reachable" in " ".join(decision.notes)


def test_worse_challenger_fails_naming_rules_and_figures(blind, tmp_path):
    good = cached_bundle("image")
    decision = run_gate(blind, good, [holdout()], GateRules(), "digits/5", "digits/4")
    assert not decision.passed
    accuracy = next(r["accuracy"] for r in decision.table if r["model"] == "challenger")
    by_rule = {reason.split(":")[0]: reason for reason in decision.reasons}
    assert set(by_rule) == {"min_accuracy", "min_delta", "max_recall_drop"}
    assert f"{100 * accuracy:.2f}%" in by_rule["min_accuracy"]
    assert "below the floor 90.00%" in by_rule["min_accuracy"]
    assert f"{100 * (accuracy - 1):+.2f} points" in by_rule["min_delta"]
    assert "against the champion's 100.00%" in by_rule["min_delta"]
    recall = by_rule["max_recall_drop"]
    assert "class 'right' recall falls from 100.00% to 0.00% (100.00 points" in recall
    with pytest.raises(GateFailed, match="gate failed for digits/5: min_accuracy"):
        raise GateFailed(decision)
    # the run folder gets the decision as JSON and as text
    path = write_decision(decision, tmp_path / "run")
    stored = json.loads(path.read_text())
    assert path.name == DECISION_JSON and stored["passed"] is False
    assert stored["reasons"] == decision.reasons and stored["rules"]["min_accuracy"] == 0.9
    assert read_decision(tmp_path / "run") == decision
    assert read_decision(tmp_path / "elsewhere") is None
    with pytest.raises(ConfigError, match="not a gate decision"):
        GateDecision.from_dict({"passed": True})
    text = (tmp_path / "run" / DECISION_TEXT).read_text()
    assert text.startswith("gate FAILED: digits/5 against digits/4")
    assert "reason: max_recall_drop" in text


def test_a_class_recall_regression_alone_fails(blind):
    good = cached_bundle("image")
    few_right = holdout(n=150, right=3)  # 'right' is 3 items: accuracy barely moves
    rules = GateRules(min_delta=-5.0)
    decision = run_gate(blind, good, [few_right], rules, "digits/5", "digits/4")
    assert [r.split(":")[0] for r in decision.reasons] == ["max_recall_drop"]
    assert "(100.00 points; at most 5.00, 3 items)" in decision.reasons[0]
    # the same figures pass when the rule is off
    off = GateRules(min_delta=-5.0, max_recall_drop=None)
    assert run_gate(blind, good, [few_right], off, "digits/5", "digits/4").passed


def test_first_run_without_champion_is_judged_by_the_floor(blind):
    decision = run_gate(cached_bundle("image"), None, [holdout()], GateRules(), "digits/1", None)
    assert decision.passed and decision.champion is None
    assert [r["model"] for r in decision.table] == ["challenger", "challenger"]
    assert "no champion" in " ".join(decision.notes)
    below = run_gate(blind, None, [holdout()], GateRules(), "digits/1", None)
    assert [r.split(":")[0] for r in below.reasons] == ["min_accuracy"]
    # a lower floor lets the same model pass
    assert run_gate(blind, None, [holdout()], GateRules(min_accuracy=0.5), "digits/1", None).passed


def test_champion_holdout_reachable_or_not(blind):
    """New data without 'right' items: both models score 100 % there; on the champion's
    own data the challenger loses 'right' and regresses far beyond the 1 point allowed."""
    good = cached_bundle("image")
    new = holdout(right=0)
    old = holdout(seed=7, name="champion's data: test", role=CHAMPION_DATA)
    without = run_gate(blind, good, [new], GateRules(), "digits/5", "digits/4")
    assert without.passed
    assert "max_regression not applied" in " ".join(without.notes)
    rules = GateRules(max_recall_drop=None)
    both = run_gate(blind, good, [new, old], rules, "digits/5", "digits/4")
    assert [r.split(":")[0] for r in both.reasons] == ["max_regression"]
    assert "on the champion's own holdout 'champion's data: test'" in both.reasons[0]
    assert "at most 1.00" in both.reasons[0]
    assert {h["role"] for h in both.holdouts} == {"new", "champion"}
    # a generous limit lets it through; null applies min_delta there instead
    assert run_gate(blind, good, [new, old], GateRules(max_recall_drop=None,
                    max_regression=50.0), "digits/5", "digits/4").passed  # fmt: skip
    strict = run_gate(blind, good, [new, old], GateRules(max_recall_drop=None,
                      max_regression=None), "digits/5", "digits/4")  # fmt: skip
    assert [r.split(":")[0] for r in strict.reasons] == ["min_delta"]


def test_int8_variant_rule(blind, tmp_path):
    """A challenger whose int8 file is the blind model: the int8 rule catches it."""
    broken = Path(shutil.copytree(cached_bundle("image"), tmp_path / "challenger"))
    shutil.copy(blind / "model.onnx", broken / "model.int8.onnx")
    good = cached_bundle("image")
    off = run_gate(broken, good, [holdout()], GateRules(), "digits/5", "digits/4")
    assert off.passed  # the rule is off by default; the table still shows the variant
    int8 = next(r for r in off.table if r["precision"] == "int8")
    assert int8["recall"]["right"] == 0.0
    on = run_gate(broken, good, [holdout()], GateRules(max_quantized_drop=1.0), "digits/5",
                  "digits/4")  # fmt: skip
    assert [r.split(":")[0] for r in on.reasons] == ["max_quantized_drop"]
    assert "digits/5's int8 variant scores" in on.reasons[0]
    assert "against 100.00% for fp32" in on.reasons[0] and "at most 1.00" in on.reasons[0]
    # a bundle without an int8 variant: the rule is noted as not applied
    plain = run_gate(blind, None, [holdout()], GateRules(min_accuracy=0.5,
                     max_quantized_drop=1.0), "digits/5", None)  # fmt: skip
    assert plain.passed and "has no int8 variant" in " ".join(plain.notes)


def test_text_bundles_are_scored_on_texts():
    texts, labels = synthetic_texts(60, seed=9)
    new = Holdout("new data: test", texts, [TEXT_CLASSES[i] for i in labels],
                  [str(i) for i in range(60)], kind="text")  # fmt: skip
    text = cached_bundle("text")
    decision = run_gate(text, text, [new], GateRules(), "reviews/2", "reviews/1")
    assert decision.passed
    assert {r["accuracy"] for r in decision.table} == {1.0}
    with pytest.raises(ConfigError, match="holds text data but .* is a image model"):
        run_gate(cached_bundle("image"), None, [new], GateRules(), "digits/1", None)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"min_acuracy": 0.9}, "gate.min_acuracy is not a gate rule (rules: min_accuracy,"),
        ({"min_accuracy": 90}, "gate.min_accuracy=90: input should be less than or equal to 1"),
        ({"max_recall_drop": -1}, "gate.max_recall_drop=-1: input should be greater than or"),
        ({"min_delta": "lots"}, "gate.min_delta='lots': input should be a valid number"),
    ],
)
def test_bad_rule_config_is_a_clear_error(config, message):
    with pytest.raises(ConfigError) as caught:
        GateRules.from_config(OmegaConf.create(config))
    assert message in str(caught.value)


def test_rules_config_file_matches_the_rules():
    path = Path(__file__).resolve().parents[1] / "configs" / "pipeline" / "gate" / "default.yaml"
    rules = GateRules.from_config(OmegaConf.load(path))
    assert rules == GateRules()
    assert GateRules.from_config({"max_regression": None}).max_regression is None
    with pytest.raises(ConfigError, match="GateRules.min_accuracy=2"):
        GateRules(min_accuracy=2)


def test_holdout_checks_its_items():
    with pytest.raises(ConfigError, match="3 inputs, 2 labels and 3 ids"):
        Holdout("x", [1, 2, 3], ["a", "b"], ["1", "2", "3"])
    with pytest.raises(ConfigError, match="holds no items"):
        Holdout("x", [], [], [])
    with pytest.raises(ConfigError, match="the gate needs the new data's holdout"):
        run_gate(cached_bundle("image"), None, [holdout(role=CHAMPION_DATA)], GateRules(),
                 "digits/1", None)  # fmt: skip


# --- holdouts from configs and lineage -----------------------------------------------


def test_holdout_is_the_split_training_uses(make_cfg):
    from cycleml.training.train import build_datamodule

    cfg = make_cfg("train", "data=digits")
    built = holdout_from_config(cfg)
    trained_on = build_datamodule(cfg)
    images, labels = trained_on.split_arrays("test")
    assert built.item_ids == trained_on.split_ids("test")
    assert built.labels == [trained_on.class_names[i] for i in labels]
    assert np.array_equal(np.stack(built.inputs), images)
    assert built.kind == "image" and built.role == "new"
    assert built.source["fingerprint"] == trained_on.fingerprint
    with pytest.raises(ConfigError, match="holdout split must be one of"):
        holdout_from_config(cfg, split="holdout")


def test_champion_holdout_follows_the_lineage(make_cfg, tmp_path, caplog):
    cfg = make_cfg("train", "data=digits")
    run = tmp_path / "runs" / "1"
    (run / "checkpoints").mkdir(parents=True)
    data = OmegaConf.to_container(cfg.data, resolve=True)
    (run / "summary.json").write_text(json.dumps({"config": {"data": data}}))
    champion = Path(shutil.copytree(cached_bundle("image"), tmp_path / "champion"))
    rewrite_meta(champion, source={"checkpoint": str(run / "checkpoints" / "best.ckpt")})

    found = champion_holdout(champion)
    assert found is not None and found.role == CHAMPION_DATA
    assert found.item_ids == holdout_from_config(cfg).item_ids
    assert found.source["config"] == str(run / "summary.json")
    # the gate scores the champion's split besides the new data's, unless it is the same
    drifted = holdout()
    assert [h.role for h in gate_holdouts(drifted, champion)] == ["new", "champion"]
    assert gate_holdouts(holdout_from_config(cfg), champion)[1:] == []
    assert gate_holdouts(drifted, None) == [drifted]

    # no summary: the saved Hydra config, interpolations resolved
    (run / "summary.json").unlink()
    (run / ".hydra").mkdir()
    saved = OmegaConf.create({"seed": 3, "data": {**data, "augment_seed": "${seed}"}})
    OmegaConf.save(saved, run / ".hydra" / "config.yaml")
    again = champion_holdout(champion)
    assert again is not None and again.item_ids == found.item_ids

    caplog.set_level(logging.INFO, logger="cycleml.pipeline.holdout")
    shutil.rmtree(run)
    assert champion_holdout(champion) is None
    assert f"the training run folder {run} is not there" in caplog.text
    rewrite_meta(champion, source={})
    assert champion_holdout(champion) is None
    assert "names no source checkpoint" in caplog.text


# --- the registry ---------------------------------------------------------------------


@pytest.fixture(params=DATABASES)
def db_url(request):
    if request.param == "sqlite":
        yield None
    else:
        yield from postgres_schema_url(POSTGRES_URL)


def test_decisions_on_both_databases(db_url, tmp_path):
    """Stored whole (NaN as null), read back newest last; promote follows the last one."""
    registry = Registry(db_url, tmp_path / "registry")
    try:
        first = cached_bundle("image")
        registry.register(first, name="digits")
        registry.register(variant_of(first, tmp_path / "second", "v2"), name="digits")
        registry.set_alias("digits", "champion", 1)
        registry.set_alias("digits", "challenger", 2)
        failed = {"passed": False, "reasons": ["min_delta: -2.00 points"], "champion": "digits/1",
                  "table": [{"accuracy": float("nan"), "n": np.int64(3)}]}  # fmt: skip
        registry.record_evaluation("digits", 2, failed)
        stored = registry.last_evaluation("digits", 2)
        assert stored.decision["table"] == [{"accuracy": None, "n": 3}]
        assert (stored.passed, stored.reasons, stored.champion, stored.ref) == (
            False, ["min_delta: -2.00 points"], "digits/1", "digits/2")  # fmt: skip
        with pytest.raises(GateRefused, match="min_delta: -2.00 points. Promote it anyway"):
            registry.promote("digits", "challenger", "champion", require_gate=True)
        # without the check (the API's default) the move is made
        assert registry.promote("digits", "challenger", "champion").to_version == 2
        registry.set_alias("digits", "champion", 1)
        registry.record_evaluation("digits", 2, {"passed": True, "reasons": []})
        assert [e.passed for e in registry.evaluations("digits", 2)] == [False, True]
        assert registry.promote("digits", "challenger", "champion", require_gate=True)
        assert registry.evaluations("digits", 1) == []
        with pytest.raises(Exception, match="has no version 9"):
            registry.record_evaluation("digits", 9, {"passed": True, "reasons": []})
    finally:
        registry.close()


@pytest.mark.slow
def test_decision_stored_shown_and_required_by_promote(blind, tmp_path):
    good = cached_bundle("image")
    root = tmp_path / "registry"
    registry = Registry(None, root)
    try:
        registry.register(good, name="digits")
        registry.register(blind, name="digits")
        registry.set_alias("digits", "champion", 1)
        registry.set_alias("digits", "challenger", 2)
        assert registry.last_evaluation("digits", 2) is None
        failed = run_gate(blind, good, [holdout()], GateRules(), "digits/2", "digits/1")
        stored = record_decision(registry, "digits", 2, failed)
        assert stored.passed is False and stored.reasons == failed.reasons
        last = registry.last_evaluation("digits", 2)
        assert last is not None and last.decision["table"] == failed.to_dict()["table"]
        assert last.champion == "digits/1" and last.decision["rules"]["min_delta"] == 0.0
        with pytest.raises(GateRefused, match=r"digits/2 \(digits@challenger\) failed its last"):
            registry.promote("digits", "challenger", "champion", require_gate=True)
        assert registry.aliases("digits")["digits"]["champion"] == 1
    finally:
        registry.close()

    shown = ok("registry", "show", "digits/2", cwd=tmp_path)
    assert "gate FAILED: digits/2 against digits/1" in shown
    assert "reason: min_accuracy: digits/2 scores" in shown
    assert "challenger digits/2" in shown and "champion digits/1" in shown
    as_json = json.loads(ok("registry", "show", "digits/2", "format=json", cwd=tmp_path))
    assert as_json["gate"]["passed"] is False and as_json["gate_decisions"] == 1
    assert as_json["gate"]["reasons"] == failed.reasons

    line = error("registry", "promote", "digits", "challenger", "champion", cwd=tmp_path)
    assert "failed its last gate" in line and "min_accuracy" in line and "force=true" in line
    moved = ok("registry", "promote", "digits", "challenger", "champion", "force=true",
               "reason=checked by hand", cwd=tmp_path)  # fmt: skip
    assert "digits@champion: version 1 -> version 2" in moved
    registry = Registry(None, root)
    try:
        audit = registry.audit("digits")[-1]
        assert audit.reason.startswith("checked by hand (forced past a failed gate: min_accuracy")
        # a later passing decision is the one that counts
        registry.set_alias("digits", "champion", 1)
        passed = run_gate(blind, good, [holdout()], GateRules(min_accuracy=0.5, min_delta=-50,
                          max_recall_drop=None), "digits/2", "digits/1")  # fmt: skip
        record_decision(registry, "digits", 2, passed)
        assert len(registry.evaluations("digits", 2)) == 2
        assert registry.promote("digits", "challenger", "champion", require_gate=True)
    finally:
        registry.close()
    assert "gate (the last of 2 decisions):" in ok("registry", "show", "digits/2", cwd=tmp_path)


def test_a_version_never_gated_is_promoted_and_old_databases_get_the_table(tmp_path):
    from sqlalchemy import create_engine, inspect

    from cycleml.registry.tables import alias_moves, aliases, versions

    root = tmp_path / "registry"
    root.mkdir()
    # a database made before gate decisions existed: the three older tables only
    engine = create_engine(f"sqlite:///{root / 'registry.db'}")
    for table in (versions, aliases, alias_moves):
        table.create(engine)
    engine.dispose()
    registry = Registry(None, root)
    try:
        assert "registry_evaluations" in inspect(registry.engine).get_table_names()
        first = cached_bundle("image")
        registry.register(first, name="digits")
        registry.register(variant_of(first, tmp_path / "second", "v2"), name="digits")
        registry.set_alias("digits", "challenger", 2)
        assert registry.promote("digits", "challenger", "champion", require_gate=True)
        with pytest.raises(Exception, match="passed=true/false"):
            registry.record_evaluation("digits", 2, {"reasons": []})
    finally:
        registry.close()


@pytest.mark.slow
def test_real_training_run_champion_holdout(tmp_path):
    """A real `cycleml train` run exported to a bundle: the gate reaches the run's own
    test split through the bundle's lineage and scores it through ONNX Runtime."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    from cycleml.export.checkpoint import export_checkpoint
    from cycleml.training.train import train

    cfg = compose_config("train", [*FAST_TRAIN, "trainer.limit_train_batches=8"], tmp_path)
    try:
        train(cfg)
        new = holdout_from_config(cfg)
    finally:
        HydraConfig.instance().cfg = None
        GlobalHydra.instance().clear()
    bundle = export_checkpoint(tmp_path / "run", out_dir=tmp_path / "bundle")
    own = champion_holdout(bundle.path)
    assert own is not None and own.item_ids == new.item_ids
    decision = run_gate(bundle.path, bundle.path, [new, own], GateRules(min_accuracy=0.0),
                        "digits/2", "digits/1")  # fmt: skip
    assert decision.passed
    accuracies = {r["accuracy"] for r in decision.table}
    assert len(accuracies) == 1  # the same model on the same items: the same figures
