"""One upstream socket: writes a request, feeds the response parser, and is aborted
(never closed gracefully) on any failure, so that an unsent body and the socket are
released at once whatever the upstream does."""

from __future__ import annotations

import asyncio
import socket
import struct
import sys
from typing import Protocol

from .errors import Disconnected
from .response import Response
from .wire import Origin

# SO_LINGER on, 0 s: close() sends a RST and drops unsent bytes, instead of the kernel
# holding them (and the socket) for as long as an upstream that stopped reading wants.
_RESET = struct.pack("ii", 1, 0)
_RCVBUF = 32 * 1024

if sys.platform == "linux":
    import fcntl
    import termios

    _OUTQ: int | None = termios.TIOCOUTQ  # SIOCOUTQ on a socket: bytes the peer has not acknowledged
else:  # pragma: no cover
    _OUTQ = None


def _all_sent(transport: asyncio.Transport, big: bool) -> bool:
    """Whether every byte written has reached the upstream.  The transport's own buffer
    is not enough: behind TLS it leaves out the socket transport's buffer, and either
    way the kernel may still hold the tail of a body the upstream stopped reading."""
    if transport.get_write_buffer_size():
        return False
    if not big:
        return True
    sock = transport.get_extra_info("socket")
    if _OUTQ is None or sock is None:
        return True
    try:
        (queued,) = struct.unpack("i", fcntl.ioctl(sock.fileno(), _OUTQ, b"\0\0\0\0"))
    except (OSError, ValueError):
        return False
    return int(queued) == 0


# A request smaller than this fits the upstream's receive window at once: once a complete
# response is in, every byte of it was acknowledged (the upstream's segments carry the ACK).
# Only larger ones pay for the kernel check in _all_sent (a system call).
_SURELY_ACKED = 64 * 1024


class Pool(Protocol):
    """What a connection needs from the pool that owns it."""

    def put(self, conn: Connection) -> None: ...

    def forget(self, conn: Connection) -> None: ...


class Connection(asyncio.Protocol):
    __slots__ = ("pool", "origin", "transport", "response", "closed", "_big")

    def __init__(self, pool: Pool, origin: Origin) -> None:
        self.pool = pool
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.response: Response | None = None
        self.closed = False
        self._big = False  # the last request body may not all have reached the upstream yet

    # -- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's are not asyncio.Transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:  # smaller reads: what a paused stream holds is bounded by them too
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RCVBUF)
            except (OSError, ValueError):
                pass

    def data_received(self, data: bytes) -> None:
        response = self.response
        if response is None:  # bytes on an idle connection: it cannot be trusted any more
            self.abort()
            return
        response.feed(data)

    def eof_received(self) -> bool:
        return False  # close the transport; connection_lost says the rest

    def connection_lost(self, exc: Exception | None) -> None:
        ours = self.closed  # aborted (or closed) by the gateway, not ended by the upstream
        self.closed = True
        self.pool.forget(self)
        response = self.response
        if response is not None:
            if exc is None and ours:  # never the clean end of a body delimited by the close
                exc = Disconnected("the connection was closed by the gateway")
            response.lost(exc)
        # Nothing to keep: the response (and its buffered body) and the transport are freed by
        # reference counting now, not by a later full garbage collection.
        self.response = None
        self.transport = None

    # -- used by the client and its response ---------------------------------------------

    def send(self, head: bytes, body: bytes, response: Response) -> None:
        self.response = response
        transport = self.transport
        assert transport is not None
        self._big = len(body) >= _SURELY_ACKED
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
            and _all_sent(transport, self._big)
        ):
            self.response = None
            self.pool.put(self)
        else:
            self.abort()

    def abort(self) -> None:
        """Drop the connection now: a RST, no FIN after a flush of whatever is still unsent."""
        self.closed = True
        transport = self.transport
        if transport is not None:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
                except (OSError, ValueError):  # already closed (uvloop: ValueError)
                    pass
            transport.abort()

    def close(self) -> None:
        """Close an idle connection politely (nothing is pending on it)."""
        self.closed = True
        if self.transport is not None:
            self.transport.close()
