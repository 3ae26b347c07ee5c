"""Content against a connector's manifest: adapt what can be adapted, refuse the rest.

``SendMessage`` and ``PreviewMessage`` share :func:`adapt`, so a preview says
exactly what a send would do. Rich content a channel cannot carry but whose
meaning survives as text (buttons, lists, a location, a contact card, an
email's text part) is rendered as plain text; parts that would silently
vanish (media on a text-only channel, a template a channel cannot render) are
violations: the sender must decide, the gateway does not guess.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from connectors.sms.encoding import SmsEncoding, analyze
from gateway.api.v1.connector_pb2 import ConnectorManifest
from gateway.api.v1.content_pb2 import (
    Choice,
    ContactCard,
    Location,
    Text,
    TextFormat,
)
from gateway.api.v1.gateway_service_pb2 import AdaptationKind
from gateway.api.v1.message_pb2 import Message

#: Content cases that read as text once rendered (see :func:`_as_text`).
DEGRADABLE = frozenset({"choice", "location", "contact", "email", "choice_response"})


@dataclass(frozen=True, slots=True)
class Violation:
    """One reason the content cannot be sent (a google.rpc.BadRequest field violation)."""

    field: str
    description: str


@dataclass(frozen=True, slots=True)
class Adaptation:
    """One change made to the content for the channel."""

    kind: AdaptationKind.ValueType
    field: str
    description: str


@dataclass(slots=True)
class Adapted:
    """The content as the connector would get it, and what happened on the way."""

    message: Message
    adaptations: list[Adaptation] = field(default_factory=list)
    violations: list[Violation] = field(default_factory=list)
    #: Encoding and segments of the text (SMS channel only).
    sms: SmsEncoding | None = None


def _choice_text(choice: Choice) -> str:
    lines = [choice.header] if choice.header else []
    if choice.body:
        lines.append(choice.body)
    for number, option in enumerate(choice.options, start=1):
        title = option.title or option.id
        lines.append(
            f"{number}. {title} - {option.description}"
            if option.description
            else f"{number}. {title}"
        )
    if choice.footer:
        lines.append(choice.footer)
    return "\n".join(lines)


def _location_text(location: Location) -> str:
    lines = [part for part in (location.name, location.address) if part]
    lines.append(f"{location.latitude:.6f},{location.longitude:.6f}")
    return "\n".join(lines)


def _contact_text(contact: ContactCard) -> str:
    lines = [contact.formatted_name] if contact.formatted_name else []
    if contact.organization:
        lines.append(contact.organization)
    lines.extend(contact.phones)
    lines.extend(contact.emails)
    return "\n".join(lines)


def _as_text(message: Message, case: str, prefix: str, out: Adapted) -> str | None:
    """Render a degradable content case as text (None when it has no text to give)."""
    if case == "choice":
        return _choice_text(message.choice)
    if case == "location":
        return _location_text(message.location)
    if case == "contact":
        return _contact_text(message.contact)
    if case == "choice_response":
        return message.choice_response.title or message.choice_response.option_id
    email = message.email
    if email.html:
        out.adaptations.append(
            Adaptation(
                kind=AdaptationKind.ADAPTATION_KIND_DROPPED,
                field=f"{prefix}.email.html",
                description="the HTML body is left out; the text part is sent",
            )
        )
    if email.headers or email.in_reply_to or email.references:
        out.adaptations.append(
            Adaptation(
                kind=AdaptationKind.ADAPTATION_KIND_DROPPED,
                field=f"{prefix}.email.headers",
                description="email headers and threading ids have no meaning on this channel",
            )
        )
    if not email.text:
        return None
    return f"{email.subject}\n\n{email.text}" if email.subject else email.text


def adapt(message: Message, manifest: ConnectorManifest, *, prefix: str = "message") -> Adapted:
    """Adapt ``message`` for the connector of ``manifest``; report violations.

    ``prefix`` is the request field path of ``message`` (for violations).
    """
    name = f"{manifest.channel}.{manifest.provider}"
    supported = set(manifest.outbound_content)
    limits = manifest.limits
    out = Adapted(message=Message())
    out.message.CopyFrom(message)
    case = message.WhichOneof("content")

    if case is None and not message.attachments:
        out.violations.append(
            Violation(prefix, "no content: set one of text, media, choice, ... or attachments")
        )
        return out
    if case is not None and case not in supported:
        if case in DEGRADABLE and "text" in supported:
            text = _as_text(message, case, prefix, out)
            if text is None:
                out.violations.append(
                    Violation(
                        f"{prefix}.email.text",
                        f"{name} sends text only, and this email has no text part",
                    )
                )
            else:
                out.message.text.CopyFrom(Text(body=text, format=TextFormat.TEXT_FORMAT_PLAIN))
                out.adaptations.append(
                    Adaptation(
                        kind=AdaptationKind.ADAPTATION_KIND_DEGRADED_TO_TEXT,
                        field=f"{prefix}.{case}",
                        description=f"{case} is not supported by {name}: sent as plain text",
                    )
                )
        else:
            out.violations.append(
                Violation(
                    f"{prefix}.{case}",
                    f"{name} cannot send {case} content "
                    f"(it sends: {', '.join(sorted(supported)) or 'nothing'})",
                )
            )

    if message.attachments:
        if "media" not in supported:
            out.violations.append(
                Violation(
                    f"{prefix}.attachments",
                    f"{name} cannot send media: remove the {len(message.attachments)} "
                    "attachment(s) or send on a channel that takes media",
                )
            )
        else:
            if limits.max_attachments and len(message.attachments) > limits.max_attachments:
                out.violations.append(
                    Violation(
                        f"{prefix}.attachments",
                        f"{name} takes at most {limits.max_attachments} attachments, "
                        f"got {len(message.attachments)}",
                    )
                )
            for i, item in enumerate(message.attachments):
                if not item.url and not item.provider_media_id:
                    out.violations.append(
                        Violation(
                            f"{prefix}.attachments[{i}].url",
                            "an attachment needs a url (or a provider_media_id)",
                        )
                    )
                elif item.url and not item.url.startswith(("https://", "http://")):
                    out.violations.append(
                        Violation(f"{prefix}.attachments[{i}].url", "must be an http(s) URL")
                    )
                if limits.max_attachment_bytes and item.size_bytes > limits.max_attachment_bytes:
                    out.violations.append(
                        Violation(
                            f"{prefix}.attachments[{i}].size_bytes",
                            f"{item.size_bytes} bytes is over {name}'s limit of "
                            f"{limits.max_attachment_bytes}",
                        )
                    )
    elif case == "media" and "media" in supported:
        out.violations.append(
            Violation(f"{prefix}.attachments", "media content needs at least one attachment")
        )

    final = out.message.WhichOneof("content")
    body_field = f"{prefix}.{case}" if case in DEGRADABLE else f"{prefix}.text.body"
    if final == "media":
        body, body_field = out.message.media.caption, f"{prefix}.media.caption"
    elif final == "text":
        body = out.message.text.body
    else:
        body = ""
    if final == "text" and not body and not message.attachments:
        out.violations.append(Violation(body_field, "the text is empty"))
    if limits.max_text_length and len(body) > limits.max_text_length:
        out.violations.append(
            Violation(
                body_field,
                f"the text is {len(body)} characters; {name} takes at most "
                f"{limits.max_text_length}",
            )
        )
    if manifest.channel == "sms" and body:
        out.sms = analyze(body)
    return out
