"""One upstream socket: writes a request, feeds the response parser, and is aborted
(never closed gracefully) on any failure, so that an unsent body and the socket are
released at once whatever the upstream does."""

from __future__ import annotations

import asyncio
from typing import Protocol

from .response import Response
from .wire import Origin


class Pool(Protocol):
    """What a connection needs from the pool that owns it."""

    def put(self, conn: Connection) -> None: ...

    def forget(self, conn: Connection) -> None: ...


class Connection(asyncio.Protocol):
    __slots__ = ("pool", "origin", "transport", "response", "closed")

    def __init__(self, pool: Pool, origin: Origin) -> None:
        self.pool = pool
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.response: Response | None = None
        self.closed = False

    # -- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's are not asyncio.Transport

    def data_received(self, data: bytes) -> None:
        response = self.response
        if response is None:  # bytes on an idle connection: it cannot be trusted any more
            self.abort()
            return
        response.feed(data)

    def eof_received(self) -> bool:
        return False  # close the transport; connection_lost says the rest

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        if self.response is not None:
            self.response.lost(exc)

    # -- used by the client and its response ---------------------------------------------

    def send(self, head: bytes, body: bytes, response: Response) -> None:
        self.response = response
        transport = self.transport
        assert transport is not None
        if len(body) < 16384:
            transport.write(head + body)
        else:  # no copy of a large body just to prepend the head
            transport.writelines((head, body))

    @property
    def usable(self) -> bool:
        transport = self.transport
        return not self.closed and transport is not None and not transport.is_closing()

    def pause(self) -> None:
        if self.usable:
            assert self.transport is not None
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.usable:
            assert self.transport is not None
            self.transport.resume_reading()

    def release(self, response: Response) -> None:
        """Pooled only after a complete request write and a complete keep-alive response."""
        transport = self.transport
        if (
            response is self.response
            and response.reusable
            and self.usable
            and transport is not None
            and transport.get_write_buffer_size() == 0
        ):
            self.response = None
            self.pool.put(self)
        else:
            self.abort()

    def abort(self) -> None:
        """Drop the connection now: no FIN after a flush of whatever is still unsent."""
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        """Close an idle connection politely (nothing is pending on it)."""
        self.closed = True
        if self.transport is not None:
            self.transport.close()
