"""What every fake provider API shares: a loopback HTTP server with scripted answers.

A fake subclasses :class:`FakeProviderServer`, registers its routes in
:meth:`~FakeProviderServer.add_routes` and answers each provider call with
:meth:`~FakeProviderServer.next_answer`: the next scripted answer (429, 5xx,
4xx, a hang) or, when nothing is scripted, a success with
:attr:`~FakeProviderServer.default_status`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Coroutine
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, ClassVar, Self

import aiohttp
from aiohttp import web


@dataclass(frozen=True, kw_only=True)
class ScriptedAnswer:
    """One scripted answer to the next provider call."""

    status: int
    body: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    #: Sleep this long before answering (longer than the client timeout = a hang).
    delay: float = 0.0


class FakeProviderServer:
    """A fake provider API on 127.0.0.1 (random port); an async context manager."""

    #: The status of an unscripted (successful) answer.
    default_status: ClassVar[int] = 200
    #: Largest request body the fake accepts.
    client_max_size: ClassVar[int] = 1024**2

    def __init__(self) -> None:
        self.url = ""
        self._script: deque[ScriptedAnswer] = deque()
        self._runner: web.AppRunner | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None

    def add_routes(self, router: web.UrlDispatcher) -> None:
        """Register the provider endpoints this fake serves."""
        raise NotImplementedError

    def answer_next(self, answer: ScriptedAnswer) -> None:
        """Queue a scripted answer for the next provider call."""
        self._script.append(answer)

    def next_answer(self) -> ScriptedAnswer:
        """The next scripted answer, or a success when nothing is scripted."""
        return (
            self._script.popleft() if self._script else ScriptedAnswer(status=self.default_status)
        )

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` in the background (e.g. a callback); cancelled on stop."""
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def session(self) -> aiohttp.ClientSession:
        """An HTTP client for calls the fake makes (status callbacks), closed on stop."""
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self._session

    async def start(self) -> None:
        """Listen on 127.0.0.1 with a random port."""
        app = web.Application(client_max_size=self.client_max_size)
        self.add_routes(app.router)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = next(a[1] for a in self._runner.addresses if isinstance(a, tuple))
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        """Stop background work in flight, then the server."""
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
