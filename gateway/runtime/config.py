"""Typed settings: one YAML file plus environment overrides.

``CHANNEL_GATEWAY__BROKER__URL=amqp://...`` overrides ``broker.url``: the
prefix, then the path with ``__`` between keys (values are read as YAML
scalars). Secrets never appear in the file, only references to env vars or
files (see :mod:`gateway.contract.secrets`). A bad config stops start-up with
a message naming the field.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gateway.contract.connector import ConnectorSpec
from gateway.contract.errors import ConfigError

ENV_PREFIX = "CHANNEL_GATEWAY__"
CONFIG_ENV = "CHANNEL_GATEWAY_CONFIG"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HttpSettings(_Model):
    """The webhook HTTP server."""

    host: str = "127.0.0.1"
    port: int = 8080
    #: The public URL providers call (e.g. https://hooks.example.com/sms), used to
    #: rebuild the URL they signed when a reverse proxy sits in front.
    public_base_url: str | None = None
    max_body_bytes: int = Field(default=1024 * 1024, gt=0)


class BrokerSettings(_Model):
    """RabbitMQ (or ``memory://`` for the embedded in-process bus)."""

    url: str = "amqp://guest:guest@localhost:5672/"
    publish_timeout: float = Field(default=5.0, gt=0)
    connect_timeout: float = Field(default=5.0, gt=0)
    prefetch: int = Field(default=16, gt=0)
    delivery_limit: int = Field(default=5, gt=0)


class DedupSettings(_Model):
    """Inbound dedup and the outbound send ledger."""

    url: str = "memory://"
    #: How long a webhook waits for a concurrent copy of itself to finish.
    pending_wait: float = Field(default=2.0, ge=0)


class SpoolSettings(_Model):
    """The durable local spool for events the broker could not confirm.

    Only connectors whose spec sets ``spool_on_outage`` (providers that do not
    retry a 5xx, such as Twilio) spool; the others answer 503 in an outage.
    """

    enabled: bool = False
    #: Directory of the spool files; it must survive restarts (a volume).
    state_dir: str = "/var/lib/channel-gateway/spool"
    #: The spool file; default ``<state_dir>/<channels>.sqlite`` for the channels
    #: of the service's spooling connectors (``sms.sqlite``, ``voice.sqlite``).
    path: str | None = None
    #: Bounds: when either is reached the spool refuses and webhooks get 503.
    max_events: int = Field(default=100_000, gt=0)
    max_bytes: int = Field(default=256 * 1024 * 1024, gt=0)
    #: Seconds a write waits for another process's lock on the file.
    lock_timeout: float = Field(default=5.0, gt=0)
    #: Spooled events republished per batch.
    replay_batch: int = Field(default=100, gt=0)
    #: Replay backoff while the broker is down: first delay and cap, in seconds.
    initial_backoff: float = Field(default=0.5, gt=0)
    max_backoff: float = Field(default=30.0, gt=0)

    def file_for(self, channels: Sequence[str]) -> Path:
        """The spool file of a service whose spooling connectors are on ``channels``."""
        if self.path:
            return Path(self.path)
        name = "+".join(sorted(set(channels))) or "gateway"
        return Path(self.state_dir) / f"{name}.sqlite"


class TelemetrySettings(_Model):
    """Logs and traces."""

    log_level: str = "INFO"
    log_format: Literal["json", "console"] = "json"
    otlp_endpoint: str | None = None
    console_spans: bool = False


class SendSettings(_Model):
    """Outbound sends."""

    max_attempts: int = Field(default=4, ge=1)
    initial_backoff: float = Field(default=0.5, ge=0)
    max_backoff: float = Field(default=30.0, ge=0)
    #: A Retry-After longer than this ends the send as FAILED (not permanent).
    max_retry_after: float = Field(default=60.0, ge=0)
    provider_timeout: float = Field(default=10.0, gt=0)
    #: How long a sent command id is remembered (redelivery protection).
    record_ttl: float = Field(default=7 * 24 * 3600, gt=0)


class SubscriptionSettings(_Model):
    """A downstream queue the runtime declares on ``channels.events``."""

    queue: str
    bindings: list[str] = Field(min_length=1)


class RuntimeSettings(_Model):
    """Everything a service process needs."""

    http: HttpSettings = HttpSettings()
    broker: BrokerSettings = BrokerSettings()
    dedup: DedupSettings = DedupSettings()
    telemetry: TelemetrySettings = TelemetrySettings()
    send: SendSettings = SendSettings()
    spool: SpoolSettings = SpoolSettings()
    subscriptions: list[SubscriptionSettings] = []
    #: Raw connector sections by name (``sms.twilio``), validated by each spec.
    connectors: dict[str, dict[str, Any]] = {}
    #: Raw ``gateway:`` section (gRPC server, ledger), validated by gateway.server.settings.
    gateway: dict[str, Any] = {}

    def connector_enabled(self, name: str) -> bool:
        """True when the config has a section for ``name`` not marked ``enabled: false``."""
        section = self.connectors.get(name)
        return section is not None and bool(section.get("enabled", True))

    def connector_settings(
        self, spec: ConnectorSpec, environ: Mapping[str, str] | None = None
    ) -> BaseModel:
        """The validated (secrets resolved) settings of one connector."""
        section = {k: v for k, v in self.connectors.get(spec.name, {}).items() if k != "enabled"}
        try:
            return spec.settings.model_validate(
                section, context={"environ": os.environ if environ is None else environ}
            )
        except ValidationError as exc:
            raise ConfigError(f"connectors.{spec.name}: {_describe(exc)}") from exc


def _describe(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}" for err in exc.errors()
    )


def _apply_env(data: dict[str, Any], environ: Mapping[str, str]) -> None:
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        path = [p.lower() for p in name[len(ENV_PREFIX) :].split("__") if p]
        if not path:
            continue
        node = data
        for key in path[:-1]:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{name}: {key} is not a section")
            node = child
        node[path[-1]] = yaml.safe_load(raw) if raw else raw


def load_config(
    path: str | Path | None = None, *, environ: Mapping[str, str] | None = None
) -> RuntimeSettings:
    """Read ``path`` (or ``$CHANNEL_GATEWAY_CONFIG``; none means defaults) plus env overrides."""
    environ = os.environ if environ is None else environ
    path = path or environ.get(CONFIG_ENV)
    data: dict[str, Any] = {}
    if path:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc.strerror}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"config {path} is not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config {path} must be a mapping at the top level")
        data = loaded or {}
    _apply_env(data, environ)
    try:
        return RuntimeSettings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"config {path or '(defaults)'}: {_describe(exc)}") from exc
