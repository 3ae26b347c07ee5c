"""Human-readable one-line renderings of events (``tail``, ``demo``)."""

from __future__ import annotations

import sys

from google.protobuf.json_format import MessageToDict

from gateway.api.v1.call_pb2 import CallState
from gateway.api.v1.delivery_pb2 import DeliveryState
from gateway.api.v1.envelope_pb2 import Event

_COLORS = {"message": "\033[36m", "status": "\033[33m", "call": "\033[35m"}
_RESET = "\033[0m"


def _short(text: str, limit: int = 60) -> str:
    text = text.replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def summary(event: Event) -> str:
    """What the event says, in a few words."""
    case = event.WhichOneof("payload")
    if case == "message":
        msg = event.message
        content = msg.WhichOneof("content") or "empty"
        text = msg.text.body if content == "text" else f"<{content}>"
        media = f" [{len(msg.attachments)} media]" if msg.attachments else ""
        to = ",".join(r.address for r in msg.recipients)
        return f'{msg.sender.address} -> {to} "{_short(text)}"{media}'
    if case == "status":
        st = event.status
        reason = f" reason={st.reason_code}" if st.reason_code else ""
        state = DeliveryState.Name(st.state).removeprefix("DELIVERY_STATE_")
        provider = f" ({st.provider_status})" if st.provider_status else ""
        ids = f"provider_id={st.provider_message_id or '-'} message_id={st.message_id or '-'}"
        return f"{state}{provider} {ids}{reason}"
    if case == "call":
        call = event.call
        state = CallState.Name(call.state).removeprefix("CALL_STATE_")
        words = [f"{state} ({call.provider_status})" if call.provider_status else state]
        words.append(f"{getattr(call, 'from') or '-'} -> {call.to or '-'} call_id={call.call_id}")
        if call.flow_step:
            words.append(f"step={call.flow_step}")
        if call.dtmf or call.speech:
            words.append(f'input="{_short(call.dtmf or call.speech, 30)}"')
        if call.HasField("duration"):
            words.append(f"duration={call.duration.seconds}s")
        return " ".join(words)
    return _short(str(MessageToDict(getattr(event, case))) if case else "<no payload>", 100)


def render(event: Event, routing_key: str, *, color: bool | None = None) -> str:
    """``routing-key  summary  id=...`` with colours on a terminal."""
    use_color = sys.stdout.isatty() if color is None else color
    key = routing_key.ljust(34)
    if use_color:
        tint = _COLORS.get(event.type.split(".")[-1], _COLORS.get(event.type.split(".")[0], ""))
        key = f"{tint}{key}{_RESET}"
    return f"{key} {summary(event)}  id={event.id[:8]}"
