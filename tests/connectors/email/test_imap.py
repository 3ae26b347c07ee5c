"""IMAP polling against a real, private Dovecot (started by the test)."""

from __future__ import annotations

import asyncio
import imaplib
import json
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as redis

from connectors.email.imap.connector import ImapEmailConnector
from gateway.runtime.idempotency import RedisIdempotencyStore
from gateway.testing import fake_email_dovecot as dovecot
from gateway.testing.conformance import FlakyBus
from tests.connectors.email import corpus
from tests.connectors.email.support import Collected, email_service


@pytest.fixture
def imap_server() -> Iterator[dovecot.DovecotServer]:
    with dovecot.running() as server:
        yield server


@pytest.fixture
async def stores(redis_url: str, unique: str) -> AsyncIterator[Callable[[], RedisIdempotencyStore]]:
    """Dedup stores on the real Redis, one per service run, sharing one key space."""
    prefix = f"cg:test-imap:{unique}:"
    yield lambda: RedisIdempotencyStore(redis_url, prefix=prefix)
    client = redis.Redis.from_url(redis_url)
    try:
        keys = [key async for key in client.scan_iter(match=prefix + "*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


def numbered(n: int) -> bytes:
    return (
        f"From: customer{n}@example.org\r\nTo: support@shop.example\r\n"
        f"Subject: Question {n}\r\nMessage-ID: <imap-{n}@example.org>\r\n\r\nBody {n}\r\n"
    ).encode()


def section(server: dovecot.DovecotServer, state: Path, **extra: Any) -> dict[str, Any]:
    return {
        "state_dir": str(state),
        "poll_interval": 0.1,
        "min_backoff": 0.1,
        "max_backoff": 0.5,
        "timeout": 5,
        "mailboxes": {
            "support": {
                "host": server.host,
                "port": server.port,
                "security": "none",
                "username": server.username,
                "password": {"env": "IMAP_PASS"},
                "address": "support@shop.example",
                **extra,
            }
        },
    }


ENV = {"IMAP_PASS": "imap-pass-1"}


def seen_flags(server: dovecot.DovecotServer, folder: str = "INBOX") -> dict[int, bool]:
    with imaplib.IMAP4(server.host, server.port, timeout=10) as client:
        client.login(server.username, server.password)
        client.select(folder, readonly=True)
        _, data = client.uid("fetch", "1:*", "(FLAGS)")
    flags: dict[int, bool] = {}
    for item in data:
        if isinstance(item, bytes) and b"UID" in item:
            text = item.decode()
            uid = int(text.split("UID ")[1].split()[0].rstrip(")"))
            flags[uid] = "\\Seen" in text
    return flags


def subjects(collected: Collected) -> list[str]:
    return sorted(e.message.email.subject for e in collected.events)


async def test_new_mail_is_published_then_flagged_seen(
    imap_server: dovecot.DovecotServer, tmp_path: Path
) -> None:
    imap_server.deliver(corpus.plain_utf8())
    imap_server.deliver(corpus.iso_2022_jp())
    imap_server.deliver(corpus.bomb_many_parts())
    state = tmp_path / "state"
    async with email_service("email.imap", section(imap_server, state), environ=ENV) as (
        service,
        seen,
    ):
        await seen.wait(lambda: len(seen.events) >= 2 and len(seen.quarantined) >= 1)
        imap_server.deliver(numbered(1))  # arrives while the poller runs
        await seen.wait(lambda: len(seen.events) >= 3)
        connector = service.hosted[0].connector
        assert isinstance(connector, ImapEmailConnector)
    assert subjects(seen) == ["Question 1", "Re: Bestellung überfällig", "注文の件"]
    assert all(e.account == "support" and e.provider == "imap" for e in seen.events)
    assert seen.events[0].attributes["email.rcpt_to"] == "support@shop.example"
    assert seen.quarantined[0].attributes["email.quarantine_reason"] == "too_many_parts"
    assert seen_flags(imap_server) == {1: True, 2: True, 3: True, 4: True}
    saved = json.loads((state / "support.json").read_text())
    assert saved["last_uid"] == 4
    assert saved["uidvalidity"] > 0


async def test_restart_and_connection_cuts_publish_every_mail_once(
    imap_server: dovecot.DovecotServer,
    tmp_path: Path,
    stores: Callable[[], RedisIdempotencyStore],
) -> None:
    for n in range(1, 7):
        imap_server.deliver(numbered(n))
    state = tmp_path / "state"
    runs: list[Collected] = []
    settings = section(imap_server, state)
    settings["batch_size"] = 2
    async with email_service("email.imap", settings, environ=ENV, store=stores()) as (_, first):
        runs.append(first)
        await first.wait(lambda: len(first.events) >= 2, settle=0.0)
    # The connector stopped mid-stream; more mail arrives; the server restarts
    # under the next run (every open connection is cut).
    for n in range(7, 10):
        imap_server.deliver(numbered(n))
    server = imap_server
    async with email_service("email.imap", settings, environ=ENV, store=stores()) as (_, second):
        runs.append(second)
        await second.wait(lambda: len(second.events) >= 1, settle=0.0)
        server = await asyncio.to_thread(imap_server.restart)
        try:
            total = len(first.events)
            await second.wait(lambda: total + len(second.events) >= 9, timeout=15)
        finally:
            dovecot.stop(server)
    all_ids = [e.message.email.message_id for run in runs for e in run.events]
    assert sorted(all_ids) == sorted(f"<imap-{n}@example.org>" for n in range(1, 10))
    assert len(set(all_ids)) == len(all_ids)  # every mail exactly once


async def test_unconfirmed_publish_leaves_the_mail_unseen_until_it_is_published(
    imap_server: dovecot.DovecotServer, tmp_path: Path
) -> None:
    imap_server.deliver(numbered(1))
    bus = FlakyBus(failures=2)
    async with email_service(
        "email.imap", section(imap_server, tmp_path / "state"), environ=ENV, bus=bus
    ) as (_, seen):
        await seen.wait(lambda: len(seen.events) >= 1)
    assert bus.failures == 0
    assert len(seen.events) == 1
    assert seen_flags(imap_server) == {1: True}


async def test_uidvalidity_change_rereads_the_window_without_duplicates(
    imap_server: dovecot.DovecotServer,
    tmp_path: Path,
    stores: Callable[[], RedisIdempotencyStore],
) -> None:
    for n in range(1, 4):
        imap_server.deliver(numbered(n))
    state = tmp_path / "state"
    settings = section(imap_server, state, after_publish="none")
    async with email_service("email.imap", settings, environ=ENV, store=stores()) as (_, first):
        await first.wait(lambda: len(first.events) >= 3)
    saved = json.loads((state / "support.json").read_text())
    (state / "support.json").write_text(
        json.dumps({"uidvalidity": saved["uidvalidity"] + 1, "last_uid": 99})
    )
    async with email_service("email.imap", settings, environ=ENV, store=stores()) as (_, second):
        await asyncio.sleep(1.0)
    assert second.events == []  # re-read, deduped on the events' ids
    assert json.loads((state / "support.json").read_text()) == saved
    assert seen_flags(imap_server) == {1: False, 2: False, 3: False}


async def test_move_after_publish(imap_server: dovecot.DovecotServer, tmp_path: Path) -> None:
    with imaplib.IMAP4(imap_server.host, imap_server.port) as client:
        client.login(imap_server.username, imap_server.password)
        client.create("Done")
    imap_server.deliver(numbered(1))
    settings = section(imap_server, tmp_path / "state", after_publish="move", move_to="Done")
    async with email_service("email.imap", settings, environ=ENV) as (_, seen):
        await seen.wait(lambda: len(seen.events) >= 1)
    assert seen_flags(imap_server) == {}
    assert list(seen_flags(imap_server, "Done").keys()) == [1]


async def test_wrong_password_backs_off_and_publishes_nothing(
    imap_server: dovecot.DovecotServer, tmp_path: Path
) -> None:
    imap_server.deliver(numbered(1))
    async with email_service(
        "email.imap", section(imap_server, tmp_path / "state"), environ={"IMAP_PASS": "wrong-pw"}
    ) as (_, seen):
        await asyncio.sleep(1.0)
    assert seen.events == []
    assert seen_flags(imap_server) == {1: False}
