"""The durable spool through broker outages, on a PRIVATE RabbitMQ node.

Twilio does not retry a webhook answered 5xx, so with the spool enabled its
webhooks are answered 200 while the broker is down, and the spooled events
reach the queues once it is back: exactly the messages the spool accepted,
oldest first, after a service restart too. The node (gateway.testing.rabbitmq_node)
runs on its own ports and data directory; its RabbitMQ application is stopped
and started to cut every connection. Never the shared broker.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aio_pika
import aiohttp
import pytest
import yaml

from gateway.runtime.config import (
    HttpSettings,
    RuntimeSettings,
    SpoolSettings,
    SubscriptionSettings,
    load_config,
)
from gateway.runtime.service import Service
from gateway.testing.rabbitmq_node import RabbitMQNode, free_port
from tests.connectors.sms.twilio.support import sign
from tests.connectors.voice.conftest import TOKEN_ENV, call_params, call_sid, make_settings
from tests.runtime import service_helpers as h

pytestmark = pytest.mark.rabbitmq

SMS_QUEUE = "crm.sms-inbound"
CALL_QUEUE = "crm.calls"


@pytest.fixture(scope="module")
def node() -> Iterator[RabbitMQNode]:
    with RabbitMQNode.start(timeout=60) as private:
        yield private


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    # The client gives up after 5 s: a webhook that hangs fails the test.
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        yield session


def _with_spool(runtime: RuntimeSettings, state_dir: Path, queue: str, pattern: str) -> Any:
    return runtime.model_copy(
        update={
            "spool": SpoolSettings(
                enabled=True, state_dir=str(state_dir), initial_backoff=0.1, max_backoff=0.5
            ),
            "subscriptions": [SubscriptionSettings(queue=queue, bindings=[pattern])],
        }
    )


def _sms_service(node: RabbitMQNode, state_dir: Path) -> Service:
    runtime = h.settings(
        # Reconnect quickly, so recovery is visible within the test.
        node.url + "?reconnect_interval=0.5",
        publish_timeout=5.0,
        connect_timeout=2.0,
    )
    return h.service(_with_spool(runtime, state_dir, SMS_QUEUE, "message.received.#"))


async def _take_all(node: RabbitMQNode, queue: str) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """Every message waiting in ``queue`` (acknowledged)."""
    connection = await aio_pika.connect(node.url, timeout=5)
    try:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        taken = []
        while (message := await declared.get(fail=False)) is not None:
            await message.ack()
            taken.append(message)
        return taken
    finally:
        await connection.close()


def _spooled_rows(path: Path) -> list[tuple[Any, ...]]:
    """The spool file's rows, oldest first, read as another process would."""
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        return db.execute(
            "SELECT message_id, type, content_type, headers, timestamp, correlation_id, body, "
            "routing_key FROM spool ORDER BY seq"
        ).fetchall()


async def _until(predicate: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} within {timeout:g} s"
        await asyncio.sleep(0.1)


async def _ready(http: aiohttp.ClientSession, svc: Service) -> tuple[int, dict[str, Any]]:
    async with http.get(f"http://127.0.0.1:{svc.port}/readyz") as resp:
        return resp.status, await resp.json()


async def test_twilio_sms_in_an_outage_is_accepted_spooled_and_drained_exactly(
    node: RabbitMQNode, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    svc = _sms_service(node, tmp_path)
    await svc.start()
    try:
        assert svc.spool is not None
        before = h.inbound_form()
        assert (await h.post_signed(http, h.inbound_url(svc), before))[0] == 200
        assert svc.spool.stats.events == 0
        await _take_all(node, SMS_QUEUE)

        await asyncio.to_thread(node.stop_app)
        forms = [h.inbound_form(body=f"during outage {n}") for n in range(20)]
        try:
            answers = await asyncio.gather(
                *(h.post_signed(http, h.inbound_url(svc), form) for form in forms)
            )
            assert [status for status, _ in answers] == [200] * 20
            assert svc.spool.stats.events == 20
            # Twilio's own retry of one of them is a duplicate, not a second row.
            assert (await h.post_signed(http, h.inbound_url(svc), forms[0]))[0] == 200
            assert svc.spool.stats.events == 20
            status, body = await _ready(http, svc)
            assert status == 200, body  # still taking traffic safely
            assert body["status"] == "degraded"
            assert body["checks"] == {"broker": False, "spool": True}
            assert body["spool"]["depth"] == 20
            rows = _spooled_rows(svc.spool.path)
        finally:
            await asyncio.to_thread(node.start_app)

        await _until(lambda: svc.spool is not None and svc.spool.stats.events == 0, "drained")
        delivered = await _take_all(node, SMS_QUEUE)
        # Oldest first, each exactly the message the spool accepted.
        assert [m.message_id for m in delivered] == [row[0] for row in rows]
        for message, row in zip(delivered, rows, strict=True):
            _, type_, content_type, headers, timestamp, correlation_id, body_, key = row
            assert message.body == body_
            assert message.type == type_
            assert message.content_type == content_type
            assert message.routing_key == key == "message.received.sms.twilio"
            assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
            sent = {k: v for k, v in message.headers.items() if not k.startswith("x-")}
            assert sent == json.loads(headers)
            assert "traceparent" in sent
            assert message.correlation_id == correlation_id
            assert (message.timestamp is None) == (timestamp is None)
        sids = [h.consumed_event(m).message.provider_message_id for m in delivered]
        assert sorted(sids) == sorted(f["MessageSid"] for f in forms)
        assert (await _ready(http, svc))[0] == 200
        # After the outage, publishing is direct again.
        after = h.inbound_form()
        assert (await h.post_signed(http, h.inbound_url(svc), after))[0] == 200
        assert svc.spool.stats.events == 0
        (direct,) = await _take_all(node, SMS_QUEUE)
        assert h.consumed_event(direct).message.provider_message_id == after["MessageSid"]
    finally:
        async with asyncio.timeout(20):
            await svc.stop()


async def test_a_restarted_service_drains_what_the_last_one_spooled(
    node: RabbitMQNode, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    first = _sms_service(node, tmp_path)
    await first.start()
    await _take_all(node, SMS_QUEUE)
    forms = [h.inbound_form() for _ in range(5)]
    await asyncio.to_thread(node.stop_app)
    try:
        for form in forms:
            assert (await h.post_signed(http, h.inbound_url(first), form))[0] == 200
        # Shutdown during the outage is prompt and keeps the spool.
        async with asyncio.timeout(15):
            await first.stop()
    finally:
        await asyncio.to_thread(node.start_app)
    assert len(_spooled_rows(tmp_path / "sms.sqlite")) == 5

    second = _sms_service(node, tmp_path)
    await second.start()
    try:
        await _until(lambda: second.spool is not None and second.spool.stats.events == 0, "drained")
        delivered = await _take_all(node, SMS_QUEUE)
        assert [h.consumed_event(m).message.provider_message_id for m in delivered] == [
            f["MessageSid"] for f in forms
        ]
        assert _spooled_rows(tmp_path / "sms.sqlite") == []
    finally:
        async with asyncio.timeout(20):
            await second.stop()


async def test_twilio_voice_callbacks_in_an_outage_are_not_lost(
    node: RabbitMQNode, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    token = secrets.token_hex(16)
    runtime = make_settings(node.url + "?reconnect_interval=0.5")
    settings = _with_spool(runtime, tmp_path, CALL_QUEUE, "call.#")
    svc = Service(settings, ["voice.twilio"], environ={TOKEN_ENV: token})
    await svc.start()

    async def post(route: str, params: dict[str, str]) -> tuple[int, str]:
        url = f"{svc.base_url}/webhooks/voice/twilio/main/{route}"
        pairs = list(params.items())
        async with http.post(
            url,
            data=urlencode(pairs),
            headers={
                "Content-Type": "application/x-www-form-urlencoded",
                "X-Twilio-Signature": sign(token, url, pairs),
            },
        ) as resp:
            return resp.status, await resp.text()

    try:
        assert svc.spool is not None
        assert svc.spool.path == tmp_path / "voice.sqlite"
        await _take_all(node, CALL_QUEUE)
        sid = call_sid()
        await asyncio.to_thread(node.stop_app)
        try:
            # The answer webhook is answered with the flow (the caller hears it) ...
            status, twiml = await post("incoming", call_params(sid))
            assert status == 200
            assert "<Gather" in twiml
            # Its event goes to the spool in the background (the call did not wait).
            await _until(
                lambda: svc.spool is not None and svc.spool.stats.events == 1, "spooled", 10
            )
            # ... and the status callbacks Twilio would not retry are accepted.
            for state in ("in-progress", "completed"):
                extra = {"CallDuration": "42"} if state == "completed" else {}
                status, _ = await post("status", call_params(sid, state, **extra))
                assert status == 204
            await _until(
                lambda: svc.spool is not None and svc.spool.stats.events == 3, "spooled", 10
            )
        finally:
            await asyncio.to_thread(node.start_app)
        await _until(lambda: svc.spool is not None and svc.spool.stats.events == 0, "drained")
        events = [h.consumed_event(m) for m in await _take_all(node, CALL_QUEUE)]
        assert {e.call.call_id for e in events} == {sid}
        assert [e.type for e in events] == ["call.ringing", "call.answered", "call.completed"]
        assert events[-1].call.duration.seconds == 42
    finally:
        async with asyncio.timeout(20):
            await svc.stop()


def _start_cli_service(config: Path) -> subprocess.Popen[str]:
    """`channel-gateway run sms` as its own process (so it can be killed -9)."""
    return subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "--config", str(config), "run", "sms"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **h.ENVIRON},
        cwd=Path(__file__).resolve().parents[2],
    )


def _kill_9(proc: subprocess.Popen[str]) -> tuple[int, str]:
    proc.send_signal(signal.SIGKILL)
    _, stderr = proc.communicate(timeout=30)
    return proc.returncode, stderr


async def test_a_service_killed_9_during_an_outage_loses_no_accepted_webhook(
    node: RabbitMQNode, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    port = free_port()
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "http": {"host": "127.0.0.1", "port": port},
                "broker": {"url": node.url + "?reconnect_interval=0.5"},
                "spool": {"enabled": True, "state_dir": str(tmp_path / "spool")},
                "subscriptions": [{"queue": SMS_QUEUE, "bindings": ["message.received.#"]}],
                "connectors": {
                    "sms.twilio": h.settings().connectors["sms.twilio"],
                },
            }
        )
    )
    await _take_all(node, SMS_QUEUE)
    proc = await asyncio.to_thread(_start_cli_service, config)
    url = f"http://127.0.0.1:{port}/webhooks/sms/twilio/main/inbound"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, "the service exited"
            assert time.monotonic() < deadline, "the service did not become ready"
            try:
                async with http.get(f"http://127.0.0.1:{port}/readyz") as resp:
                    if resp.status == 200:
                        break
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.2)
        await asyncio.to_thread(node.stop_app)
        try:
            forms = [h.inbound_form() for _ in range(10)]
            for form in forms:
                assert (await h.post_signed(http, url, form))[0] == 200
            # No graceful anything: the process dies with the events on its disk only.
            status, stderr = await asyncio.to_thread(_kill_9, proc)
            assert status == -signal.SIGKILL, stderr
        finally:
            await asyncio.to_thread(node.start_app)
    finally:
        if proc.poll() is None:
            await asyncio.to_thread(_kill_9, proc)
    assert len(_spooled_rows(tmp_path / "spool" / "sms.sqlite")) == 10

    restarted = Service(
        load_config(config).model_copy(update={"http": HttpSettings(host="127.0.0.1", port=0)}),
        ["sms.twilio"],
        environ=h.ENVIRON,
    )
    await restarted.start()
    try:
        await _until(
            lambda: restarted.spool is not None and restarted.spool.stats.events == 0, "drained"
        )
        delivered = await _take_all(node, SMS_QUEUE)
        assert [h.consumed_event(m).message.provider_message_id for m in delivered] == [
            f["MessageSid"] for f in forms
        ]
    finally:
        async with asyncio.timeout(20):
            await restarted.stop()
