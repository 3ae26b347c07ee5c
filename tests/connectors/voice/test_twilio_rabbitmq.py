"""voice.twilio on the real RabbitMQ: answers and callbacks end up on channels.events."""

from __future__ import annotations

import pytest

from gateway.api.v1.call_pb2 import CallState
from tests.connectors.voice.conftest import Harness, call_params, call_sid
from tests.connectors.voice.schemas import check_twiml

pytestmark = pytest.mark.rabbitmq


async def test_call_events_are_confirmed_on_rabbitmq(rabbit_harness: Harness) -> None:
    harness = rabbit_harness
    sid = call_sid()
    status, _, body = await harness.call(harness.url("incoming"), call_params(sid))
    assert status == 200
    assert check_twiml(body.encode())[0].tag == "Say"
    status, _, _ = await harness.call(
        harness.url("status"), call_params(sid, "completed", CallDuration="7")
    )
    assert status == 204
    received = {}
    while len(received) < 2:
        event, key = await harness.next_event()
        if event.call.call_id == sid:  # other publishers may share the broker
            received[key] = event
    assert set(received) == {"call.ringing.voice.twilio", "call.completed.voice.twilio"}
    completed = received["call.completed.voice.twilio"]
    assert completed.call.state == CallState.CALL_STATE_COMPLETED
    assert completed.call.duration.seconds == 7
