"""Fetching provider media without becoming an SSRF proxy.

A media URL comes from a provider payload or API, i.e. from outside. Before any
connection is made:

- only ``https`` (and ``http`` when explicitly allowed) URLs without userinfo;
- IP literals must be canonical: decimal (``2130706433``), octal (``0177.0.0.1``),
  hex (``0x7f.1``) and short (``127.1``) forms are refused rather than decoded;
- every address is checked: loopback, private, link-local (the
  169.254.169.254 metadata service), CGNAT 100.64/10, multicast, reserved,
  unspecified, and IPv6 forms that embed an IPv4 address (``::ffff:a.b.c.d``
  mapped, NAT64 ``64:ff9b::/96`` and ``64:ff9b:1::/48``, 6to4 ``2002::/16``,
  Teredo ``2001::/32``) are refused; Python calls NAT64 and 6to4 "global",
  so they are decoded and the embedded IPv4 address is checked;
- host names are resolved by our resolver, which refuses the name if ANY of
  its addresses is refused, and the connection goes to an address it checked
  (no second lookup a DNS rebinding could change);
- redirects are followed by hand, each hop checked the same way;
- the body is capped in size (Content-Length and while reading) and the whole
  fetch in time.

aiohttp skips custom resolvers for IP literals (aiohttp #10224): literals are
therefore checked here before the request, and names by the resolver.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from gateway.contract import PermanentError, TransientError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_MAX_BYTES = 100 * 1024 * 1024
DEFAULT_TIMEOUT = 30.0
MAX_REDIRECTS = 5

#: Refused whatever Python's ``is_global`` says.
_BLOCKED_NETWORKS: tuple[IPNetwork, ...] = tuple(
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8",
        "100.64.0.0/10",  # CGNAT
        "169.254.0.0/16",  # link-local, cloud metadata
        "192.0.0.0/24",
        "198.18.0.0/15",
        "64:ff9b:1::/48",  # local-use NAT64
        "2001::/32",  # Teredo
        "fc00::/7",
        "fe80::/10",
    )
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_SIXTOFOUR = ipaddress.ip_network("2002::/16")

Resolve = Callable[[str, int], Awaitable[Sequence[str]]]


class UnsafeUrlError(PermanentError):
    """The URL points (or redirects) somewhere we must not connect to."""

    code = "unsafe_url"


class MediaTooLargeError(PermanentError):
    """The body is larger than the configured cap."""

    code = "media_too_large"


@dataclass(frozen=True, slots=True)
class FetchedMedia:
    """A fetched media body."""

    url: str
    content: bytes
    content_type: str
    sha256: str

    @property
    def size(self) -> int:
        """Size in bytes."""
        return len(self.content)


def refusal(address: IPAddress, allowed: Iterable[IPNetwork] = ()) -> str | None:
    """Why ``address`` must not be connected to (None: it may)."""
    for network in allowed:
        if address.version == network.version and address in network:
            return None
    if isinstance(address, ipaddress.IPv6Address):
        embedded: IPAddress | None = address.ipv4_mapped
        if embedded is None and address in _NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is None and address in _SIXTOFOUR:
            embedded = address.sixtofour
        if embedded is not None:
            inner = refusal(embedded, allowed)
            return f"embeds {embedded} which {inner}" if inner else None
    for network in _BLOCKED_NETWORKS:
        if address.version == network.version and address in network:
            return f"is in blocked network {network}"
    if address.is_loopback:
        return "is loopback"
    if address.is_link_local:
        return "is link-local"
    if address.is_multicast:
        return "is multicast"
    if address.is_unspecified:
        return "is unspecified"
    if address.is_private or not address.is_global:
        return "is not a public address"
    return None


def _literal(host: str) -> IPAddress | None:
    """The IP of an IP-literal host; refuses legacy IPv4 spellings."""
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        pass
    try:
        socket.inet_aton(host)
    except OSError:
        return None
    # inet_aton took it but it is not a dotted quad: 2130706433, 0177.0.0.1, 127.1 ...
    raise UnsafeUrlError(f"non-canonical IP literal {host!r}")


async def _system_resolve(host: str, port: int) -> Sequence[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )
    return [str(info[4][0]) for info in infos]


class _CheckedResolver(AbstractResolver):
    """Resolves a name and returns its addresses only if every one is allowed."""

    def __init__(self, resolve: Resolve, allowed: Sequence[IPNetwork]) -> None:
        self._resolve = resolve
        self._allowed = allowed

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        try:
            addresses = await self._resolve(host, port)
        except OSError as exc:
            raise UnsafeUrlError(f"cannot resolve {host!r}: {exc}") from exc
        if not addresses:
            raise UnsafeUrlError(f"{host!r} resolves to nothing")
        results: list[ResolveResult] = []
        for text in addresses:
            address = ipaddress.ip_address(text.split("%", 1)[0])
            why = refusal(address, self._allowed)
            if why:
                raise UnsafeUrlError(f"{host!r} resolves to {address}, which {why}")
            results.append(
                ResolveResult(
                    hostname=host,
                    host=str(address),
                    port=port,
                    family=socket.AF_INET6 if address.version == 6 else socket.AF_INET,
                    proto=0,
                    flags=socket.AI_NUMERICHOST,
                )
            )
        return results

    async def close(self) -> None:
        return None


class SafeFetcher:
    """Fetches URLs from outside with SSRF checks and size/time caps."""

    def __init__(
        self,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        timeout: float = DEFAULT_TIMEOUT,
        allow_http: bool = False,
        allowed_networks: Sequence[str] = (),
        resolve: Resolve | None = None,
    ) -> None:
        """``allowed_networks`` exempts networks from the checks (tests, an internal
        media proxy): use it knowingly. ``resolve`` replaces the system resolver."""
        self.max_bytes = max_bytes
        self.timeout = timeout
        self.schemes = ("https", "http") if allow_http else ("https",)
        self._allowed = tuple(ipaddress.ip_network(n) for n in allowed_networks)
        self._resolve = resolve or _system_resolve

    def check_url(self, url: URL) -> None:
        """Refuse a URL by its form and literal address (names are checked on connect)."""
        if url.scheme not in self.schemes:
            raise UnsafeUrlError(f"scheme {url.scheme!r} not allowed ({', '.join(self.schemes)})")
        if url.user is not None or url.password is not None:
            raise UnsafeUrlError("URLs with userinfo are refused")
        host = url.raw_host
        if not host:
            raise UnsafeUrlError("URL without a host")
        address = _literal(host)
        if address is not None:
            why = refusal(address, self._allowed)
            if why:
                raise UnsafeUrlError(f"{address} {why}")

    async def fetch(self, url: str, *, headers: Mapping[str, str] | None = None) -> FetchedMedia:
        """GET ``url`` (following checked redirects) and return its body."""
        try:
            return await asyncio.wait_for(self._fetch(URL(url), headers or {}), self.timeout)
        except TimeoutError as exc:
            raise TransientError(f"media fetch took longer than {self.timeout}s") from exc

    async def _fetch(self, url: URL, headers: Mapping[str, str]) -> FetchedMedia:
        connector = aiohttp.TCPConnector(
            resolver=_CheckedResolver(self._resolve, self._allowed), use_dns_cache=False
        )
        async with aiohttp.ClientSession(connector=connector) as session:
            for _ in range(MAX_REDIRECTS + 1):
                self.check_url(url)
                try:
                    async with session.get(
                        url, headers=headers, allow_redirects=False, auto_decompress=False
                    ) as resp:
                        if resp.status in (301, 302, 303, 307, 308):
                            location = resp.headers.get("Location")
                            if not location:
                                raise PermanentError(f"redirect {resp.status} without Location")
                            next_url = url.join(URL(location))
                            if next_url.host != url.host:
                                # Credentials are for the host they were given for.
                                headers = {
                                    k: v for k, v in headers.items() if k.lower() != "authorization"
                                }
                            url = next_url
                            continue
                        if resp.status >= 400:
                            error = (
                                TransientError
                                if resp.status >= 500 or resp.status == 429
                                else PermanentError
                            )
                            raise error(f"media fetch answered {resp.status}")
                        return await self._read(url, resp)
                except aiohttp.ClientConnectorError as exc:
                    if isinstance(exc.__cause__, UnsafeUrlError):
                        raise exc.__cause__ from None
                    raise TransientError(f"cannot connect for media: {exc}") from exc
                except aiohttp.ClientError as exc:
                    raise TransientError(f"media fetch failed: {exc!r}") from exc
            raise UnsafeUrlError(f"more than {MAX_REDIRECTS} redirects")

    async def _read(self, url: URL, resp: aiohttp.ClientResponse) -> FetchedMedia:
        declared = resp.content_length
        if declared is not None and declared > self.max_bytes:
            raise MediaTooLargeError(f"media is {declared} bytes, more than {self.max_bytes}")
        chunks, total = [], 0
        async for chunk in resp.content.iter_chunked(65536):
            total += len(chunk)
            if total > self.max_bytes:
                raise MediaTooLargeError(f"media is larger than {self.max_bytes} bytes")
            chunks.append(chunk)
        content = b"".join(chunks)
        return FetchedMedia(
            url=str(url),
            content=content,
            content_type=resp.headers.get("Content-Type", "application/octet-stream"),
            sha256=hashlib.sha256(content).hexdigest(),
        )
