"""Structural checks of TwiML and NCCO, written from the providers' references.

TwiML (https://www.twilio.com/docs/voice/twiml): which verbs may appear in a
``<Response>`` and inside ``<Gather>``/``<Dial>``, and each verb's documented
attributes. NCCO (https://developer.vonage.com/en/voice/voice-api/ncco-reference):
each action's documented fields, with their JSON types and the value ranges
Vonage's own Python SDK models (``vonage_voice.models.ncco``/``input_types``)
enforce. Anything undocumented fails, so a renderer cannot invent an attribute
or field a provider ignores or rejects.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any

#: Verb -> documented attributes.
TWIML_ATTRIBUTES: dict[str, frozenset[str]] = {
    "Response": frozenset(),
    "Say": frozenset({"voice", "language", "loop"}),
    "Play": frozenset({"loop", "digits"}),
    "Pause": frozenset({"length"}),
    "Gather": frozenset(
        {
            "action",
            "actionOnEmptyResult",
            "enhanced",
            "finishOnKey",
            "hints",
            "input",
            "language",
            "method",
            "numDigits",
            "partialResultCallback",
            "partialResultCallbackMethod",
            "profanityFilter",
            "speechModel",
            "speechTimeout",
            "timeout",
        }
    ),
    "Record": frozenset(
        {
            "action",
            "finishOnKey",
            "maxLength",
            "method",
            "playBeep",
            "recordingStatusCallback",
            "recordingStatusCallbackEvent",
            "recordingStatusCallbackMethod",
            "timeout",
            "transcribe",
            "transcribeCallback",
            "trim",
        }
    ),
    "Dial": frozenset(
        {
            "action",
            "answerOnBridge",
            "callerId",
            "hangupOnStar",
            "method",
            "record",
            "recordingStatusCallback",
            "ringTone",
            "timeLimit",
            "timeout",
        }
    ),
    "Number": frozenset(
        {"sendDigits", "url", "method", "statusCallback", "statusCallbackEvent", "byoc"}
    ),
    "Sip": frozenset({"username", "password", "url", "method", "statusCallback"}),
    "Enqueue": frozenset({"action", "method", "waitUrl", "waitUrlMethod", "workflowSid"}),
    "Hangup": frozenset(),
    "Redirect": frozenset({"method"}),
}
#: Verbs that may be nested in a verb (others take text or nothing).
TWIML_CHILDREN: dict[str, frozenset[str]] = {
    "Response": frozenset(
        {"Say", "Play", "Pause", "Gather", "Record", "Dial", "Enqueue", "Hangup", "Redirect"}
    ),
    "Gather": frozenset({"Say", "Play", "Pause"}),
    "Dial": frozenset({"Number", "Sip", "Client", "Conference", "Queue"}),
}
#: Verbs whose text is required (what to say, what to play, where to go).
TWIML_TEXT = frozenset({"Say", "Play", "Number", "Sip", "Enqueue", "Redirect"})
_GATHER_INPUT = {"dtmf", "speech", "dtmf speech"}
_BOOL = {"true", "false"}


def check_twiml(document: bytes) -> ET.Element:
    """Parse ``document`` and assert it keeps to TwiML's documented shape."""
    root = ET.fromstring(document)
    assert root.tag == "Response", root.tag
    _check_element(root)
    return root


def _check_element(element: ET.Element) -> None:
    tag = element.tag
    assert tag in TWIML_ATTRIBUTES, f"unknown TwiML verb {tag}"
    unknown = set(element.attrib) - TWIML_ATTRIBUTES[tag]
    assert not unknown, f"<{tag}> has undocumented attributes {unknown}"
    allowed_children = TWIML_CHILDREN.get(tag, frozenset())
    for child in element:
        assert child.tag in allowed_children, f"<{child.tag}> may not be nested in <{tag}>"
        _check_element(child)
    if tag in TWIML_TEXT:
        assert (element.text or "").strip(), f"<{tag}> needs text"
    if tag == "Gather":
        assert element.get("input", "dtmf") in _GATHER_INPUT
        assert element.get("actionOnEmptyResult", "false") in _BOOL
    if tag == "Record":
        for name in ("transcribe", "playBeep", "trim"):
            assert element.get(name, "true") in _BOOL | {"trim-silence", "do-not-trim"}
    for name in ("timeout", "numDigits", "maxLength", "loop"):
        if name in element.attrib:
            assert element.attrib[name].isdigit(), f"<{tag} {name}> is not a number"


_STR, _INT, _BOOL_T, _LIST, _OBJ = str, int, bool, list, dict
#: Action -> documented field -> JSON type.
NCCO_FIELDS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "talk": {
        "action": _STR,
        "text": _STR,
        "bargeIn": _BOOL_T,
        "loop": _INT,
        "level": (int, float),
        "language": _STR,
        "style": _INT,
        "premium": _BOOL_T,
    },
    "stream": {
        "action": _STR,
        "streamUrl": _LIST,
        "level": (int, float),
        "bargeIn": _BOOL_T,
        "loop": _INT,
    },
    "input": {
        "action": _STR,
        "type": _LIST,
        "dtmf": _OBJ,
        "speech": _OBJ,
        "eventUrl": _LIST,
        "eventMethod": _STR,
        "mode": _STR,
    },
    "record": {
        "action": _STR,
        "format": _STR,
        "split": _STR,
        "channels": _INT,
        "endOnSilence": _INT,
        "endOnKey": _STR,
        "timeOut": _INT,
        "beepStart": _BOOL_T,
        "eventUrl": _LIST,
        "eventMethod": _STR,
        "transcription": _OBJ,
    },
    "connect": {
        "action": _STR,
        "endpoint": _LIST,
        "from": _STR,
        "randomFromNumber": _BOOL_T,
        "eventType": _STR,
        "timeout": _INT,
        "limit": _INT,
        "machineDetection": _STR,
        "advancedMachineDetection": _OBJ,
        "eventUrl": _LIST,
        "eventMethod": _STR,
        "ringbackTone": _STR,
    },
    "conversation": {
        "action": _STR,
        "name": _STR,
        "musicOnHoldUrl": _LIST,
        "startOnEnter": _BOOL_T,
        "endOnExit": _BOOL_T,
        "record": _BOOL_T,
        "canSpeak": _LIST,
        "canHear": _LIST,
        "mute": _BOOL_T,
    },
    "notify": {"action": _STR, "payload": _OBJ, "eventUrl": _LIST, "eventMethod": _STR},
}
_DTMF = {"timeOut": int, "maxDigits": int, "submitOnHash": bool}
_SPEECH = {
    "uuid": list,
    "endOnSilence": (int, float),
    "language": str,
    "context": list,
    "startTimeout": int,
    "maxDuration": int,
    "saveAudio": bool,
    "sensitivity": int,
}
_ENDPOINTS = {
    "phone": {"type": str, "number": str, "dtmfAnswer": str, "onAnswer": dict, "shaken": str},
    "sip": {"type": str, "uri": str, "headers": dict, "standardHeaders": dict},
    "app": {"type": str, "user": str},
    "websocket": {"type": str, "uri": str, "content-type": str, "headers": dict},
    "vbc": {"type": str, "extension": str},
}
_TRANSCRIPTION = {"language": str, "eventUrl": list, "eventMethod": str, "sentimentAnalysis": bool}


def _check_fields(
    where: str, value: dict[str, Any], fields: dict[str, type | tuple[type, ...]]
) -> None:
    unknown = set(value) - set(fields)
    assert not unknown, f"{where} has undocumented fields {unknown}"
    for name, item in value.items():
        assert isinstance(item, fields[name]), f"{where}.{name} has type {type(item).__name__}"


def check_ncco(ncco: Any) -> list[dict[str, Any]]:
    """Assert ``ncco`` keeps to the NCCO reference's documented shape."""
    assert isinstance(ncco, list), "an NCCO is a JSON array"
    for index, action in enumerate(ncco):
        assert isinstance(action, dict), f"action {index} is not an object"
        kind = action.get("action")
        assert kind in NCCO_FIELDS, f"unknown NCCO action {kind!r}"
        _check_fields(f"{kind}[{index}]", action, NCCO_FIELDS[kind])
        for url_field in ("eventUrl", "streamUrl", "musicOnHoldUrl"):
            for url in action.get(url_field, []):
                assert isinstance(url, str)
                assert url.startswith(("http://", "https://"))
        if kind == "talk":
            assert 0 < len(action["text"]) <= 1500
            assert action.get("loop", 1) >= 0
        if kind == "input":
            assert action["type"]
            assert set(action["type"]) <= {"dtmf", "speech"}
            dtmf, speech = action.get("dtmf", {}), action.get("speech", {})
            _check_fields("input.dtmf", dtmf, dict(_DTMF))
            _check_fields("input.speech", speech, dict(_SPEECH))
            assert 0 <= dtmf.get("timeOut", 0) <= 10
            assert 1 <= dtmf.get("maxDigits", 1) <= 20
            assert 0.4 <= speech.get("endOnSilence", 1) <= 10
            assert 1 <= speech.get("startTimeout", 1) <= 60
        if kind == "record":
            assert action.get("format", "mp3") in {"mp3", "wav", "ogg"}
            assert 3 <= action.get("endOnSilence", 3) <= 10
            assert 3 <= action.get("timeOut", 3) <= 7200
            assert action.get("endOnKey", "#") in set("0123456789#*")
            _check_fields("record.transcription", action.get("transcription", {}), _TRANSCRIPTION)
        if kind == "connect":
            assert action["endpoint"], "connect needs an endpoint"
            # Exactly one of a caller id and a random one of our numbers.
            assert ("from" in action) != bool(action.get("randomFromNumber"))
            assert action.get("limit", 0) <= 7200
            for endpoint in action["endpoint"]:
                shape = _ENDPOINTS.get(endpoint.get("type"))
                assert shape is not None, f"unknown endpoint type {endpoint.get('type')!r}"
                _check_fields("connect.endpoint", endpoint, dict(shape))
                if endpoint["type"] == "phone":
                    # E.164 digits without '+'.
                    assert endpoint["number"].isdigit()
        if kind == "conversation":
            assert action["name"]
    return ncco
