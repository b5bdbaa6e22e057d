"""Keep-alive connections per :class:`~.wire.Origin`, and opening new ones: directly,
through a CONNECT tunnel, or to a plain-HTTP forward proxy.

Idle connections are swept by one timer for the whole pool (they close between 1
and 4/3 keep-alive times after their last use); the most recently used is handed
out first, as the least likely to have gone stale.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from typing import TypeVar

from .connection import Connection
from .errors import ConnectFailed, ConnectTimeout, ProxyFailed
from .proxy import Tunnel
from .wire import Origin

KEEPALIVE_TIMEOUT = 30.0
P = TypeVar("P", bound=asyncio.Protocol)
NEVER = float("inf")


class Pool:
    def __init__(
        self, keepalive_timeout: float = KEEPALIVE_TIMEOUT, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        self._keepalive = keepalive_timeout
        # Idle connections per origin, oldest first, with the time each went idle.
        self._idle: dict[Origin, dict[Connection, float]] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        self._all: set[Connection] = set()
        self._verified = ssl_context  # None: the system's trust store, made on first use
        self._unverified: ssl.SSLContext | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.closed = False

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop

    # -- handing out and taking back ----------------------------------------------------

    def take(self, origin: Origin, now: float) -> Connection | None:
        idle = self._idle.get(origin)
        if not idle:
            return None
        oldest_ok = now - self._keepalive
        while idle:
            conn, since = idle.popitem()
            if since < oldest_ok:
                conn.close()
            elif conn.usable:
                return conn
        return None

    def put(self, conn: Connection) -> None:
        if self.closed:
            conn.close()
            return
        loop = self.loop
        self._idle.setdefault(conn.origin, {})[conn] = loop.time()
        if self._sweeper is None:
            self._sweeper = loop.call_later(self._keepalive / 3, self._sweep)

    def forget(self, conn: Connection) -> None:
        self._all.discard(conn)
        idle = self._idle.get(conn.origin)
        if idle:
            idle.pop(conn, None)

    def _sweep(self) -> None:
        self._sweeper = None
        loop = self.loop
        oldest_ok = loop.time() - self._keepalive
        for origin, idle in list(self._idle.items()):
            for conn, since in list(idle.items()):  # oldest first
                if since >= oldest_ok:
                    break
                del idle[conn]
                conn.close()
            if not idle:
                del self._idle[origin]
        if self._idle:
            self._sweeper = loop.call_later(self._keepalive / 3, self._sweep)

    def counts(self) -> tuple[int, int]:
        """(open connections, idle ones): open minus idle are in use."""
        return len(self._all), sum(len(idle) for idle in self._idle.values())

    def close(self) -> None:
        """Abort every connection, idle or busy."""
        self.closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for conn in list(self._all):
            conn.abort()
            self.forget(conn)
        self._idle.clear()

    # -- opening ---------------------------------------------------------------------------

    async def connect(self, origin: Origin, timeout: float) -> Connection:
        """A new connection to ``origin`` (TLS and tunnel included) within ``timeout`` seconds."""
        proxy = origin.proxy
        host, port = (proxy.host, proxy.port) if proxy is not None else (origin.host, origin.port)
        try:
            async with asyncio.timeout(timeout if timeout < NEVER else None):
                conn = await self._open(origin)
        except TimeoutError:
            via = f" via proxy {proxy.display}" if proxy is not None else ""
            raise ConnectTimeout(
                f"connection to {origin.host}:{origin.port}{via} timed out after {timeout:g} s"
            ) from None
        except ConnectFailed:
            raise
        except (OSError, ValueError) as exc:  # ValueError: e.g. an IDNA error for an impossible name
            reason = (
                exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
            )
            what = f"proxy {proxy.display}" if proxy is not None else f"{host}:{port}"
            raise ConnectFailed(f"cannot connect to {what} ({reason})") from exc
        if self.closed:
            conn.abort()
            raise RuntimeError("the upstream client is closed")
        self._all.add(conn)
        return conn

    async def _open(self, origin: Origin) -> Connection:
        proxy = origin.proxy
        if proxy is None:
            context = self.ssl_context(origin.verify) if origin.tls else None
            _, conn = await self._dial(lambda: Connection(self, origin), origin.host, origin.port, context)
            return conn
        proxy_tls = self.ssl_context(True) if proxy.scheme == "https" else None
        if not origin.tunnel:  # a plain-HTTP origin: requests go to the proxy in absolute form
            _, conn = await self._dial(lambda: Connection(self, origin), proxy.host, proxy.port, proxy_tls)
            return conn
        transport, tunnel = await self._dial(lambda: Tunnel(origin, proxy), proxy.host, proxy.port, proxy_tls)
        loop = self.loop
        try:
            await tunnel.established
            conn = Connection(self, origin)
            try:
                tls = await loop.start_tls(
                    transport, conn, self.ssl_context(origin.verify), server_hostname=origin.host
                )
            except (ssl.SSLError, ConnectionError) as exc:
                raise ProxyFailed(
                    f"TLS to {origin.host}:{origin.port} through proxy {proxy.display} failed: {exc}"
                ) from exc
            if tls is None:
                raise ProxyFailed(f"proxy {proxy.display} closed the tunnel during the TLS handshake")
        except BaseException:
            transport.abort()
            raise
        conn.connection_made(tls)
        return conn

    async def _dial(
        self, factory: Callable[[], P], host: str, port: int, tls: ssl.SSLContext | None
    ) -> tuple[asyncio.Transport, P]:
        """A TCP connection (TLS when ``tls`` is given, checked against ``host``)."""
        transport, protocol = await self.loop.create_connection(
            factory, host, port, ssl=tls, server_hostname=host if tls is not None else None
        )
        return transport, protocol

    def ssl_context(self, verify: bool) -> ssl.SSLContext:
        if verify:
            if self._verified is None:
                self._verified = ssl.create_default_context()
            return self._verified
        if self._unverified is None:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            self._unverified = context
        return self._unverified
