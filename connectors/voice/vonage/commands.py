"""Call commands -> Vonage Voice API request bodies: pure functions.

How each :class:`~gateway.api.v1.call_pb2.CallCommand` action maps:

========  ====================================================================
place     ``POST /v1/calls``: ``to`` [phone (E.164 digits) or sip (uri)],
          ``from`` phone (the command's, else the account's ``caller_number``,
          else ``random_from_number``), ``event_url`` = the event route,
          ``ringing_timer``. ``say``/``play_url``: an inline ``ncco`` (talk or
          stream; the call hangs up when it ends). ``flow`` (or ``record``):
          ``answer_url`` = the connector's answer route naming the script, so
          the flow routes (gather, recording) drive the call and the record
          action's eventUrl can name the call leg, whose uuid an inline NCCO
          cannot know. ``record``: an NCCO ``record`` action first, without an
          end condition, which records the whole call asynchronously.
transfer  ``PUT /v1/calls/{uuid}`` transfer to ``[connect]`` (phone or sip
          endpoint; caller id: the command's, else the account's
          ``caller_number``, else ``randomFromNumber``: a connect's ``from`` must
          be one of our Vonage numbers, so the call's own caller id cannot be
          kept).
enqueue   transfer to ``[conversation]`` named after the queue, with
          ``startOnEnter: false`` (the caller waits until an agent joins) and
          ``musicOnHoldUrl`` = the hold music of the flow step that enqueues
          into the same queue (none: Vonage's default).
speak     transfer to ``[talk|stream] + NCCO of then_step`` (nothing after
          it: Vonage hangs up when the NCCO ends). Not ``PUT .../talk`` or
          ``.../stream``: those play over the call's current NCCO and cannot
          continue with a flow step afterwards (nor hang up).
hang_up   ``PUT /v1/calls/{uuid}`` ``{"action": "hangup"}``.
========  ====================================================================

https://developer.vonage.com/en/api/voice and
https://developer.vonage.com/en/voice/voice-api/ncco-reference
"""

from __future__ import annotations

import re
from typing import Any

from connectors.voice.flow import Enqueue, Play, Say, VoiceFlows, hold_step, ncco_prompt
from gateway.contract import BadRequestError, PermanentError, normalize_phone

#: Vonage's limit for ``ringing_timer`` (seconds).
MAX_RINGING_TIMER = 120
_SIP = re.compile(r"^sips?:[^\s<>]{1,250}$")
_URL = re.compile(r"^https?://\S+$")
HANGUP: dict[str, Any] = {"action": "hangup"}


def e164_digits(raw: str, *, code: str, what: str) -> str:
    """A phone number as Vonage writes it: E.164 digits without ``+``."""
    try:
        return normalize_phone(raw).removeprefix("+")
    except (BadRequestError, ValueError) as exc:
        raise PermanentError(f"{what} {raw!r} is not an E.164 phone number", code=code) from exc


def endpoint(target: str) -> dict[str, Any]:
    """The Vonage endpoint of a call target: an E.164 number or a ``sip:`` URI."""
    target = target.strip()
    if target.lower().startswith(("sip:", "sips:")):
        if not _SIP.match(target):
            raise PermanentError(f"malformed SIP URI {target!r}", code="invalid_target")
        return {"type": "sip", "uri": target}
    if not target:
        raise PermanentError("no target to call", code="invalid_target")
    return {"type": "phone", "number": e164_digits(target, code="invalid_target", what="target")}


def talk(text: str, *, language: str = "", voice: str = "") -> dict[str, Any]:
    """An NCCO ``talk``. Vonage picks a voice by language and ``style`` (a
    number); any other voice name is refused rather than ignored."""
    try:
        action = ncco_prompt(Say(say=text, language=language or None))
    except ValueError as exc:
        raise PermanentError(f"cannot speak this text: {exc}", code="invalid_say") from exc
    if voice:
        if not voice.isdigit():
            raise PermanentError(
                f"Vonage voices are a language and a style number, not {voice!r}",
                code="invalid_voice",
            )
        action["style"] = int(voice)
    return action


def stream(url: str) -> dict[str, Any]:
    """An NCCO ``stream`` of an audio URL."""
    if not _URL.match(url):
        raise PermanentError(f"not an http(s) audio URL: {url!r}", code="invalid_audio_url")
    return ncco_prompt(Play(play=url))


def record_call(event_url: str) -> dict[str, Any]:
    """An NCCO ``record`` of the whole call: no end condition makes it asynchronous
    (it runs on under the following actions until the call ends)."""
    return {"action": "record", "format": "mp3", "eventUrl": [event_url], "eventMethod": "POST"}


def ringing_timer(seconds: int) -> int | None:
    """``ringing_timer`` of a ring timeout (0: Vonage's default of 60 s)."""
    if seconds == 0:
        return None
    if seconds > MAX_RINGING_TIMER:
        raise PermanentError(
            f"Vonage rings at most {MAX_RINGING_TIMER} s, not {seconds}",
            code="invalid_ring_timeout",
        )
    return seconds


def create_call(
    *,
    to: dict[str, Any],
    from_number: str | None,
    event_url: str,
    ncco: list[dict[str, Any]] | None = None,
    answer_url: str | None = None,
    ring_seconds: int | None = None,
) -> dict[str, Any]:
    """The ``POST /v1/calls`` body (exactly one of ``ncco`` and ``answer_url``)."""
    if (ncco is None) == (answer_url is None):
        raise ValueError("a call needs exactly one of ncco and answer_url")
    body: dict[str, Any] = {"to": [to], "event_url": [event_url], "event_method": "POST"}
    if from_number:
        body["from"] = {"type": "phone", "number": from_number}
    else:
        # Vonage picks one of the application's numbers.
        body["random_from_number"] = True
    if ncco is not None:
        body["ncco"] = ncco
    else:
        body["answer_url"] = [answer_url]
        body["answer_method"] = "GET"
    if ring_seconds is not None:
        body["ringing_timer"] = ring_seconds
    return body


def transfer(ncco: list[dict[str, Any]]) -> dict[str, Any]:
    """The ``PUT /v1/calls/{uuid}`` body moving a live call to ``ncco``."""
    return {"action": "transfer", "destination": {"type": "ncco", "ncco": ncco}}


def connect(target: dict[str, Any], caller_id: str | None) -> dict[str, Any]:
    """An NCCO ``connect`` to ``target`` (a phone or SIP endpoint)."""
    action: dict[str, Any] = {"action": "connect", "endpoint": [target]}
    if caller_id:
        action["from"] = caller_id
    else:
        action["randomFromNumber"] = True
    return action


def hold_music(flows: VoiceFlows, queue: str) -> str | None:
    """The hold music of the flow step that enqueues into ``queue`` (if any)."""
    found = hold_step(flows, queue)
    if found is None:
        return None
    _, actions = flows.step(*found)
    last = actions[-1]
    return last.enqueue.hold_music if isinstance(last, Enqueue) else None


def conversation(queue: str, music: str | None) -> dict[str, Any]:
    """An NCCO ``conversation`` holding the caller in ``queue`` until an agent joins."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", queue):
        raise PermanentError(
            f"queue names are 1-64 letters, digits, '_', '.', '-': {queue!r}", code="invalid_queue"
        )
    action: dict[str, Any] = {"action": "conversation", "name": queue, "startOnEnter": False}
    if music:
        action["musicOnHoldUrl"] = [music]
    return action
