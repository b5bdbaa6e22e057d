"""One upstream response as a state machine, parsed by httptools (llhttp).

States::

    HEAD ──head in──► BODY ──message complete──► DONE
      │                 │
      └──── any parse error, timeout or lost connection ────► ERROR (terminal)

1xx interim responses are skipped; ``101``, a status outside 100-599 and any
malformed byte are :class:`BadResponse`.  Once in ERROR no further byte is parsed
or handed over and the connection is aborted; bytes after a complete response mark
the connection as not reusable.  Body bytes are handed over as llhttp de-frames
them, with no copy of ours.  A read timeout (no data for that long) covers the wait
for the head (bounded too by the failover deadline) and, once the relay sets it,
the gaps in the body.  Flow control: past a high-water mark of unread bytes the
socket is paused until the reader catches up, and that time does not count.
"""

from __future__ import annotations

import asyncio
from enum import Enum
from typing import Protocol

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

from .errors import BadResponse, DeadlineReached, Disconnected, NothingReceived, ReadTimeout

NEVER = float("inf")
HIGH_WATER = 32 * 1024  # unread body bytes before the upstream socket is paused
MAX_HEAD = 64 * 1024  # a response head (or trailer section) larger than this is refused
_NO_HEADERS: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())  # until the head is in


class State(Enum):
    HEAD = "head"
    BODY = "body"
    DONE = "done"
    ERROR = "error"


class Link(Protocol):
    """What a response needs from its connection."""

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def abort(self) -> None: ...

    def release(self, response: Response) -> None: ...


class _Stop(Exception):
    """Raised inside a parser callback to make llhttp stop where it is."""


class Response:
    """Status and headers, then the body as it arrives; fed by :class:`Connection`."""

    __slots__ = (
        "status",
        "reason",
        "headers",
        "content_type",
        "state",
        "keep_alive",
        "_link",
        "_loop",
        "_parser",
        "_raw",
        "_reason",
        "_head_size",
        "_head_bytes",
        "_feeding",
        "_fed",
        "_buffer",
        "_size",
        "_exc",
        "_waiter",
        "_head_waiter",
        "_paused",
        "_timeout",
        "_deadline",
        "_last",
        "_timer",
        "on_body",
    )

    def __init__(
        self, link: Link, loop: asyncio.AbstractEventLoop, read_timeout: float, deadline: float = NEVER
    ) -> None:
        self.status = 0
        self.reason = ""
        self.headers = _NO_HEADERS
        self.content_type = ""
        self.state = State.HEAD
        self.keep_alive = False
        self._link = link
        self._loop = loop
        self._buffer: list[bytes] = []
        # llhttp hands over each de-framed piece of body (one per chunk of a chunked body):
        # straight into the buffer, with no Python frame per piece.  feed() does the
        # accounting once per read.
        self.on_body = self._buffer.append
        # The parser refers back to this object (its callbacks): a cycle that only the
        # garbage collector could break.  It is dropped as soon as the response is done
        # with (release, close, failure), so responses are freed by reference counting.
        self._parser: httptools.HttpResponseParser | None = httptools.HttpResponseParser(self)
        self._raw: list[tuple[bytes, bytes]] = []
        self._reason = b""
        self._head_size = 0
        self._head_bytes = 0  # bytes fed while still in HEAD: httptools holds a header until it ends
        self._feeding = 0  # the size of the read being parsed
        self._fed = False  # any byte at all, 1xx interim responses included
        self._size = 0  # bytes fed since the reader last took the buffer: the flow-control measure
        self._exc: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._head_waiter: asyncio.Future[None] = loop.create_future()
        self._paused = False
        self._timeout = read_timeout
        self._deadline = deadline  # for the response head only (the failover deadline)
        self._last = loop.time()
        due = min(self._last + read_timeout if read_timeout > 0 else NEVER, deadline)
        self._timer: asyncio.TimerHandle | None = loop.call_at(due, self._on_timer) if due < NEVER else None

    # -- fed by the connection ------------------------------------------------------

    def feed(self, data: bytes) -> None:
        state = self.state
        if state is State.ERROR:
            return
        if state is State.DONE:  # bytes after a complete response: never reuse the connection
            self.keep_alive = False
            return
        self._fed = True
        self._last = self._loop.time()
        self._feeding = len(data)
        parser = self._parser
        if parser is None:  # released or closed: nothing more is read
            return
        try:
            parser.feed_data(data)
            if self._buffer:
                self._size += len(data)
                self._wake()
                if self._size > HIGH_WATER and not self._paused:
                    self._paused = True  # a slow reader: stop reading the upstream until it catches up
                    self._link.pause()
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, _Stop):
                return  # the response was complete: the rest is not parsed
            self._fail(cause if isinstance(cause, BadResponse) else BadResponse(str(cause)))
        except httptools.HttpParserUpgrade:
            self._fail(BadResponse("the upstream switched protocols (101)"))
        except httptools.HttpParserError as exc:
            self._fail(BadResponse(str(exc) or type(exc).__name__))
        else:
            if self.state is State.HEAD:  # every byte of this feed was part of the head
                self._head_bytes += len(data)
                if self._head_bytes > MAX_HEAD:
                    self._fail(BadResponse(f"response head over {MAX_HEAD // 1024} KB"))

    # httptools callbacks: they run inside feed_data.

    def on_message_begin(self) -> None:
        if self.state is State.DONE:
            self.keep_alive = False
            raise _Stop
        self._raw.clear()
        self._reason = b""

    def on_status(self, reason: bytes) -> None:
        self._reason += reason
        self._count(len(reason))

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.state is State.HEAD:  # sized when the head is complete
            self._raw.append((name, value))
        else:  # a trailer section: never passed on, only bounded
            self._count(len(name) + len(value) + 4)

    def _count(self, n: int) -> None:
        self._head_size += n
        if self._head_size > MAX_HEAD:
            raise BadResponse(f"response head or trailers over {MAX_HEAD // 1024} KB")

    def on_headers_complete(self) -> None:
        parser = self._parser
        assert parser is not None  # callbacks run inside feed_data
        status = parser.get_status_code()
        if status == 101 or not 100 <= status <= 599:
            raise BadResponse(f"status {status} is not a valid final response here")
        if parser.get_http_version() not in ("1.1", "1.0"):
            raise BadResponse(f"HTTP/{parser.get_http_version()} is not HTTP/1.x")
        if status < 200:
            return  # 1xx interim (100 Continue, 103 Early Hints): skipped, the head comes next
        raw = self._raw
        if self._head_bytes + self._feeding > MAX_HEAD:  # only then can the head be too large
            size = self._head_size + sum(len(n) + len(v) + 4 for n, v in raw)
            if size > MAX_HEAD:
                raise BadResponse(f"response head or trailers over {MAX_HEAD // 1024} KB")
        headers = CIMultiDict([(n.decode("latin-1"), v.decode("utf-8", "surrogateescape")) for n, v in raw])
        raw.clear()
        self.status = status
        self.reason = self._reason.decode("latin-1")
        self.headers = CIMultiDictProxy(headers)
        content_type = headers.get("Content-Type")
        self.content_type = (
            content_type.partition(";")[0].strip().lower() if content_type else "application/octet-stream"
        )
        self.state = State.BODY
        self._head_size = 0
        if not self._head_waiter.done():
            self._head_waiter.set_result(None)

    def on_message_complete(self) -> None:
        if self.state is State.HEAD:
            return  # the end of a 1xx interim response
        assert self._parser is not None
        self.keep_alive = self._parser.should_keep_alive()
        self.state = State.DONE
        self._cancel_timer()
        self._wake()

    # -- the end of the connection and failures ------------------------------------

    def lost(self, exc: BaseException | None) -> None:
        """The connection is gone (``exc`` None: closed cleanly by the upstream)."""
        state = self.state
        if state is State.DONE or state is State.ERROR:
            return
        if state is State.BODY and exc is None and _until_eof(self.status, self.headers):
            self.keep_alive = False
            self.state = State.DONE  # the body was delimited by the close
            self._cancel_timer()
            self._wake()
        elif state is State.HEAD and not self._fed:
            self._fail(NothingReceived("the upstream closed the connection before responding"))
        elif state is State.HEAD:
            self._fail(Disconnected("the upstream closed the connection in the middle of the response head"))
        else:
            self._fail(Disconnected("the upstream closed the connection before the body was complete"))

    def _fail(self, exc: BaseException) -> None:
        """Enter the terminal ERROR state: nothing more is parsed, the connection is aborted."""
        if self.state is State.ERROR or self.state is State.DONE:
            return
        self.state = State.ERROR
        self._parser = None
        self._exc = exc
        self.keep_alive = False
        self._cancel_timer()
        if not self._head_waiter.done():
            self._head_waiter.set_exception(exc)
            self._head_waiter.exception()  # retrieved: nobody may be waiting any more
        self._wake()
        self._link.abort()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- the read timeout -------------------------------------------------------------

    def _on_timer(self) -> None:
        self._timer = None
        if self.state is State.DONE or self.state is State.ERROR:
            return
        now = self._loop.time()
        head = self.state is State.HEAD
        if head and now >= self._deadline:
            self._fail(DeadlineReached("the failover deadline passed before the response head"))
            return
        if self._paused:  # waiting on our own reader, not on the upstream
            self._last = now
        due = self._last + self._timeout if self._timeout > 0 else NEVER
        if head:
            due = min(due, self._deadline)
        if now < due:
            if due < NEVER:
                self._timer = self._loop.call_at(due, self._on_timer)
            return
        what = "response headers" if head else "data"
        self._fail(ReadTimeout(f"no {what} from the upstream for {self._timeout:g} s"))

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def set_read_timeout(self, seconds: float) -> None:
        """From now on, the longest wait for more body bytes (0: none)."""
        self._timeout = seconds
        self._cancel_timer()
        if seconds > 0 and (self.state is State.HEAD or self.state is State.BODY):
            due = self._last + seconds
            if self.state is State.HEAD:
                due = min(due, self._deadline)
            self._timer = self._loop.call_at(due, self._on_timer)

    # -- used by the client and the relay ------------------------------------------

    async def wait_head(self) -> None:
        await self._head_waiter

    @property
    def ready(self) -> bool:
        """readany() would return at once: bytes are buffered, or the body ended or failed."""
        return bool(self._buffer) or self.state is State.DONE or self.state is State.ERROR

    @property
    def at_eof(self) -> bool:
        """The whole body has arrived and been read."""
        return self.state is State.DONE and not self._buffer

    async def readany(self) -> bytes:
        """The body bytes that have arrived (waiting for some); b"" at the end.

        A paused upstream is resumed only when the reader comes back with nothing left to
        take -- after it has passed on what it took -- so a reader stuck writing to a slow
        client never has a second buffer filling up behind it."""
        while not self._buffer:
            if self._paused:
                self._paused = False
                self._last = self._loop.time()
                self._link.resume()
            if self._exc is not None:
                raise self._exc
            if self.state is State.DONE:
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
        return data

    async def first_event(self) -> bytes:
        """The start of the body, left unread: waits until it holds a whole first SSE event
        (a blank line), HIGH_WATER bytes, or the body's end -- within the read timeout.

        For the relay's check of a 200 stream whose first event is an error; it adds one
        look at the buffer when the event came with the headers (the usual case)."""
        buffer = self._buffer
        while True:
            if buffer:
                if len(buffer) > 1:  # one piece from now on (the same list: on_body appends to it)
                    joined = b"".join(buffer)
                    buffer.clear()
                    buffer.append(joined)
                data = buffer[0]
                if b"\n\n" in data or b"\r\n\r\n" in data or len(data) >= HIGH_WATER:
                    return data
            if self._exc is not None:
                raise self._exc
            if self.state is State.DONE:
                return buffer[0] if buffer else b""
            if self._paused:  # the pause mark counts head bytes too: less than HIGH_WATER is here
                self._paused = False
                self._last = self._loop.time()
                self._link.resume()
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

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
        """Done with the response: its connection is pooled if it ended cleanly, else aborted."""
        self._cancel_timer()
        self._parser = None
        self._link.release(self)

    def close(self) -> None:
        """Done early (or failed): the connection is aborted, never reused."""
        self._fail(Disconnected("the response was abandoned before its end"))
        self._parser = None
        self._link.abort()

    @property
    def reusable(self) -> bool:
        """Complete, read to the end, and the upstream allows keep-alive."""
        return self.state is State.DONE and self.keep_alive and not self._buffer


def _until_eof(status: int, headers: CIMultiDictProxy[str]) -> bool:
    """Whether a body is delimited by the connection's close (RFC 9112 section 6.3): no
    Content-Length, and chunked is not the last coding across every Transfer-Encoding line."""
    if status in (204, 304) or "Content-Length" in headers:
        return False
    codings = ",".join(headers.getall("Transfer-Encoding", ()))
    return not codings or codings.rsplit(",", 1)[-1].strip().lower() != "chunked"
