"""Relaying an SSE response: bytes as they arrive, keepalives when the upstream
is silent, and a visible error when it stalls or stops short.

Chunks are written as they come, untouched.  The only bytes the gateway adds:
an SSE comment (``: keepalive``) after ``keepaliveMs`` of upstream silence, and
only at an event boundary; and a final ``event: error`` when the upstream
stalls past ``streamInactivityTimeoutMs``, breaks off, or ends before
``message_stop``, or when the gateway's drain deadline ends it (``overloaded_error``,
:mod:`ccx_proxy.ops.drain`).  Compressed streams are relayed without either: their bytes
cannot be inspected or extended.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct

from aiohttp import HttpVersion11, web
from multidict import CIMultiDict

from .errors import sse_error_event
from .ops.drain import DRAIN, SHUTTING_DOWN
from .policy import Timeouts
from .server import STALLED_CLIENTS
from .team.meter import USAGE_MARK, UsageMeter
from .upstream.attempt import Attempt
from .upstream.errors import UpstreamFailure
from .upstream.response import Response

log = logging.getLogger("ccx_proxy.stream")

KEEPALIVE = b": keepalive\n\n"
_TAIL = 4096  # enough to hold the final event
_READ_ERRORS = (UpstreamFailure, TimeoutError, OSError)
# A write this small into an empty transport buffer cannot pause it (the high-water mark is
# 64 KB), so it cannot block and needs no stall timer; a larger one can block on its own.
_UNTIMED_WRITE = 16 * 1024
# SO_LINGER on, 0 s: the close resets the connection.  A plain close would leave the kernel
# an orphaned socket holding the unsent send queue (megabytes) for as long as the stalled
# client keeps its window shut; a reset frees it at once (nginx: reset_timedout_connection).
_RESET = struct.pack("ii", 1, 0)
_SHUTDOWN_EVENT = sse_error_event("overloaded_error", SHUTTING_DOWN)  # the drain deadline's


def _at_boundary(tail: bytes) -> bool:
    return tail.endswith(b"\n\n") or tail.endswith(b"\r\n\r\n")


def _finished(tail: bytes) -> bool:
    """Whether the stream ended after a complete ``message_stop`` or ``error`` event."""
    if not _at_boundary(tail):
        return False
    # The last event is nearly always short: look in the last 512 bytes first (a
    # blank line found there is the last one in the whole tail too).
    last = _last_event(tail[-512:]) if len(tail) > 512 else None
    if last is None:
        last = _last_event(tail)
        if last is None:
            last = tail.rstrip(b"\r\n").replace(b"\r\n", b"\n")
    return (
        last.startswith(b"event: message_stop")
        or last.startswith(b"event: error")
        or (last.startswith(b"data:") and (b'"message_stop"' in last or b'"type":"error"' in last))
    )


def _last_event(tail: bytes) -> bytes | None:
    """The event after the last blank line (CRLF or LF line ends), or None if there is none."""
    if b"\r" in tail:
        body = tail.rstrip(b"\r\n").replace(b"\r\n", b"\n")
    else:  # LF line ends (what Anthropic sends): no normalising copy
        body = tail.rstrip(b"\n")
    at = body.rfind(b"\n\n")
    return body[at + 2 :] if at >= 0 else None


class _Keepalive:
    """One timer per stream; writes a comment when the upstream has been quiet."""

    __slots__ = ("_loop", "_interval", "_response", "last", "boundary", "_handle", "_task")

    def __init__(
        self, loop: asyncio.AbstractEventLoop, interval: float, response: web.StreamResponse
    ) -> None:
        self._loop = loop
        self._interval = interval
        self._response = response
        self.last = loop.time()
        self.boundary = True
        self._task: asyncio.Task[None] | None = None
        self._handle = loop.call_later(interval, self._tick)

    def _tick(self) -> None:
        quiet = self._loop.time() - self.last
        if quiet < self._interval:
            self._handle = self._loop.call_later(self._interval - quiet, self._tick)
            return
        if self.boundary and self._task is None:
            self._task = self._loop.create_task(self._send())
        # Quiet but inside an event (or a keepalive still being written): look again one
        # interval later, not in a tight loop.
        self._handle = self._loop.call_later(self._interval, self._tick)

    async def _send(self) -> None:
        try:
            # Data may have arrived between the tick and this task: check again; the
            # write below reaches the transport before any await, so nothing interleaves.
            if not self.boundary or self._loop.time() - self.last < self._interval:
                return
            await self._response.write(KEEPALIVE)
        except (ConnectionError, RuntimeError):
            pass  # the client left; the relay loop finds out on its next write
        finally:
            self._task = None
            self.last = self._loop.time()

    def close(self) -> None:
        self._handle.cancel()
        if self._task is not None:
            self._task.cancel()


async def relay_sse(
    request: web.Request,
    upstream: Response,
    headers: CIMultiDict[str],
    channel: str,
    timeouts: Timeouts,
    attempt: Attempt,
    loop: asyncio.AbstractEventLoop,
    write_timeout: float = 0.0,
    meter: UsageMeter | None = None,
) -> web.StreamResponse:
    headers["X-Accel-Buffering"] = "no"
    response = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=headers)
    if request.version < HttpVersion11:
        response.force_close()  # HTTP/1.0 has no chunked framing: the close ends the stream
    await response.prepare(request)
    transport = request.transport

    async def write(data: bytes, *, eof: bool = False) -> None:
        """Write with backpressure; a client that accepts nothing for write_timeout loses
        its stream (the upstream is aborted by the caller's cleanup)."""
        if (
            write_timeout
            and transport is not None
            and (len(data) > _UNTIMED_WRITE or transport.get_write_buffer_size())
        ):
            try:
                async with asyncio.timeout(write_timeout):
                    await (response.write_eof(data) if eof else response.write(data))
                return
            except TimeoutError:
                STALLED_CLIENTS.info(
                    loop.time(),
                    "client stalled: it accepted no bytes for %g s; closing its stream",
                    write_timeout,
                )
                sock = transport.get_extra_info("socket")
                if sock is not None:
                    with contextlib.suppress(OSError, ValueError):  # closed already (uvloop: ValueError)
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
                transport.abort()
                raise ConnectionResetError("the client stopped reading") from None
        await (response.write_eof(data) if eof else response.write(data))

    upstream.set_read_timeout(timeouts.inactivity)  # headers are in: idle limit from now on
    encoded = "Content-Encoding" in upstream.headers
    inspect = upstream.status == 200 and not encoded
    use_keepalive = inspect and timeouts.keepaliveMs > 0
    keepalive: _Keepalive | None = None
    read = upstream.readany
    tail = b""
    failure: str | None = None
    stalled = shutdown = False
    drain = request.app.get(DRAIN)
    if drain is not None:  # at the drain deadline the drain closes the upstream: see below
        drain.track(upstream)
    try:
        while True:
            if keepalive is None and use_keepalive and not upstream.ready:
                # Started at the first wait: a response that arrives whole (the short,
                # common case) never needs the timer; a stream gets it as before.
                keepalive = _Keepalive(loop, timeouts.keepalive, response)
                keepalive.boundary = _at_boundary(tail) if tail else True
            try:
                chunk = await read()
            except _READ_ERRORS as exc:
                if inspect and _finished(tail):
                    # message_stop (or an error event) was already relayed: the stream is
                    # complete whatever happened to the connection afterwards.
                    upstream.close()
                    break
                if drain is not None and drain.cut:  # the drain closed it: not the upstream's fault
                    failure, shutdown = SHUTTING_DOWN, True
                    break
                stalled = isinstance(exc, TimeoutError)
                failure = (
                    f"upstream channel {channel!r} stalled: no data for "
                    f"{timeouts.streamInactivityTimeoutMs} ms"
                    if stalled
                    else f"upstream channel {channel!r} broke off mid-stream ({type(exc).__name__})"
                )
                break
            if not chunk:
                if inspect and not _finished(tail):
                    failure = f"upstream channel {channel!r} closed the stream before message_stop"
                break
            if inspect:
                # After an event boundary the chunk starts a new event: the last event lies
                # within it, so keep a reference instead of a copy (no 4 KB per open stream).
                if len(chunk) >= _TAIL:
                    tail = chunk[-_TAIL:]
                elif _at_boundary(tail):
                    tail = chunk
                else:
                    tail = (tail + chunk)[-_TAIL:]
                if keepalive is not None:
                    keepalive.last = loop.time()
                    keepalive.boundary = _at_boundary(tail)
                # Usage (team.meter): a substring search and a last-byte check per chunk.
                if meter is not None and (meter.partial or USAGE_MARK in chunk or chunk[-1] != 10):
                    meter.feed(chunk)
            if upstream.at_eof and (not inspect or _finished(tail)):
                # The upstream is done: the last bytes and the end of the body in one write.
                await write(chunk, eof=True)
                return response
            await write(chunk)  # a client that went away raises here
    finally:
        if keepalive is not None:
            keepalive.close()
        if drain is not None:
            drain.streams.discard(upstream)
    if failure is not None:
        upstream.close()
        if shutdown:
            event = _SHUTDOWN_EVENT
            if meter is not None:
                meter.outcome = "shutdown"
        else:
            event = sse_error_event("api_error", failure + "; the response is incomplete")
            attempt.broke_off()
            if meter is not None:
                meter.outcome = "stalled" if stalled else "upstream_cut"
            log.warning("%s", failure)
        if encoded:  # nothing can be appended to compressed bytes: cut the connection instead
            if request.transport is not None:
                request.transport.close()
            return response
        if not inspect or _at_boundary(tail):
            await write(event)
        else:  # end the half-written event first, so the error event parses on its own
            await write(b"\n\n" + event)
    await write(b"", eof=True)
    return response
