"""The plugin contract: what a connector is and what the runtime gives it.

A connector turns one provider's traffic into ``gateway.api.v1`` events and
sends ``SendMessageCommand``s through the provider's API. It never touches the
broker, retries, tracing set-up or logging configuration: the runtime owns
those and hands the connector a :class:`ConnectorContext`.

Inbound: each :class:`WebhookRoute` handler verifies the request (raising
:class:`~gateway.contract.errors.AuthError`), maps it (raising
:class:`~gateway.contract.errors.BadRequestError`) and returns an
:class:`Inbound`: the events plus the reply the provider should get. The
runtime dedupes the events on their ids, publishes them with confirms, and
answers the provider with ``reply`` only once every event is confirmed.

Outbound: the runtime consumes the connector's command queue and calls
:meth:`Connector.send`; errors decide retries (see ``errors``). A voice
connector that also implements :class:`CallControl` (and lists its actions in
``manifest.call_actions``) gets a second queue of ``CallCommand``s.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from typing import Any, Protocol, runtime_checkable
from urllib.parse import unquote

import aiohttp
from multidict import MultiDict, MultiMapping
from pydantic import BaseModel

from gateway.api.v1.call_pb2 import CallCommand
from gateway.api.v1.command_pb2 import SendMessageCommand
from gateway.api.v1.connector_pb2 import ConnectorManifest
from gateway.api.v1.delivery_pb2 import DeliveryState
from gateway.api.v1.envelope_pb2 import Event
from gateway.contract.errors import BadRequestError


def parse_form(text: str) -> list[tuple[str, str]]:
    """``application/x-www-form-urlencoded`` fields, as ``parse_qsl(text,
    keep_blank_values=True, strict_parsing=True)`` gives them.

    Every webhook body goes through this. ``parse_qsl`` unquotes each name
    and value on its own (two replace and two unquote calls per field); here
    a body whose escapes cannot hide a separator (no ``%26`` or ``%3D``) is
    unquoted once as a whole and then split, which gives the same fields:
    ``&`` and ``=`` are ASCII, so neither can be part of a UTF-8 sequence
    that decoding replaces. A field without ``=`` is a ValueError.
    """
    if not text:
        return []
    if "%" in text or "+" in text:
        upper = text.upper() if "%" in text else ""
        if "%26" in upper or "%3D" in upper:
            return _split_fields(text, unquote_each=True)
        text = unquote(text.replace("+", " "), errors="replace")
    return _split_fields(text, unquote_each=False)


def _split_fields(text: str, *, unquote_each: bool) -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    for item in text.split("&"):
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"bad query field: {item!r}")
        if unquote_each and ("%" in item or "+" in item):
            name = unquote(name.replace("+", " "), errors="replace")
            value = unquote(value.replace("+", " "), errors="replace")
        pairs.append((name, value))
    return pairs


@dataclass(frozen=True, kw_only=True)
class WebhookRequest:
    """An HTTP request from a provider, as the connector needs it.

    ``url`` is the URL exactly as the provider called it (scheme, host and
    port of the configured public base URL, path and query string), which is
    what URL-signing schemes such as Twilio's sign.
    """

    method: str
    url: str
    path_params: Mapping[str, str]
    headers: Mapping[str, str]
    query: MultiMapping[str]
    body: bytes

    @cached_property
    def form(self) -> MultiDict[str]:
        """The body as ``application/x-www-form-urlencoded`` fields (all values kept)."""
        try:
            return MultiDict(parse_form(self.body.decode("utf-8")))
        except (UnicodeDecodeError, ValueError) as exc:
            raise BadRequestError(f"malformed form body: {exc}") from exc

    @cached_property
    def params(self) -> MultiDict[str]:
        """Query parameters for GET, form fields otherwise."""
        return MultiDict(self.query) if self.method == "GET" else self.form

    def json(self) -> Any:
        """The body parsed as JSON; malformed JSON is a 400."""
        try:
            return json.loads(self.body)
        except (UnicodeDecodeError, ValueError) as exc:
            raise BadRequestError(f"malformed JSON body: {exc}") from exc


@dataclass(frozen=True, kw_only=True)
class WebhookReply:
    """What the provider gets back once every event is confirmed."""

    status: int = 200
    body: bytes = b""
    content_type: str = "text/plain"


@dataclass(frozen=True, kw_only=True)
class Inbound:
    """The result of handling one webhook: zero or more events, one reply.

    Every item of a batched payload is one event; the runtime publishes all of
    them or answers non-2xx (and a retry re-emits only what is missing).
    """

    events: Sequence[Event] = ()
    reply: WebhookReply = field(default_factory=WebhookReply)


WebhookHandler = Callable[[WebhookRequest], Awaitable[Inbound]]


@dataclass(frozen=True, kw_only=True)
class WebhookRoute:
    """One webhook endpoint, mounted at ``/webhooks/<channel>/<provider><path>``.

    ``path`` may hold aiohttp placeholders such as ``{account}``.
    """

    name: str
    path: str
    handler: WebhookHandler
    methods: tuple[str, ...] = ("POST",)


@dataclass(frozen=True, kw_only=True)
class SendResult:
    """What a provider said when it accepted a send."""

    provider_message_id: str
    #: The account key that sent (the command may leave it to the default).
    account: str
    #: State the provider reported (usually QUEUED, ACCEPTED or SENT).
    state: DeliveryState.ValueType = DeliveryState.DELIVERY_STATE_SENT
    provider_status: str = ""
    #: Billable segments or parts when known.
    segments: int = 0
    attributes: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class CallResult:
    """What a provider said when it accepted a :class:`CallCommand`."""

    #: The provider's id of the call placed or controlled (e.g. a Twilio CallSid).
    call_id: str
    #: The account key that acted (the command may leave it to the default).
    account: str
    #: The provider's status of the call after the command, verbatim.
    provider_status: str = ""
    attributes: Mapping[str, str] = field(default_factory=dict)


class Logger(Protocol):
    """The structured logger the runtime hands to connectors."""

    def debug(self, event: str, **kw: Any) -> Any: ...
    def info(self, event: str, **kw: Any) -> Any: ...
    def warning(self, event: str, **kw: Any) -> Any: ...
    def error(self, event: str, **kw: Any) -> Any: ...


class ConnectorContext(Protocol):
    """What the runtime gives a connector."""

    @property
    def http(self) -> aiohttp.ClientSession:
        """Shared HTTP client for provider APIs (timeouts set by the runtime)."""

    @property
    def log(self) -> Logger:
        """Logger bound to this connector."""

    def webhook_url(self, route: str, **path_params: str) -> str:
        """Public URL of one of this connector's routes (e.g. a StatusCallback)."""

    def now(self) -> datetime:
        """Current UTC time (injectable for tests)."""

    async def publish(self, events: Sequence[Event]) -> None:
        """Publish events that arrived outside a webhook (an SMTP session, an
        IMAP poll): deduped on their ids like webhook events, and confirmed by
        the broker. Raises :class:`~gateway.contract.errors.TransientError`
        unless every event is confirmed (the caller then refuses the input
        temporarily, e.g. SMTP 451). For a connector whose spec sets
        ``spool_on_outage``, an event the broker could not confirm is written
        to the runtime's durable spool when one is configured (and republished
        later); it raises then only when the spool refuses too."""

    async def quarantine(self, event: Event) -> None:
        """Publish input that must not be processed (a MIME bomb, say) with its
        raw bytes in ``event.raw``, to the dead-letter exchange with routing key
        ``quarantine.<channel>.<provider>``: kept for an operator, never
        retried. Raises TransientError unless the broker confirmed it."""


@runtime_checkable
class Connector(Protocol):
    """A provider connector. Built by :attr:`ConnectorSpec.factory`."""

    manifest: ConnectorManifest

    def webhook_routes(self) -> Sequence[WebhookRoute]:
        """The provider's webhook endpoints."""

    async def start(self) -> None:
        """Acquire resources; called once before any webhook or send."""

    async def stop(self) -> None:
        """Release resources; called once, after in-flight work finished."""

    async def send(self, command: SendMessageCommand) -> SendResult:
        """Send one message. Raises TransientError, PermanentError or
        AmbiguousSendError; the runtime decides retries from the type."""


@runtime_checkable
class CallControl(Protocol):
    """A voice connector that places and controls calls.

    Optional: the runtime consumes ``connector.<channel>.<provider>.call``
    only for connectors that implement this and list their actions in
    ``manifest.call_actions``.
    """

    async def call(self, command: CallCommand) -> CallResult:
        """Execute one call command (``command.WhichOneof("action")``).

        Raises TransientError (retried), PermanentError (e.g. the call is no
        longer live: code ``call_not_in_progress``) or AmbiguousSendError
        (the provider may have acted: a placed call is never placed twice).
        """


@dataclass(frozen=True, kw_only=True)
class ConnectorSpec:
    """What a connector's entry point names (``connectors.sms.twilio:SPEC``)."""

    channel: str
    provider: str
    #: Pydantic model of the connector's config section.
    settings: type[BaseModel]
    factory: Callable[[ConnectorContext, Any], Connector]
    #: What the connector can do (the gateway reads it without building one).
    manifest: ConnectorManifest
    #: How long inbound dedup remembers an event: at least the provider's retry window.
    dedup_ttl_seconds: int = 24 * 3600
    #: Write events the broker cannot confirm to the runtime's durable spool (when
    #: one is configured) and answer 2xx, instead of 503: for providers that do
    #: not retry a 5xx (Twilio), where a 503 loses the event.
    spool_on_outage: bool = False

    @property
    def name(self) -> str:
        """Registry name, ``<channel>.<provider>``."""
        return f"{self.channel}.{self.provider}"
