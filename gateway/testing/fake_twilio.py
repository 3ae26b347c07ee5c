"""A fake Twilio Messages and Calls API over real HTTP, built from Twilio's documented payloads.

It answers ``POST /2010-04-01/Accounts/{sid}/Messages.json`` like Twilio (201
with a message resource, or Twilio's error body), records every call, can be
scripted to fail (429 with Retry-After, 5xx, a hang past the client timeout,
a 4xx rejection), and plays the message's life back to the ``StatusCallback``
URL as signed status callbacks (queued, sent, delivered), as Twilio does.

Calls (https://www.twilio.com/docs/voice/api/call-resource): ``POST
.../Calls.json`` creates a call (To, From and one of Url/Twiml/ApplicationSid
required, else Twilio's 400 error body) and answers 201 with the call resource
(``CA...`` sid, status ``queued``); the callee then goes through
:attr:`FakeTwilio.call_progress` (initiated, ringing, answered, completed by
default): each step the create asked for in ``StatusCallbackEvent`` is POSTed
to ``StatusCallback`` signed with the auth token, as Twilio reports call
progress, and on answer the call's ``Url`` is fetched (signed) like Twilio
fetches TwiML. ``POST .../Calls/{sid}.json`` updates a call: 404 (20404) for a
sid it never created, 400 (21220) once the call ended, ``Status=completed``
hangs up (a ``completed`` callback follows), ``Twiml``/``Url`` are recorded.
A call created with ``Record=true`` that was answered reports its recording to
``RecordingStatusCallback`` once it ends.
Every request is recorded in :attr:`FakeTwilio.call_requests`.

Use it by pointing ``connectors.sms.twilio.api_base_url`` (or
``connectors.voice.twilio.api_base_url``) at :attr:`url`.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime

import aiohttp
from aiohttp import web
from multidict import MultiDict

from connectors.sms.twilio.webhooks import SIGNATURE_HEADER, compute_signature
from gateway.testing.fake_server import FakeProviderServer, ScriptedAnswer


@dataclass(frozen=True, kw_only=True)
class RecordedCall:
    """A create-message request as the fake received it."""

    account_sid: str
    form: MultiDict[str]
    authorization: str


@dataclass(frozen=True, kw_only=True)
class RecordedCallRequest:
    """A create-call or update-call request as the fake received it."""

    account_sid: str
    #: The updated call's sid; "" for a create.
    call_sid: str
    form: MultiDict[str]
    authorization: str


#: StatusCallbackEvent name -> the CallStatus Twilio reports with it.
CALL_PROGRESS_STATUS = {
    "initiated": "initiated",
    "ringing": "ringing",
    "answered": "in-progress",
    "completed": "completed",
}
#: Statuses after which a call cannot be updated (Twilio error 21220).
ENDED_CALL_STATUSES = frozenset({"completed", "busy", "no-answer", "failed", "canceled"})


@dataclass
class FakeCall:
    """A call the fake placed, and what happened to it."""

    sid: str
    account_sid: str
    to: str
    sender: str
    status: str = "queued"
    url: str = ""
    twiml: str = ""
    status_callback: str = ""
    #: The StatusCallbackEvent values the create asked for.
    events: frozenset[str] = frozenset()
    #: (CallStatus, HTTP status of our webhook) of each status callback sent.
    callbacks: list[tuple[str, int]] = field(default_factory=list)
    #: The TwiML documents the call ran: answers to its Url, then updates.
    documents: list[str] = field(default_factory=list)
    answered_at: datetime | None = None
    #: ``Record=true``: where the whole-call recording is reported when the call ends.
    recording_callback: str = ""
    #: (RecordingSid, HTTP status of our webhook) of the recording status callback.
    recordings: list[tuple[str, int]] = field(default_factory=list)


def _twilio_error(code: int, message: str, status: int) -> web.Response:
    body = {
        "code": code,
        "message": message,
        "more_info": f"https://www.twilio.com/docs/errors/{code}",
        "status": status,
    }
    return web.json_response(body, status=status)


class FakeTwilio(FakeProviderServer):
    """Fake Twilio API on 127.0.0.1 (random port)."""

    default_status = 201

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_post("/2010-04-01/Accounts/{sid}/Messages.json", self._create)
        router.add_post("/2010-04-01/Accounts/{sid}/Calls.json", self._create_call)
        router.add_post("/2010-04-01/Accounts/{sid}/Calls/{call}.json", self._update_call)

    def __init__(
        self,
        *,
        auth_token: str,
        callback_statuses: tuple[str, ...] = ("sent", "delivered"),
        callback_delay: float = 0.01,
        call_progress: tuple[str, ...] = ("initiated", "ringing", "answered", "completed"),
    ) -> None:
        super().__init__()
        self.auth_token = auth_token
        self.callback_statuses = callback_statuses
        self.callback_delay = callback_delay
        #: What every placed call goes through (StatusCallbackEvent names, in
        #: order); leave out "completed" to keep calls live for updates.
        self.call_progress = call_progress
        self.calls: list[RecordedCall] = []
        self.callbacks_sent: list[tuple[str, str, int]] = []
        self.call_requests: list[RecordedCallRequest] = []
        #: Calls placed through the fake, by sid.
        self.placed: dict[str, FakeCall] = {}
        self._stopping = False

    async def stop(self) -> None:
        """Stop; a request still in flight (a scripted hang) sends no callback after this."""
        self._stopping = True
        await super().stop()

    # -- scripting ---------------------------------------------------------------

    def rate_limit_next(self, retry_after: int = 1) -> None:
        """Answer the next call with 429 and a Retry-After header."""
        self.answer_next(
            ScriptedAnswer(
                status=429,
                body={"code": 20429, "message": "Too Many Requests", "status": 429},
                headers={"Retry-After": str(retry_after)},
            )
        )

    def server_error_next(self, status: int = 500) -> None:
        """Answer the next call with a 5xx."""
        self.answer_next(
            ScriptedAnswer(status=status, body={"code": 20500, "message": "Internal Server Error"})
        )

    def reject_next(
        self, code: int = 21211, message: str = "The 'To' number is not a valid phone number."
    ) -> None:
        """Answer the next call with Twilio's 400 error body."""
        self.answer_next(
            ScriptedAnswer(status=400, body={"code": code, "message": message, "status": 400})
        )

    def hang_next(self, seconds: float) -> None:
        """Accept the next call but answer only after ``seconds`` (a timeout for the client)."""
        self.answer_next(ScriptedAnswer(status=201, delay=seconds))

    # -- server ------------------------------------------------------------------

    async def _create(self, request: web.Request) -> web.Response:
        form = MultiDict((await request.post()).items())
        form_str: MultiDict[str] = MultiDict((k, str(v)) for k, v in form.items())
        sid_account = request.match_info["sid"]
        self.calls.append(
            RecordedCall(
                account_sid=sid_account,
                form=form_str,
                authorization=request.headers.get("Authorization", ""),
            )
        )
        answer = self.next_answer()
        if answer.delay:
            await asyncio.sleep(answer.delay)
        if answer.status != 201:
            return web.json_response(answer.body, status=answer.status, headers=answer.headers)
        if "To" not in form_str or not ({"From", "MessagingServiceSid"} & set(form_str)):
            return web.json_response(
                {"code": 21604, "message": "A 'To' phone number is required."}, status=400
            )
        sid = f"SM{uuid.uuid4().hex}"  # unique across runs, like Twilio's
        resource = {
            "sid": sid,
            "account_sid": sid_account,
            "to": form_str["To"],
            "from": form_str.get("From"),
            "body": form_str.get("Body", ""),
            "status": "queued",
            "num_segments": "1",
            "num_media": str(len(form_str.getall("MediaUrl", []))),
            "api_version": "2010-04-01",
            "error_code": None,
            "uri": f"/2010-04-01/Accounts/{sid_account}/Messages/{sid}.json",
        }
        callback = form_str.get("StatusCallback")
        if callback:
            self.spawn(self._play_callbacks(callback, sid, sid_account, form_str))
        return web.json_response(resource, status=201)

    async def _play_callbacks(
        self, url: str, sid: str, account_sid: str, form: MultiDict[str]
    ) -> None:
        for status in self.callback_statuses:
            await asyncio.sleep(self.callback_delay)
            await self.send_status(
                url,
                sid=sid,
                account_sid=account_sid,
                status=status,
                to=form["To"],
                sender=form.get("From", ""),
            )

    async def send_status(
        self,
        url: str,
        *,
        sid: str,
        account_sid: str,
        status: str,
        to: str,
        sender: str = "",
        error_code: str | None = None,
    ) -> int:
        """POST one signed status callback, as Twilio does; returns the HTTP status."""
        params = {
            "MessageSid": sid,
            "SmsSid": sid,
            "AccountSid": account_sid,
            "MessageStatus": status,
            "SmsStatus": status,
            "To": to,
            "From": sender,
            "ApiVersion": "2010-04-01",
        }
        if error_code:
            params["ErrorCode"] = error_code
        signature = compute_signature(self.auth_token, url, {k: [v] for k, v in params.items()})
        async with self.session.post(
            url, data=params, headers={SIGNATURE_HEADER: signature}
        ) as resp:
            self.callbacks_sent.append((sid, status, resp.status))
            return resp.status

    # -- calls -------------------------------------------------------------------

    async def _record_call_request(self, request: web.Request) -> RecordedCallRequest:
        form: MultiDict[str] = MultiDict((k, str(v)) for k, v in (await request.post()).items())
        recorded = RecordedCallRequest(
            account_sid=request.match_info["sid"],
            call_sid=request.match_info.get("call", ""),
            form=form,
            authorization=request.headers.get("Authorization", ""),
        )
        self.call_requests.append(recorded)
        return recorded

    async def _scripted(self) -> web.Response | None:
        answer = self.next_answer()
        if answer.delay:
            await asyncio.sleep(answer.delay)
        if answer.status != self.default_status:
            return web.json_response(answer.body, status=answer.status, headers=answer.headers)
        return None

    async def _create_call(self, request: web.Request) -> web.Response:
        recorded = await self._record_call_request(request)
        scripted = await self._scripted()
        if scripted is not None:
            return scripted
        form = recorded.form
        if not form.get("To"):
            return _twilio_error(21201, "No 'To' number is specified", 400)
        if not form.get("From"):
            return _twilio_error(21213, "No 'From' number is specified", 400)
        if not {"Url", "Twiml", "ApplicationSid"} & set(form):
            return _twilio_error(21205, "Url parameter is required", 400)
        events = frozenset(form.getall("StatusCallbackEvent", []))
        unknown = events - set(CALL_PROGRESS_STATUS)
        if unknown:
            return _twilio_error(21626, f"Invalid StatusCallbackEvent {sorted(unknown)}", 400)
        call = FakeCall(
            sid=f"CA{uuid.uuid4().hex}",
            account_sid=recorded.account_sid,
            to=form["To"],
            sender=form["From"],
            url=form.get("Url", ""),
            twiml=form.get("Twiml", ""),
            status_callback=form.get("StatusCallback", ""),
            # Without StatusCallbackEvent, Twilio reports only the end of the call.
            events=events or frozenset({"completed"}),
            recording_callback=form.get("RecordingStatusCallback", "")
            if form.get("Record") == "true"
            else "",
        )
        self.placed[call.sid] = call
        self.spawn(self._progress(call))
        return web.json_response(self._call_resource(call), status=201)

    async def _update_call(self, request: web.Request) -> web.Response:
        recorded = await self._record_call_request(request)
        scripted = await self._scripted()
        if scripted is not None:
            return scripted
        call = self.placed.get(recorded.call_sid)
        if call is None or call.account_sid != recorded.account_sid:
            return _twilio_error(20404, f"The requested resource {request.path} was not found", 404)
        if call.status in ENDED_CALL_STATUSES:
            return _twilio_error(21220, "Call is not in-progress. Cannot redirect.", 400)
        form = recorded.form
        status = form.get("Status")
        if status is not None and status not in ("completed", "canceled"):
            return _twilio_error(20001, f"Invalid Status {status!r}", 400)
        if status == "completed" or (status == "canceled" and call.status != "in-progress"):
            # "canceled" only ends a call that was not answered yet.
            self.end_call(call.sid, status)
        elif form.get("Twiml"):
            call.documents.append(form["Twiml"])
        elif form.get("Url"):
            call.url = form["Url"]
            self.spawn(self._fetch_twiml(call))
        return web.json_response(self._call_resource(call), status=200)

    def end_call(self, sid: str, status: str = "completed") -> None:
        """End a call (the callee hangs up); its ``completed`` callback follows."""
        call = self.placed[sid]
        if call.status in ENDED_CALL_STATUSES:
            return
        call.status = status
        if "completed" in call.events:
            self.spawn(self._send_call_status(call))

    def _call_resource(self, call: FakeCall) -> dict[str, object]:
        return {
            "sid": call.sid,
            "account_sid": call.account_sid,
            "to": call.to,
            "to_formatted": call.to,
            "from": call.sender,
            "from_formatted": call.sender,
            "status": call.status,
            "direction": "outbound-api",
            "api_version": "2010-04-01",
            "answered_by": None,
            "parent_call_sid": None,
            "start_time": None,
            "end_time": None,
            "duration": None,
            "price": None,
            "queue_time": "0",
            "uri": f"/2010-04-01/Accounts/{call.account_sid}/Calls/{call.sid}.json",
        }

    async def _progress(self, call: FakeCall) -> None:
        for event in self.call_progress:
            await asyncio.sleep(self.callback_delay)
            if call.status in ENDED_CALL_STATUSES:
                return  # hung up by an update meanwhile
            call.status = CALL_PROGRESS_STATUS[event]
            if event == "answered":
                call.answered_at = datetime.now(UTC)
                if call.twiml:
                    call.documents.append(call.twiml)
                elif call.url:
                    await self._fetch_twiml(call)
            if event in call.events:
                await self._send_call_status(call)

    def _call_params(self, call: FakeCall) -> dict[str, str]:
        # The parameters of every voice request Twilio makes for an outbound call.
        return {
            "AccountSid": call.account_sid,
            "ApiVersion": "2010-04-01",
            "CallSid": call.sid,
            "CallStatus": call.status,
            "Called": call.to,
            "Caller": call.sender,
            "Direction": "outbound-api",
            "From": call.sender,
            "To": call.to,
        }

    async def _signed_post(self, url: str, params: dict[str, str]) -> tuple[int, str]:
        """POST a signed voice request; (HTTP status, body), status 0 when the
        webhook cannot be reached (Twilio logs that and carries on)."""
        if self._stopping:
            # The callback session is closed (or would be opened and never closed again).
            return 0, ""
        signature = compute_signature(self.auth_token, url, {k: [v] for k, v in params.items()})
        try:
            async with self.session.post(
                url, data=params, headers={SIGNATURE_HEADER: signature}
            ) as resp:
                return resp.status, await resp.text()
        except aiohttp.ClientError:
            return 0, ""

    async def _fetch_twiml(self, call: FakeCall) -> None:
        status, body = await self._signed_post(call.url, self._call_params(call))
        if status == 200:
            call.documents.append(body)

    async def _send_call_status(self, call: FakeCall) -> None:
        if not call.status_callback:
            return
        params = {
            **self._call_params(call),
            "CallbackSource": "call-progress-events",
            "SequenceNumber": str(len(call.callbacks)),
            "Timestamp": format_datetime(datetime.now(UTC)),
        }
        if call.status in ENDED_CALL_STATUSES:
            answered = call.answered_at
            seconds = int((datetime.now(UTC) - answered).total_seconds()) if answered else 0
            params["CallDuration"] = str(seconds)
        status, _ = await self._signed_post(call.status_callback, params)
        call.callbacks.append((params["CallStatus"], status))
        if call.status in ENDED_CALL_STATUSES and call.answered_at and call.recording_callback:
            await self._send_recording(call, int(params["CallDuration"]))

    async def _send_recording(self, call: FakeCall, seconds: int) -> None:
        # A recording status callback, as documented: no From/To/CallStatus.
        recording_sid = f"RE{uuid.uuid4().hex}"
        base = f"https://api.twilio.com/2010-04-01/Accounts/{call.account_sid}/Recordings"
        params = {
            "AccountSid": call.account_sid,
            "CallSid": call.sid,
            "RecordingSid": recording_sid,
            "RecordingUrl": f"{base}/{recording_sid}",
            "RecordingStatus": "completed",
            "RecordingDuration": str(seconds),
            "RecordingChannels": "1",
            "RecordingSource": "OutboundAPI",
            "RecordingStartTime": format_datetime(call.answered_at or datetime.now(UTC)),
        }
        status, _ = await self._signed_post(call.recording_callback, params)
        call.recordings.append((recording_sid, status))
