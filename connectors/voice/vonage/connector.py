"""Vonage Voice API connector: calls answered with NCCO from a call flow, call events.

Provider API: Voice API v1 webhooks and NCCO.
Docs: https://developer.vonage.com/en/voice/voice-api/webhook-reference and
https://developer.vonage.com/en/voice/voice-api/ncco-reference

Routes (under ``/webhooks/voice/vonage``), one set per configured account
(a Vonage application); every request carries ``Authorization: Bearer <JWT>``
signed (HS256) with the account's signature secret, checked with the SMS
connector's verifier (``iat`` window, ``payload_hash`` of the body):

- ``/{account}/answer`` (GET or POST): the application's answer_url. Answered
  with the NCCO of the called number's flow; publishes ``call.answered``.
- ``/{account}/event``: the application's event_url -> ``call.<state>``
  (statuses without a canonical state -> ``call.progress``).
- ``/{account}/gather?flow=&step=``: an input action's eventUrl. Publishes
  ``call.input`` and answers the NCCO of the step the menu routes to.
- ``/{account}/recording?flow=&step=&call=``: a record action's eventUrl.
- ``/{account}/transcription?flow=&step=&call=``: a transcription eventUrl
  (Vonage sends a transcription URL, kept as an attribute; the text is not fetched).

Answer routes answer even while the broker is down (see
:mod:`connectors.voice.answering`); the others answer 2xx once confirmed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Self
from urllib.parse import urlencode

from pydantic import BaseModel, ConfigDict, Field

from connectors.sms.vonage import webhooks
from connectors.voice.answering import AnswerEvents
from connectors.voice.flow import Callback, Gather, VoiceFlows, ncco_json, render_ncco
from connectors.voice.vonage import mapping
from gateway.api.v1.call_pb2 import CallState
from gateway.api.v1.command_pb2 import SendMessageCommand
from gateway.api.v1.connector_pb2 import ConnectorLimits, ConnectorManifest
from gateway.api.v1.envelope_pb2 import Event, RawPayload
from gateway.contract import (
    AuthError,
    BadRequestError,
    ConnectorContext,
    Inbound,
    PermanentError,
    Secret,
    SendResult,
    WebhookReply,
    WebhookRequest,
    WebhookRoute,
)

JSON = "application/json"


class VonageVoiceAccount(BaseModel):
    """One Vonage application and the secret its webhooks are signed with."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    application_id: str = Field(min_length=1)
    signature_secret: Secret
    #: Oldest accepted webhook JWT ``iat``, in seconds.
    signature_max_age: float = Field(default=300.0, gt=0)


class VonageVoiceSettings(BaseModel):
    """``connectors.voice.vonage`` config section."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    accounts: dict[str, VonageVoiceAccount] = Field(min_length=1)
    call_flows: VoiceFlows
    answer_publish_wait: float = Field(default=0.05, ge=0, le=2)
    max_pending_events: int = Field(default=10_000, ge=1)
    drain_timeout: float = Field(default=5.0, ge=0)


MANIFEST = ConnectorManifest(
    channel="voice",
    provider="vonage",
    api_version="v1",
    docs_url="https://developer.vonage.com/en/voice/voice-api/webhook-reference",
    outbound_content=[],
    inbound_content=[],
    event_types=list(mapping.EVENT_TYPES),
    limits=ConnectorLimits(max_recipients=1),
    idempotent_send=False,
    call_actions=["place", "transfer", "enqueue", "speak", "hang_up"],
)


class VonageVoiceConnector:
    """Vonage Voice in: call flows answered as NCCO, call events published."""

    manifest = MANIFEST

    def __init__(self, context: ConnectorContext, settings: VonageVoiceSettings) -> None:
        self._ctx = context
        self._settings = settings
        self._flows = settings.call_flows
        self._answers = AnswerEvents(
            context, wait=settings.answer_publish_wait, max_pending=settings.max_pending_events
        )

    @classmethod
    def create(cls, context: ConnectorContext, settings: VonageVoiceSettings) -> Self:
        """Factory named by the entry point's spec."""
        return cls(context, settings)

    def webhook_routes(self) -> Sequence[WebhookRoute]:
        return (
            WebhookRoute(
                name="answer",
                path="/{account}/answer",
                handler=self.on_answer,
                methods=("GET", "POST"),
            ),
            WebhookRoute(name="event", path="/{account}/event", handler=self.on_event),
            WebhookRoute(name="gather", path="/{account}/gather", handler=self.on_gather),
            WebhookRoute(name="recording", path="/{account}/recording", handler=self.on_recording),
            WebhookRoute(
                name="transcription", path="/{account}/transcription", handler=self.on_transcription
            ),
        )

    async def start(self) -> None:
        for account in self._settings.accounts:
            for kind in (Callback.GATHER, Callback.RECORDING, Callback.TRANSCRIPTION):
                self._ctx.webhook_url(kind.value, account=account)

    async def stop(self) -> None:
        await self._answers.close(self._settings.drain_timeout)

    async def send(self, command: SendMessageCommand) -> SendResult:
        # Outbound calls are call commands (issue 6, not built yet), not messages.
        raise PermanentError(
            "voice.vonage does not send messages: place calls with call commands",
            code="unsupported",
        )

    # -- helpers ---------------------------------------------------------------

    def _authenticate(self, request: WebhookRequest) -> tuple[str, dict[str, Any], RawPayload]:
        key = request.path_params.get("account", "")
        account = self._settings.accounts.get(key)
        if account is None:
            raise AuthError("unknown account", status=403)
        claims = webhooks.verify_jwt(
            request,
            account.signature_secret.get_secret_value(),
            now=self._ctx.now().timestamp(),
            max_age=account.signature_max_age,
        )
        application = claims.get("application_id")
        if application is not None and application != account.application_id:
            raise AuthError("JWT application_id does not match the account of this URL", status=403)
        if request.method == "GET":
            body: dict[str, Any] = dict(request.query)
            raw = RawPayload(content_type="text/uri-list", data=request.url.encode())
        else:
            body, raw = webhooks.json_object(request), webhooks.raw_json(request)
        return key, body, raw

    def _urls(self, account: str, call_id: str) -> _Urls:
        return _Urls(self._ctx, account, call_id)

    @staticmethod
    def _flow_step(request: WebhookRequest) -> tuple[str, str]:
        flow, step = request.query.get("flow", ""), request.query.get("step", "")
        if not flow or not step:
            raise BadRequestError("flow and step query parameters are required")
        return flow, step

    async def _answer(self, events: Sequence[Event], ncco: list[dict[str, Any]]) -> Inbound:
        await self._answers.submit(events)
        return Inbound(events=(), reply=WebhookReply(body=ncco_json(ncco), content_type=JSON))

    # -- routes ----------------------------------------------------------------

    async def on_answer(self, request: WebhookRequest) -> Inbound:
        """The answer_url: the called number's flow as NCCO."""
        key, body, raw = self._authenticate(request)
        uuid = mapping.required(body, "uuid")
        flow = self._flows.flow_for("+" + mapping.required(body, "to").lstrip("+"))
        start = self._flows.flows[flow].start
        called = "+" + mapping.required(body, "to").lstrip("+")
        ncco = render_ncco(self._flows, flow, start, self._urls(key, uuid), from_number=called)
        event = mapping.call_event(
            {**body, "status": "answered"},
            account=key,
            event_type="call.answered",
            state=CallState.CALL_STATE_ANSWERED,
            # The same id as the event webhook's 'answered' for this leg.
            id_parts=("answered",),
            raw=raw,
            received_at=self._ctx.now(),
            flow_step=f"{flow}/{start}",
        )
        return await self._answer([event], ncco)

    async def on_event(self, request: WebhookRequest) -> Inbound:
        """The event_url: call status events."""
        key, body, raw = self._authenticate(request)
        event = mapping.status_event(body, account=key, raw=raw, received_at=self._ctx.now())
        return Inbound(events=[event], reply=WebhookReply(status=204))

    async def on_gather(self, request: WebhookRequest) -> Inbound:
        """An input result: publish it, answer the routed step's NCCO."""
        key, body, raw = self._authenticate(request)
        flow, step = self._flow_step(request)
        _, actions = self._flows.step(flow, step)
        gather = actions[-1]
        if not isinstance(gather, Gather):
            raise BadRequestError(f"step {flow!r}/{step!r} has no gather")
        event = mapping.input_event(
            body, account=key, flow_step=f"{flow}/{step}", raw=raw, received_at=self._ctx.now()
        )
        target = gather.gather.route(event.call.dtmf, event.call.speech)
        # No route and no default: an empty NCCO ends the call.
        ncco = (
            render_ncco(
                self._flows,
                flow,
                target,
                self._urls(key, event.call.call_id),
                from_number=event.call.to if event.call.to.startswith("+") else None,
            )
            if target
            else []
        )
        if target:
            event.attributes["voice.next_step"] = target
        return await self._answer([event], ncco)

    async def on_recording(self, request: WebhookRequest) -> Inbound:
        """A record action's recording is ready."""
        key, body, raw = self._authenticate(request)
        flow, step = self._flow_step(request)
        call_id = request.query.get("call", "")
        if not call_id:
            raise BadRequestError("call query parameter is required")
        event = mapping.recording_event(
            body,
            account=key,
            flow_step=f"{flow}/{step}",
            raw=raw,
            received_at=self._ctx.now(),
            call_id=call_id,
        )
        return Inbound(events=[event], reply=WebhookReply(status=204))

    async def on_transcription(self, request: WebhookRequest) -> Inbound:
        """A transcription is ready (its URL; the text is not fetched yet)."""
        key, body, raw = self._authenticate(request)
        flow, step = self._flow_step(request)
        call_id = request.query.get("call", "")
        if not call_id:
            raise BadRequestError("call query parameter is required")
        recording_uuid = mapping.required(body, "recording_uuid")
        event = mapping.call_event(
            {**body, "uuid": call_id},
            account=key,
            event_type="call.transcription",
            state=CallState.CALL_STATE_ANSWERED,
            id_parts=(recording_uuid, mapping.text(body, "status") or "-"),
            raw=raw,
            received_at=self._ctx.now(),
            flow_step=f"{flow}/{step}",
        )
        return Inbound(events=[event], reply=WebhookReply(status=204))


class _Urls:
    """Callback URLs of one call's flow steps (the leg uuid rides along)."""

    def __init__(self, context: ConnectorContext, account: str, call_id: str) -> None:
        self._ctx, self._account, self._call = context, account, call_id

    def __call__(self, kind: Callback, flow: str, step: str) -> str:
        base = self._ctx.webhook_url(kind.value, account=self._account)
        return f"{base}?{urlencode({'flow': flow, 'step': step, 'call': self._call})}"
