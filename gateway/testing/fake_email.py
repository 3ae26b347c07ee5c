"""A scriptable SMTP relay on 127.0.0.1 (aiosmtpd) for outbound email tests.

It records every message submitted to it and can be scripted, like the fake
provider APIs: answer the next DATA with a 4xx/5xx, refuse a recipient, hang
after the message was received (the ambiguous case), require AUTH, offer
STARTTLS or speak implicit TLS.
"""

from __future__ import annotations

import asyncio
import ssl
import warnings
from dataclasses import dataclass, field
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session


@dataclass(frozen=True, kw_only=True)
class Submitted:
    """One message the relay accepted (or answered with a scripted reply)."""

    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    authenticated_as: str | None = None
    tls: bool = False


@dataclass(kw_only=True)
class _Script:
    data_replies: list[str] = field(default_factory=list)
    refused_rcpt: dict[str, str] = field(default_factory=dict)
    hang_seconds: float = 0.0


class FakeSmtpRelay:
    """An SMTP submission server double. ``url`` is ``smtp://127.0.0.1:<port>``."""

    def __init__(
        self,
        *,
        username: str | None = None,
        password: str | None = None,
        tls_context: ssl.SSLContext | None = None,
        implicit_tls: bool = False,
    ) -> None:
        self._credentials = (username, password) if username is not None else None
        self._tls = tls_context
        self._implicit = implicit_tls
        self._script = _Script()
        self._server: asyncio.Server | None = None
        self.port = 0
        #: Every DATA received, including those answered with a scripted error.
        self.calls: list[Submitted] = []
        #: Messages accepted with 250.
        self.messages: list[Submitted] = []

    @property
    def url(self) -> str:
        """Where the relay listens."""
        return f"smtp://127.0.0.1:{self.port}"

    # -- scripting -----------------------------------------------------------------

    def reply_next(self, reply: str) -> None:
        """Answer the next DATA with ``reply`` (e.g. ``"451 4.3.0 try later"``)."""
        self._script.data_replies.append(reply)

    def refuse_recipient(self, address: str, reply: str = "550 5.1.1 no such user") -> None:
        """Refuse ``address`` at RCPT TO."""
        self._script.refused_rcpt[address.lower()] = reply

    def hang_next(self, seconds: float) -> None:
        """Receive the next message, then wait ``seconds`` before answering."""
        self._script.hang_seconds = seconds

    # -- aiosmtpd hooks --------------------------------------------------------------

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: Any
    ) -> str:
        refused = self._script.refused_rcpt.get(address.lower())
        if refused:
            return refused
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        data = envelope.original_content or b""
        login = session.auth_data.login if isinstance(session.auth_data, LoginPassword) else None
        item = Submitted(
            mail_from=envelope.mail_from or "",
            rcpt_tos=list(envelope.rcpt_tos),
            data=bytes(data),
            authenticated_as=login.decode() if isinstance(login, bytes) else None,
            tls=session.ssl is not None or self._implicit,
        )
        self.calls.append(item)
        if self._script.hang_seconds:
            seconds, self._script.hang_seconds = self._script.hang_seconds, 0.0
            await asyncio.sleep(seconds)
        if self._script.data_replies:
            return self._script.data_replies.pop(0)
        self.messages.append(item)
        return "250 2.0.0 Ok: queued"

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        if self._credentials is None or not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        username, password = self._credentials
        ok = auth_data.login.decode() == username and auth_data.password.decode() == password
        return AuthResult(success=ok, handled=False, auth_data=auth_data if ok else None)

    # -- lifecycle -----------------------------------------------------------------

    def _protocol(self) -> SMTP:
        with warnings.catch_warnings():
            # Implicit TLS: aiosmtpd cannot see the TLS below it and warns that
            # AUTH does not require TLS; the connection is TLS from its first byte.
            warnings.simplefilter("ignore", UserWarning)
            return self._new_protocol()

    def _new_protocol(self) -> SMTP:
        return SMTP(
            self,
            hostname="relay.test",
            tls_context=None if self._implicit else self._tls,
            require_starttls=self._tls is not None and not self._implicit,
            authenticator=self._authenticate if self._credentials else None,
            auth_required=self._credentials is not None,
            auth_require_tls=not self._implicit and self._tls is not None,
        )

    async def start(self) -> None:
        """Listen on a free port."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._protocol,
            host="127.0.0.1",
            port=0,
            ssl=self._tls if self._implicit else None,
        )
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """Stop listening."""
        if self._server is not None:
            self._server.close()
            self._server = None
