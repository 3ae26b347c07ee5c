"""Call flows: YAML validation, TwiML and NCCO rendering, and their equivalence."""

from __future__ import annotations

import json

import pytest

from connectors.voice.flow import (
    Callback,
    VoiceFlows,
    load_flows,
    ncco_json,
    render_hold_twiml,
    render_ncco,
    render_twiml,
)
from gateway.contract import BadRequestError, ConfigError
from tests.connectors.voice.schemas import check_ncco, check_twiml

FLOWS_YAML = """
numbers:
  "+1 415 555 0100": support
flows:
  support:
    start: welcome
    steps:
      welcome:
        - say: Welcome to Acme.
          language: en-GB
        - play: https://cdn.example.com/jingle.mp3
        - gather:
            input: [dtmf, speech]
            num_digits: 1
            hints: [sales, voicemail]
            prompt:
              - say: Press 1 or say sales. Press 2 for voicemail.
            routes: {"1": sales, sales: sales, "2": voicemail, "3": agents, "4": support_sip}
            default: goodbye
      sales:
        - forward:
            number: "+44 7700 900123"
            caller_id: "+14155550100"
      support_sip:
        - forward: {sip: "sip:support@pbx.example.com"}
      agents:
        - enqueue: {queue: agents, hold_music: "https://cdn.example.com/hold.mp3"}
      voicemail:
        - say: Leave a message after the beep.
        - record: {max_length: 60, transcribe: true, then: thanks}
      thanks:
        - say: Thank you.
        - goto: goodbye
      goodbye:
        - say: Goodbye.
        - hangup
"""


def urls(kind: Callback, flow: str, step: str) -> str:
    return f"https://hooks.example.com/{kind.value}?flow={flow}&step={step}"


@pytest.fixture
def flows() -> VoiceFlows:
    return load_flows(FLOWS_YAML)


def verbs(document: bytes) -> list[str]:
    return [child.tag for child in check_twiml(document)]


def actions(flows: VoiceFlows, step: str) -> list[str]:
    ncco = check_ncco(json.loads(ncco_json(render_ncco(flows, "support", step, urls))))
    return [a["action"] for a in ncco]


#: Each step -> expected TwiML verbs and NCCO actions (equivalent behaviour).
EQUIVALENCE = [
    ("welcome", ["Say", "Play", "Gather"], ["talk", "stream", "talk", "input"]),
    ("sales", ["Dial"], ["connect"]),
    ("support_sip", ["Dial"], ["connect"]),
    ("agents", ["Enqueue"], ["conversation"]),
    # Record then continues with 'thanks' -> goto 'goodbye': TwiML via the Record
    # action and a Redirect, NCCO inline (record, talk, talk, end of NCCO = hangup).
    ("voicemail", ["Say", "Record"], ["talk", "record", "talk", "talk"]),
    ("thanks", ["Say", "Redirect"], ["talk", "talk"]),
    ("goodbye", ["Say", "Hangup"], ["talk"]),
]


@pytest.mark.parametrize(("step", "twiml", "ncco"), EQUIVALENCE)
def test_each_step_renders_equivalently(
    flows: VoiceFlows, step: str, twiml: list[str], ncco: list[str]
) -> None:
    assert verbs(render_twiml(flows, "support", step, urls)) == twiml
    assert actions(flows, step) == ncco


def test_gather_renders_menu_with_routing_callback(flows: VoiceFlows) -> None:
    root = check_twiml(render_twiml(flows, "support", "welcome", urls))
    gather = root.find("Gather")
    assert gather is not None
    assert gather.attrib == {
        "input": "dtmf speech",
        "action": urls(Callback.GATHER, "support", "welcome"),
        "method": "POST",
        "timeout": "5",
        "actionOnEmptyResult": "true",
        "finishOnKey": "#",
        "numDigits": "1",
        "speechTimeout": "auto",
        "hints": "sales,voicemail",
    }
    assert [(c.tag, c.text) for c in gather] == [
        ("Say", "Press 1 or say sales. Press 2 for voicemail.")
    ]
    assert root[0].get("language") == "en-GB"
    ncco = render_ncco(flows, "support", "welcome", urls)
    assert ncco[2]["bargeIn"] is True
    assert ncco[0]["bargeIn"] is False
    assert ncco[3] == {
        "action": "input",
        "type": ["dtmf", "speech"],
        "eventUrl": [urls(Callback.GATHER, "support", "welcome")],
        "eventMethod": "POST",
        "dtmf": {"timeOut": 5, "submitOnHash": True, "maxDigits": 1},
        "speech": {"startTimeout": 5, "endOnSilence": 1, "context": ["sales", "voicemail"]},
    }


def test_forward_targets(flows: VoiceFlows) -> None:
    root = check_twiml(render_twiml(flows, "support", "sales", urls))
    dial = root[0]
    assert dial.get("callerId") == "+14155550100"
    assert [(c.tag, c.text) for c in dial] == [("Number", "+447700900123")]
    sip = check_twiml(render_twiml(flows, "support", "support_sip", urls))[0]
    assert [(c.tag, c.text) for c in sip] == [("Sip", "sip:support@pbx.example.com")]
    assert render_ncco(flows, "support", "sales", urls)[0]["endpoint"] == [
        {"type": "phone", "number": "447700900123"}
    ]
    assert render_ncco(flows, "support", "sales", urls)[0]["from"] == "14155550100"
    sip_connect = render_ncco(flows, "support", "support_sip", urls)[0]
    assert sip_connect["endpoint"] == [{"type": "sip", "uri": "sip:support@pbx.example.com"}]
    # Without a caller id of its own, the called number (ours) is the caller id.
    assert sip_connect["randomFromNumber"] is True
    with_from = render_ncco(flows, "support", "support_sip", urls, from_number="+14155550100")[0]
    assert with_from["from"] == "14155550100"
    assert "randomFromNumber" not in check_ncco([with_from])[0]


def test_record_with_transcription(flows: VoiceFlows) -> None:
    record = check_twiml(render_twiml(flows, "support", "voicemail", urls)).find("Record")
    assert record is not None
    assert record.get("transcribe") == "true"
    assert record.get("transcribeCallback") == urls(Callback.TRANSCRIPTION, "support", "voicemail")
    assert record.get("action") == urls(Callback.RECORD, "support", "voicemail")
    assert record.get("maxLength") == "60"
    ncco = render_ncco(flows, "support", "voicemail", urls)
    assert ncco[1]["transcription"] == {
        "eventUrl": [urls(Callback.TRANSCRIPTION, "support", "voicemail")],
        "eventMethod": "POST",
    }
    assert ncco[1]["eventUrl"] == [urls(Callback.RECORDING, "support", "voicemail")]
    assert ncco[1]["timeOut"] == 60
    assert ncco[1]["endOnKey"] == "#"


def test_enqueue_hold_music(flows: VoiceFlows) -> None:
    enqueue = check_twiml(render_twiml(flows, "support", "agents", urls))[0]
    assert enqueue.text == "agents"
    assert enqueue.get("waitUrl") == urls(Callback.HOLD, "support", "agents")
    hold = check_twiml(render_hold_twiml(flows, "support", "agents"))
    assert [(c.tag, c.text, c.get("loop")) for c in hold] == [
        ("Play", "https://cdn.example.com/hold.mp3", "0")
    ]
    with pytest.raises(BadRequestError):
        render_hold_twiml(flows, "support", "sales")
    assert render_ncco(flows, "support", "agents", urls)[0]["musicOnHoldUrl"] == [
        "https://cdn.example.com/hold.mp3"
    ]


def test_say_text_is_escaped(flows: VoiceFlows) -> None:
    special = load_flows(
        'numbers: {"+14155550100": f}\n'
        "flows: {f: {start: a, steps: {a: [{say: 'Tom & Jerry <3'}]}}}\n"
    )
    document = render_twiml(special, "f", "a", urls)
    assert b"Tom &amp; Jerry &lt;3" in document
    assert check_twiml(document)[0].text == "Tom & Jerry <3"


@pytest.mark.parametrize(
    ("digits", "speech", "expected"),
    [
        ("1", "", "sales"),
        ("2", "", "voicemail"),
        ("", "Sales.", "sales"),
        ("", "  SALES ", "sales"),
        ("9", "", "goodbye"),
        ("", "", "goodbye"),
        ("1", "voicemail", "sales"),
    ],
)
def test_menu_routing(flows: VoiceFlows, digits: str, speech: str, expected: str) -> None:
    gather = flows.flows["support"].steps["welcome"][-1]
    assert gather.gather.route(digits, speech) == expected  # type: ignore[union-attr]


def test_flow_for_number(flows: VoiceFlows) -> None:
    assert flows.flow_for("+14155550100") == "support"
    with pytest.raises(BadRequestError):
        flows.flow_for("+14155550199")
    with pytest.raises(BadRequestError):
        flows.step("support", "nope")


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("flows: [", "malformed YAML"),
        (
            'numbers: {"+14155550100": f}\nflows: {f: {start: a, steps: {a: [hangup, {say: x}]}}}',
            "nothing may follow",
        ),
        (
            'numbers: {"+14155550100": f}\nflows: {f: {start: a, steps: {a: [{goto: b}]}}}',
            "unknown step 'b'",
        ),
        (
            'numbers: {"+14155550100": f}\nflows: {f: {start: z, steps: {a: [hangup]}}}',
            "start step 'z'",
        ),
        (
            'numbers: {"+14155550100": f}\n'
            "flows: {f: {start: a, steps: {a: [{goto: b}], b: [{goto: a}]}}}",
            "loop without waiting",
        ),
        (
            'numbers: {"+14155550100": g}\nflows: {f: {start: a, steps: {a: [hangup]}}}',
            "unknown flow 'g'",
        ),
        (
            'numbers: {"+14155550100": f}\n'
            "flows: {f: {start: a, steps: {a: [{forward: {number: '+14155550101', "
            "sip: 'sip:a@b'}}]}}}",
            "exactly one of number or sip",
        ),
        (
            'numbers: {"+14155550100": f}\n'
            "flows: {f: {start: a, steps: {a: [{say: x, play: 'https://a/b.mp3'}]}}}",
            "exactly one kind",
        ),
        (
            'numbers: {"+14155550100": f}\nflows: {f: {start: a, steps: {a: [{sing: x}]}}}',
            "exactly one kind",
        ),
        ('numbers: {"not a number": f}\nflows: {f: {start: a, steps: {a: [hangup]}}}', "numbers"),
        (
            'numbers: {"+14155550100": f}\n'
            "flows: {f: {start: a, steps: {a: [{gather: {timeout: 30}}]}}}",
            "less than or equal to 10",
        ),
        (
            'numbers: {"+14155550100": f}\n'
            "flows: {f: {start: a, steps: {a: [{record: {silence_timeout: 1}}]}}}",
            "greater than or equal to 3",
        ),
        (
            'numbers: {"+14155550100": f}\n'
            f"flows: {{f: {{start: a, steps: {{a: [{{say: {'x' * 1501}}}]}}}}}}",
            "at most 1500",
        ),
    ],
)
def test_invalid_flows_are_config_errors(yaml_text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_flows(yaml_text)


def test_gather_loop_back_is_allowed(flows: VoiceFlows) -> None:
    # A menu that routes back to itself waits for the caller each time: no inline loop.
    looping = load_flows(
        'numbers: {"+14155550100": f}\n'
        "flows: {f: {start: menu, steps: {menu: [{gather: {routes: {'0': menu}, "
        "default: menu}}]}}}"
    )
    assert actions_of(looping) == ["input"]


def actions_of(flows: VoiceFlows) -> list[str]:
    return [a["action"] for a in check_ncco(render_ncco(flows, "f", "menu", urls))]
