"""One upstream request's response, as the relay sees it, and the connection it arrives on.

The response head is parsed once; body bytes are de-framed (:mod:`ccx_proxy.h1`)
and handed over as they arrive, with no copy beyond the de-framing.  A read
timeout (no data for that long) covers the wait for the head and, once the relay
changes it, the gaps in the body; the failover deadline bounds the head as well.
Flow control: past a high-water mark of unread bytes the upstream socket is
paused until the relay catches up (and the timeout does not count that time).
A response that was not read to the end closes its connection: never reused.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from multidict import CIMultiDict, CIMultiDictProxy

from .h1 import BadResponse, ChunkedDecoder, Head, UpstreamClientError, parse_head

NEVER = float("inf")
_HIGH_WATER = 256 * 1024  # unread body bytes before the upstream socket is paused
_MAX_HEAD = 64 * 1024
_NO_HEADERS: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())  # until the head is in


class ReadTimeout(UpstreamClientError, TimeoutError):
    pass


class Disconnected(UpstreamClientError, ConnectionError):
    pass


class NothingReceived(Disconnected):
    """Closed before a single response byte: on a reused keep-alive connection, the
    upstream dropped it while idle, so the request can go again on a fresh one."""


Key = tuple[str, str, int]  # (scheme, host, port)


class Pool(Protocol):
    """What a connection needs from the pool that owns it."""

    def put(self, conn: Connection) -> None: ...

    def forget(self, conn: Connection) -> None: ...


class Connection(asyncio.Protocol):
    """One upstream connection; feeds the bytes it receives to its current exchange."""

    __slots__ = ("pool", "key", "transport", "exchange", "closed")

    def __init__(self, pool: Pool, key: Key) -> None:
        self.pool = pool
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.exchange: UpstreamResponse | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's are not asyncio.Transport

    def data_received(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None:  # bytes on an idle connection: it cannot be trusted any more
            self.close()
            return
        exchange.feed(data)

    def eof_received(self) -> bool:
        return False  # close the transport; connection_lost says the rest

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        if self.exchange is not None:
            self.exchange.lost(exc)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class UpstreamResponse:
    """One request's response: status and headers, then the body as it arrives."""

    __slots__ = (
        "status",
        "reason",
        "headers",
        "content_type",
        "_conn",
        "_loop",
        "_head",
        "_head_buf",
        "_fed",
        "_framing",
        "_remaining",
        "_chunked",
        "_reuse",
        "_buffer",
        "_size",
        "_complete",
        "_exc",
        "_waiter",
        "_paused",
        "_timeout",
        "_deadline",
        "_last",
        "_timer",
        "_head_waiter",
    )

    def __init__(
        self, conn: Connection, loop: asyncio.AbstractEventLoop, read_timeout: float, deadline: float
    ) -> None:
        self.status = 0
        self.reason = ""
        self.headers = _NO_HEADERS
        self.content_type = ""
        self._conn = conn
        self._loop = loop
        self._head: Head | None = None
        self._head_buf = b""
        self._fed = False  # any byte at all, 1xx interim responses included
        self._framing = ""
        self._remaining = 0
        self._chunked: ChunkedDecoder | None = None
        self._reuse = False
        self._buffer: list[bytes] = []  # readany takes it all; a list is ~500 B smaller than a deque
        self._size = 0
        self._complete = False
        self._exc: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._head_waiter: asyncio.Future[None] = loop.create_future()
        self._paused = False
        self._timeout = read_timeout
        self._deadline = deadline  # for the response head only (the failover deadline)
        self._last = loop.time()
        due = min(self._last + read_timeout if read_timeout > 0 else deadline, deadline)
        self._timer: asyncio.TimerHandle | None = loop.call_at(due, self._on_timer) if due < NEVER else None

    # -- fed by the connection ------------------------------------------------

    def feed(self, data: bytes) -> None:
        self._fed = True
        self._last = self._loop.time()
        try:
            if self._head is None:
                data = self._feed_head(data)
                if self._head is None:
                    return
            self._feed_body(data)
        except UpstreamClientError as exc:
            self._fail(exc)
        except Exception as exc:  # a parse error of any kind: a bad response, never a crash
            self._fail(BadResponse(f"unparseable response: {type(exc).__name__}: {exc}"))
            self._conn.close()

    def _feed_head(self, data: bytes) -> bytes:
        buf = self._head_buf + data if self._head_buf else data
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > _MAX_HEAD:
                    raise UpstreamClientError("response head too large")
                self._head_buf = buf
                return b""
            head = parse_head(buf[:end])
            buf = buf[end + 4 :]
            if not 100 <= head.status < 200 or head.status == 101:
                break  # 1xx interim responses (100 Continue, 103 Early Hints) are skipped
        self._head_buf = b""
        self._head = head
        self.status, self.reason = head.status, head.reason
        self.headers = CIMultiDictProxy(head.headers)
        content_type = head.headers.get("Content-Type")
        self.content_type = (
            content_type.partition(";")[0].strip().lower() if content_type else "application/octet-stream"
        )
        self._framing = head.framing
        self._remaining = head.length
        self._reuse = head.keep_alive
        if head.framing == "chunked":
            self._chunked = ChunkedDecoder()
        elif head.framing == "none" or (head.framing == "length" and not head.length):
            self._finish()
        if not self._head_waiter.done():
            self._head_waiter.set_result(None)
        return buf

    def _feed_body(self, data: bytes) -> None:
        if self._complete:
            if data:
                self._reuse = False  # bytes after the body: do not trust this connection again
            return
        framing = self._framing
        if framing == "chunked":
            assert self._chunked is not None
            payload = self._chunked.feed(data)
            if self._chunked.done:
                if self._chunked.rest:
                    self._reuse = False
                self._push(payload)
                self._finish()
                return
        elif framing == "length":
            if len(data) >= self._remaining:
                if len(data) > self._remaining:
                    self._reuse = False
                payload = data[: self._remaining]
                self._remaining = 0
                self._push(payload)
                self._finish()
                return
            payload = data
            self._remaining -= len(data)
        else:
            payload = data
        self._push(payload)

    def _push(self, payload: bytes) -> None:
        if not payload:
            return
        self._buffer.append(payload)
        self._size += len(payload)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if self._size > _HIGH_WATER and not self._paused and self._conn.transport is not None:
            self._paused = True  # a slow client: stop reading the upstream until it catches up
            self._conn.transport.pause_reading()

    def _finish(self) -> None:
        self._complete = True
        self._cancel_timer()
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def lost(self, exc: Exception | None) -> None:
        if self._complete:
            return
        if self._head is not None and self._framing == "close" and exc is None:
            self._finish()  # the body was delimited by the close
            return
        if self._head is None and not self._fed:
            self._fail(NothingReceived("the upstream closed the connection before responding"))
        elif self._head is None:
            self._fail(Disconnected("the upstream closed the connection in the middle of the response head"))
        else:
            self._fail(Disconnected("the upstream closed the connection before the body was complete"))

    def _fail(self, exc: BaseException) -> None:
        if self._exc is not None or self._complete:
            return
        self._exc = exc
        self._reuse = False
        self._cancel_timer()
        if not self._head_waiter.done():
            self._head_waiter.set_exception(exc)
            self._head_waiter.exception()  # retrieved: nobody may be waiting any more
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- the read timeout ------------------------------------------------------

    def _on_timer(self) -> None:
        self._timer = None
        if self._complete or self._exc is not None:
            return
        now = self._loop.time()
        if self._head is None and now >= self._deadline:
            self._fail(ReadTimeout("failover deadline reached before the response head"))
            self._conn.close()
            return
        if self._paused:  # waiting on our own client, not on the upstream
            self._last = now
        due = self._last + self._timeout if self._timeout > 0 else NEVER
        if self._head is None:
            due = min(due, self._deadline)
        if now < due:
            if due < NEVER:
                self._timer = self._loop.call_at(due, self._on_timer)
            return
        self._fail(ReadTimeout(f"no data from the upstream for {self._timeout:g} s"))
        self._conn.close()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def set_read_timeout(self, seconds: float) -> None:
        """From now on, the longest wait for more body bytes (0: none)."""
        self._timeout = seconds
        self._cancel_timer()
        if seconds > 0 and not self._complete and self._exc is None:
            due = (
                self._last + seconds if self._head is not None else min(self._last + seconds, self._deadline)
            )
            self._timer = self._loop.call_at(due, self._on_timer)

    # -- used by the relay -------------------------------------------------------

    @property
    def ready(self) -> bool:
        """readany() would return at once: bytes are buffered, or the body ended or failed."""
        return bool(self._buffer) or self._complete or self._exc is not None

    @property
    def at_eof(self) -> bool:
        """The whole body has arrived and been read."""
        return self._complete and not self._buffer

    async def readany(self) -> bytes:
        """The body bytes that have arrived (waiting for some); b"" at the end."""
        while not self._buffer:
            if self._exc is not None:
                raise self._exc
            if self._complete:
                return b""
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        buffer = self._buffer
        data = buffer[0] if len(buffer) == 1 else b"".join(buffer)
        buffer.clear()
        self._size = 0
        if self._paused and self._conn.transport is not None:
            self._paused = False
            self._last = self._loop.time()
            self._conn.transport.resume_reading()
        return data

    async def read(self, limit: int = -1) -> bytes:
        """The rest of the body (at most ``limit`` bytes when limit >= 0)."""
        parts: list[bytes] = []
        size = 0
        while limit < 0 or size < limit:
            chunk = await self.readany()
            if not chunk:
                break
            parts.append(chunk)
            size += len(chunk)
        data = b"".join(parts)
        return data if limit < 0 else data[:limit]

    def release(self) -> None:
        """Done with the response: pool the connection if it was read to the end cleanly."""
        conn = self._conn
        if self._complete and self._reuse and not conn.closed and not self._buffer:
            conn.exchange = None
            conn.pool.put(conn)
        else:
            self.close()

    def close(self) -> None:
        """Done early (or failed): the connection is closed, never reused."""
        self._cancel_timer()
        self._reuse = False
        self._conn.close()
