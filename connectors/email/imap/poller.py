"""Polling one IMAP mailbox: every message published once, none skipped.

Each round: connect, log in, ``SELECT`` the folder (its UIDVALIDITY), find
the UIDs after the saved one (``UID SEARCH UID n:*``; on first start or after
a UIDVALIDITY change, the messages of the backfill window, ``SINCE``),
and for each in UID order: ``FETCH BODY.PEEK[]`` (does not set \\Seen),
publish through the ingestor (confirmed by the broker, or quarantined),
only then flag it \\Seen or move it, and save the UID. A failure anywhere
stops the round without saving, and the next round (after a backoff)
re-reads from the saved UID; the events' deterministic ids dedupe a message
published just before a crash or disconnect.
"""

from __future__ import annotations

import asyncio
import re
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import aioimaplib  # type: ignore[import-untyped]  # no stubs or py.typed upstream

from connectors.email.imap.state import Position, StateStore
from connectors.email.ingest import MailIngestor
from gateway.contract import Logger, TransientError

_UIDVALIDITY = re.compile(rb"UIDVALIDITY (\d+)")
_UID = re.compile(rb"UID (\d+)")


class ImapError(TransientError):
    """The IMAP server refused a command or the connection failed."""

    code = "imap_error"


@dataclass(frozen=True, kw_only=True)
class MailboxConfig:
    """What the poller needs to know about one mailbox."""

    key: str
    host: str
    port: int
    tls: bool
    username: str
    password: str
    folder: str
    address: str
    after_publish: str
    move_to: str | None
    timeout: float
    tls_context: ssl.SSLContext | None = None


class ImapSession:
    """One logged-in aioimaplib connection with the folder selected."""

    def __init__(self, config: MailboxConfig) -> None:
        self._config = config
        self._client: aioimaplib.IMAP4 | None = None
        self.uidvalidity = 0

    @staticmethod
    def _check(response: Any, what: str) -> Any:
        if response.result != "OK":
            detail = b" ".join(bytes(line) for line in response.lines)[:300]
            raise ImapError(f"IMAP {what} failed: {response.result} {detail!r}")
        return response

    async def open(self) -> None:
        """Connect, log in and select the folder."""
        config = self._config
        try:
            if config.tls:
                client: aioimaplib.IMAP4 = aioimaplib.IMAP4_SSL(
                    host=config.host,
                    port=config.port,
                    timeout=config.timeout,
                    ssl_context=config.tls_context,
                )
            else:
                client = aioimaplib.IMAP4(
                    host=config.host, port=config.port, timeout=config.timeout
                )
            self._client = client
            await client.wait_hello_from_server()
            self._check(await client.login(config.username, config.password), "LOGIN")
            selected = self._check(await client.select(config.folder), "SELECT")
        except (OSError, TimeoutError, aioimaplib.Abort, aioimaplib.CommandTimeout) as exc:
            raise ImapError(
                f"IMAP connection to {config.host}:{config.port} failed: {exc!r}"
            ) from exc
        for line in selected.lines:
            match = _UIDVALIDITY.search(bytes(line))
            if match:
                self.uidvalidity = int(match.group(1))
        if not self.uidvalidity:
            raise ImapError("SELECT returned no UIDVALIDITY")

    @property
    def client(self) -> aioimaplib.IMAP4:
        """The open connection."""
        if self._client is None:
            raise ImapError("IMAP session is not open")
        return self._client

    async def _command(self, what: str, call: Callable[[], Awaitable[Any]]) -> Any:
        try:
            response = await call()
        except (OSError, TimeoutError, aioimaplib.Abort, aioimaplib.CommandTimeout) as exc:
            raise ImapError(f"IMAP {what} failed: {exc!r}") from exc
        assert isinstance(response, aioimaplib.Response)
        return self._check(response, what)

    async def search(self, *criteria: str) -> list[int]:
        """UIDs matching ``criteria`` (``UID SEARCH``), ascending."""
        response = await self._command("UID SEARCH", lambda: self.client.uid_search(*criteria))
        uids: set[int] = set()
        for line in response.lines[:-1]:
            uids.update(int(token) for token in bytes(line).split() if token.isdigit())
        return sorted(uids)

    async def fetch(self, uid: int) -> bytes | None:
        """The raw message of ``uid`` without setting \\Seen (None if it is gone)."""
        response = await self._command(
            "UID FETCH", lambda: self.client.uid("fetch", str(uid), "(UID BODY.PEEK[])")
        )
        lines = response.lines
        for index, line in enumerate(lines):
            if isinstance(line, bytearray) and index > 0:
                match = _UID.search(bytes(lines[index - 1]))
                if match is None or int(match.group(1)) == uid:
                    return bytes(line)
        return None

    async def done(self, uid: int) -> None:
        """Mark ``uid`` as handled: flag \\Seen, or move it to ``move_to``."""
        config = self._config
        if config.after_publish == "seen":
            await self._command(
                "UID STORE", lambda: self.client.uid("store", str(uid), "+FLAGS.SILENT (\\Seen)")
            )
        elif config.after_publish == "move" and config.move_to:
            target = config.move_to
            if self.client.has_capability("MOVE"):
                await self._command("UID MOVE", lambda: self.client.uid("move", str(uid), target))
            else:
                await self._command("UID COPY", lambda: self.client.uid("copy", str(uid), target))
                await self._command(
                    "UID STORE",
                    lambda: self.client.uid("store", str(uid), "+FLAGS.SILENT (\\Deleted)"),
                )
                await self._command("EXPUNGE", lambda: self.client.expunge())

    async def close(self) -> None:
        """Log out when the session is usable, else just drop the connection."""
        client, self._client = self._client, None
        if client is None:
            return
        if self.uidvalidity:
            try:
                await asyncio.wait_for(client.logout(), 2)
                return
            except (OSError, TimeoutError, aioimaplib.Abort, aioimaplib.CommandTimeout):
                # The server went away: close our end below.
                self.uidvalidity = 0
        transport = getattr(client.protocol, "transport", None)
        if transport is not None:
            transport.close()


def _imap_date(when: datetime) -> str:
    return when.strftime("%d-%b-%Y")


class MailboxPoller:
    """Polls one mailbox until stopped, reconnecting with backoff."""

    def __init__(
        self,
        config: MailboxConfig,
        *,
        ingestor: MailIngestor,
        state: StateStore,
        log: Logger,
        now: Callable[[], datetime],
        poll_interval: float,
        backfill: timedelta,
        batch_size: int,
        max_backoff: float,
        min_backoff: float = 1.0,
    ) -> None:
        self.config = config
        self._ingestor = ingestor
        self._state = state
        self._log = log
        self._now = now
        self._interval = poll_interval
        self._backfill = backfill
        self._batch = batch_size
        self._max_backoff = max_backoff
        self._min_backoff = min_backoff
        #: Messages published (or quarantined) by this poller.
        self.processed = 0
        #: True while a fetched message is being published, flagged and saved.
        self.in_message = False

    async def _pending(self, session: ImapSession) -> tuple[Position, Sequence[int]]:
        saved = self._state.load(self.config.key)
        if saved is not None and saved.uidvalidity == session.uidvalidity:
            uids = await session.search("UID", f"{saved.last_uid + 1}:*")
            # "n:*" always matches the highest UID, even when it is below n.
            return saved, [u for u in uids if u > saved.last_uid]
        if saved is not None:
            self._log.warning(
                "imap UIDVALIDITY changed: reading the backfill window again",
                mailbox=self.config.key,
                old=saved.uidvalidity,
                new=session.uidvalidity,
            )
        since = _imap_date(self._now() - self._backfill)
        return Position(uidvalidity=session.uidvalidity, last_uid=0), await session.search(
            "SINCE", since
        )

    async def poll_once(self) -> int:
        """One round; returns how many messages it finished. Raises TransientError."""
        session = ImapSession(self.config)
        done = 0
        try:
            await session.open()
            position, uids = await self._pending(session)
            if position.last_uid == 0 and not uids:
                # Remember the UIDVALIDITY even for an empty window.
                self._state.save(self.config.key, position)
            for uid in list(uids)[: self._batch]:
                raw = await session.fetch(uid)
                self.in_message = True
                try:
                    if raw is not None:
                        await self._ingestor.ingest(
                            raw,
                            account=self.config.key,
                            rcpt_to=[self.config.address] if self.config.address else (),
                        )
                        await session.done(uid)
                    position = Position(uidvalidity=position.uidvalidity, last_uid=uid)
                    self._state.save(self.config.key, position)
                finally:
                    self.in_message = False
                done += 1
                self.processed += 1
        finally:
            await session.close()
        return done

    async def run(self, stop: asyncio.Event) -> None:
        """Poll until ``stop`` is set; failures back off exponentially."""
        backoff = 0.0
        while not stop.is_set():
            try:
                done = await self.poll_once()
                backoff = 0.0
                # A full batch means more is waiting: go again at once.
                delay = 0.0 if done >= self._batch else self._interval
            except TransientError as exc:
                backoff = min(self._max_backoff, max(self._min_backoff, backoff * 2))
                delay = backoff
                self._log.warning(
                    "imap poll failed; retrying",
                    mailbox=self.config.key,
                    error=str(exc),
                    retry_in=delay,
                )
            try:
                await asyncio.wait_for(stop.wait(), delay)
            except TimeoutError:
                continue
