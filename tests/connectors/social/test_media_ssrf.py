"""SSRF-safe media fetch: every internal-address vector is refused before connecting.

A canary listener on 127.0.0.1 counts connections; after every vector it has
seen none. A "public" server on 127.0.0.2 (exempted with ``allowed_networks``,
as a test stands in for the internet) serves redirects, huge and slow bodies.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web

from connectors.social.media import (
    MediaTooLargeError,
    SafeFetcher,
    UnsafeUrlError,
    refusal,
)
from connectors.social.whatsapp import WhatsAppConnector, WhatsAppSettings
from gateway.contract import PermanentError, TransientError
from gateway.testing.fake_meta import FakeMeta
from tests.connectors.social.support import Context

PUBLIC_IP = "127.0.0.2"


@dataclass
class Canary:
    """A TCP listener that records every connection it gets."""

    port: int = 0
    connections: list[object] = field(default_factory=list)


@pytest.fixture
async def canary() -> AsyncIterator[Canary]:
    record = Canary()

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        record.connections.append(writer.get_extra_info("peername"))
        writer.close()

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    record.port = int(server.sockets[0].getsockname()[1])
    async with server:
        yield record


@pytest.fixture
async def public(canary: Canary) -> AsyncIterator[str]:
    """A stand-in public media host."""

    async def image(_: web.Request) -> web.Response:
        return web.Response(body=b"\x89PNG" + b"x" * 100, content_type="image/png")

    async def to_canary(_: web.Request) -> web.Response:
        raise web.HTTPFound(f"http://127.0.0.1:{canary.port}/secret")

    async def to_metadata(_: web.Request) -> web.Response:
        raise web.HTTPFound("http://169.254.169.254/latest/meta-data/")

    async def to_internal_name(_: web.Request) -> web.Response:
        raise web.HTTPFound(f"http://internal.example:{canary.port}/")

    async def huge(_: web.Request) -> web.StreamResponse:
        return web.Response(body=b"x" * 5000)

    async def huge_chunked(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        for _ in range(100):
            await resp.write(b"x" * 1000)
        await resp.write_eof()
        return resp

    async def slow(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        await resp.write(b"x")
        await asyncio.sleep(5)
        return resp

    app = web.Application()
    for path, handler in (
        ("/image.png", image),
        ("/to-canary", to_canary),
        ("/to-metadata", to_metadata),
        ("/to-internal-name", to_internal_name),
        ("/huge", huge),
        ("/huge-chunked", huge_chunked),
        ("/slow", slow),
    ):
        app.router.add_get(path, handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, PUBLIC_IP, 0)
    await site.start()
    port = next(a[1] for a in runner.addresses if isinstance(a, tuple))
    yield f"http://{PUBLIC_IP}:{port}"
    await runner.cleanup()


def fetcher(canary: Canary, **kw: object) -> SafeFetcher:
    names = {
        "internal.example": ["10.0.0.5"],
        "loopback.example": ["127.0.0.1"],
        "mixed.example": ["93.184.216.34", "127.0.0.1"],
        "mapped.example": ["::ffff:127.0.0.1"],
        "media.example": [PUBLIC_IP],
    }

    async def resolve(host: str, port: int) -> Sequence[str]:
        if host not in names:
            raise OSError(f"NXDOMAIN {host}")
        return names[host]

    options: dict[str, object] = {
        "allow_http": True,
        "allowed_networks": [f"{PUBLIC_IP}/32"],
        "resolve": resolve,
        "max_bytes": 2000,
        "timeout": 1.0,
    }
    options.update(kw)
    return SafeFetcher(**options)  # type: ignore[arg-type]


def vectors(port: int) -> list[str]:
    return [
        f"http://127.0.0.1:{port}/",
        f"http://localhost:{port}/",
        f"http://loopback.example:{port}/",
        f"http://mixed.example:{port}/",
        f"http://mapped.example:{port}/",
        f"http://internal.example:{port}/",
        f"http://2130706433:{port}/",  # decimal
        f"http://0177.0.0.1:{port}/",  # octal
        f"http://0x7f.0.0.1:{port}/",  # hex
        f"http://127.1:{port}/",  # short form
        f"http://017700000001:{port}/",  # octal integer
        f"http://[::1]:{port}/",
        f"http://[::ffff:127.0.0.1]:{port}/",  # IPv4-mapped
        f"http://[::ffff:7f00:1]:{port}/",
        f"http://[64:ff9b::7f00:1]:{port}/",  # NAT64 of 127.0.0.1
        f"http://[64:ff9b:1::a00:1]:{port}/",  # local-use NAT64
        f"http://[2002:7f00:1::]:{port}/",  # 6to4 of 127.0.0.1
        f"http://[fe80::1]:{port}/",
        f"http://0.0.0.0:{port}/",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::ffff:169.254.169.254]/",
        "http://100.64.0.1/",
        "http://10.0.0.1/",
        "http://192.168.1.1/",
        "http://172.16.0.1/",
        f"http://user:pass@media.example:{port}/",
        "file:///etc/passwd",
        f"gopher://127.0.0.1:{port}/",
        f"http://no-such-host.example:{port}/",
    ]


async def test_every_internal_vector_is_refused_without_a_connection(canary: Canary) -> None:
    fetch = fetcher(canary)
    for url in vectors(canary.port):
        with pytest.raises(UnsafeUrlError):
            await fetch.fetch(url)
    assert canary.connections == []


async def test_https_only_by_default(canary: Canary) -> None:
    with pytest.raises(UnsafeUrlError, match="scheme"):
        await SafeFetcher().fetch("http://example.com/a.jpg")
    assert canary.connections == []


async def test_redirects_to_internal_addresses_are_refused(canary: Canary, public: str) -> None:
    fetch = fetcher(canary)
    for path in ("/to-canary", "/to-metadata", "/to-internal-name"):
        with pytest.raises(UnsafeUrlError):
            await fetch.fetch(public + path)
    assert canary.connections == []


async def test_public_media_is_fetched(canary: Canary, public: str) -> None:
    media = await fetcher(canary).fetch(public + "/image.png")
    assert media.content.startswith(b"\x89PNG")
    assert media.content_type == "image/png"
    assert len(media.sha256) == 64
    port = public.rsplit(":", 1)[1]
    by_name = await fetcher(canary).fetch(f"http://media.example:{port}/image.png")
    assert by_name.content == media.content
    assert canary.connections == []


async def test_size_and_time_caps(canary: Canary, public: str) -> None:
    fetch = fetcher(canary)
    with pytest.raises(MediaTooLargeError):
        await fetch.fetch(public + "/huge")
    with pytest.raises(MediaTooLargeError):
        await fetch.fetch(public + "/huge-chunked")
    with pytest.raises(TransientError, match="longer than"):
        await fetch.fetch(public + "/slow")


@pytest.mark.parametrize(
    ("address", "refused"),
    [
        ("8.8.8.8", False),
        ("2606:4700:4700::1111", False),
        ("64:ff9b::808:808", False),  # NAT64 of a public address
        ("127.0.0.1", True),
        ("100.127.255.255", True),
        ("169.254.169.254", True),
        ("::ffff:10.0.0.1", True),
        ("2002:a00:1::", True),  # 6to4 of 10.0.0.1
        ("2001:0:4136:e378::1", True),  # Teredo
        ("224.0.0.1", True),
        ("fd00::1", True),
        ("198.18.0.1", True),
    ],
)
def test_address_policy(address: str, refused: bool) -> None:
    assert (refusal(ipaddress.ip_address(address)) is not None) is refused


async def test_whatsapp_media_id_is_resolved_and_fetched_safely(
    canary: Canary, public: str
) -> None:
    token = "EAAG-media-token"
    async with FakeMeta(tokens=(token,)) as graph:
        graph.add_media("1001", url=public + "/image.png", mime_type="image/png")
        graph.add_media(
            "1002", url="http://169.254.169.254/latest/meta-data/", mime_type="image/png"
        )
        graph.add_media("1003", url=f"http://127.0.0.1:{canary.port}/x", mime_type="image/png")
        graph.add_media("1004", url=public + "/to-canary", mime_type="image/png")
        settings = WhatsAppSettings.model_validate(
            {
                "app_secret": {"env": "S"},
                "verify_token": {"env": "V"},
                "graph_base_url": graph.url,
                "accounts": {"main": {"phone_number_id": "1065403", "access_token": {"env": "T"}}},
                "media": {
                    "allow_http": True,
                    "allowed_networks": [f"{PUBLIC_IP}/32"],
                    "max_bytes": 4096,
                },
            },
            context={"environ": {"S": "s3cret-app", "V": "v", "T": token}},
        )
        async with aiohttp.ClientSession() as http:
            connector = WhatsAppConnector(Context(http=http), settings)
            await connector.start()
            media = await connector.fetch_media("main", "1001")
            assert media.content.startswith(b"\x89PNG")
            for media_id in ("1002", "1003", "1004"):
                with pytest.raises(UnsafeUrlError):
                    await connector.fetch_media("main", media_id)
            with pytest.raises(PermanentError):
                await connector.fetch_media("main", "9999")  # unknown id: Meta's 400
            with pytest.raises(PermanentError):
                await connector.fetch_media("main", "../me")
        assert [c.path for c in graph.media_lookups] == [
            f"/v21.0/{n}" for n in ("1001", "1002", "1003", "1004", "9999")
        ]
        assert {c.token for c in graph.media_lookups} == {token}
    assert canary.connections == []
