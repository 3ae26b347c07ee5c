"""A ConnectorContext for driving a connector directly (no service), with a settable clock."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp


@dataclass
class RecordingLog:
    """Keeps every log call: ``(level, event, fields)``."""

    records: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)

    def debug(self, event: str, **kw: Any) -> None:
        self.records.append(("debug", event, kw))

    def info(self, event: str, **kw: Any) -> None:
        self.records.append(("info", event, kw))

    def warning(self, event: str, **kw: Any) -> None:
        self.records.append(("warning", event, kw))

    def error(self, event: str, **kw: Any) -> None:
        self.records.append(("error", event, kw))


@dataclass
class Context:
    """The runtime's context, reduced to what a test controls."""

    http: aiohttp.ClientSession
    log: RecordingLog = field(default_factory=RecordingLog)
    clock: datetime = field(default_factory=lambda: datetime.now(UTC))

    def webhook_url(self, route: str, **path_params: str) -> str:
        return f"https://gateway.example/webhooks/{route}"

    def now(self) -> datetime:
        return self.clock
