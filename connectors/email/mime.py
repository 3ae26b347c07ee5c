"""MIME normalization: raw RFC 5322 bytes to a :class:`ParsedMail`, safely.

Parsing uses the standard library's ``email`` package with ``policy.default``
(RFC 2047 encoded words, RFC 2231 parameters, charsets). Mail is hostile
input, so :func:`parse` enforces :class:`MimeLimits` and raises
:class:`MimeLimitError` when a message breaks one; such a message is
quarantined, never retried. Cheap byte-level checks (size, header length,
encoded words, boundaries) run before the parser so a bomb costs little; the
part count and nesting depth are checked on the parsed tree.

:func:`parse` is CPU-bound and blocking. :class:`MimeParser` runs it in a
process pool so an expensive message never stalls the event loop (a thread
would still hold the GIL for most of the parse).

The result holds plain data (picklable across the pool): decoded headers,
the text body with quoted replies split off, the HTML body sanitized with
nh3, every attachment and inline part with its Content-ID, size and SHA-256,
threading ids, and the classification: an ordinary message, an auto-reply
(``Auto-Submitted``, ``X-Autoreply``, ``Precedence``) or a delivery status
notification (``multipart/report; report-type=delivery-status``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from email import message_from_bytes, policy
from email.header import decode_header, make_header
from email.headerregistry import Address
from email.message import Message
from email.utils import getaddresses, parsedate_to_datetime
from multiprocessing import get_context
from typing import Any, Literal, TypeVar

import nh3

MailKind = Literal["message", "auto_reply", "dsn"]
T = TypeVar("T")


class MimeLimitError(ValueError):
    """A message breaks a :class:`MimeLimits` cap (or defeats the parser)."""

    def __init__(self, reason: str, detail: str) -> None:
        # Both in args: the error crosses the process pool by pickling.
        super().__init__(reason, detail)
        #: Short machine-readable cap name, e.g. ``too_many_parts``.
        self.reason = reason
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


@dataclass(frozen=True, kw_only=True)
class MimeLimits:
    """Caps on one message. The defaults accept any legitimate mail we know of."""

    max_bytes: int = 25 * 1024 * 1024
    max_parts: int = 500
    max_depth: int = 30
    #: One header field, unfolded, name included.
    max_header_bytes: int = 64 * 1024
    #: Every header field of the message (all parts) together.
    max_total_header_bytes: int = 1024 * 1024
    max_encoded_words: int = 2000


@dataclass(frozen=True, kw_only=True)
class MailAddress:
    """One mailbox: lower-cased address and display name."""

    address: str
    name: str = ""


@dataclass(frozen=True, kw_only=True)
class MailAttachment:
    """One attachment or inline part; ``data`` is its decoded content."""

    filename: str
    content_type: str
    size: int
    sha256: str
    content_id: str = ""
    inline: bool = False


@dataclass(frozen=True, kw_only=True)
class DsnRecipient:
    """One per-recipient block of a delivery status notification (RFC 3464)."""

    recipient: str
    action: str
    status: str
    diagnostic: str = ""


@dataclass(frozen=True, kw_only=True)
class ParsedMail:
    """A normalized message."""

    kind: MailKind
    message_id: str
    in_reply_to: str
    references: tuple[str, ...]
    subject: str
    sender: MailAddress | None
    to: tuple[MailAddress, ...]
    cc: tuple[MailAddress, ...]
    reply_to: tuple[MailAddress, ...]
    date: datetime | None
    text: str
    quoted_text: str
    html: str
    headers: tuple[tuple[str, str], ...]
    attachments: tuple[MailAttachment, ...]
    #: Why the message counts as an auto-reply (``Auto-Submitted: auto-replied`` ...).
    auto_reason: str = ""
    dsn_recipients: tuple[DsnRecipient, ...] = ()
    #: Message-ID of the mail a DSN reports on (from its returned headers).
    dsn_original_message_id: str = ""
    defects: tuple[str, ...] = field(default_factory=tuple)


# -- byte-level pre-checks ---------------------------------------------------------

_ENCODED_WORD = re.compile(rb"=\?[^?\s]{1,75}\?[bBqQ]\?")
_BOUNDARY = re.compile(rb'boundary\s*=\s*("[^"\r\n]{1,200}"|[^\s;"]{1,200})', re.IGNORECASE)
_HEADER_END = re.compile(rb"\r?\n\r?\n")


def _header_fields(block: bytes) -> Iterator[int]:
    """Length of each unfolded header field of a header block."""
    length = -1
    for line in block.splitlines():
        if line[:1] in (b" ", b"\t") and length >= 0:
            length += len(line)
            continue
        if length >= 0:
            yield length
        length = len(line)
    if length >= 0:
        yield length


def precheck(raw: bytes, limits: MimeLimits) -> None:
    """Reject by bytes alone what the parser should never see."""
    if len(raw) > limits.max_bytes:
        raise MimeLimitError("too_large", f"{len(raw)} bytes > {limits.max_bytes}")
    match = _HEADER_END.search(raw)
    top = raw[: match.start()] if match else raw
    for length in _header_fields(top):
        if length > limits.max_header_bytes:
            raise MimeLimitError(
                "header_too_long", f"a header field of {length} bytes > {limits.max_header_bytes}"
            )
    for words, _ in enumerate(_ENCODED_WORD.finditer(raw), start=1):
        if words > limits.max_encoded_words:
            raise MimeLimitError(
                "too_many_encoded_words", f"more than {limits.max_encoded_words} encoded words"
            )
    # Every multipart declares one boundary: more than max_parts of them means
    # more containers than parts we accept, whatever the nesting. Then count the
    # delimiter lines of the declared boundaries: each opens one part (plus one
    # closing line per multipart), so the parser never builds a 10,000-part tree.
    declared: set[bytes] = set()
    for count, match in enumerate(_BOUNDARY.finditer(raw), start=1):
        if count > limits.max_parts:
            raise MimeLimitError("too_many_parts", f"more than {limits.max_parts} multiparts")
        declared.add(match.group(1).strip(b'"'))
    delimiters = sum(raw.count(b"\n--" + boundary) for boundary in declared if boundary)
    if delimiters > limits.max_parts + len(declared):
        raise MimeLimitError("too_many_parts", f"{delimiters} MIME part delimiters")


# -- parsing -----------------------------------------------------------------------

#: What the stdlib's header parser raises on some garbled headers.
_HEADER_FAILURES = (ValueError, TypeError, IndexError, AttributeError, LookupError, UnicodeError)

_AUTO_PRECEDENCE = {"bulk", "junk", "list", "auto_reply"}
_MSGID = re.compile(r"<[^<>\s]+>")


def _msgids(value: str | None) -> list[str]:
    return _MSGID.findall(value or "")


def _first_msgid(value: str | None) -> str:
    ids = _msgids(value)
    if ids:
        return ids[0]
    text = (value or "").strip()
    return f"<{text}>" if text and " " not in text else ""


def _children(part: Message) -> list[Message]:
    """The sub-parts of a multipart or attached message (none for a leaf)."""
    if not part.is_multipart():
        return []
    payload = part.get_payload()
    if not isinstance(payload, list):
        return []
    return [child for child in payload if isinstance(child, Message)]


def _raw_values(msg: Message, name: str) -> list[str]:
    """The values of header ``name`` as received (RFC 2047 words decoded when possible)."""
    wanted = name.lower()
    values = []
    for key, raw in msg.raw_items():
        if key.lower() != wanted:
            continue
        text = str(raw)
        # Undecodable words stay as received.
        with contextlib.suppress(ValueError, LookupError, UnicodeError):
            text = str(make_header(decode_header(text)))
        values.append(" ".join(text.split()))
    return values


def _header_str(msg: Message, name: str) -> str:
    try:
        value = msg.get(name)
    except _HEADER_FAILURES:
        # The modern header parser fails on some garbled headers (stdlib
        # bugs): fall back to the value as received rather than lose the mail.
        raw = _raw_values(msg, name)
        return raw[0].strip() if raw else ""
    return "" if value is None else str(value).strip()


def _addresses(msg: Message, name: str) -> tuple[MailAddress, ...]:
    result: list[MailAddress] = []
    try:
        values: list[object] = list(msg.get_all(name) or [])
    except _HEADER_FAILURES:
        values = list(_raw_values(msg, name))
    for value in values:
        groups = getattr(value, "addresses", None)
        if groups is not None:
            for address in groups:
                if isinstance(address, Address) and address.addr_spec and "@" in address.addr_spec:
                    result.append(
                        MailAddress(address=address.addr_spec.lower(), name=address.display_name)
                    )
            continue
        for display, addr in getaddresses([str(value)]):
            if "@" in addr:
                result.append(MailAddress(address=addr.lower(), name=display))
    return tuple(result)


def _decoded_text(part: Message) -> str:
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes):
        return ""
    charset = part.get_content_charset() or "us-ascii"
    try:
        return payload.decode(charset, errors="replace")
    except (LookupError, ValueError):  # an unknown or garbled charset name: never fail the mail
        return payload.decode("utf-8", errors="replace")


# Lines that open a quoted earlier mail, in the languages customers write in.
_REPLY_HEADER = re.compile(
    r"^\s*(On\s.{1,200}\swrote:|Le\s.{1,200}\sa écrit\s?:|Am\s.{1,200}\sschrieb\s.{0,100}:"
    r"|El\s.{1,200}\sescribió:|Il\s.{1,200}\sha scritto:|Op\s.{1,200}\sschreef\s.{0,100}:"
    r"|-{2,}\s*Original Message\s*-{2,}|-{2,}\s*Ursprüngliche Nachricht\s*-{2,}"
    r"|-{2,}\s*Forwarded message\s*-{2,}|Begin forwarded message:)\s*$",
    re.IGNORECASE,
)
_OUTLOOK_FROM = re.compile(r"^\s*(From|De|Von|Da):\s.+$")
_OUTLOOK_NEXT = re.compile(r"^\s*(Sent|Date|Envoyé|Gesendet|Inviato|To|À|An|Subject):\s")


def split_quoted(text: str) -> tuple[str, str]:
    """Split ``text`` into the new part and the quoted earlier mail.

    The quote starts at a reply header ("On ... wrote:", "-----Original
    Message-----", an Outlook ``From:``/``Sent:`` block) or at a trailing
    block of ``>``-quoted lines. Text without a quote is all new.
    """
    lines = text.splitlines(keepends=True)
    cut = len(lines)
    for i, line in enumerate(lines):
        if _REPLY_HEADER.match(line):
            cut = i
            break
        if _OUTLOOK_FROM.match(line) and i + 1 < len(lines) and _OUTLOOK_NEXT.match(lines[i + 1]):
            cut = i
            break
    if cut == len(lines):
        # A trailing run of quoted (or blank) lines, with at least one quoted line.
        j = len(lines)
        while j > 0 and (lines[j - 1].lstrip().startswith(">") or not lines[j - 1].strip()):
            j -= 1
        if any(line.lstrip().startswith(">") for line in lines[j:]):
            cut = j
    new = "".join(lines[:cut]).rstrip()
    quoted = "".join(lines[cut:]).strip()
    return new, quoted


def sanitize_html(html: str) -> str:
    """HTML made safe to render: no scripts, handlers or foreign schemes (``cid:`` kept)."""
    return nh3.clean(
        html,
        clean_content_tags={"script", "style"},
        url_schemes={"http", "https", "mailto", "tel", "cid"},
    )


def _walk(msg: Message, limits: MimeLimits) -> list[tuple[Message, bool]]:
    """Every part with whether it sits inside an attached message; checks the
    part count and depth. Iterative: a depth of 1,000 must not recurse."""
    stack: list[tuple[Message, int, bool]] = [(msg, 0, False)]
    found: list[tuple[Message, bool]] = []
    while stack:
        part, depth, embedded = stack.pop()
        if len(found) >= limits.max_parts:
            raise MimeLimitError("too_many_parts", f"more than {limits.max_parts} MIME parts")
        if depth > limits.max_depth:
            raise MimeLimitError("too_deep", f"MIME nesting deeper than {limits.max_depth}")
        found.append((part, embedded))
        children = _children(part)
        if children:
            inner = embedded or part.get_content_type() == "message/rfc822"
            stack.extend((child, depth + 1, inner) for child in reversed(children))
    return found


def _check_part_headers(part: Message, limits: MimeLimits, total: int) -> int:
    for name, value in part.raw_items():
        length = len(name) + len(str(value)) + 2
        if length > limits.max_header_bytes:
            raise MimeLimitError(
                "header_too_long", f"a header field of {length} bytes > {limits.max_header_bytes}"
            )
        total += length
    if total > limits.max_total_header_bytes:
        raise MimeLimitError(
            "headers_too_large", f"headers of {total} bytes > {limits.max_total_header_bytes}"
        )
    return total


def _auto_reason(msg: Message) -> str:
    auto = _header_str(msg, "Auto-Submitted").lower()
    if auto and auto != "no":
        return f"auto-submitted: {auto}"
    if msg.get("X-Autoreply") is not None or msg.get("X-Autorespond") is not None:
        return "x-autoreply"
    precedence = _header_str(msg, "Precedence").lower()
    if precedence in _AUTO_PRECEDENCE:
        return f"precedence: {precedence}"
    return ""


def _dsn(report: Message) -> tuple[list[DsnRecipient], str]:
    """Per-recipient fields and the original Message-ID of a delivery-status report."""
    recipients: list[DsnRecipient] = []
    original = ""
    for child in _children(report):
        ctype = child.get_content_type()
        if ctype == "message/delivery-status":
            # The per-message and per-recipient field groups are parsed as sub-messages.
            for group in _children(child)[1:]:
                rcpt = _header_str(group, "Final-Recipient") or _header_str(
                    group, "Original-Recipient"
                )
                _, _, address = rcpt.partition(";")
                recipients.append(
                    DsnRecipient(
                        recipient=(address or rcpt).strip().lower(),
                        action=_header_str(group, "Action").lower(),
                        status=_header_str(group, "Status"),
                        diagnostic=_header_str(group, "Diagnostic-Code")[:1000],
                    )
                )
        elif ctype in ("message/rfc822", "text/rfc822-headers") and not original:
            inner = child.get_payload()
            embedded = _children(child)
            if embedded:
                original = _first_msgid(_header_str(embedded[0], "Message-ID"))
            elif isinstance(inner, str):
                headers = message_from_bytes(
                    inner.encode("utf-8", "replace"), policy=policy.default
                )
                original = _first_msgid(_header_str(headers, "Message-ID"))
    return recipients, original


#: What the stdlib parser raises on input it cannot make sense of.
_PARSER_FAILURES = (ValueError, LookupError, TypeError, UnicodeError, AttributeError, IndexError)


def parse(raw: bytes, limits: MimeLimits | None = None) -> ParsedMail:
    """Normalize one message; raises :class:`MimeLimitError` on a cap, and
    also (reason ``unparsable``) when the stdlib parser fails on the input."""
    try:
        return _parse(raw, limits or MimeLimits())
    except MimeLimitError:
        raise
    except _PARSER_FAILURES as exc:
        raise MimeLimitError("unparsable", f"{type(exc).__name__}: {exc}"[:500]) from exc


def _parse(raw: bytes, limits: MimeLimits) -> ParsedMail:
    precheck(raw, limits)
    try:
        msg = message_from_bytes(raw, policy=policy.default)
    except RecursionError as exc:
        raise MimeLimitError("too_deep", "MIME nesting defeats the parser") from exc
    text_parts: list[str] = []
    html_parts: list[str] = []
    attachments: list[MailAttachment] = []
    header_total = 0
    dsn_recipients: list[DsnRecipient] = []
    dsn_original = ""
    is_dsn = False
    try:
        parts = _walk(msg, limits)
        for part, _ in parts:
            header_total = _check_part_headers(part, limits, header_total)
        for part, embedded in parts:
            if embedded:
                continue  # content of an attached (forwarded, bounced) message
            ctype = part.get_content_type()
            if ctype == "multipart/report" and (
                (part.get_param("report-type") or "") == "delivery-status"
            ):
                is_dsn = True
                found, original = _dsn(part)
                dsn_recipients.extend(found)
                dsn_original = dsn_original or original
            if part.is_multipart() and ctype != "message/rfc822":
                continue
            disposition = part.get_content_disposition()
            filename = part.get_filename() or ""
            if (
                ctype in ("text/plain", "text/html")
                and disposition != "attachment"
                and not filename
            ):
                (text_parts if ctype == "text/plain" else html_parts).append(_decoded_text(part))
                continue
            if ctype in ("message/delivery-status", "text/rfc822-headers") and is_dsn:
                continue
            if ctype == "message/rfc822":
                embedded_parts = _children(part)
                try:
                    data = embedded_parts[0].as_bytes() if embedded_parts else b""
                except _HEADER_FAILURES:
                    # Not re-serializable (garbled headers): the bytes as received.
                    data = str(embedded_parts[0]).encode("utf-8", "surrogateescape")
            else:
                payload = part.get_payload(decode=True)
                data = payload if isinstance(payload, bytes) else b""
            content_id = _header_str(part, "Content-ID").strip("<>")
            attachments.append(
                MailAttachment(
                    filename=filename,
                    content_type=ctype,
                    size=len(data),
                    sha256=hashlib.sha256(data).hexdigest(),
                    content_id=content_id,
                    inline=disposition == "inline" or (disposition is None and bool(content_id)),
                )
            )
    except RecursionError as exc:
        raise MimeLimitError("too_deep", "MIME nesting defeats the parser") from exc
    text = "\n".join(t for t in text_parts if t)
    new_text, quoted = split_quoted(text)
    html = sanitize_html("\n".join(h for h in html_parts if h)) if html_parts else ""
    headers: list[tuple[str, str]] = []
    for name, raw_value in msg.raw_items():
        try:
            value = str(msg.policy.header_fetch_parse(name, raw_value))
        except (ValueError, TypeError, IndexError, AttributeError):
            # The modern header parser gave up on this one: keep it as received.
            value = str(raw_value)
        headers.append((name, value))
    date: datetime | None = None
    try:
        raw_date = _header_str(msg, "Date")
        date = parsedate_to_datetime(raw_date) if raw_date else None
    except (TypeError, ValueError, IndexError):
        date = None
    senders = _addresses(msg, "From")
    kind: MailKind = "dsn" if is_dsn else "message"
    auto = "" if is_dsn else _auto_reason(msg)
    if auto:
        kind = "auto_reply"
    return ParsedMail(
        kind=kind,
        message_id=_first_msgid(_header_str(msg, "Message-ID")),
        in_reply_to=_first_msgid(_header_str(msg, "In-Reply-To")),
        references=tuple(_msgids(_header_str(msg, "References"))),
        subject=_header_str(msg, "Subject"),
        sender=senders[0] if senders else None,
        to=_addresses(msg, "To"),
        cc=_addresses(msg, "Cc"),
        reply_to=_addresses(msg, "Reply-To"),
        date=date,
        text=new_text,
        quoted_text=quoted,
        html=html,
        headers=tuple(headers),
        attachments=tuple(attachments),
        auto_reason=auto,
        dsn_recipients=tuple(dsn_recipients),
        dsn_original_message_id=dsn_original,
        defects=tuple(type(d).__name__ for d in getattr(msg, "defects", ())),
    )


def thread_root(mail: ParsedMail) -> str:
    """The Message-ID that names the thread: the first reference, else the
    replied-to message, else the message itself."""
    if mail.references:
        return mail.references[0]
    return mail.in_reply_to or mail.message_id


class MimeParser:
    """Runs :func:`parse` off the event loop, in worker processes.

    Built lazily: the pool starts on first use (``spawn``, safe beside the
    loop's threads). Pass ``executor`` to share a pool or use threads in tests.
    """

    def __init__(
        self,
        limits: MimeLimits | None = None,
        *,
        workers: int = 1,
        executor: Executor | None = None,
    ) -> None:
        self.limits = limits or MimeLimits()
        self._workers = workers
        self._executor = executor
        self._owned = executor is None

    def _pool(self) -> Executor:
        if self._executor is None:
            self._executor = ProcessPoolExecutor(
                max_workers=self._workers, mp_context=get_context("spawn")
            )
        return self._executor

    async def warm(self) -> None:
        """Start the workers now (a spawned worker imports for a while), so the
        first mail does not wait for them."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._pool(), parse, b"Subject: warm-up\r\n\r\n", self.limits)

    async def parse(self, raw: bytes) -> ParsedMail:
        """Parse ``raw`` in the pool; raises :class:`MimeLimitError` on a cap."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool(), parse, raw, self.limits)

    async def run(self, func: Callable[..., T], *args: Any) -> T:
        """Run another CPU-bound, picklable ``func`` (a form-data split, say) in the pool."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool(), func, *args)

    def close(self) -> None:
        """Shut the pool down (if this parser started it)."""
        if self._owned and self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
