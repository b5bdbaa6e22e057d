"""The client side of the gateway's HTTP server: limits and errors a hostile client meets.

aiohttp's server does the parsing; this module adds what a production proxy (nginx,
Envoy) enforces and aiohttp does not, in one request-handler subclass:

* a **head timeout**: a request head must be complete within ``CLIENT_HEADER_TIMEOUT_MS``
  of its first byte (and a new connection must send one within that time) -- a head
  trickled a byte a second, or a silent connection, is closed;
* the **keep-alive** idle limit (``CLIENT_KEEPALIVE_TIMEOUT_MS``, aiohttp's own timer);
* no **lingering**: after a response, a request body that is still arriving is not read
  and discarded for seconds -- the connection is closed;
* no request-body **decompression** (the relay refuses a ``Content-Encoding`` with 415);
* aiohttp's own **protocol errors** (malformed request line or header, a header over the
  size limit, an HTTP/2 preface) answered with Anthropic-shaped JSON and one short log
  line that quotes nothing the client sent (a malformed header line may hold a key).

The body idle and write stall timeouts live where the body is read and the stream is
written (:mod:`ccx_proxy.relay`, :mod:`ccx_proxy.stream`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, BadHttpMethod, BadStatusLine, LineTooLong
from aiohttp.web_protocol import RequestHandler

from .errors import GatewayError, HeaderTooLarge, InvalidRequest, render
from .settings import Settings

log = logging.getLogger("ccx_proxy.server")


class QuietLog:
    """At most ``burst`` lines per ``window`` seconds for one kind of client misbehaviour,
    then one summary line for the rest: an attack must not flood the log."""

    __slots__ = ("_burst", "_window", "_start", "_count", "_dropped")

    def __init__(self, burst: int = 20, window: float = 10.0) -> None:
        self._burst, self._window = burst, window
        self._start, self._count, self._dropped = 0.0, 0, 0

    def info(self, now: float, message: str, *args: object) -> None:
        if now - self._start >= self._window:
            if self._dropped:
                log.info(
                    "... and %d more such lines in the last %g s (not shown)", self._dropped, self._window
                )
            self._start, self._count, self._dropped = now, 0, 0
        self._count += 1
        if self._count <= self._burst:
            log.info(message, *args)
        else:
            self._dropped += 1


# One budget per kind of misbehaviour: a flood of one kind hides none of the others.
SLOW_HEADS, BAD_REQUESTS, HTTP2, STALLED_CLIENTS = QuietLog(), QuietLog(), QuietLog(), QuietLog()

_H2_PREFACE = "PRI"  # llhttp stops at "PRI * HTTP/2.0": "Pause on PRI/Upgrade"


def server_kwargs(settings: Settings) -> dict[str, Any]:
    """aiohttp server arguments for the gateway's app (cli and tests use the same)."""
    return {
        "handler_cancellation": True,
        "keepalive_timeout": settings.client_keepalive_timeout,
        "lingering_time": 0,  # never read and discard a body nobody wants
        "auto_decompress": False,  # never inflate a request body (a 4 MB gzip can be 4 GB)
    }


class GatewayHandler(RequestHandler):
    """One client connection (see the module docstring)."""

    __slots__ = ("_head_since",)

    def __init__(self, manager: web.Server, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        # When the head now awaited began (loop time; 0: none awaited).  No timer per
        # request: the server sweeps its connections a few times per head timeout.
        self._head_since = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._head_since = self._loop.time()  # a new connection must start a request in time
        manager = self._manager
        if isinstance(manager, _GatewayServer):
            manager.watch()

    def data_received(self, data: bytes) -> None:
        if not self._head_since and self._current_request is None and not self._messages:
            self._head_since = self._loop.time()  # the first bytes of a new request head
        count = self._request_count
        super().data_received(data)
        if self._request_count != count:
            self._head_since = 0.0  # a whole head arrived

    def head_late(self, since_before: float, timeout: float) -> None:
        """Close the connection if the head it awaits began before ``since_before``."""
        since = self._head_since
        if since and since < since_before and self._current_request is None and not self._messages:
            if self.transport is not None:
                SLOW_HEADS.info(
                    self._loop.time(),
                    "closing a connection from %s: no complete request head within %g s",
                    _peer(self.transport),
                    timeout,
                )
                self.force_close()

    def handle_error(
        self,
        request: Any,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """aiohttp's own errors, Anthropic-shaped; the log line names the kind of error only."""
        if request.writer.output_size > 0:
            # A response under way broke off (a client that left or stalled: the relay
            # logged it): no bad request to log, and nothing more can be sent.
            raise ConnectionError("response already started")
        peer = _peer(self.transport)
        if isinstance(exc, BadHttpMessage) and _H2_PREFACE in str(exc)[:60]:
            HTTP2.info(
                self._loop.time(), "closing a connection from %s: HTTP/2 is not served (use HTTP/1.1)", peer
            )
            self.force_close()  # no HTTP/1.1 answer to an HTTP/2 client: just the close
            return web.Response(status=505)  # never written: the transport is gone
        error: GatewayError
        if isinstance(exc, LineTooLong):
            error = HeaderTooLarge(
                "request line or header too large (limit 8190 bytes each); check the client's headers"
            )
        elif status >= 500:
            error = GatewayError("internal gateway error; see the gateway's log")
        else:
            kind = "request line" if isinstance(exc, (BadStatusLine, BadHttpMethod)) else "request"
            error = InvalidRequest(f"malformed HTTP {kind}: the gateway speaks HTTP/1.1")
        BAD_REQUESTS.info(
            self._loop.time(),
            "bad request from %s: %s (%s)",
            peer,
            type(exc).__name__ if exc else status,
            error.status,
        )
        response = render(error)
        response.force_close()
        return response


def _peer(transport: asyncio.BaseTransport | None) -> str:
    if transport is None:
        return "?"
    peer = transport.get_extra_info("peername")
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else "?"


class _GatewayServer(web.Server):
    """Makes :class:`GatewayHandler` connections instead of aiohttp's own, and enforces their
    head timeout with one sweep for all of them (4 looks per timeout, at most one a second)."""

    head_timeout: float = 10.0
    _sweeper: asyncio.TimerHandle | None = None

    def __call__(self) -> RequestHandler:
        return GatewayHandler(self, loop=self._loop, **self._kwargs)

    def watch(self) -> None:
        if self._sweeper is None and self.head_timeout > 0:
            self._sweeper = self._loop.call_later(min(1.0, self.head_timeout / 4), self._sweep)

    def _sweep(self) -> None:
        self._sweeper = None
        since_before = self._loop.time() - self.head_timeout
        for handler in list(self._connections):
            if isinstance(handler, GatewayHandler):
                handler.head_late(since_before, self.head_timeout)
        if self._connections:
            self.watch()


RequestHandlerFunc = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


def requests_in_progress(server: web.Server) -> int:
    """Requests whose handler runs or whose response is still being written (not idle
    keep-alive connections): what a drain waits for."""
    return sum(1 for handler in server.connections if handler._request_in_progress)


def divert_requests(server: web.Server, wrap: Callable[[RequestHandlerFunc], RequestHandlerFunc]) -> None:
    """From now on, every request that starts -- on a new connection or on one already open,
    pipelined ones included -- goes to ``wrap(app handler)``; requests under way keep theirs.

    The drain's 503s (:mod:`ccx_proxy.ops.drain`) cost nothing before a drain: no middleware
    looks at every request for a flag."""
    handler = wrap(server.request_handler)
    server.request_handler = handler  # connections made from now on
    for connection in server.connections:
        if connection._request_handler is not None:  # None: the connection is already lost
            connection._request_handler = handler


def install(server: web.Server, settings: Settings) -> None:
    """Give an aiohttp server (an AppRunner's, after ``setup()``) the gateway's handler."""
    server.__class__ = _GatewayServer
    assert isinstance(server, _GatewayServer)
    server.head_timeout = settings.client_header_timeout
