"""Raw inbound mail to published events, shared by SMTP, IMAP and the webhooks.

The MIME parse runs in a process pool (:class:`~connectors.email.mime.MimeParser`)
under a timeout. A mail that breaks a cap, defeats the parser, crashes its
worker or overruns the timeout is quarantined with its raw bytes (never lost,
never retried); anything else becomes the events of
:func:`connectors.email.mapping.events_for`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import Executor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

from connectors.email import mapping
from connectors.email.mime import MimeLimitError, MimeParser, ParsedMail
from connectors.email.settings import MimeCaps
from gateway.api.v1.envelope_pb2 import Event
from gateway.contract import ConnectorContext


@dataclass(frozen=True, kw_only=True)
class Normalized:
    """What one raw mail came to: events to publish, or one quarantine event."""

    events: Sequence[Event] = ()
    quarantine: Event | None = None
    mail: ParsedMail | None = None


class MailIngestor:
    """Parses raw mail off the event loop and maps it for one connector."""

    def __init__(
        self,
        context: ConnectorContext,
        *,
        provider: str,
        caps: MimeCaps,
        max_bytes: int,
        message_id_domain: str,
        executor: Executor | None = None,
    ) -> None:
        self._ctx = context
        self._provider = provider
        self._caps = caps
        self._domain = message_id_domain
        self._limits = caps.limits(max_bytes)
        self._executor = executor
        self._parser = MimeParser(self._limits, workers=caps.workers, executor=executor)

    @property
    def mime(self) -> MimeParser:
        """The parser pool (other CPU-bound input work may run in it too)."""
        return self._parser

    async def warm(self) -> None:
        """Start the parser workers."""
        await self._parser.warm()

    async def normalize(
        self, raw: bytes, *, account: str, mail_from: str = "", rcpt_to: Sequence[str] = ()
    ) -> Normalized:
        """Parse and map ``raw``; never raises for bad mail (it is quarantined)."""
        received = self._ctx.now()

        def quarantined(reason: str, detail: str) -> Normalized:
            self._ctx.log.warning(
                "mail quarantined", provider=self._provider, reason=reason, size=len(raw)
            )
            return Normalized(
                quarantine=mapping.quarantine_event(
                    raw,
                    provider=self._provider,
                    account=account,
                    reason=reason,
                    detail=detail,
                    received_at=received,
                    mail_from=mail_from,
                    rcpt_to=rcpt_to,
                )
            )

        try:
            mail = await asyncio.wait_for(self._parser.parse(raw), self._caps.parse_timeout)
        except MimeLimitError as exc:
            return quarantined(exc.reason, str(exc))
        except TimeoutError:
            return quarantined("parse_timeout", f"parse took over {self._caps.parse_timeout} s")
        except BrokenProcessPool as exc:
            # The mail killed its worker (memory, a crash in C code): start a new pool.
            self._parser.close()
            self._parser = MimeParser(self._limits, workers=self._caps.workers)
            return quarantined("parser_crashed", repr(exc))
        except (ValueError, LookupError, TypeError, UnicodeError, AttributeError) as exc:
            # The stdlib parser failing on input it should tolerate: keep the mail.
            return quarantined("parse_error", repr(exc))
        events = mapping.events_for(
            mail,
            provider=self._provider,
            account=account,
            raw=raw,
            received_at=received,
            mail_from=mail_from,
            rcpt_to=rcpt_to,
            message_id_domain=self._domain,
        )
        return Normalized(events=events, mail=mail)

    async def ingest(
        self, raw: bytes, *, account: str, mail_from: str = "", rcpt_to: Sequence[str] = ()
    ) -> Normalized:
        """Normalize and publish with confirms (raises TransientError unless confirmed)."""
        result = await self.normalize(raw, account=account, mail_from=mail_from, rcpt_to=rcpt_to)
        if result.quarantine is not None:
            await self._ctx.quarantine(result.quarantine)
        elif result.events:
            await self._ctx.publish(result.events)
        return result

    def close(self) -> None:
        """Stop the parser pool."""
        self._parser.close()
