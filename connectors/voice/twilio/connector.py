"""Twilio Programmable Voice connector: calls answered from a call flow, call events.

Provider API: Voice webhooks and TwiML, REST API version 2010-04-01.
Docs: https://www.twilio.com/docs/voice/twiml and
https://www.twilio.com/docs/voice/api/call-resource#statuscallback

Routes (under ``/webhooks/voice/twilio``), one set per configured account;
every request carries a verified ``X-Twilio-Signature`` (the SMS connector's
verifier):

- ``/{account}/incoming``: the number's voice URL. Answered with the TwiML of
  the called number's flow (start step); publishes ``call.<state>``.
- ``/{account}/gather?flow=&step=``: a Gather's action. Publishes
  ``call.input`` (digits/speech) and answers the step the menu routes to.
- ``/{account}/record?flow=&step=``: a Record's action. Publishes
  ``call.recording`` and the voicemail as ``message.received`` (audio
  attachment); answers the record step's ``then`` step (or hangs up).
- ``/{account}/step?flow=&step=``: a Redirect target (``goto``).
- ``/{account}/hold?flow=&step=``: an Enqueue's waitUrl (hold music).
- ``/{account}/status``: call status callbacks -> ``call.<state>``.
- ``/{account}/recording``, ``/{account}/transcription``: recording status and
  transcribe callbacks -> ``call.recording`` / ``call.transcription``.

Call commands (:meth:`TwilioVoiceConnector.call`, the ``CallControl``
protocol), through the Calls REST API
(https://www.twilio.com/docs/voice/api/call-resource):

- ``place``: create a call whose ``Url`` is this connector's ``step`` route at
  the flow's start (the routes above then drive it), or whose ``Twiml`` says or
  plays a message and hangs up; the call's status callbacks come to
  ``/{account}/status`` (initiated, ringing, answered, completed), a whole-call
  recording (``record``) to ``/{account}/recording``.
- ``transfer`` / ``enqueue`` / ``speak``: update the live call with new TwiML
  (``<Dial>``; ``<Enqueue>`` whose waitUrl is the hold route of a flow step
  queueing into the same queue; ``<Say>``/``<Play>`` then ``<Redirect>`` to a
  flow step or ``<Hangup/>``).
- ``hang_up``: update the call with ``Status=completed``.

The answer routes (incoming, gather, record, step, hold) answer the flow even
when the broker is down (see :mod:`connectors.voice.answering`); the callback
routes answer 2xx only once their event is confirmed, like every webhook.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Self
from urllib.parse import urlencode

from multidict import MultiMapping
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from connectors.sms.twilio import webhooks
from connectors.sms.twilio.client import DEFAULT_API_BASE
from connectors.voice.answering import AnswerEvents
from connectors.voice.flow import (
    Callback,
    EnqueueSpec,
    ForwardSpec,
    Gather,
    PhoneNumber,
    Play,
    Prompt,
    Record,
    Say,
    hold_step,
    render_dial_twiml,
    render_enqueue_twiml,
    render_hold_twiml,
    render_speak_twiml,
    render_twiml,
)
from connectors.voice.settings import VoiceSettings
from connectors.voice.twilio import mapping
from connectors.voice.twilio.client import TwilioCallsClient
from gateway.api.v1.call_pb2 import (
    CallCommand,
    EnqueueCall,
    PlaceCall,
    SpeakToCall,
    TransferCall,
)
from gateway.api.v1.command_pb2 import SendMessageCommand
from gateway.api.v1.connector_pb2 import ConnectorLimits, ConnectorManifest
from gateway.api.v1.envelope_pb2 import Event, RawPayload
from gateway.contract import (
    AuthError,
    BadRequestError,
    CallResult,
    ConnectorContext,
    Inbound,
    PermanentError,
    Secret,
    SendResult,
    TransientError,
    WebhookReply,
    WebhookRequest,
    WebhookRoute,
    normalize_phone,
)
from gateway.contract.callbacks import traced_callback_url

FORM = "application/x-www-form-urlencoded"
TWIML = "text/xml"
HANGUP_TWIML = b'<?xml version="1.0" encoding="UTF-8"?><Response><Hangup /></Response>'
#: Longest ``Twiml`` parameter the Calls API takes (characters).
MAX_TWIML = 4000
#: Longest ring ``Timeout`` the Calls API takes (seconds).
MAX_RING_TIMEOUT = 600
#: Call progress events a placed call reports to the status route.
STATUS_EVENTS = ("initiated", "ringing", "answered", "completed")
_SIP = re.compile(r"^sips?:[^\s<>]+$")


class TwilioVoiceAccount(BaseModel):
    """One Twilio account (or sub-account)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    account_sid: str = Field(pattern=r"^AC[0-9a-fA-F]{32}$")
    auth_token: Secret
    #: Our number (E.164) that places calls when a command names no ``from``.
    caller_number: PhoneNumber | None = None


class TwilioVoiceSettings(VoiceSettings[TwilioVoiceAccount]):
    """``connectors.voice.twilio`` config section."""

    #: Twilio REST API base (a fake in tests).
    api_base_url: str = DEFAULT_API_BASE


MANIFEST = ConnectorManifest(
    channel="voice",
    provider="twilio",
    api_version="2010-04-01",
    docs_url="https://www.twilio.com/docs/voice/twiml",
    outbound_content=[],
    inbound_content=["media"],
    # Plus call.command: the outcome the runtime publishes for each call command.
    event_types=[*mapping.EVENT_TYPES, "call.command"],
    limits=ConnectorLimits(max_recipients=1),
    idempotent_send=False,
    # CallCommand actions this connector executes (TwilioVoiceConnector.call).
    call_actions=["place", "transfer", "enqueue", "speak", "hang_up"],
)


class TwilioVoiceConnector:
    """Twilio Voice: call flows answered as TwiML, call events published, calls
    placed and controlled by call commands."""

    manifest = MANIFEST

    def __init__(self, context: ConnectorContext, settings: TwilioVoiceSettings) -> None:
        self._ctx = context
        self._settings = settings
        self._flows = settings.call_flows
        self._answers = AnswerEvents(
            context, wait=settings.answer_publish_wait, max_pending=settings.max_pending_events
        )
        self._clients: dict[str, TwilioCallsClient] = {}
        # Rendered TwiML per (account, flow, step): a document depends only on
        # those and the configured flows, and rendering it was a third of an
        # answer webhook's CPU. Bounded by accounts x configured steps.
        self._twiml: dict[tuple[str, str, str], bytes] = {}

    @classmethod
    def create(cls, context: ConnectorContext, settings: TwilioVoiceSettings) -> Self:
        """Factory named by the entry point's spec."""
        return cls(context, settings)

    @property
    def answer_events(self) -> AnswerEvents:
        """The publisher of answer-webhook events (pending count for health checks)."""
        return self._answers

    def webhook_routes(self) -> Sequence[WebhookRoute]:
        answer = ("POST", "GET")
        return (
            WebhookRoute(
                name="incoming",
                path="/{account}/incoming",
                handler=self.on_incoming,
                methods=answer,
            ),
            WebhookRoute(name="gather", path="/{account}/gather", handler=self.on_gather),
            WebhookRoute(name="record", path="/{account}/record", handler=self.on_record),
            WebhookRoute(name="step", path="/{account}/step", handler=self.on_step),
            WebhookRoute(name="hold", path="/{account}/hold", handler=self.on_hold),
            WebhookRoute(name="status", path="/{account}/status", handler=self.on_status),
            WebhookRoute(name="recording", path="/{account}/recording", handler=self.on_recording),
            WebhookRoute(
                name="transcription", path="/{account}/transcription", handler=self.on_transcription
            ),
        )

    async def start(self) -> None:
        # Fail at start-up, not on the first call, when a route cannot be addressed.
        for key, account in self._settings.accounts.items():
            for kind in Callback:
                self._ctx.webhook_url(kind.value, account=key)
            self._ctx.webhook_url("status", account=key)
            self._clients[key] = TwilioCallsClient(
                self._ctx.http,
                api_base=self._settings.api_base_url,
                account_sid=account.account_sid,
                auth_token=account.auth_token.get_secret_value(),
            )

    async def stop(self) -> None:
        await self._answers.close(self._settings.drain_timeout)
        self._clients.clear()

    async def send(self, command: SendMessageCommand) -> SendResult:
        # Outbound calls are call commands (TwilioVoiceConnector.call), not messages.
        raise PermanentError(
            "voice.twilio does not send messages: place calls with call commands",
            code="unsupported",
        )

    # -- call commands (CallControl) -------------------------------------------

    async def call(self, command: CallCommand) -> CallResult:
        """Execute one call command through the Calls REST API.

        Raises PermanentError for a command that cannot succeed (an invalid
        target, an unknown account, flow or step, a call that ended: code
        ``call_not_in_progress``, or that Twilio does not know:
        ``call_not_found``), TransientError (429, 5xx, no connection, a
        hang-up whose answer was lost) or AmbiguousSendError (a placed call,
        transfer, enqueue or speak whose answer was lost: repeating it could
        ring someone twice, so it is never repeated).
        """
        action = command.WhichOneof("action")
        key = self._account_for(command)
        client = self._clients.get(key)
        if client is None:
            raise TransientError("voice.twilio is not started", code="not_started")
        if action == "place":
            resource = await client.create_call(self._place_form(key, command.place))
        elif action == "hang_up":
            resource = await client.update_call(
                command.hang_up.call_id, [("Status", "completed")], repeatable=True
            )
        elif action in ("transfer", "enqueue", "speak"):
            call_id, twiml = self._control_twiml(key, command)
            resource = await client.update_call(call_id, [("Twiml", twiml)], repeatable=False)
        else:
            raise PermanentError(
                f"voice.twilio cannot {action!r} a call", code="unsupported_action"
            )
        return CallResult(
            call_id=str(resource["sid"]),
            account=key,
            provider_status=str(resource.get("status") or ""),
        )

    def _account_for(self, command: CallCommand) -> str:
        key = self._settings.command_account(command.account)
        if key not in self._settings.accounts:
            raise PermanentError(f"unknown twilio account {key!r}", code="unknown_account")
        return key

    def _place_form(self, key: str, place: PlaceCall) -> list[tuple[str, str]]:
        number, sip = _target(place.to)
        caller = getattr(place, "from") or self._settings.accounts[key].caller_number
        if not caller:
            raise PermanentError(
                f"the command names no from and account {key!r} has no caller_number",
                code="no_caller_number",
            )
        try:
            caller = normalize_phone(caller)
        except BadRequestError as exc:
            raise PermanentError(f"from: {exc}", code="invalid_caller_id") from exc
        form: list[tuple[str, str]] = [("To", number or sip or ""), ("From", caller)]
        script = place.WhichOneof("script")
        if script == "flow":
            flow = self._flows.flows.get(place.flow)
            if flow is None:
                raise PermanentError(f"no call flow {place.flow!r}", code="unknown_flow")
            # The step route answers the flow's start once the callee picks up;
            # the gather/record/step routes continue it, as for an incoming call.
            form += [
                ("Url", self._urls(key)(Callback.STEP, place.flow, flow.start)),
                ("Method", "POST"),
            ]
        elif script in ("say", "play_url"):
            prompt = _prompt(place.say, place.play_url, place.language)
            form.append(("Twiml", _twiml(render_speak_twiml(prompt, voice=place.voice or None))))
        else:
            raise PermanentError("place needs a flow, say or play_url", code="missing_script")
        status_url = self._ctx.webhook_url("status", account=key)
        # The call command's span rides the URL, so the call's events link to it.
        form += [
            ("StatusCallback", traced_callback_url(status_url)),
            ("StatusCallbackMethod", "POST"),
        ]
        form += [("StatusCallbackEvent", event) for event in STATUS_EVENTS]
        if place.ring_timeout_seconds:
            if place.ring_timeout_seconds > MAX_RING_TIMEOUT:
                raise PermanentError(
                    f"ring_timeout_seconds is at most {MAX_RING_TIMEOUT}", code="invalid_timeout"
                )
            form.append(("Timeout", str(place.ring_timeout_seconds)))
        if place.record:
            # The whole-call recording comes back as call.recording on the recording route.
            form += [
                ("Record", "true"),
                ("RecordingStatusCallback", self._ctx.webhook_url("recording", account=key)),
                ("RecordingStatusCallbackMethod", "POST"),
            ]
        return form

    def _control_twiml(self, key: str, command: CallCommand) -> tuple[str, str]:
        """The call SID and new TwiML of a transfer, enqueue or speak."""
        urls = self._urls(key)
        if command.HasField("transfer"):
            transfer: TransferCall = command.transfer
            number, sip = _target(transfer.to)
            try:
                forward = ForwardSpec(number=number, sip=sip, caller_id=transfer.caller_id or None)
            except ValidationError as exc:
                raise PermanentError(f"transfer: {exc}", code="invalid_caller_id") from exc
            return transfer.call_id, _twiml(render_dial_twiml(forward))
        if command.HasField("enqueue"):
            enqueue: EnqueueCall = command.enqueue
            try:
                queue = EnqueueSpec(queue=enqueue.queue)
            except ValidationError as exc:
                raise PermanentError(f"enqueue: {exc}", code="invalid_queue") from exc
            # Hold music as configured for the same queue in a flow, if any.
            holding = hold_step(self._flows, queue.queue)
            wait_url = urls(Callback.HOLD, *holding) if holding else None
            return enqueue.call_id, _twiml(render_enqueue_twiml(queue, wait_url))
        speak: SpeakToCall = command.speak
        if speak.WhichOneof("script") is None:
            raise PermanentError("speak needs say or play_url", code="missing_script")
        prompt = _prompt(speak.say, speak.play_url, speak.language)
        then_url = None
        if speak.then_step:
            flow, _, step = speak.then_step.partition("/")
            try:
                self._flows.step(flow, step)
            except BadRequestError as exc:
                raise PermanentError(str(exc), code="unknown_flow_step") from exc
            then_url = urls(Callback.STEP, flow, step)
        document = render_speak_twiml(prompt, voice=speak.voice or None, then_url=then_url)
        return speak.call_id, _twiml(document)

    # -- helpers ---------------------------------------------------------------

    def _authenticate(self, request: WebhookRequest) -> tuple[str, MultiMapping[str], RawPayload]:
        key = request.path_params.get("account", "")
        account = self._settings.accounts.get(key)
        if account is None:
            # Same answer as a bad signature: do not reveal which keys exist.
            raise AuthError("unknown account", status=403)
        webhooks.verify(request, account.auth_token.get_secret_value())
        if request.method == "GET":
            params: MultiMapping[str] = request.query
            raw = RawPayload(content_type="text/uri-list", data=request.url.encode())
        else:
            params, raw = request.form, RawPayload(content_type=FORM, data=request.body)
        if params.get("AccountSid") and params["AccountSid"] != account.account_sid:
            raise AuthError("AccountSid does not match the account of this URL", status=403)
        return key, params, raw

    def _urls(self, account: str) -> _Urls:
        return _Urls(self._ctx, account)

    def _render(self, account: str, flow: str, step: str) -> bytes:
        """The TwiML of one flow step for one account (rendered once)."""
        key = (account, flow, step)
        twiml = self._twiml.get(key)
        if twiml is None:
            # An unknown flow or step raises here and is never cached.
            twiml = self._twiml[key] = render_twiml(self._flows, flow, step, self._urls(account))
        return twiml

    @staticmethod
    def _flow_step(request: WebhookRequest) -> tuple[str, str]:
        flow, step = request.query.get("flow", ""), request.query.get("step", "")
        if not flow or not step:
            raise BadRequestError("flow and step query parameters are required")
        return flow, step

    async def _answer(self, events: Sequence[Event], twiml: bytes) -> Inbound:
        # The TwiML is rendered before publishing: the call is answered whatever
        # the broker does; the runtime gets no events to wait on.
        await self._answers.submit(events)
        return Inbound(events=(), reply=WebhookReply(body=twiml, content_type=TWIML))

    # -- answer routes ---------------------------------------------------------

    async def on_incoming(self, request: WebhookRequest) -> Inbound:
        """The voice URL: answer the called number's flow."""
        key, params, raw = self._authenticate(request)
        flow = self._flows.flow_for(mapping.required(params, "To"))
        start = self._flows.flows[flow].start
        twiml = self._render(key, flow, start)
        event = mapping.status_event(
            params,
            account=key,
            raw=raw,
            received_at=self._ctx.now(),
            flow_step=f"{flow}/{start}",
        )
        return await self._answer([event], twiml)

    async def on_gather(self, request: WebhookRequest) -> Inbound:
        """A Gather's result: publish the input, answer the routed step."""
        key, params, raw = self._authenticate(request)
        flow, step = self._flow_step(request)
        _, actions = self._flows.step(flow, step)
        gather = actions[-1]
        if not isinstance(gather, Gather):
            raise BadRequestError(f"step {flow!r}/{step!r} has no gather")
        target = gather.gather.route(params.get("Digits", ""), params.get("SpeechResult", ""))
        twiml = self._render(key, flow, target) if target else HANGUP_TWIML
        event = mapping.input_event(
            params,
            account=key,
            flow_step=f"{flow}/{step}",
            idempotency_token=request.headers.get(mapping.IDEMPOTENCY_HEADER, ""),
            raw=raw,
            received_at=self._ctx.now(),
        )
        if target:
            event.attributes["voice.next_step"] = target
        return await self._answer([event], twiml)

    async def on_record(self, request: WebhookRequest) -> Inbound:
        """A Record's end: publish the recording and voicemail, answer ``then``."""
        key, params, raw = self._authenticate(request)
        flow, step = self._flow_step(request)
        _, actions = self._flows.step(flow, step)
        record = actions[-1]
        if not isinstance(record, Record):
            raise BadRequestError(f"step {flow!r}/{step!r} has no record")
        then = record.record.then
        twiml = self._render(key, flow, then) if then else HANGUP_TWIML
        now = self._ctx.now()
        events: list[Event] = []
        if params.get("RecordingSid"):
            events.append(
                mapping.recording_event(
                    params, account=key, flow_step=f"{flow}/{step}", raw=raw, received_at=now
                )
            )
            voicemail = mapping.voicemail_message(
                params, account=key, flow_step=f"{flow}/{step}", raw=raw, received_at=now
            )
            if voicemail is not None:
                events.append(voicemail)
        return await self._answer(events, twiml)

    async def on_step(self, request: WebhookRequest) -> Inbound:
        """A Redirect (``goto``): answer the named step."""
        key, _, _ = self._authenticate(request)
        flow, step = self._flow_step(request)
        return await self._answer((), self._render(key, flow, step))

    async def on_hold(self, request: WebhookRequest) -> Inbound:
        """An Enqueue's waitUrl: the step's hold music."""
        self._authenticate(request)
        flow, step = self._flow_step(request)
        return await self._answer((), render_hold_twiml(self._flows, flow, step))

    # -- callbacks (confirmed before 2xx) -----------------------------------------

    async def on_status(self, request: WebhookRequest) -> Inbound:
        """A call status callback."""
        key, params, raw = self._authenticate(request)
        event = mapping.status_event(params, account=key, raw=raw, received_at=self._ctx.now())
        return Inbound(events=[event], reply=WebhookReply(status=204))

    async def on_recording(self, request: WebhookRequest) -> Inbound:
        """A recordingStatusCallback."""
        key, params, raw = self._authenticate(request)
        step = "/".join(filter(None, (request.query.get("flow"), request.query.get("step"))))
        event = mapping.recording_event(
            params, account=key, flow_step=step, raw=raw, received_at=self._ctx.now()
        )
        return Inbound(events=[event], reply=WebhookReply(status=204))

    async def on_transcription(self, request: WebhookRequest) -> Inbound:
        """A transcribeCallback."""
        key, params, raw = self._authenticate(request)
        step = "/".join(filter(None, (request.query.get("flow"), request.query.get("step"))))
        event = mapping.transcription_event(
            params, account=key, flow_step=step, raw=raw, received_at=self._ctx.now()
        )
        return Inbound(events=[event], reply=WebhookReply(status=204))


def _target(raw: str) -> tuple[str | None, str | None]:
    """(E.164 number, None) or (None, SIP URI) of a call target."""
    value = raw.strip()
    if _SIP.match(value):
        return None, value
    if not value.startswith("+"):
        # Twilio would dial a national number in some country; we do not guess.
        raise PermanentError(
            f"call target must be E.164 (+...) or a sip: URI, got {raw!r}", code="invalid_target"
        )
    try:
        return normalize_phone(value), None
    except BadRequestError as exc:
        raise PermanentError(f"call target: {exc}", code="invalid_target") from exc


def _prompt(say: str, play_url: str, language: str) -> Prompt:
    """What a place or speak command says or plays, validated as a flow step's."""
    try:
        if say:
            return Say(say=say, language=language or None)
        return Play(play=play_url)
    except ValidationError as exc:
        raise PermanentError(f"invalid script: {exc}", code="invalid_script") from exc


def _twiml(document: bytes) -> str:
    text = document.decode("utf-8")
    if len(text) > MAX_TWIML:
        raise PermanentError(
            f"the TwiML is {len(text)} characters, twilio takes at most {MAX_TWIML}",
            code="twiml_too_long",
        )
    return text


class _Urls:
    """Callback URLs of one account's routes, naming the flow step in the query."""

    def __init__(self, context: ConnectorContext, account: str) -> None:
        self._ctx, self._account = context, account

    def __call__(self, kind: Callback, flow: str, step: str) -> str:
        base = self._ctx.webhook_url(kind.value, account=self._account)
        return f"{base}?{urlencode({'flow': flow, 'step': step})}"
