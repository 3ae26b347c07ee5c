"""Vonage Voice API connector: calls answered with NCCO from a call flow, call events,
calls placed and controlled by call commands.

Provider API: Voice API v1 (calls, webhooks and NCCO).
Docs: https://developer.vonage.com/en/voice/voice-api/webhook-reference,
https://developer.vonage.com/en/voice/voice-api/ncco-reference and
https://developer.vonage.com/en/api/voice

Routes (under ``/webhooks/voice/vonage``), one set per configured account
(a Vonage application); every request carries ``Authorization: Bearer <JWT>``
signed (HS256) with the account's signature secret, checked with the SMS
connector's verifier (``iat`` window, ``payload_hash`` of the body):

- ``/{account}/answer`` (GET or POST): the application's answer_url. Answered
  with the NCCO of the called number's flow; publishes ``call.answered``. A
  call we placed names its script in the query (``placed=1`` and ``flow=``, or
  ``say=``/``play=``, and ``record=1``): see :mod:`.commands`.
- ``/{account}/event``: the application's event_url -> ``call.<state>``
  (statuses without a canonical state -> ``call.progress``).
- ``/{account}/gather?flow=&step=``: an input action's eventUrl. Publishes
  ``call.input`` and answers the NCCO of the step the menu routes to.
- ``/{account}/recording?flow=&step=&call=&caller=&called=``: a record
  action's eventUrl -> ``call.recording``; a flow's record step is a
  voicemail, also published as ``message.received`` with the audio attached.
  Without flow and step: the whole-call recording of a placed call.
- ``/{account}/transcription?flow=&step=&call=``: a transcription eventUrl
  (Vonage sends a transcription URL, kept as an attribute; the text is not fetched).

Answer routes answer even while the broker is down (see
:mod:`connectors.voice.answering`); the others answer 2xx once confirmed.

Call commands (:meth:`VonageVoiceConnector.call`, the ``CallControl``
protocol) go through :class:`~connectors.voice.vonage.client.VonageVoiceClient`
with the account's application key; :mod:`.commands` maps each action.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Self
from urllib.parse import urlencode

from pydantic import BaseModel, ConfigDict, Field

from connectors.sms.vonage import webhooks
from connectors.sms.vonage.client import ApplicationJwt
from connectors.voice.answering import AnswerEvents
from connectors.voice.flow import Callback, Gather, PhoneNumber, Record, ncco_json, render_ncco
from connectors.voice.settings import VoiceSettings
from connectors.voice.vonage import commands, mapping
from connectors.voice.vonage.client import DEFAULT_API_BASE, VonageVoiceClient
from gateway.api.v1.call_pb2 import (
    CallCommand,
    CallState,
    EnqueueCall,
    HangUpCall,
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
    #: The application's private key (PEM): signs the RS256 JWTs of Voice API
    #: calls. Without it the account answers calls but cannot place or control them.
    private_key: Secret | None = None
    #: Caller id (E.164, one of the application's numbers) of placed calls that
    #: name none and of transfers; None lets Vonage pick one (random_from_number).
    caller_number: PhoneNumber | None = None


class VonageVoiceSettings(VoiceSettings[VonageVoiceAccount]):
    """``connectors.voice.vonage`` config section."""

    #: Voice API base URL (calls placed and controlled).
    api_base_url: str = DEFAULT_API_BASE


MANIFEST = ConnectorManifest(
    channel="voice",
    provider="vonage",
    api_version="v1",
    docs_url="https://developer.vonage.com/en/voice/voice-api/webhook-reference",
    outbound_content=[],
    # Voicemails, as message.received with the audio attached.
    inbound_content=["media"],
    # Plus call.command: the outcome the runtime publishes for each call command.
    event_types=[*mapping.EVENT_TYPES, "call.command"],
    limits=ConnectorLimits(max_recipients=1),
    idempotent_send=False,
    call_actions=["place", "transfer", "enqueue", "speak", "hang_up"],
)


class VonageVoiceConnector:
    """Vonage Voice: call flows answered as NCCO, call events published, calls
    placed and controlled through the Voice API (:class:`CallControl`)."""

    manifest = MANIFEST

    def __init__(self, context: ConnectorContext, settings: VonageVoiceSettings) -> None:
        self._ctx = context
        self._settings = settings
        self._flows = settings.call_flows
        self._answers = AnswerEvents(
            context, wait=settings.answer_publish_wait, max_pending=settings.max_pending_events
        )
        self._clients: dict[str, VonageVoiceClient] = {}

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
            self._ctx.webhook_url("answer", account=account)
            self._ctx.webhook_url("event", account=account)

    async def stop(self) -> None:
        await self._answers.close(self._settings.drain_timeout)

    async def send(self, command: SendMessageCommand) -> SendResult:
        # Calls are placed with call commands (``call``), not message sends.
        raise PermanentError(
            "voice.vonage does not send messages: place calls with call commands",
            code="unsupported",
        )

    # -- call control ------------------------------------------------------------

    async def call(self, command: CallCommand) -> CallResult:
        """Execute one call command through the Voice API (see :mod:`.commands`)."""
        key = self._account_key(command.account)
        client = self._client(key)
        action = command.WhichOneof("action")
        if action == "place":
            return await self._place(key, client, command.place)
        if action == "transfer":
            return await self._transfer(key, client, command.transfer)
        if action == "enqueue":
            return await self._enqueue(key, client, command.enqueue)
        if action == "speak":
            return await self._speak(key, client, command.speak)
        if action == "hang_up":
            return await self._hang_up(key, client, command.hang_up)
        raise PermanentError("the call command names no action", code="invalid_command")

    def _account_key(self, requested: str) -> str:
        key = self._settings.command_account(requested)
        if key not in self._settings.accounts:
            raise PermanentError(f"unknown voice.vonage account {key!r}", code="unknown_account")
        return key

    def _client(self, key: str) -> VonageVoiceClient:
        client = self._clients.get(key)
        if client is None:
            account = self._settings.accounts[key]
            if account.private_key is None:
                raise PermanentError(
                    f"voice.vonage account {key!r} has no private_key: it cannot place or "
                    "control calls",
                    code="not_configured",
                )
            client = VonageVoiceClient(
                self._ctx.http,
                api_base=self._settings.api_base_url,
                application_jwt=ApplicationJwt(
                    account.application_id, account.private_key.get_secret_value()
                ),
            )
            self._clients[key] = client
        return client

    def _caller_id(self, key: str, requested: str) -> str | None:
        if requested:
            return commands.e164_digits(requested, code="invalid_from", what="caller id")
        number = self._settings.accounts[key].caller_number
        return number.removeprefix("+") if number else None

    @staticmethod
    def _call_id(value: str) -> str:
        if not value:
            raise PermanentError("the command names no call_id", code="invalid_command")
        return value

    async def _place(self, key: str, client: VonageVoiceClient, place: PlaceCall) -> CallResult:
        to = commands.endpoint(place.to)
        caller = self._caller_id(key, getattr(place, "from"))
        ring = commands.ringing_timer(place.ring_timeout_seconds)
        script = place.WhichOneof("script")
        event_url = self._ctx.webhook_url("event", account=key)
        if script is None:
            raise PermanentError("place names no flow, say or play_url", code="invalid_command")
        if script == "flow" and place.flow not in self._flows.flows:
            raise PermanentError(f"unknown call flow {place.flow!r}", code="unknown_flow")
        ncco: list[dict[str, Any]] | None = None
        answer_url: str | None = None
        if script == "flow" or place.record:
            # The answer route renders the script once Vonage names the leg.
            query = {"placed": "1", "record": "1" if place.record else ""}
            if script == "flow":
                query["flow"] = place.flow
            elif script == "say":
                commands.talk(place.say, language=place.language, voice=place.voice)
                query |= {"say": place.say, "language": place.language, "style": place.voice}
            else:
                commands.stream(place.play_url)
                query["play"] = place.play_url
            answer_url = _with_query(
                self._ctx.webhook_url("answer", account=key),
                {k: v for k, v in query.items() if v},
            )
        elif script == "say":
            ncco = [commands.talk(place.say, language=place.language, voice=place.voice)]
        else:
            ncco = [commands.stream(place.play_url)]
        created = await client.create_call(
            commands.create_call(
                to=to,
                from_number=caller,
                event_url=event_url,
                ncco=ncco,
                answer_url=answer_url,
                ring_seconds=ring,
            )
        )
        attributes = {"vonage.conversation_uuid": created.conversation_uuid}
        if created.direction:
            attributes["vonage.direction"] = created.direction
        return CallResult(
            call_id=created.uuid,
            account=key,
            provider_status=created.status,
            attributes={k: v for k, v in attributes.items() if v},
        )

    async def _transfer(
        self, key: str, client: VonageVoiceClient, transfer: TransferCall
    ) -> CallResult:
        call_id = self._call_id(transfer.call_id)
        ncco = [
            commands.connect(
                commands.endpoint(transfer.to), self._caller_id(key, transfer.caller_id)
            )
        ]
        await client.modify_call(call_id, commands.transfer(ncco), idempotent=False)
        return CallResult(call_id=call_id, account=key)

    async def _enqueue(
        self, key: str, client: VonageVoiceClient, enqueue: EnqueueCall
    ) -> CallResult:
        call_id = self._call_id(enqueue.call_id)
        music = commands.hold_music(self._flows, enqueue.queue)
        ncco = [commands.conversation(enqueue.queue, music)]
        await client.modify_call(call_id, commands.transfer(ncco), idempotent=False)
        return CallResult(call_id=call_id, account=key, attributes={"voice.queue": enqueue.queue})

    async def _speak(self, key: str, client: VonageVoiceClient, speak: SpeakToCall) -> CallResult:
        call_id = self._call_id(speak.call_id)
        script = speak.WhichOneof("script")
        if script == "say":
            prompt = commands.talk(speak.say, language=speak.language, voice=speak.voice)
        elif script == "play_url":
            prompt = commands.stream(speak.play_url)
        else:
            raise PermanentError("speak names neither say nor play_url", code="invalid_command")
        ncco = [prompt]
        if speak.then_step:
            flow, _, step = speak.then_step.partition("/")
            try:
                ncco += render_ncco(
                    self._flows,
                    flow,
                    step,
                    self._urls(key, call_id),
                    from_number=self._settings.accounts[key].caller_number,
                )
            except BadRequestError as exc:
                raise PermanentError(str(exc), code="unknown_step") from exc
        await client.modify_call(call_id, commands.transfer(ncco), idempotent=False)
        return CallResult(call_id=call_id, account=key)

    async def _hang_up(
        self, key: str, client: VonageVoiceClient, hang_up: HangUpCall
    ) -> CallResult:
        call_id = self._call_id(hang_up.call_id)
        await client.modify_call(call_id, commands.HANGUP, idempotent=True)
        return CallResult(call_id=call_id, account=key)

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

    def _urls(
        self, account: str, call_id: str, *, outbound: bool = False, parties: _Parties | None = None
    ) -> _Urls:
        return _Urls(self._ctx, account, call_id, outbound=outbound, parties=parties)

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
        """The answer_url: the called number's flow as NCCO, or a placed call's script."""
        key, body, raw = self._authenticate(request)
        uuid = mapping.required(body, "uuid")
        to = _plus(mapping.required(body, "to"))
        if request.query.get("placed"):
            return await self._answer_placed(request.query, key, body, raw, uuid, to)
        flow = self._flows.flow_for(to)
        start = self._flows.flows[flow].start
        caller = _plus(mapping.text(body, "from"))
        urls = self._urls(key, uuid, parties=_Parties(caller=caller, called=to))
        ncco = render_ncco(self._flows, flow, start, urls, from_number=to)
        event = self._answered(body, key, raw, flow_step=f"{flow}/{start}")
        return await self._answer([event], ncco)

    async def _answer_placed(
        self,
        query: Mapping[str, str],
        key: str,
        body: dict[str, Any],
        raw: RawPayload,
        uuid: str,
        to: str,
    ) -> Inbound:
        # A call we placed: 'to' is the callee, 'from' our number.
        ours = _plus(mapping.text(body, "from"))
        urls = self._urls(key, uuid, outbound=True, parties=_Parties(caller=to, called=ours))
        ncco: list[dict[str, Any]] = []
        if query.get("record"):
            ncco.append(commands.record_call(urls.recording()))
        flow_step = ""
        try:
            if query.get("flow"):
                flow = query["flow"]
                if flow not in self._flows.flows:
                    raise BadRequestError(f"unknown call flow {flow!r}")
                start = self._flows.flows[flow].start
                flow_step = f"{flow}/{start}"
                ncco += render_ncco(
                    self._flows, flow, start, urls, from_number=ours if ours[1:].isdigit() else None
                )
            elif query.get("say"):
                ncco.append(
                    commands.talk(
                        query["say"],
                        language=query.get("language", ""),
                        voice=query.get("style", ""),
                    )
                )
            elif query.get("play"):
                ncco.append(commands.stream(query["play"]))
            else:
                raise BadRequestError("a placed call's answer_url names no script")
        except PermanentError as exc:
            raise BadRequestError(str(exc)) from exc
        event = self._answered({**body, "direction": "outbound"}, key, raw, flow_step=flow_step)
        return await self._answer([event], ncco)

    def _answered(
        self, body: dict[str, Any], key: str, raw: RawPayload, *, flow_step: str
    ) -> Event:
        return mapping.call_event(
            {**body, "status": "answered"},
            account=key,
            event_type="call.answered",
            state=CallState.CALL_STATE_ANSWERED,
            # The same id as the event webhook's 'answered' for this leg.
            id_parts=("answered",),
            raw=raw,
            received_at=self._ctx.now(),
            flow_step=flow_step,
        )

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
        outbound = request.query.get("out") == "1"
        if outbound:
            body = {**body, "direction": "outbound"}
        event = mapping.input_event(
            body, account=key, flow_step=f"{flow}/{step}", raw=raw, received_at=self._ctx.now()
        )
        target = gather.gather.route(event.call.dtmf, event.call.speech)
        caller, called = getattr(event.call, "from"), event.call.to
        # For a call we placed the remote party is the callee.
        parties = _Parties(caller=called, called=caller) if outbound else _Parties(caller, called)
        ours = parties.called
        # No route and no default: an empty NCCO ends the call.
        ncco = (
            render_ncco(
                self._flows,
                flow,
                target,
                self._urls(key, event.call.call_id, outbound=outbound, parties=parties),
                from_number=ours if ours.startswith("+") else None,
            )
            if target
            else []
        )
        if target:
            event.attributes["voice.next_step"] = target
        return await self._answer([event], ncco)

    async def on_recording(self, request: WebhookRequest) -> Inbound:
        """A record action's recording is ready: ``call.recording``, and for a
        flow's record step (a voicemail) also ``message.received`` with the audio."""
        key, body, raw = self._authenticate(request)
        call_id = request.query.get("call", "")
        if not call_id:
            raise BadRequestError("call query parameter is required")
        flow, step = request.query.get("flow", ""), request.query.get("step", "")
        if bool(flow) != bool(step):
            raise BadRequestError("flow and step query parameters go together")
        flow_step = f"{flow}/{step}" if flow else ""
        if request.query.get("out") == "1":
            body = {**body, "direction": "outbound"}
        now = self._ctx.now()
        event = mapping.recording_event(
            body, account=key, flow_step=flow_step, raw=raw, received_at=now, call_id=call_id
        )
        events = [event]
        caller, called = request.query.get("caller", ""), request.query.get("called", "")
        if flow and caller and called and self._is_record_step(flow, step):
            events.append(
                mapping.voicemail_message(
                    body,
                    account=key,
                    call_id=call_id,
                    caller=caller,
                    called=called,
                    flow_step=flow_step,
                    raw=raw,
                    received_at=now,
                )
            )
        return Inbound(events=events, reply=WebhookReply(status=204))

    def _is_record_step(self, flow: str, step: str) -> bool:
        _, actions = self._flows.step(flow, step)
        return isinstance(actions[-1], Record)

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


def _plus(number: str) -> str:
    # Vonage writes E.164 without '+'; SIP URIs and app users stay as they are.
    return "+" + number if number.isdigit() else number


def _with_query(url: str, query: Mapping[str, str]) -> str:
    return f"{url}{'&' if '?' in url else '?'}{urlencode(query)}"


class _Parties:
    """The remote party (who leaves a voicemail) and our number of one call."""

    def __init__(self, caller: str, called: str) -> None:
        self.caller, self.called = caller, called


class _Urls:
    """Callback URLs of one call's flow steps (the leg uuid rides along).

    Vonage's record and input webhooks name neither the leg nor the parties,
    so the URLs carry what the routes need: the leg uuid; ``out=1`` on a call
    we placed (its input webhooks' ``to`` is the remote party, and its events
    are outbound); the caller and
    our number on record eventUrls (a voicemail's sender and recipient).
    """

    def __init__(
        self,
        context: ConnectorContext,
        account: str,
        call_id: str,
        *,
        outbound: bool = False,
        parties: _Parties | None = None,
    ) -> None:
        self._ctx, self._account, self._call = context, account, call_id
        self._outbound, self._parties = outbound, parties

    def __call__(self, kind: Callback, flow: str, step: str) -> str:
        query = {"flow": flow, "step": step, "call": self._call}
        if kind in (Callback.GATHER, Callback.RECORDING) and self._outbound:
            query["out"] = "1"
        if kind is Callback.RECORDING and self._parties is not None:
            query |= {"caller": self._parties.caller, "called": self._parties.called}
        return _with_query(self._ctx.webhook_url(kind.value, account=self._account), query)

    def recording(self) -> str:
        """The recording route of the whole call's recording (no flow step)."""
        query = {"call": self._call, **({"out": "1"} if self._outbound else {})}
        return _with_query(
            self._ctx.webhook_url(Callback.RECORDING.value, account=self._account), query
        )
