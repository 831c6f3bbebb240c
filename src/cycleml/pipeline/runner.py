"""Run a pipeline: lock the model, check the trigger, pick the run folder, run each stage
(or take over its outputs when its key is unchanged), gate the challenger, promote it.

Exit statuses: 0 promoted, waiting for a human decision (``promote=false``) or not
triggered; 1 the gate rejected the challenger; 2 a stage failed (its reason is in
``state.json`` and printed); 130 interrupted.
"""

from __future__ import annotations

import json
import logging
import time
import traceback
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cycleml.errors import ConfigError, CycleMLError
from cycleml.pipeline import state as st
from cycleml.pipeline.lock import PipelineLock
from cycleml.pipeline.stages import STAGES, Context, Stage, dataset_dir, train_config
from cycleml.pipeline.triggers import (
    TriggerResult,
    check_trigger_name,
    drift_trigger,
    labels_trigger,
    training_dataset_of,
)
from cycleml.redaction import redact, redact_values
from cycleml.training.console import CONSOLE

log = logging.getLogger(__name__)

PROMOTED_EXIT = 0
REJECTED_EXIT = 1
FAILED_EXIT = 2
INTERRUPTED_EXIT = 130
TRIGGER_LOG = "triggers.jsonl"
STAGE_NAMES = (*(stage.name for stage in STAGES), "gate")
LOG_FILE = "pipeline.log"


class StageFailed(Exception):
    """A stage raised; the run is recorded as failed at that stage."""


def model_dir(cfg: DictConfig) -> Path:
    return Path(cfg.root) / str(cfg.name)


def run_pipeline(cfg: DictConfig) -> int:
    """One launch of the pipeline described by ``cfg``; returns the exit status."""
    from cycleml.registry import Registry, check_name

    name = check_name(cfg.name, "name")
    trigger = check_trigger_name(str(cfg.trigger))
    # the aliases are used at register, gate and promote: checked before the first stage
    champion_alias = _checked_alias(cfg, "champion_alias")
    challenger_alias = _checked_alias(cfg, "challenger_alias")
    if champion_alias == challenger_alias:
        raise ConfigError(
            f"champion_alias and challenger_alias are both '{champion_alias}': the challenger "
            "needs an alias of its own"
        )
    stop_after = cfg.get("stop_after")
    if stop_after is not None and stop_after not in STAGE_NAMES:
        raise ConfigError(
            f"stop_after={stop_after!r}: expected null or one of {', '.join(STAGE_NAMES)}"
        )
    # the gate's rules before any stage: a typo there must not cost a training run
    from cycleml.pipeline.gate import GateRules

    GateRules.from_config(cfg.get("gate"))
    folder = model_dir(cfg)
    lock = PipelineLock(folder, name)
    lock.acquire()
    try:
        registry = Registry(cfg.registry.db_url, cfg.registry.root)
        try:
            return _launch(cfg, folder, lock, registry, trigger)
        finally:
            registry.close()
    finally:
        lock.release()


def _checked_alias(cfg: DictConfig, key: str) -> str:
    from cycleml.registry import check_alias

    value = cfg.get(key)
    try:  # as the stages use it: its text (champion_alias=5 is the alias '5')
        return check_alias(None if value is None else str(value))
    except CycleMLError as err:
        raise ConfigError(f"{key}: {err}") from None


def _champion(registry: Any, name: str, alias: str) -> Any | None:
    version = registry.aliases(name).get(name, {}).get(alias)
    return None if version is None else registry.get(name, version)


def _launch(cfg: DictConfig, folder: Path, lock: PipelineLock, registry: Any, trigger: str) -> int:
    name = str(cfg.name)
    champion = _champion(registry, name, str(cfg.champion_alias))
    if champion is None:
        log.info("%s@%s does not exist yet: the challenger becomes champion if it passes "
                 "the gate's absolute floor", name, cfg.champion_alias, extra=CONSOLE)  # fmt: skip
    state = st.unfinished_run(folder) if cfg.resume else None
    triggered_before = state is not None and state.stage("trigger").status == st.DONE
    fired: TriggerResult | None = None
    if trigger == "drift" and not triggered_before:
        ref = None if champion is None else f"{name}@{cfg.champion_alias}"
        fired = drift_trigger(cfg, ref)
        if not fired.fire:
            return _not_triggered(folder, trigger, fired)
    elif trigger == "always" and not triggered_before:
        fired = TriggerResult(True, "trigger=always")
    if state is None:
        state = st.RunState(run_dir=st.new_run_dir(folder), name=name)
        log.info("pipeline run %s", state.run_dir, extra=CONSOLE)
    else:
        log.info("continuing pipeline run %s (%s%s)", state.run_dir, state.status,
                 f" at {state.failed_stage}" if state.failed_stage else "", extra=CONSOLE)  # fmt: skip
    lock.set_run(str(state.run_dir))
    handler = _log_to(state.run_dir / LOG_FILE)
    try:
        return _run(cfg, state, folder, registry, champion, trigger, fired)
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()


def _not_triggered(folder: Path, trigger: str, result: TriggerResult) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    line = {"at": st.utc_now(), "trigger": trigger, "fired": False, "reason": result.reason,
            **result.details}  # fmt: skip
    with (folder / TRIGGER_LOG).open("a", encoding="utf-8") as out:
        out.write(json.dumps(line, default=str) + "\n")
    print(f"cycleml pipeline: not triggered: {result.reason}")
    return 0


def _log_to(path: Path) -> logging.Handler:
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    handler.setLevel(logging.INFO)
    logging.getLogger().addHandler(handler)
    return handler


def _record_launch(cfg: DictConfig, state: st.RunState) -> None:
    plain = redact_values(
        {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k != "hydra"}
    )
    chash = st.config_hash(plain)
    OmegaConf.save(OmegaConf.create(plain), state.run_dir / "config.yaml")
    overrides: list[str] = []
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            overrides = [redact(o) for o in HydraConfig.get().overrides.task]
    except ValueError:
        pass
    import os

    state.launches.append({"at": st.utc_now(), "pid": os.getpid(), "overrides": overrides,
                           "config_hash": chash})  # fmt: skip
    state.config_hash = chash
    state.status, state.failed_stage, state.reason = st.RUNNING, None, ""
    state.save()


def _run(
    cfg: DictConfig,
    state: st.RunState,
    folder: Path,
    registry: Any,
    champion: Any | None,
    trigger: str,
    fired: TriggerResult | None,
) -> int:
    _record_launch(cfg, state)
    ctx = Context(cfg=cfg, run_dir=state.run_dir, run_id=state.run_id, registry=registry,
                  champion=champion)  # fmt: skip
    ctx.previous = {name: st.StageRecord(**vars(r)) for name, r in state.stages.items()}
    if fired is not None:  # checked before the run folder was chosen; recorded now
        if fired.report is not None:
            from cycleml.monitoring.report import write_report

            json_path, _ = write_report(fired.report, state.run_dir / "trigger")
            fired.details["report"] = str(json_path)
        _trigger_record(state, trigger, fired)
    stop_after = cfg.get("stop_after")
    try:
        for stage in STAGES:
            _run_stage(ctx, state, folder, stage)
            if stage.name == stop_after:
                return _stopped(state, stage.name)
            if stage.name == "gather" and trigger == "labels":
                result = labels_trigger(
                    Path(ctx.outputs["gather"]["dataset_dir"]),
                    None if champion is None else training_dataset_of(champion),
                    int(cfg.min_new_labels),
                    ctx.champion_ref,
                )
                _trigger_record(state, trigger, result)
                if not result.fire:
                    state.status, state.reason = "waiting", result.reason
                    state.save()
                    print(f"cycleml pipeline: not triggered: {result.reason} "
                          f"(run {state.run_dir})")  # fmt: skip
                    return 0
        decision = _gate(ctx, state)
        if stop_after == "gate" and decision.passed:
            return _stopped(state, "gate")
        if not decision.passed:
            state.status, state.reason = st.REJECTED, "; ".join(decision.reasons)
            state.save()
            print(f"cycleml pipeline: {decision.summary()}; {ctx.champion_ref or 'no champion'} "
                  f"stays; run {state.run_dir}")  # fmt: skip
            return REJECTED_EXIT
        return _promote(ctx, state)
    except StageFailed as failed:
        print(f"cycleml pipeline: error: {failed}; the champion is unchanged "
              f"({ctx.champion_ref or 'none'}); state: {state.run_dir / st.STATE_FILE}")  # fmt: skip
        return FAILED_EXIT
    except KeyboardInterrupt:
        state.status = st.INTERRUPTED
        state.save()
        print(f"cycleml pipeline: interrupted; rerun the same command to continue "
              f"{state.run_dir}")  # fmt: skip
        return INTERRUPTED_EXIT


def _stopped(state: st.RunState, stage: str) -> int:
    """``stop_after=<stage>``: the run waits; the next launch continues after ``stage``."""
    state.status, state.reason = st.STOPPED, f"stop_after={stage}"
    state.save()
    print(f"cycleml pipeline: stopped after {stage} (stop_after={stage}); the next launch "
          f"continues {state.run_dir}")  # fmt: skip
    return 0


def _trigger_record(state: st.RunState, trigger: str, result: TriggerResult) -> None:
    record = state.stage("trigger")
    record.status = st.DONE if result.fire else "not_triggered"
    record.config_hash = st.config_hash({"trigger": trigger})
    record.outputs = {"fired": result.fire, **result.details}
    record.message = result.reason
    record.started_at = record.finished_at = st.utc_now()
    state.save()
    log.info("trigger=%s: %s", trigger, result.reason, extra=CONSOLE)


def _run_stage(ctx: Context, state: st.RunState, folder: Path, stage: Stage) -> None:
    record = state.stage(stage.name)
    try:
        config, inputs = stage.plan(ctx)
    except Exception as err:
        _fail(state, record, stage.name, err)
    key, chash = st.stage_key(config, inputs)
    ctx.keys[stage.name] = key
    if stage.cached:
        found = st.find_reusable(folder, state, stage.name, key)
        if found is not None:
            owner, earlier = found
            ctx.outputs[stage.name] = dict(earlier.outputs)
            if owner.run_dir != state.run_dir or record.status not in (st.DONE, st.REUSED):
                record.status, record.reused_from = st.REUSED, str(owner.run_dir)
                record.outputs = dict(earlier.outputs)
            record.key, record.config_hash, record.inputs = key, chash, inputs
            state.save()
            log.info("%s: skipped, inputs and config unchanged (%s)", stage.name,
                     "this run" if owner.run_dir == state.run_dir else owner.run_id,
                     extra=CONSOLE)  # fmt: skip
            return
    record.status, record.key, record.config_hash, record.inputs = st.RUNNING, key, chash, inputs
    record.started_at, record.finished_at, record.error, record.message = (
        st.utc_now(),
        None,
        None,
        "",
    )
    record.reused_from = None
    state.save()
    log.info("%s: running", stage.name, extra=CONSOLE)
    started = time.monotonic()
    try:
        outputs = stage.run(ctx, state.run_dir / stage.name)
    except KeyboardInterrupt:
        _interrupted(state, record, stage.name, started)
        raise
    except SystemExit as err:
        if err.code == INTERRUPTED_EXIT:  # training stopped by Ctrl-C, its state saved
            _interrupted(state, record, stage.name, started)
            raise KeyboardInterrupt from None
        _fail(state, record, stage.name, RuntimeError(f"exited with status {err.code}"))
    except Exception as err:
        _fail(state, record, stage.name, err, started)
    record.status, record.outputs = st.DONE, outputs
    record.finished_at, record.seconds = st.utc_now(), round(time.monotonic() - started, 2)
    ctx.outputs[stage.name] = outputs
    state.save()
    log.info("%s: done in %.1f s", stage.name, record.seconds, extra=CONSOLE)


def _interrupted(state: st.RunState, record: st.StageRecord, name: str, started: float) -> None:
    record.status, record.message = st.INTERRUPTED, "interrupted"
    record.finished_at, record.seconds = st.utc_now(), round(time.monotonic() - started, 2)
    state.status, state.failed_stage, state.reason = st.INTERRUPTED, name, "interrupted"
    state.save()


def _fail(
    state: st.RunState,
    record: st.StageRecord,
    name: str,
    err: BaseException,
    started: float | None = None,
) -> None:
    """Record ``err`` as the stage's failure and raise :class:`StageFailed`."""
    from cycleml.hydra_app import user_error

    known = user_error(err)
    message = redact(str(known) if known else f"{type(err).__name__}: {err}")
    if known is None:
        log.error("stage %s crashed:\n%s", name, "".join(traceback.format_exception(err)))
    record.status, record.error = st.FAILED, message
    record.finished_at = st.utc_now()
    if started is not None:
        record.seconds = round(time.monotonic() - started, 2)
    state.status, state.failed_stage = st.FAILED, name
    state.reason = f"stage {name} failed: {message}"
    state.save()
    log.error("%s", state.reason)
    raise StageFailed(state.reason) from err


# --- gate and promote ----------------------------------------------------------------


def _gate(ctx: Context, state: st.RunState) -> Any:
    from cycleml.pipeline.gate import GateRules, record_decision, run_gate, write_decision
    from cycleml.pipeline.holdout import gate_holdouts, holdout_from_config

    record = state.stage("gate")
    challenger = ctx.outputs["register"]
    record.status, record.started_at, record.error = st.RUNNING, st.utc_now(), None
    record.inputs = {"challenger": challenger["ref"], "champion": ctx.champion_ref or "none"}
    state.save()
    log.info("gate: %s against %s", challenger["ref"], ctx.champion_ref or "no champion",
             extra=CONSOLE)  # fmt: skip
    started = time.monotonic()
    try:
        rules = GateRules.from_config(ctx.cfg.get("gate"))
        record.config_hash = st.config_hash(rules.to_dict())
        train_cfg = train_config(ctx, str(state.run_dir / "train"), dataset_dir(ctx))
        new = holdout_from_config(train_cfg, "test", name="new data: test")
        holdouts = gate_holdouts(new, None if ctx.champion is None else Path(ctx.champion.path))
        decision = run_gate(
            Path(challenger["path"]),
            None if ctx.champion is None else Path(ctx.champion.path),
            holdouts,
            rules,
            challenger["ref"],
            ctx.champion_ref,
        )
        path = write_decision(decision, state.run_dir / "gate")
        record_decision(ctx.registry, ctx.name, int(challenger["version"]), decision)
    except Exception as err:
        _fail(state, record, "gate", err, started)
    record.status = st.DONE
    record.outputs = {"passed": decision.passed, "reasons": decision.reasons,
                      "decision": str(path)}  # fmt: skip
    record.message = decision.summary()
    record.finished_at, record.seconds = st.utc_now(), round(time.monotonic() - started, 2)
    state.save()
    log.info("%s", decision.summary(), extra=CONSOLE)
    return decision


def _promote(ctx: Context, state: st.RunState) -> int:
    from cycleml.registry import AliasConflict

    record = state.stage("promote")
    challenger = ctx.outputs["register"]
    alias = str(ctx.cfg.champion_alias)
    if not ctx.cfg.promote:
        command = f"cycleml registry promote {ctx.name} {ctx.cfg.challenger_alias} {alias}"
        record.status, record.message = "skipped", f"promote=false: finish with `{command}`"
        state.status = st.AWAITING_PROMOTION
        state.reason = f"{challenger['ref']} passed the gate; promote=false"
        state.save()
        print(f"cycleml pipeline: {challenger['ref']} passed the gate and waits as "
              f"{ctx.name}@{ctx.cfg.challenger_alias}; promote it with: {command}")  # fmt: skip
        return PROMOTED_EXIT
    record.status, record.started_at = st.RUNNING, st.utc_now()
    state.save()
    expected = None if ctx.champion is None else ctx.champion.version
    reason = f"passed the gate in pipeline run {state.run_id}"
    try:
        move = ctx.registry.set_alias(ctx.name, alias, int(challenger["version"]),
                                      reason=reason, expected=expected)  # fmt: skip
    except AliasConflict as err:
        _fail(state, record, "promote", CycleMLError(
            f"{ctx.name}@{alias} moved while the pipeline ran ({err}); nothing promoted"))  # fmt: skip
    except Exception as err:
        _fail(state, record, "promote", err)
    record.status, record.finished_at = st.DONE, st.utc_now()
    record.outputs = {"alias": f"{ctx.name}@{alias}", "from": expected,
                      "to": int(challenger["version"]), "moved": move is not None}  # fmt: skip
    state.status, state.reason = st.PROMOTED, reason
    state.save()
    print(f"cycleml pipeline: {ctx.name}@{alias}: {ctx.champion_ref or 'none'} -> "
          f"{challenger['ref']} (run {state.run_dir})")  # fmt: skip
    return PROMOTED_EXIT
