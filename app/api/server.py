"""Serving the app with uvicorn, hardened at the edge: a deadline for request headers, a bound on open connections
that keeps the server answering, proxy headers trusted only from configured addresses, and a graceful stop with a
deadline. (Body read timeouts are the middleware's: they need the ASGI side.)"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.api.app import create_app
from app.settings import Settings

log = logging.getLogger("synthgen.server")


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's HTTP/1.1 protocol plus two guards it lacks: a connection must send its request headers within
    `header_timeout_s` (uvicorn waits forever for half a request), and beyond `max_connections` a connection with
    no request in progress is closed, so idle or slow sockets cannot lock everyone out. The victim is the oldest
    one that never sent a whole request head (a flood of idle or half-open sockets looks like that), else the
    keep-alive one quiet the longest: a client already served keeps its connection through a flood of new ones."""

    header_timeout_s = 10.0
    max_connections = 1000

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None
        self._opened = self._last_active = time.monotonic()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()
        if len(self.connections) > self.max_connections:
            self._make_room()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._last_active = time.monotonic()
        if self._awaiting_request():
            self._arm_header_timer()  # a new request starts: its headers get the same deadline
        super().data_received(data)

    def on_headers_complete(self) -> None:
        self._disarm_header_timer()
        super().on_headers_complete()

    def _awaiting_request(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.transport.close()

    def _make_room(self) -> None:
        idle = [c for c in self.connections
                if c is not self and isinstance(c, GuardedProtocol) and c._awaiting_request()]
        never_served = [c for c in idle if c.cycle is None]
        if never_served:
            victim = min(never_served, key=lambda c: c._opened)
        else:
            victim = min(idle, key=lambda c: c._last_active) if idle else self
        if victim is self:
            log.warning("%d connections are open and all busy; refusing a new one", len(self.connections))
        victim.transport.close()


def _raise_file_limit() -> None:
    """Open-file soft limit up to the hard limit: each connection is a file descriptor."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def serve(settings: Settings, host: str, port: int) -> None:
    """Run the app until SIGINT/SIGTERM."""
    _raise_file_limit()
    protocol = type("Protocol", (GuardedProtocol,), {"header_timeout_s": settings.header_timeout_s,
                                                     "max_connections": settings.max_connections})
    uvicorn.run(create_app(settings), host=host, port=port, log_level=settings.log_level, http=protocol,
                log_config=None, access_log=False,  # app.api.logs: JSON lines, one per request
                timeout_keep_alive=5, timeout_graceful_shutdown=settings.shutdown_timeout_s,  # type: ignore[arg-type]
                proxy_headers=bool(settings.forwarded_allow_ips),
                forwarded_allow_ips=",".join(settings.forwarded_allow_ips) or None)
