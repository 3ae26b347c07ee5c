"""The ``gateway:`` section of the config file (gRPC server and delivery ledger).

Environment overrides work as for every section, e.g.
``CHANNEL_GATEWAY__GATEWAY__PORT=50052`` or
``CHANNEL_GATEWAY__GATEWAY__LEDGER_URL=postgresql+asyncpg://...``.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gateway.contract.errors import ConfigError
from gateway.runtime.config import RuntimeSettings

DEFAULT_PORT = 50051


class RetentionSettings(BaseModel):
    """``gateway.retention``: how long the ledger keeps what it no longer needs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Delete settled messages (final or DELIVERED, no fallback timer) last
    #: updated this many days ago; their idempotency keys become free again.
    #: None keeps them forever.
    messages_days: float | None = Field(default=30.0, gt=0)
    #: Drop statuses that never met their message after this many hours; None: never.
    pending_hours: float | None = Field(default=24.0, gt=0)
    #: Seconds between retention passes.
    interval_seconds: float = Field(default=600.0, gt=0)
    #: Messages deleted per transaction, and at most this many batches per pass.
    batch_size: int = Field(default=1000, gt=0)
    max_batches: int = Field(default=100, gt=0)


class GatewaySettings(BaseModel):
    """``gateway:`` config section."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: gRPC listen address.
    host: str = "127.0.0.1"
    port: int = Field(default=DEFAULT_PORT, ge=0, le=65535)
    #: Delivery ledger: a SQLite file by default, ``postgresql+asyncpg://...`` in production.
    ledger_url: str = "sqlite+aiosqlite:///channel-gateway-ledger.db"
    #: PostgreSQL schema of the ledger's tables (it must exist); default: the search path.
    ledger_schema: str | None = None
    #: Events kept for StreamEvents to resume from a cursor (0 switches resuming off).
    replay_buffer: int = Field(default=10_000, ge=0)
    #: How long in-flight RPCs may take to finish on shutdown.
    shutdown_grace: float = Field(default=10.0, ge=0)
    #: ListMessages page size when the request gives none, and the maximum.
    default_page_size: int = Field(default=50, gt=0)
    max_page_size: int = Field(default=1000, gt=0)
    #: Provider to use per channel when several connectors of it are enabled.
    default_providers: dict[str, str] = {}
    #: Serve Prometheus metrics (``/metrics``) on this port of ``host``; None: off.
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    #: Consume status events in this process (the ledger's ingestor) and run
    #: the fallback engine. Switch off only to run a read-only API replica.
    run_ingestor: bool = True
    #: Ledger retention (runs where the ingestor runs).
    retention: RetentionSettings = RetentionSettings()


def gateway_settings(settings: RuntimeSettings) -> GatewaySettings:
    """The validated ``gateway:`` section of ``settings``."""
    try:
        return GatewaySettings.model_validate(settings.gateway)
    except ValidationError as exc:
        detail = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}"
            for err in exc.errors()
        )
        raise ConfigError(f"gateway: {detail}") from exc
