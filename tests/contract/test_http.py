"""Provider HTTP outcomes become error types, over real HTTP to a local server."""

from __future__ import annotations

import asyncio
import email.utils
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from gateway.contract.errors import AmbiguousSendError, PermanentError, TransientError
from gateway.contract.http import ProviderRejectedError, parse_retry_after, request
from gateway.testing.rabbitmq_node import free_port


async def _answer(req: web.Request) -> web.StreamResponse:
    kind = req.match_info["kind"]
    if kind == "ok":
        return web.json_response({"sid": "SM1", "echo": (await req.post()).get("To")}, status=201)
    if kind == "slow":
        await asyncio.sleep(5)
        return web.json_response({})
    if kind == "garbage":
        return web.Response(status=200, text="<html>proxy says hi</html>")
    if kind == "rate":
        return web.json_response({"code": 20429}, status=429, headers={"Retry-After": "7"})
    if kind == "rate-date":
        when = email.utils.formatdate(time.time() + 30, usegmt=True)
        return web.json_response({}, status=429, headers={"Retry-After": when})
    if kind == "unavailable":
        return web.Response(status=503, text="maintenance", headers={"Retry-After": "2"})
    if kind == "error":
        return web.Response(status=500, text="oops")
    if kind == "reject":
        return web.json_response({"code": 21211, "message": "invalid To"}, status=400)
    if kind == "forbidden":
        return web.Response(status=403, text="no")
    raise web.HTTPNotFound()


@pytest.fixture
async def server() -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_route("*", "/{kind}", _answer)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = next(a[1] for a in runner.addresses if isinstance(a, tuple))
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.5)) as s:
        yield s


async def test_2xx_returns_the_answer(server: str, session: aiohttp.ClientSession) -> None:
    answer = await request(session, "POST", f"{server}/ok", provider="p", data={"To": "+1"})
    assert answer.status == 201
    assert answer.json() == {"sid": "SM1", "echo": "+1"}
    assert answer.headers["Content-Type"].startswith("application/json")


async def test_connection_refused_is_transient(session: aiohttp.ClientSession) -> None:
    with pytest.raises(TransientError) as info:
        await request(session, "POST", f"http://127.0.0.1:{free_port()}/x", provider="p")
    assert info.value.code == "connect_failed"
    assert not isinstance(info.value, AmbiguousSendError)


async def test_timeout_after_send_is_ambiguous(server: str, session: aiohttp.ClientSession) -> None:
    with pytest.raises(AmbiguousSendError) as info:
        await request(session, "POST", f"{server}/slow", provider="p")
    assert info.value.code == "ambiguous_send"
    assert "request sent but no complete answer" in str(info.value)


async def test_disconnect_after_send_is_ambiguous() -> None:
    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")  # the request arrived ...
        writer.close()  # ... and the server hangs up without an answer

    srv = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as s:
            with pytest.raises(AmbiguousSendError):
                await request(s, "POST", f"http://127.0.0.1:{port}/x", provider="p", data="a=b")
    finally:
        srv.close()
        await srv.wait_closed()


@pytest.mark.parametrize(
    ("kind", "code", "retry_after"),
    [
        ("rate", "rate_limited", 7.0),
        ("unavailable", "http_503", 2.0),
        ("error", "http_500", None),
    ],
)
async def test_429_and_5xx_are_transient_with_retry_after(
    server: str, session: aiohttp.ClientSession, kind: str, code: str, retry_after: float | None
) -> None:
    with pytest.raises(TransientError) as info:
        await request(session, "POST", f"{server}/{kind}", provider="p")
    assert info.value.code == code
    assert info.value.retry_after == retry_after


async def test_retry_after_as_http_date(server: str, session: aiohttp.ClientSession) -> None:
    with pytest.raises(TransientError) as info:
        await request(session, "POST", f"{server}/rate-date", provider="p")
    assert info.value.retry_after is not None
    assert 25 <= info.value.retry_after <= 31


@pytest.mark.parametrize(("kind", "status"), [("reject", 400), ("forbidden", 403), ("nope", 404)])
async def test_other_4xx_are_permanent(
    server: str, session: aiohttp.ClientSession, kind: str, status: int
) -> None:
    with pytest.raises(ProviderRejectedError) as info:
        await request(session, "POST", f"{server}/{kind}", provider="acme")
    assert isinstance(info.value, PermanentError)
    assert info.value.status == status
    assert info.value.code == f"http_{status}"
    assert f"acme: rejected ({status})" in str(info.value)


async def test_garbage_json_in_2xx_is_ambiguous(
    server: str, session: aiohttp.ClientSession
) -> None:
    answer = await request(session, "GET", f"{server}/garbage", provider="p")
    with pytest.raises(AmbiguousSendError, match="non-JSON"):
        answer.json()


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, None), ("", None), ("0", 0.0), (" 120 ", 120.0), ("soon", None), ("-5", None)],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value) == expected


def test_parse_retry_after_past_date_is_zero() -> None:
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0
