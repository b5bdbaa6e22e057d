"""The gateway's own HTTP/1.1 client for upstream requests, on raw asyncio.

Why not ``aiohttp.ClientSession``: on the bench its per-request machinery
(request objects, tracing hooks, cookie handling, a Python ``StreamReader``
callback per HTTP chunk) cost about as much CPU as everything else the gateway
does, twice the time a relay needs.  This client does only what a relay needs:
keep-alive connections pooled per (scheme, host, port), one request head
written with the body, a response head parsed once, and body bytes handed over
as they arrive (:mod:`ccx_proxy.exchange` has the response side,
:mod:`ccx_proxy.h1` the wire format).

Same contract as before: no headers of its own beyond ``Host`` and
``Content-Length``; bytes exactly as sent, compression included; a connect
timeout, and a read timeout (no data for that long) that covers the wait for
the response head and, once changed by the relay, the gaps in the body; a
connection that was not read to the end is closed, never reused.
"""

from __future__ import annotations

import asyncio
import ssl

from yarl import URL

from .exchange import NEVER, Connection, Disconnected, Key, NothingReceived, ReadTimeout, UpstreamResponse
from .h1 import UpstreamClientError, request_head

__all__ = [
    "KEEPALIVE_TIMEOUT",
    "ConnectFailed",
    "ConnectTimeout",
    "Disconnected",
    "ReadTimeout",
    "UpstreamClient",
    "UpstreamResponse",
]

KEEPALIVE_TIMEOUT = 30.0  # idle pooled connections are closed 30-40 s after their last use


class ConnectFailed(UpstreamClientError):
    def __init__(self, host: str, port: int, os_error: OSError) -> None:
        reason = os_error.strerror or type(os_error).__name__
        super().__init__(f"cannot connect to {host}:{port} ({reason})")
        self.host, self.port, self.os_error = host, port, os_error


class ConnectTimeout(UpstreamClientError, TimeoutError):
    pass


class UpstreamClient:
    """Keep-alive connections per (scheme, host, port); no global cap, as before."""

    def __init__(
        self, keepalive_timeout: float = KEEPALIVE_TIMEOUT, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        self._keepalive = keepalive_timeout
        # Idle connections per key, oldest first, with the time each went idle.
        self._idle: dict[Key, dict[Connection, float]] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        self._all: set[Connection] = set()
        self._ssl = ssl_context  # None: the system's trust store, made on first use
        self.closed = False

    async def request(
        self,
        url: URL,
        body: bytes,
        header_block: bytes,
        *,
        connect_timeout: float,
        read_timeout: float,
        deadline: float = NEVER,
    ) -> UpstreamResponse:
        """POST ``body`` to ``url`` with the given header lines (CRLF-terminated, no Host or
        Content-Length); returns once the response head is in.

        Timeouts are seconds (0: none); ``deadline`` (loop time) bounds the whole wait for
        the response head, connecting included, and raises a TimeoutError subclass."""
        if self.closed:
            raise RuntimeError("the upstream client is closed")
        head = request_head(url, header_block, len(body))
        scheme, host = url.scheme, url.raw_host or ""
        key = (scheme, host, url.port or (443 if scheme == "https" else 80))
        loop = asyncio.get_running_loop()
        conn = self._acquire(key)
        if conn is not None:
            try:
                return await self._exchange(conn, head, body, loop, read_timeout, deadline)
            except NothingReceived:
                pass  # the pooled connection had gone stale: once more, on a fresh one
        left = max(0.0, deadline - loop.time())
        conn = await self._connect(key, min(connect_timeout if connect_timeout > 0 else NEVER, left))
        return await self._exchange(conn, head, body, loop, read_timeout, deadline)

    async def _exchange(
        self,
        conn: Connection,
        head: bytes,
        body: bytes,
        loop: asyncio.AbstractEventLoop,
        read_timeout: float,
        deadline: float,
    ) -> UpstreamResponse:
        exchange = UpstreamResponse(conn, loop, read_timeout, deadline)
        conn.exchange = exchange
        try:
            assert conn.transport is not None
            if len(body) < 16384:
                conn.transport.write(head + body)
            else:  # no copy of a large body just to prepend the head
                conn.transport.write(head)
                conn.transport.write(body)
            await exchange._head_waiter
        except BaseException:
            exchange.close()
            raise
        return exchange

    def _acquire(self, key: Key) -> Connection | None:
        idle = self._idle.get(key)
        if not idle:
            return None
        oldest_ok = asyncio.get_running_loop().time() - self._keepalive
        while idle:
            conn, since = idle.popitem()  # the most recently used: the least likely to be stale
            if since < oldest_ok:
                conn.close()
            elif not conn.closed and conn.transport is not None and not conn.transport.is_closing():
                return conn
        return None

    async def _connect(self, key: Key, timeout: float) -> Connection:
        scheme, host, port = key
        loop = asyncio.get_running_loop()
        context = self._ssl_context() if scheme == "https" else None
        try:
            async with asyncio.timeout(timeout if timeout < NEVER else None):
                _, conn = await loop.create_connection(
                    lambda: Connection(self, key),
                    host,
                    port,
                    ssl=context,
                    server_hostname=host if context is not None else None,
                )
        except TimeoutError:
            raise ConnectTimeout(f"connection to {host}:{port} timed out after {timeout:g} s") from None
        except OSError as exc:
            raise ConnectFailed(host, port, exc) from exc
        except ValueError as exc:  # e.g. an IDNA error for an impossible host name
            raise ConnectFailed(host, port, OSError(0, str(exc))) from exc
        if self.closed:
            conn.close()
            raise RuntimeError("the upstream client is closed")
        self._all.add(conn)
        return conn

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        return self._ssl

    def put(self, conn: Connection) -> None:
        if self.closed:
            conn.close()
            return
        loop = asyncio.get_running_loop()
        self._idle.setdefault(conn.key, {})[conn] = loop.time()
        if self._sweeper is None:
            self._sweeper = loop.call_later(self._keepalive / 3, self._sweep)

    def _sweep(self) -> None:
        """Close connections idle longer than the keep-alive time (one timer for the pool,
        not one per request: they go between 1 and 4/3 keep-alive times after last use)."""
        self._sweeper = None
        loop = asyncio.get_running_loop()
        oldest_ok = loop.time() - self._keepalive
        for key, idle in list(self._idle.items()):
            for conn, since in list(idle.items()):  # oldest first
                if since >= oldest_ok:
                    break
                del idle[conn]
                conn.close()
            if not idle:
                del self._idle[key]
        if self._idle:
            self._sweeper = loop.call_later(self._keepalive / 3, self._sweep)

    def counts(self) -> tuple[int, int]:
        """(open connections, idle ones in the pool): open minus idle are in use."""
        return len(self._all), sum(len(idle) for idle in self._idle.values())

    def forget(self, conn: Connection) -> None:
        self._all.discard(conn)
        idle = self._idle.get(conn.key)
        if idle:
            idle.pop(conn, None)

    def close(self) -> None:
        """Close every connection, idle or busy."""
        self.closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for conn in list(self._all):
            conn.close()
            self.forget(conn)
        self._idle.clear()
