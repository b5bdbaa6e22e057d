"""CONNECT tunnels through an egress proxy (RFC 9110 section 9.3.6).

The proxy's answer is parsed by llhttp like any response; only a 2xx opens the
tunnel, after which TLS to the origin starts inside it.  Proxy credentials go in
``Proxy-Authorization`` and never into a message: errors name the proxy by its
masked URL.
"""

from __future__ import annotations

import asyncio

import httptools

from .errors import ProxyFailed
from .wire import Origin, Proxy

_MAX_ANSWER = 16 * 1024


class Tunnel(asyncio.Protocol):
    """Sends CONNECT and waits for the proxy's answer; then hands the transport over."""

    def __init__(self, origin: Origin, proxy: Proxy) -> None:
        self._origin = origin
        self._proxy = proxy
        self._parser = httptools.HttpResponseParser(self)
        self._size = 0
        self.transport: asyncio.Transport | None = None
        self.established: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        target = _authority(self._origin).encode("ascii")
        transport.write(  # type: ignore[attr-defined]
            b"CONNECT %s HTTP/1.1\r\nHost: %s\r\n%s\r\n" % (target, target, self._proxy.authorization)
        )

    def data_received(self, data: bytes) -> None:
        if self.established.done():  # the origin may not speak before the TLS handshake
            self._abort()
            return
        self._size += len(data)
        if self._size > _MAX_ANSWER:
            self._refuse("its answer to CONNECT is too long")
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if not self.established.done():
                self._refuse(f"its answer to CONNECT is not valid HTTP ({exc})")

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 200 <= status < 300:
            self.established.set_result(None)
            raise _Open  # stop parsing: whatever follows belongs to the tunnel
        what = "requires credentials" if status == 407 else f"answered {status}"
        self._refuse(f"CONNECT to {_authority(self._origin)} failed: the proxy {what}")

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.established.done():
            self.established.set_exception(ProxyFailed(f"proxy {self._proxy.display} closed the connection"))
            self.established.exception()

    def _refuse(self, why: str) -> None:
        if not self.established.done():
            self.established.set_exception(ProxyFailed(f"proxy {self._proxy.display}: {why}"))
            self.established.exception()
        self._abort()

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class _Open(Exception):
    pass


def _authority(origin: Origin) -> str:
    host = f"[{origin.host}]" if ":" in origin.host else origin.host
    return f"{host}:{origin.port}"
