"""The inbound SMTP server (aiosmtpd) hosted inside the connector.

Rules a mail server must keep, and how:

- recipients are validated at ``RCPT TO``: an address or domain we do not
  serve is ``550 5.1.1`` (we are no open relay);
- the size limit is announced in ``EHLO`` (``SIZE``) and enforced by aiosmtpd
  (``552``);
- ``STARTTLS`` is offered when a certificate is configured (and may be required);
- ``250`` after ``DATA`` only once the events are confirmed by the broker (or
  the mail is confirmed in quarantine); otherwise ``451 4.3.0`` so the sending
  server keeps the mail and retries: nothing is lost.
"""

from __future__ import annotations

import asyncio
import ssl
import weakref
from collections.abc import Callable, Collection
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

from connectors.email.ingest import MailIngestor
from gateway.contract import Logger, TransientError, mask_email

#: Lines aiosmtpd may read from its buffer before it must let other tasks run.
_LINES_PER_TURN = 64


class _FairStreamReader(asyncio.StreamReader):
    """A StreamReader whose ``readuntil`` yields to the loop every few lines.

    aiosmtpd reads DATA line by line, and ``readuntil`` returns without
    yielding while the buffer holds a line: a 10,000-part mail arriving at
    once is 40,000 lines handled in one stretch (~200 ms with no other task
    running). Yielding every ``_LINES_PER_TURN`` lines keeps the loop fair.
    """

    _lines_read = 0

    async def readuntil(self, separator: Any = b"\n") -> bytes:
        self._lines_read += 1
        if self._lines_read % _LINES_PER_TURN == 0:
            await asyncio.sleep(0)
        return await super().readuntil(separator)


class _FairSMTP(SMTP):
    """aiosmtpd's SMTP protocol reading through a :class:`_FairStreamReader`."""

    def _cb_client_connected(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        # aiosmtpd builds its StreamReader in SMTP.__init__ and reaches into its
        # internals on STARTTLS, so the reader's class is swapped, not wrapped.
        reader.__class__ = _FairStreamReader
        super()._cb_client_connected(reader, writer)


class RecipientPolicy:
    """Which recipient addresses we accept mail for."""

    def __init__(self, *, addresses: Collection[str], domains: Collection[str]) -> None:
        self._addresses = {a.lower() for a in addresses}
        self._domains = {d.lower().lstrip("@") for d in domains}

    def accepts(self, address: str) -> bool:
        """True for a configured address, or any address at a configured domain."""
        normalized = address.strip().lower()
        local, at, domain = normalized.rpartition("@")
        if not at or not local or not domain:
            return False
        return normalized in self._addresses or domain in self._domains


class InboundHandler:
    """aiosmtpd handler: recipient checks, then parse, publish and only then 250."""

    def __init__(self, ingestor: MailIngestor, policy: RecipientPolicy, log: Logger) -> None:
        self._ingestor = ingestor
        self._policy = policy
        self.log = log
        #: DATA commands being processed (stop waits for them).
        self.in_flight = 0
        self.idle = asyncio.Event()
        self.idle.set()

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if not self._policy.accepts(address):
            return "550 5.1.1 Recipient address rejected: not served here"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.in_flight += 1
        self.idle.clear()
        try:
            return await self._deliver(envelope)
        finally:
            self.in_flight -= 1
            if not self.in_flight:
                self.idle.set()

    async def _deliver(self, envelope: Envelope) -> str:
        raw = envelope.original_content or envelope.content
        if isinstance(raw, str):
            raw = raw.encode("utf-8", "surrogateescape")
        if not isinstance(raw, bytes) or not envelope.rcpt_tos:
            return "554 5.5.1 No valid recipients"
        rcpt_to = [r.lower() for r in envelope.rcpt_tos]
        account = rcpt_to[0]
        try:
            result = await self._ingestor.ingest(
                raw, account=account, mail_from=(envelope.mail_from or "").lower(), rcpt_to=rcpt_to
            )
        except TransientError as exc:
            self.log.warning(
                "mail refused temporarily: publish not confirmed",
                rcpt=mask_email(account),
                error=str(exc),
                code=exc.code,
            )
            return "451 4.3.0 Temporary failure, please retry"
        if result.quarantine is not None:
            reason = result.quarantine.attributes["email.quarantine_reason"]
            return f"250 2.0.0 Accepted (quarantined: {reason})"
        return f"250 2.0.0 OK {result.events[0].id if result.events else 'no events'}"


class SmtpListener:
    """An aiosmtpd server on the connector's event loop."""

    def __init__(
        self,
        handler: InboundHandler,
        *,
        host: str,
        port: int,
        hostname: str,
        max_message_bytes: int,
        tls_context: ssl.SSLContext | None,
        require_starttls: bool,
        timeout: float,
    ) -> None:
        self._handler = handler
        self._host, self._port = host, port
        self._factory: Callable[[], SMTP] = lambda: _FairSMTP(
            handler,
            data_size_limit=max_message_bytes,
            enable_SMTPUTF8=True,
            hostname=hostname,
            ident="channel-gateway ESMTP",
            tls_context=tls_context,
            require_starttls=require_starttls and tls_context is not None,
            timeout=timeout,
        )
        self._server: asyncio.Server | None = None
        self._sessions: weakref.WeakSet[SMTP] = weakref.WeakSet()
        self.port: int | None = None

    def _protocol(self) -> SMTP:
        protocol = self._factory()
        self._sessions.add(protocol)
        return protocol

    async def start(self) -> None:
        """Bind and listen; ``port`` is the bound port afterwards."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._protocol, host=self._host, port=self._port, reuse_address=True
        )
        sockets = self._server.sockets
        self.port = int(sockets[0].getsockname()[1]) if sockets else self._port

    async def stop(self, *, grace: float = 10.0) -> None:
        """Stop accepting, let DATA commands in flight finish, close sessions."""
        if self._server is None:
            return
        self._server.close()
        try:
            await asyncio.wait_for(self._handler.idle.wait(), grace)
        except TimeoutError:
            # The senders of those get no 250: they keep the mail and retry.
            self._handler.log.warning(
                "smtp stopped with mail in flight", in_flight=self._handler.in_flight
            )
        for session in list(self._sessions):
            transport = session.transport
            if transport is not None:
                transport.close()
        await self._server.wait_closed()
        self._server = None
