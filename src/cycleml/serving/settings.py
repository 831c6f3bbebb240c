"""Validated serving settings, built from the `serve` config (configs/serve.yaml)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cycleml.errors import ConfigError
from cycleml.inference.bundle import PRECISIONS
from cycleml.training.threads import available_cpus

VERSION_POLICIES = ("latest", "all")
# the SQLite file of a model registry root (cycleml.registry.DB_FILE)
REGISTRY_DB = "registry.db"


# the most instances `runtime.instances=0` (one per core) makes of one model version
AUTO_MAX_INSTANCES = 4


@dataclass(frozen=True)
class RuntimeSettings:
    # 0: one per core of this worker process (at most AUTO_MAX_INSTANCES) on CPU, one
    # on an accelerator
    instances: int = 0
    # 0: the worker's cores shared out between its instances
    intra_op_threads: int = 0
    inter_op_threads: int = 1
    providers: tuple[str, ...] | None = None
    decode_threads: int = 1
    # how long a thread may keep Python's GIL while another waits for it
    # (sys.setswitchinterval; Python's default is 5 ms)
    gil_switch_interval_ms: float = 0.2
    spin_wait: bool = False
    # further ONNX Runtime session config entries, passed as they are
    session_config: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class BatchingSettings:
    max_batch_size: int = 32
    max_queue_delay_ms: float = 2.0
    max_queue_size: int = 256


@dataclass(frozen=True)
class LimitSettings:
    max_body_bytes: int = 16 * 1024 * 1024
    max_inflight: int = 256
    default_timeout_ms: float = 10_000.0
    max_timeout_ms: float = 60_000.0
    overload_status: int = 429
    retry_after_s: int = 1
    drain_timeout_s: float = 30.0
    # a request body must arrive within this long after its headers (408 otherwise)
    body_timeout_s: float = 30.0
    # request body bytes all connections of a process may hold at once (503 beyond)
    max_buffered_bytes: int = 256 * 1024 * 1024
    # decoding work per request, checked before it starts (413 beyond)
    max_image_pixels: int = 4096 * 4096
    max_request_pixels: int = 2 * 4096 * 4096
    max_text_chars: int = 100_000
    # None: a text of more tokens than the bundle's max_length is cut to it, as in training
    max_text_tokens: int | None = None


@dataclass(frozen=True)
class AuthSettings:
    enabled: bool = False
    keys_env: str = "CYCLEML_API_KEYS"
    keys_file: str | None = None
    public_paths: tuple[str, ...] = ("/v2/health/live", "/v2/health/ready", "/metrics")


@dataclass(frozen=True)
class ReloadSettings:
    watch: bool = True
    interval_s: float = 2.0


@dataclass(frozen=True)
class RegistrySettings:
    # the registry's database; None: <path>/registry.db when that file exists
    db_url: str | None = None
    # how often the alias table is read (a move is served within about this long plus
    # the new version's load and warm-up)
    poll_interval_s: float = 0.5


@dataclass(frozen=True)
class MonitoringSettings:
    # record sampled predictions in the prediction log (cycleml.monitoring)
    enabled: bool = False
    # the log's database; required when enabled
    db_url: str | None = None
    # the fraction of requests logged, drawn at random per request
    sample_rate: float = 1.0
    # rows waiting for the writer thread at most; more are dropped (and counted)
    buffer_rows: int = 10_000
    # and input bytes they hold at most (each waits with its input until written)
    buffer_bytes: int = 256 * 1024 * 1024
    # seconds between drift tests of the latest window for the /metrics gauges (None: off)
    report_interval_s: float | None = None
    # predictions in that window (the newest ones of each served version)
    report_window: int = 500


@dataclass(frozen=True)
class ServeSettings:
    path: str
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    version_policy: str = "latest"
    pinned_versions: dict[str, str] = field(default_factory=dict)
    # the precision a model is served in, by model name: fp32 (default), int8 or fp16
    # (the variants export writes next to the model)
    precision: dict[str, str] = field(default_factory=dict)
    runtime: RuntimeSettings = field(default_factory=RuntimeSettings)
    batching: BatchingSettings = field(default_factory=BatchingSettings)
    limits: LimitSettings = field(default_factory=LimitSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    reload: ReloadSettings = field(default_factory=ReloadSettings)
    registry: RegistrySettings = field(default_factory=RegistrySettings)
    monitoring: MonitoringSettings = field(default_factory=MonitoringSettings)
    access_log: bool = True
    # send the writes one turn of the event loop makes on a connection (a response's
    # head and body) in one call (coalescing.py)
    coalesce_writes: bool = True
    # A/B experiments between model versions: name -> spec (cycleml.experiments)
    experiments: dict[str, Any] = field(default_factory=dict)

    def instances(self, accelerated: bool = False) -> int:
        """Instances per model version: ``runtime.instances``, or for 0 one per core this
        worker process may use (its share of the usable cores, at most
        ``AUTO_MAX_INSTANCES``); one when the model runs on an accelerator
        (``accelerated``), where instances would only compete for the one device."""
        if self.runtime.instances:
            return self.runtime.instances
        if accelerated:
            return 1
        return max(1, min(AUTO_MAX_INSTANCES, available_cpus() // self.workers))

    def intra_op_threads(self, accelerated: bool = False) -> int:
        """ONNX Runtime threads per instance: ``runtime.intra_op_threads``, or for 0 the
        worker's cores shared out between its instances (at least one each), so that
        instances and their threads never outnumber the cores."""
        if self.runtime.intra_op_threads:
            return self.runtime.intra_op_threads
        cores = max(1, available_cpus() // self.workers)
        return max(1, cores // self.instances(accelerated))

    def __post_init__(self) -> None:
        _check(
            Path(self.path).exists(),
            f"path '{self.path}' does not exist; give a bundle "
            "folder or a model repository (<repository>/<model>/<version>/)",
        )
        _check(1 <= self.port <= 65535, f"port must be in 1..65535, got {self.port}")
        _check(self.workers >= 1, f"workers must be >= 1, got {self.workers}")
        _check(
            self.version_policy in VERSION_POLICIES,
            f"version_policy must be one of {VERSION_POLICIES}, got '{self.version_policy}'",
        )
        for model, precision in self.precision.items():
            _check(
                precision in PRECISIONS,
                f"precision['{model}'] must be one of {', '.join(PRECISIONS)}, got '{precision}'",
            )
        rt, batching, limits = self.runtime, self.batching, self.limits
        _check(
            rt.instances >= 0,
            f"runtime.instances must be >= 0 (0: one per core), got {rt.instances}",
        )
        _check(
            rt.intra_op_threads >= 0 and rt.inter_op_threads >= 0,
            "runtime.intra_op_threads and runtime.inter_op_threads must be >= 0",
        )
        _check(
            rt.decode_threads >= 1, f"runtime.decode_threads must be >= 1, got {rt.decode_threads}"
        )
        _check(
            rt.gil_switch_interval_ms > 0,
            "runtime.gil_switch_interval_ms must be > 0, got " + str(rt.gil_switch_interval_ms),
        )
        for key, value in rt.session_config.items():
            _check(
                isinstance(value, str | int | float | bool),
                f"runtime.session_config['{key}'] must be a single value, got {value!r} "
                "(quote keys with dots: +runtime.session_config={session.dynamic_block_base:4})",
            )
        _check(
            batching.max_batch_size >= 1,
            f"batching.max_batch_size must be >= 1, got {batching.max_batch_size}",
        )
        _check(
            batching.max_queue_delay_ms >= 0,
            f"batching.max_queue_delay_ms must be >= 0, got {batching.max_queue_delay_ms}",
        )
        _check(
            batching.max_queue_size >= 1,
            f"batching.max_queue_size must be >= 1, got {batching.max_queue_size}",
        )
        _check(
            limits.max_body_bytes >= 1024,
            f"limits.max_body_bytes must be >= 1024, got {limits.max_body_bytes}",
        )
        _check(
            limits.max_buffered_bytes >= limits.max_body_bytes,
            f"limits.max_buffered_bytes ({limits.max_buffered_bytes}) must be >= "
            f"limits.max_body_bytes ({limits.max_body_bytes})",
        )
        _check(
            1 <= limits.max_image_pixels <= limits.max_request_pixels,
            "limits.max_image_pixels must be >= 1 and <= limits.max_request_pixels",
        )
        _check(
            limits.max_text_tokens is None or limits.max_text_tokens >= 1,
            f"limits.max_text_tokens must be >= 1 or null, got {limits.max_text_tokens}",
        )
        _check(
            limits.max_text_chars >= 1,
            f"limits.max_text_chars must be >= 1, got {limits.max_text_chars}",
        )
        _check(
            limits.body_timeout_s > 0,
            f"limits.body_timeout_s must be > 0, got {limits.body_timeout_s}",
        )
        _check(
            limits.max_inflight >= 1, f"limits.max_inflight must be >= 1, got {limits.max_inflight}"
        )
        _check(
            0 < limits.default_timeout_ms <= limits.max_timeout_ms,
            "limits.default_timeout_ms must be > 0 and <= limits.max_timeout_ms",
        )
        _check(
            limits.overload_status in (429, 503),
            f"limits.overload_status must be 429 or 503, got {limits.overload_status}",
        )
        _check(
            limits.retry_after_s >= 1,
            f"limits.retry_after_s must be >= 1, got {limits.retry_after_s}",
        )
        _check(
            self.reload.interval_s > 0,
            f"reload.interval_s must be > 0, got {self.reload.interval_s}",
        )
        _check(
            self.registry.poll_interval_s > 0,
            f"registry.poll_interval_s must be > 0, got {self.registry.poll_interval_s}",
        )
        monitoring = self.monitoring
        _check(
            0.0 <= monitoring.sample_rate <= 1.0,
            f"monitoring.sample_rate must be in 0..1, got {monitoring.sample_rate}",
        )
        _check(
            monitoring.buffer_rows >= 1,
            f"monitoring.buffer_rows must be >= 1, got {monitoring.buffer_rows}",
        )
        _check(
            monitoring.buffer_bytes >= 1,
            f"monitoring.buffer_bytes must be >= 1, got {monitoring.buffer_bytes}",
        )
        _check(
            monitoring.report_interval_s is None or monitoring.report_interval_s > 0,
            f"monitoring.report_interval_s must be > 0 or null, got {monitoring.report_interval_s}",
        )
        _check(
            monitoring.report_window >= 1,
            f"monitoring.report_window must be >= 1, got {monitoring.report_window}",
        )
        _check(
            not monitoring.enabled or bool(monitoring.db_url),
            "monitoring.enabled needs monitoring.db_url (an SQLAlchemy URL)",
        )
        self._check_experiments()

    def _check_experiments(self) -> None:
        """Each configured experiment's spec, and one experiment per model."""
        if not self.experiments:
            return
        from cycleml.experiments.store import ExperimentError, ExperimentSpec

        _check(
            isinstance(self.experiments, dict),
            "experiments must map experiment names to specs",
        )
        _check(
            bool(self.monitoring.db_url),
            "experiments need a database: set monitoring.db_url (an SQLAlchemy URL)",
        )
        models: dict[str, str] = {}
        for name, values in self.experiments.items():
            try:
                spec = ExperimentSpec.from_dict(values, name=str(name))
            except ExperimentError as err:
                raise ConfigError(f"experiments.{name}: {err}") from None
            _check(
                spec.model not in models,
                f"experiments.{name}: model '{spec.model}' already has the experiment "
                f"'{models.get(spec.model)}'; one experiment per model",
            )
            models[spec.model] = spec.name

    @property
    def follows_registry(self) -> bool:
        """Whether ``path`` is a model registry whose aliases say what to serve."""
        return self.registry.db_url is not None or (Path(self.path) / REGISTRY_DB).is_file()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ServeSettings:
        """Settings from a plain mapping (a resolved config); unknown keys are errors."""
        values = dict(values)
        sections = {
            "runtime": RuntimeSettings,
            "batching": BatchingSettings,
            "limits": LimitSettings,
            "auth": AuthSettings,
            "reload": ReloadSettings,
            "registry": RegistrySettings,
            "monitoring": MonitoringSettings,
        }
        for name, section_cls in sections.items():
            values[name] = _build(section_cls, values.get(name) or {}, prefix=f"{name}.")
        if values.get("runtime").providers is not None:
            values["runtime"] = dataclasses.replace(
                values["runtime"], providers=tuple(values["runtime"].providers)
            )
        values["auth"] = dataclasses.replace(
            values["auth"], public_paths=tuple(values["auth"].public_paths)
        )
        values["pinned_versions"] = {
            str(k): str(v) for k, v in (values.get("pinned_versions") or {}).items()
        }
        values["precision"] = {str(k): str(v) for k, v in (values.get("precision") or {}).items()}
        experiments = values.get("experiments") or {}
        if not isinstance(experiments, dict):
            raise ConfigError(
                f"experiments must map experiment names to specs, got {type(experiments).__name__}"
            )
        values["experiments"] = {str(k): v for k, v in experiments.items()}
        if values.get("path") in (None, "", "???"):
            raise ConfigError("path is required: cycleml serve path=<bundle or repository>")
        values["path"] = str(values["path"])
        return _build(cls, values, prefix="")


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(
            f"unknown serve setting(s) {', '.join(prefix + k for k in unknown)}; "
            f"known: {', '.join(prefix + k for k in sorted(known))}"
        )
    try:
        return cls(**values)
    except TypeError as err:
        raise ConfigError(f"bad serve settings {prefix or ''}: {err}") from None


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def read_api_keys(auth: AuthSettings) -> list[str]:
    """The accepted API keys: from the environment variable and/or the key file."""
    keys: list[str] = []
    raw = os.environ.get(auth.keys_env, "") if auth.keys_env else ""
    keys += [k.strip() for k in raw.split(",") if k.strip()]
    if auth.keys_file:
        key_path = Path(auth.keys_file)
        if not key_path.is_file():
            raise ConfigError(f"auth.keys_file '{auth.keys_file}' is not a file")
        keys += [line.strip() for line in key_path.read_text().splitlines() if line.strip()]
    if auth.enabled and not keys:
        raise ConfigError(
            f"auth.enabled is true but no API keys were found in ${auth.keys_env} "
            f"or auth.keys_file ({auth.keys_file})"
        )
    return keys
