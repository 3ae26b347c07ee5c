"""A fake Twilio Messages API over real HTTP, built from Twilio's documented payloads.

It answers ``POST /2010-04-01/Accounts/{sid}/Messages.json`` like Twilio (201
with a message resource, or Twilio's error body), records every call, can be
scripted to fail (429 with Retry-After, 5xx, a hang past the client timeout,
a 4xx rejection), and plays the message's life back to the ``StatusCallback``
URL as signed status callbacks (queued, sent, delivered), as Twilio does.

Use it by pointing ``connectors.sms.twilio.api_base_url`` at :attr:`url`.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass

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


class FakeTwilio(FakeProviderServer):
    """Fake Twilio API on 127.0.0.1 (random port)."""

    default_status = 201

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_post("/2010-04-01/Accounts/{sid}/Messages.json", self._create)

    def __init__(
        self,
        *,
        auth_token: str,
        callback_statuses: tuple[str, ...] = ("sent", "delivered"),
        callback_delay: float = 0.01,
    ) -> None:
        super().__init__()
        self.auth_token = auth_token
        self.callback_statuses = callback_statuses
        self.callback_delay = callback_delay
        self.calls: list[RecordedCall] = []
        self.callbacks_sent: list[tuple[str, str, int]] = []

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
