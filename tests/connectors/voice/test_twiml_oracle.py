"""Our TwiML equals what Twilio's own helper library builds for the same steps.

``twilio.twiml.voice_response`` (the provider's SDK, test-only) maps its
documented snake_case parameters to TwiML's attribute names; comparing parsed
trees checks our verb and attribute names against an independent source.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any

import pytest
from twilio.twiml.voice_response import (  # type: ignore[import-untyped]
    Dial,
    Gather,
    VoiceResponse,
)

from connectors.voice.flow import Callback, VoiceFlows, load_flows, render_twiml
from tests.connectors.voice.test_flow import FLOWS_YAML, urls


def canonical(element: ET.Element) -> tuple[Any, ...]:
    return (
        element.tag,
        sorted(element.attrib.items()),
        (element.text or "").strip(),
        [canonical(child) for child in element],
    )


def sdk(response: VoiceResponse) -> tuple[Any, ...]:
    return canonical(ET.fromstring(str(response).encode()))


def welcome() -> VoiceResponse:
    r = VoiceResponse()
    r.say("Welcome to Acme.", loop=1, language="en-GB")
    r.play("https://cdn.example.com/jingle.mp3", loop=1)
    g = Gather(
        input="dtmf speech",
        action=urls(Callback.GATHER, "support", "welcome"),
        method="POST",
        timeout=5,
        action_on_empty_result=True,
        finish_on_key="#",
        num_digits=1,
        speech_timeout="auto",
        hints="sales,voicemail",
    )
    g.say("Press 1 or say sales. Press 2 for voicemail.", loop=1)
    r.append(g)
    return r


def voicemail() -> VoiceResponse:
    r = VoiceResponse()
    r.say("Leave a message after the beep.", loop=1)
    r.record(
        action=urls(Callback.RECORD, "support", "voicemail"),
        method="POST",
        max_length=60,
        timeout=5,
        finish_on_key="#",
        play_beep=True,
        recording_status_callback=urls(Callback.RECORDING, "support", "voicemail"),
        recording_status_callback_method="POST",
        transcribe=True,
        transcribe_callback=urls(Callback.TRANSCRIPTION, "support", "voicemail"),
    )
    return r


def sales() -> VoiceResponse:
    r = VoiceResponse()
    d = Dial(timeout=30, caller_id="+14155550100")
    d.number("+447700900123")
    r.append(d)
    return r


def support_sip() -> VoiceResponse:
    r = VoiceResponse()
    d = Dial(timeout=30)
    d.sip("sip:support@pbx.example.com")
    r.append(d)
    return r


def agents() -> VoiceResponse:
    r = VoiceResponse()
    r.enqueue("agents", wait_url=urls(Callback.HOLD, "support", "agents"), wait_url_method="POST")
    return r


def thanks() -> VoiceResponse:
    r = VoiceResponse()
    r.say("Thank you.", loop=1)
    r.redirect(urls(Callback.STEP, "support", "goodbye"), method="POST")
    return r


def goodbye() -> VoiceResponse:
    r = VoiceResponse()
    r.say("Goodbye.", loop=1)
    r.hangup()
    return r


@pytest.mark.parametrize(
    "expected", [welcome, voicemail, sales, support_sip, agents, thanks, goodbye]
)
def test_twiml_matches_twilios_helper_library(expected: Any) -> None:
    flows: VoiceFlows = load_flows(FLOWS_YAML)
    ours = canonical(ET.fromstring(render_twiml(flows, "support", expected.__name__, urls)))
    assert ours == sdk(expected())
