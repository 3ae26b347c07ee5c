"""Provider-neutral call flows, rendered as Twilio TwiML or Vonage NCCO.

A flow is a graph of named steps; each step is a list of actions run in order.
``say``/``play`` speak; ``gather`` collects DTMF or speech and routes the
answer to another step (menu routing); ``record`` takes a voicemail (optionally
transcribed) and continues with ``then``; ``forward`` connects the caller to a
number or SIP URI; ``enqueue`` parks the caller in a named queue; ``goto``
continues with another step; ``hangup`` ends the call. ``gather``, ``record``,
``forward``, ``enqueue``, ``goto`` and ``hangup`` end a step.

The same definition gives equivalent behaviour on both providers:

========  ====================================  ==========================================
step      TwiML verb                            NCCO action
========  ====================================  ==========================================
say       ``<Say>``                             ``talk``
play      ``<Play>``                            ``stream``
gather    ``<Gather input action>`` + prompts   prompts (``bargeIn``) + ``input`` eventUrl
record    ``<Record action transcribe>``        ``record`` (endOnSilence/endOnKey/timeOut),
                                                then the ``then`` step inline
forward   ``<Dial><Number>``/``<Sip>``          ``connect`` endpoint ``phone``/``sip``
enqueue   ``<Enqueue waitUrl>``                 ``conversation`` (musicOnHoldUrl)
goto      ``<Redirect>``                        the target step inline
hangup    ``<Hangup/>``                         end of the NCCO (Vonage hangs up)
========  ====================================  ==========================================

Provider callbacks that continue a flow (gather results, the end of a
recording) come back to the connector with the flow and step names in the
query, and the connector answers with the next step rendered again.

TwiML: https://www.twilio.com/docs/voice/twiml
NCCO: https://developer.vonage.com/en/voice/voice-api/ncco-reference
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from enum import StrEnum
from typing import Annotated, Any, Literal, Protocol, Self, cast

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from gateway.contract import BadRequestError, ConfigError, normalize_phone

_NAME = r"^[A-Za-z0-9_.-]{1,64}$"


def _e164(value: str) -> str:
    try:
        return normalize_phone(value)
    except BadRequestError as exc:
        raise ValueError(str(exc)) from exc


#: A phone number in voice config, normalized to E.164 (anything else is a config error).
PhoneNumber = Annotated[str, AfterValidator(_e164)]


class _Action(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Say(_Action):
    """Speak ``text`` (text to speech)."""

    #: At most 1500 characters (NCCO talk's limit; TwiML Say allows 4096).
    say: str = Field(min_length=1, max_length=1500)
    language: str | None = None
    loop: int = Field(default=1, ge=1, le=100)


class Play(_Action):
    """Play an audio file."""

    play: str = Field(pattern=r"^https?://")
    loop: int = Field(default=1, ge=1, le=100)


Prompt = Say | Play


class InputKind(StrEnum):
    """What a gather listens for."""

    DTMF = "dtmf"
    SPEECH = "speech"


class GatherSpec(BaseModel):
    """Collect keypad digits and/or speech, then route to a step."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input: list[InputKind] = Field(default=[InputKind.DTMF], min_length=1)
    prompt: list[Prompt] = []
    #: Seconds to wait for input (NCCO dtmf timeOut allows at most 10).
    timeout: int = Field(default=5, ge=1, le=10)
    #: Digits to collect (a single-key menu is 1).
    num_digits: int | None = Field(default=None, ge=1, le=20)
    #: ``#`` ends digit entry.
    finish_on_hash: bool = True
    language: str | None = None
    #: Phrases the speech recognizer should expect.
    hints: list[str] = []
    #: Input (digits, or a spoken word/phrase, case-insensitive) -> step name.
    routes: dict[str, str] = {}
    #: Step for no input or input without a route; None ends the call.
    default: str | None = None

    @field_validator("input")
    @classmethod
    def _distinct(cls, value: list[InputKind]) -> list[InputKind]:
        return list(dict.fromkeys(value))

    def route(self, digits: str, speech: str) -> str | None:
        """The step for a caller's answer (digits win over speech)."""
        if digits and digits in self.routes:
            return self.routes[digits]
        spoken = " ".join(speech.lower().strip(" .!?").split())
        for key, step in self.routes.items():
            if spoken and key.lower() == spoken:
                return step
        return self.default


class Gather(_Action):
    """``gather:`` step action."""

    gather: GatherSpec


class RecordSpec(BaseModel):
    """Record the caller (voicemail), optionally transcribed."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Seconds (NCCO record timeOut: 3..7200).
    max_length: int = Field(default=120, ge=3, le=7200)
    #: Seconds of silence that end the recording (NCCO record endOnSilence: 3..10).
    silence_timeout: int = Field(default=5, ge=3, le=10)
    #: A key ends the recording (``#``).
    finish_on_key: Literal["#", "*", "0", "1", "2", "3", "4", "5", "6", "7", "8", "9"] | None = "#"
    beep: bool = True
    transcribe: bool = False
    #: Step after the recording; None ends the call.
    then: str | None = None


class Record(_Action):
    """``record:`` step action."""

    record: RecordSpec


class ForwardSpec(BaseModel):
    """Connect the caller to a phone number or a SIP URI."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    number: PhoneNumber | None = None
    sip: str | None = Field(default=None, pattern=r"^sips?:[^\s<>]+$")
    #: Seconds to ring before giving up.
    timeout: int = Field(default=30, ge=5, le=600)
    #: Caller id shown to the callee (one of our numbers).
    caller_id: PhoneNumber | None = None

    @model_validator(mode="after")
    def _one_target(self) -> Self:
        if (self.number is None) == (self.sip is None):
            raise ValueError("forward needs exactly one of number or sip")
        return self


class Forward(_Action):
    """``forward:`` step action."""

    forward: ForwardSpec


class EnqueueSpec(BaseModel):
    """Park the caller in a named queue until an agent takes the call."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    queue: str = Field(pattern=_NAME)
    hold_music: str | None = Field(default=None, pattern=r"^https?://")


class Enqueue(_Action):
    """``enqueue:`` step action."""

    enqueue: EnqueueSpec


class Goto(_Action):
    """Continue with another step."""

    goto: str = Field(pattern=_NAME)


class Hangup(_Action):
    """End the call."""

    hangup: Literal[True] = True


Action = Say | Play | Gather | Record | Forward | Enqueue | Goto | Hangup
_TERMINAL = (Gather, Record, Forward, Enqueue, Goto, Hangup)


def _action_key(value: Any) -> str:
    if isinstance(value, str) and value == "hangup":
        return "hangup"
    if isinstance(value, dict):
        keys = [
            k
            for k in ("say", "play", "gather", "record", "forward", "enqueue", "goto")
            if k in value
        ]
        if "hangup" in value:
            keys.append("hangup")
        if len(keys) == 1:
            return keys[0]
        raise ValueError(f"an action names exactly one kind, got {sorted(value)}")
    if isinstance(value, _Action):
        return type(value).__name__.lower()
    raise ValueError(f"not an action: {value!r}")


def _coerce_action(value: Any) -> Any:
    # ``- hangup`` is the natural YAML spelling of the argument-less action.
    return {"hangup": True} if value == "hangup" else value


class CallFlow(BaseModel):
    """A named graph of steps; a call starts at ``start``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    start: str = Field(pattern=_NAME)
    steps: dict[str, list[Action]] = Field(min_length=1)

    @field_validator("steps", mode="before")
    @classmethod
    def _parse_steps(cls, value: Any) -> Any:
        if not isinstance(value, Mapping):
            raise ValueError("steps must be a mapping of step name -> list of actions")
        parsed: dict[str, list[Action]] = {}
        for name, actions in value.items():
            if not isinstance(actions, list) or not actions:
                raise ValueError(f"step {name!r} must be a non-empty list of actions")
            items: list[Action] = []
            for index, raw in enumerate(actions):
                raw = _coerce_action(raw)
                kind = _action_key(raw)
                model = _KINDS[kind]
                try:
                    items.append(
                        cast(Action, raw if isinstance(raw, model) else model.model_validate(raw))
                    )
                except ValidationError as exc:
                    raise ValueError(f"step {name!r} action {index} ({kind}): {exc}") from exc
            parsed[str(name)] = items
        return parsed

    @model_validator(mode="after")
    def _check_graph(self) -> Self:
        for name, actions in self.steps.items():
            if not _matches(name):
                raise ValueError(f"step name {name!r} must match {_NAME}")
            for action in actions[:-1]:
                if isinstance(action, _TERMINAL):
                    raise ValueError(
                        f"step {name!r}: {_action_key(action)} ends a step, nothing may follow it"
                    )
            for target in _targets(actions):
                if target not in self.steps:
                    raise ValueError(f"step {name!r} refers to unknown step {target!r}")
        if self.start not in self.steps:
            raise ValueError(f"start step {self.start!r} is not defined")
        for name in self.steps:
            # NCCO has no redirect: goto and record.then are inlined, so a
            # cycle of them that never waits for the caller would never end.
            _inline_chain(self, name)
        return self


_KINDS: dict[str, type[_Action]] = {
    "say": Say,
    "play": Play,
    "gather": Gather,
    "record": Record,
    "forward": Forward,
    "enqueue": Enqueue,
    "goto": Goto,
    "hangup": Hangup,
}


def _matches(name: str) -> bool:
    return re.fullmatch(_NAME[1:-1], name) is not None


def _targets(actions: list[Action]) -> list[str]:
    found: list[str] = []
    for action in actions:
        if isinstance(action, Goto):
            found.append(action.goto)
        elif isinstance(action, Record) and action.record.then:
            found.append(action.record.then)
        elif isinstance(action, Gather):
            found.extend(action.gather.routes.values())
            if action.gather.default:
                found.append(action.gather.default)
    return found


def _inline_chain(flow: CallFlow, start: str) -> list[str]:
    """Steps run one after another without a provider round trip (for NCCO)."""
    chain = [start]
    while True:
        last = flow.steps[chain[-1]][-1]
        following = (
            last.goto
            if isinstance(last, Goto)
            else last.record.then
            if isinstance(last, Record)
            else None
        )
        if following is None:
            return chain
        if following in chain:
            raise ValueError(
                f"steps {' -> '.join([*chain, following])} loop without waiting for the caller"
            )
        chain.append(following)


class VoiceFlows(BaseModel):
    """Flows by name and which flow answers each of our numbers."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    flows: dict[str, CallFlow] = Field(min_length=1)
    #: Our number (E.164) -> flow name.
    numbers: dict[str, str] = Field(min_length=1)
    #: Flow for a called number that is not listed; None rejects such calls.
    default_flow: str | None = None

    @field_validator("numbers")
    @classmethod
    def _normalize(cls, value: dict[str, str]) -> dict[str, str]:
        try:
            return {normalize_phone(number): flow for number, flow in value.items()}
        except (BadRequestError, ValueError) as exc:
            raise ValueError(str(exc)) from exc

    @model_validator(mode="after")
    def _known(self) -> Self:
        for number, flow in self.numbers.items():
            if flow not in self.flows:
                raise ValueError(f"number {number} uses unknown flow {flow!r}")
        if self.default_flow is not None and self.default_flow not in self.flows:
            raise ValueError(f"default_flow {self.default_flow!r} is not defined")
        return self

    def flow_for(self, called: str) -> str:
        """The flow name answering ``called``; BadRequestError when none does."""
        try:
            number = normalize_phone(called)
        except (BadRequestError, ValueError):
            number = called
        name = self.numbers.get(number, self.default_flow)
        if name is None:
            raise BadRequestError(f"no call flow for the called number {called!r}")
        return name

    def step(self, flow: str, step: str) -> tuple[CallFlow, list[Action]]:
        """A step of a flow; BadRequestError for names the config does not have."""
        found = self.flows.get(flow)
        if found is None or step not in found.steps:
            raise BadRequestError(f"unknown flow step {flow!r}/{step!r}")
        return found, found.steps[step]


def load_flows(text: str) -> VoiceFlows:
    """Parse a YAML flows document (``flows:``, ``numbers:``, ``default_flow:``)."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"call flows: malformed YAML: {exc}") from exc
    try:
        return VoiceFlows.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"call flows: {exc}") from exc


# -- callback URLs ---------------------------------------------------------------------


class Callback(StrEnum):
    """Connector routes a rendered flow points the provider at."""

    #: Gather result (TwiML Gather action, NCCO input eventUrl).
    GATHER = "gather"
    #: End of a recording (TwiML Record action).
    RECORD = "record"
    #: Recording ready (TwiML recordingStatusCallback, NCCO record eventUrl).
    RECORDING = "recording"
    #: Transcription ready.
    TRANSCRIPTION = "transcription"
    #: Continue with a step (TwiML Redirect).
    STEP = "step"
    #: Hold music while queued (TwiML Enqueue waitUrl).
    HOLD = "hold"


class CallbackUrls(Protocol):
    """Builds the public URL of a connector route for one flow step."""

    def __call__(self, kind: Callback, flow: str, step: str) -> str: ...


# -- TwiML -----------------------------------------------------------------------------


def _twiml_prompt(parent: ET.Element, action: Prompt, language: str | None = None) -> None:
    if isinstance(action, Say):
        say = ET.SubElement(parent, "Say", {"loop": str(action.loop)})
        lang = action.language or language
        if lang:
            say.set("language", lang)
        say.text = action.say
    else:
        play = ET.SubElement(parent, "Play", {"loop": str(action.loop)})
        play.text = action.play


def render_twiml(flows: VoiceFlows, flow: str, step: str, urls: CallbackUrls) -> bytes:
    """The TwiML document of one step (a ``<Response>``)."""
    _, actions = flows.step(flow, step)
    response = ET.Element("Response")
    for action in actions:
        if isinstance(action, Say | Play):
            _twiml_prompt(response, action)
        elif isinstance(action, Gather):
            spec = action.gather
            attrs = {
                "input": " ".join(kind.value for kind in spec.input),
                "action": urls(Callback.GATHER, flow, step),
                "method": "POST",
                "timeout": str(spec.timeout),
                # Always call the action, so "no input" routes to the default step
                # exactly as NCCO's input (which always calls its eventUrl).
                "actionOnEmptyResult": "true",
            }
            if InputKind.DTMF in spec.input:
                attrs["finishOnKey"] = "#" if spec.finish_on_hash else ""
                if spec.num_digits is not None:
                    attrs["numDigits"] = str(spec.num_digits)
            if InputKind.SPEECH in spec.input:
                attrs["speechTimeout"] = "auto"
                if spec.hints:
                    attrs["hints"] = ",".join(spec.hints)
            if spec.language:
                attrs["language"] = spec.language
            gather = ET.SubElement(response, "Gather", attrs)
            for prompt in spec.prompt:
                _twiml_prompt(gather, prompt, spec.language)
        elif isinstance(action, Record):
            spec_r = action.record
            attrs = {
                "action": urls(Callback.RECORD, flow, step),
                "method": "POST",
                "maxLength": str(spec_r.max_length),
                "timeout": str(spec_r.silence_timeout),
                "finishOnKey": spec_r.finish_on_key or "",
                "playBeep": "true" if spec_r.beep else "false",
                "recordingStatusCallback": urls(Callback.RECORDING, flow, step),
                "recordingStatusCallbackMethod": "POST",
            }
            if spec_r.transcribe:
                attrs["transcribe"] = "true"
                attrs["transcribeCallback"] = urls(Callback.TRANSCRIPTION, flow, step)
            ET.SubElement(response, "Record", attrs)
        elif isinstance(action, Forward):
            spec_f = action.forward
            dial_attrs = {"timeout": str(spec_f.timeout)}
            if spec_f.caller_id:
                dial_attrs["callerId"] = spec_f.caller_id
            dial = ET.SubElement(response, "Dial", dial_attrs)
            if spec_f.number:
                ET.SubElement(dial, "Number").text = spec_f.number
            else:
                ET.SubElement(dial, "Sip").text = spec_f.sip
        elif isinstance(action, Enqueue):
            enqueue_attrs = {}
            if action.enqueue.hold_music:
                enqueue_attrs = {
                    "waitUrl": urls(Callback.HOLD, flow, step),
                    "waitUrlMethod": "POST",
                }
            ET.SubElement(response, "Enqueue", enqueue_attrs).text = action.enqueue.queue
        elif isinstance(action, Goto):
            ET.SubElement(response, "Redirect", {"method": "POST"}).text = urls(
                Callback.STEP, flow, action.goto
            )
        else:
            ET.SubElement(response, "Hangup")
    return cast(bytes, ET.tostring(response, encoding="utf-8", xml_declaration=True))


def render_hold_twiml(flows: VoiceFlows, flow: str, step: str) -> bytes:
    """The waitUrl document of an enqueue step: its hold music, looped."""
    _, actions = flows.step(flow, step)
    last = actions[-1]
    if not isinstance(last, Enqueue) or not last.enqueue.hold_music:
        raise BadRequestError(f"step {flow!r}/{step!r} has no hold music")
    response = ET.Element("Response")
    ET.SubElement(response, "Play", {"loop": "0"}).text = last.enqueue.hold_music
    return cast(bytes, ET.tostring(response, encoding="utf-8", xml_declaration=True))


# -- TwiML for live-call commands ------------------------------------------------------
#
# A call command (place with say/play, transfer, enqueue, speak) hands Twilio a
# whole TwiML document for one call instead of a flow step: these render the
# same verbs as the flow steps above, one document each.


def _twiml_document(response: ET.Element) -> bytes:
    return cast(bytes, ET.tostring(response, encoding="utf-8", xml_declaration=True))


def render_speak_twiml(
    prompt: Prompt, *, voice: str | None = None, then_url: str | None = None
) -> bytes:
    """Say or play ``prompt``, then ``<Redirect>`` to ``then_url`` (a flow step
    URL, so the flow continues) or ``<Hangup/>`` when there is none."""
    response = ET.Element("Response")
    _twiml_prompt(response, prompt)
    if voice and isinstance(prompt, Say):
        response[-1].set("voice", voice)
    if then_url:
        ET.SubElement(response, "Redirect", {"method": "POST"}).text = then_url
    else:
        ET.SubElement(response, "Hangup")
    return _twiml_document(response)


def render_dial_twiml(forward: ForwardSpec) -> bytes:
    """``<Dial>`` the number or SIP URI of ``forward`` (a transfer of a live call)."""
    response = ET.Element("Response")
    attrs = {"timeout": str(forward.timeout)}
    if forward.caller_id:
        attrs["callerId"] = forward.caller_id
    dial = ET.SubElement(response, "Dial", attrs)
    if forward.number:
        ET.SubElement(dial, "Number").text = forward.number
    else:
        ET.SubElement(dial, "Sip").text = forward.sip
    return _twiml_document(response)


def render_enqueue_twiml(queue: EnqueueSpec, wait_url: str | None = None) -> bytes:
    """``<Enqueue>`` into ``queue``; ``wait_url`` (a hold route) plays the hold
    music, else Twilio plays its default."""
    attrs = {"waitUrl": wait_url, "waitUrlMethod": "POST"} if wait_url else {}
    response = ET.Element("Response")
    ET.SubElement(response, "Enqueue", attrs).text = queue.queue
    return _twiml_document(response)


def hold_step(flows: VoiceFlows, queue: str) -> tuple[str, str] | None:
    """The first flow step (flow, step) that enqueues into ``queue`` with hold
    music: its hold route serves that music to a call a command enqueues."""
    for flow_name, flow in flows.flows.items():
        for step_name, actions in flow.steps.items():
            last = actions[-1]
            if (
                isinstance(last, Enqueue)
                and last.enqueue.queue == queue
                and last.enqueue.hold_music
            ):
                return flow_name, step_name
    return None


# -- NCCO ------------------------------------------------------------------------------


def _ncco_prompt(action: Prompt, *, barge_in: bool, language: str | None = None) -> dict[str, Any]:
    if isinstance(action, Say):
        talk: dict[str, Any] = {
            "action": "talk",
            "text": action.say,
            "loop": action.loop,
            "bargeIn": barge_in,
        }
        lang = action.language or language
        if lang:
            talk["language"] = lang
        return talk
    return {
        "action": "stream",
        "streamUrl": [action.play],
        "loop": action.loop,
        "bargeIn": barge_in,
    }


def ncco_prompt(action: Prompt) -> dict[str, Any]:
    """The NCCO ``talk``/``stream`` of one say or play, as a flow step renders
    it (for call commands that speak on a live or placed call)."""
    return _ncco_prompt(action, barge_in=False)


def _ncco_number(e164: str) -> str:
    # NCCO phone endpoints take E.164 digits without the leading '+'.
    return e164.removeprefix("+")


def render_ncco(
    flows: VoiceFlows,
    flow: str,
    step: str,
    urls: CallbackUrls,
    *,
    from_number: str | None = None,
) -> list[dict[str, Any]]:
    """The NCCO (list of actions) of one step, with goto/record.then inlined.

    ``from_number`` (E.164, the called number of an inbound call) is the caller
    id of a forward without its own ``caller_id``: a connect to a phone needs a
    ``from`` (or ``randomFromNumber``), while TwiML's Dial defaults to the caller.
    """
    found, _ = flows.step(flow, step)
    ncco: list[dict[str, Any]] = []
    for name in _inline_chain(found, step):
        for action in found.steps[name]:
            if isinstance(action, Say | Play):
                ncco.append(_ncco_prompt(action, barge_in=False))
            elif isinstance(action, Gather):
                spec = action.gather
                for prompt in spec.prompt:
                    # The caller may answer while the menu is read (as in TwiML's Gather).
                    ncco.append(_ncco_prompt(prompt, barge_in=True, language=spec.language))
                item: dict[str, Any] = {
                    "action": "input",
                    "type": [kind.value for kind in spec.input],
                    "eventUrl": [urls(Callback.GATHER, flow, name)],
                    "eventMethod": "POST",
                }
                if InputKind.DTMF in spec.input:
                    dtmf: dict[str, Any] = {
                        "timeOut": spec.timeout,
                        "submitOnHash": spec.finish_on_hash,
                    }
                    if spec.num_digits is not None:
                        dtmf["maxDigits"] = spec.num_digits
                    item["dtmf"] = dtmf
                if InputKind.SPEECH in spec.input:
                    speech: dict[str, Any] = {"startTimeout": spec.timeout, "endOnSilence": 1}
                    if spec.language:
                        speech["language"] = spec.language
                    if spec.hints:
                        speech["context"] = list(spec.hints)
                    item["speech"] = speech
                ncco.append(item)
            elif isinstance(action, Record):
                spec_r = action.record
                record: dict[str, Any] = {
                    "action": "record",
                    "format": "mp3",
                    "endOnSilence": spec_r.silence_timeout,
                    "timeOut": spec_r.max_length,
                    "beepStart": spec_r.beep,
                    "eventUrl": [urls(Callback.RECORDING, flow, name)],
                    "eventMethod": "POST",
                }
                if spec_r.finish_on_key:
                    record["endOnKey"] = spec_r.finish_on_key
                if spec_r.transcribe:
                    record["transcription"] = {
                        "eventUrl": [urls(Callback.TRANSCRIPTION, flow, name)],
                        "eventMethod": "POST",
                    }
                ncco.append(record)
            elif isinstance(action, Forward):
                spec_f = action.forward
                endpoint: dict[str, Any] = (
                    {"type": "phone", "number": _ncco_number(spec_f.number)}
                    if spec_f.number
                    else {"type": "sip", "uri": spec_f.sip}
                )
                connect: dict[str, Any] = {
                    "action": "connect",
                    "endpoint": [endpoint],
                    "timeout": spec_f.timeout,
                }
                caller_id = spec_f.caller_id or from_number
                if caller_id:
                    connect["from"] = _ncco_number(caller_id)
                else:
                    connect["randomFromNumber"] = True
                ncco.append(connect)
            elif isinstance(action, Enqueue):
                conversation: dict[str, Any] = {
                    "action": "conversation",
                    "name": action.enqueue.queue,
                    # The caller waits (hears hold music) until an agent joins.
                    "startOnEnter": False,
                }
                if action.enqueue.hold_music:
                    conversation["musicOnHoldUrl"] = [action.enqueue.hold_music]
                ncco.append(conversation)
            # Goto: the next step of the chain follows inline. Hangup: the NCCO
            # ends here, and Vonage hangs up when it runs out of actions.
    return ncco


def ncco_json(ncco: list[dict[str, Any]]) -> bytes:
    """An NCCO as the JSON body of an answer webhook."""
    return json.dumps(ncco, separators=(",", ":")).encode()
