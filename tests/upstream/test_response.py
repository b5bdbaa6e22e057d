"""The response state machine, byte by byte: :class:`Response` fed by hand, with a fake
link in place of the connection and no socket (as uvicorn tests its protocols against a
mock transport).  Timers run either on the real loop with small timeouts, or on a clock
moved by hand where a test must show that something does *not* happen."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable
from typing import Any

import pytest

from ccx_proxy.upstream.errors import (
    BadResponse,
    DeadlineReached,
    Disconnected,
    NothingReceived,
    ReadTimeout,
    UpstreamFailure,
)
from ccx_proxy.upstream.response import HIGH_WATER, MAX_HEAD, NEVER, Response, State


class FakeLink:
    """Stands in for the connection: records what the response asks of it."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.released: list[Response] = []

    def pause(self) -> None:
        self.calls.append("pause")

    def resume(self) -> None:
        self.calls.append("resume")

    def abort(self) -> None:
        self.calls.append("abort")

    def release(self, response: Response) -> None:
        self.calls.append("release")
        self.released.append(response)


class _Timer:
    def __init__(self, when: float, callback: Callable[[], None]) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class ManualClock:
    """Just enough of a loop for the response's timers: time moves only by advance(),
    and the timers due by then run inside it; futures come from the real loop."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.timers: list[_Timer] = []
        self._loop = asyncio.get_running_loop()

    def time(self) -> float:
        return self.now

    def create_future(self) -> asyncio.Future[Any]:
        return self._loop.create_future()

    def call_at(self, when: float, callback: Callable[[], None]) -> _Timer:
        timer = _Timer(when, callback)
        self.timers.append(timer)
        return timer

    def pending(self) -> list[float]:
        return [t.when for t in self.timers if not t.cancelled]

    def advance(self, seconds: float) -> None:
        self.now += seconds
        for _ in range(1000):  # a timer may set the next one
            due = [t for t in self.timers if not t.cancelled and t.when <= self.now]
            if not due:
                return
            timer = min(due, key=lambda t: t.when)
            self.timers.remove(timer)
            timer.callback()
        raise AssertionError("timers keep rescheduling themselves")


def new(read_timeout: float = 0.0, deadline: float = NEVER, loop: Any = None) -> tuple[Response, FakeLink]:
    link = FakeLink()
    return Response(link, loop or asyncio.get_running_loop(), read_timeout, deadline), link


def feed(response: Response, *chunks: bytes) -> Response:
    for chunk in chunks:
        response.feed(chunk)
    return response


async def take(response: Response) -> tuple[bytes, BaseException | None]:
    """Every body byte readany() hands over without waiting, and the error it then raises."""
    data = b""
    for _ in range(10_000):
        if not response.ready:
            break
        try:
            chunk = await response.readany()
        except UpstreamFailure as exc:
            return data, exc
        if not chunk:
            break
        data += chunk
    return data, None


async def failure(response: Response) -> BaseException:
    """The exception a reader gets (after whatever body bytes were buffered)."""
    _, exc = await take(response)
    assert exc is not None, "expected the response to have failed"
    return exc


def chunked(*chunks: bytes, trailers: bytes = b"") -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n" + trailers + b"\r\n"


OK_5 = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"


# -- any split of the bytes parses the same ---------------------------------------------


@pytest.mark.parametrize(
    "raw, status, reason, headers, body, keep_alive",
    [
        pytest.param(
            b"HTTP/1.1 200 OK\r\nContent-Type: Application/JSON; charset=utf-8\r\n"
            b"X-Multi: 1\r\nx-multi: 2\r\nContent-Length: 5\r\n\r\nhello",
            200,
            "OK",
            [
                ("Content-Type", "Application/JSON; charset=utf-8"),
                ("X-Multi", "1"),
                ("x-multi", "2"),
                ("Content-Length", "5"),
            ],
            b"hello",
            True,
            id="content-length",
        ),
        pytest.param(
            b"HTTP/1.1 429 Too Many Requests\r\nTransfer-Encoding: chunked\r\nRetry-After: 7\r\n\r\n"
            + chunked(b"ab", b"c\r\n0\r\n", b"de;x", trailers=b"X-Trailer: t\r\n").replace(
                b"2\r\n", b"2;ext=1\r\n", 1
            ),
            429,
            "Too Many Requests",
            [("Transfer-Encoding", "chunked"), ("Retry-After", "7")],
            b"abc\r\n0\r\nde;x",
            True,
            id="chunked-extension-trailers",
        ),
        pytest.param(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>; rel=preload\r\n\r\n"
            b"HTTP/1.1 201 Created Fine\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
            201,
            "Created Fine",
            [("Connection", "close"), ("Content-Length", "2")],
            b"ok",
            False,
            id="interim-100-103-then-final",
        ),
        pytest.param(
            "HTTP/1.1 204 No Content\r\nX-Name: caf\u00e9\r\n\r\n".encode(),
            204,
            "No Content",
            [("X-Name", "caf\u00e9")],
            b"",
            True,
            id="no-body-utf8-value",
        ),
    ],
)
async def test_the_head_split_at_every_byte_parses_the_same(
    raw: bytes, status: int, reason: str, headers: list[tuple[str, str]], body: bytes, keep_alive: bool
) -> None:
    splits = [[raw[:i], raw[i:]] for i in range(1, len(raw))]
    splits.append([raw[i : i + 1] for i in range(len(raw))])  # and one byte at a time
    for chunks in splits:
        response, link = new()
        feed(response, *chunks)
        got = await take(response)
        seen = (response.state, response.status, response.reason, list(response.headers.items()))
        assert seen == (State.DONE, status, reason, headers), chunks
        assert got == (body, None), chunks
        assert (response.keep_alive, response.reusable, link.calls) == (keep_alive, keep_alive, []), chunks


@pytest.mark.parametrize(
    "content_type, expected",
    [
        pytest.param("Application/JSON; charset=utf-8", "application/json", id="params-and-case"),
        pytest.param(" text/event-stream ", "text/event-stream", id="spaces"),
        pytest.param(None, "application/octet-stream", id="absent"),
    ],
)
async def test_content_type_is_the_bare_media_type(content_type: str | None, expected: str) -> None:
    line = b"" if content_type is None else b"Content-Type: %s\r\n" % content_type.encode()
    response, _ = new()
    feed(response, b"HTTP/1.1 200 OK\r\n" + line + b"Content-Length: 0\r\n\r\n")
    assert response.content_type == expected


# -- framing: Transfer-Encoding, close-delimited bodies -------------------------------------


async def test_transfer_encoding_gzip_then_chunked_lines_mean_chunked() -> None:
    response, _ = new()
    feed(response, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert response.headers.getall("Transfer-Encoding") == ["gzip", "chunked"]
    feed(response, b"3\r\nabc\r\n")
    assert await take(response) == (b"abc", None)
    response.lost(None)  # a chunked body cut short is an error, not an end
    assert response.state is State.ERROR
    assert isinstance(await failure(response), Disconnected)


async def test_transfer_encoding_gzip_then_chunked_complete() -> None:
    response, link = new()
    feed(
        response,
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n",
        chunked(b"abc", b"def"),
    )
    assert await take(response) == (b"abcdef", None)
    assert (response.state, response.reusable, link.calls) == (State.DONE, True, [])


@pytest.mark.parametrize(
    "codings",
    [
        pytest.param(b"Transfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n", id="two-lines"),
        pytest.param(b"Transfer-Encoding: chunked, gzip\r\n", id="one-line"),
    ],
)
async def test_chunked_not_last_means_the_body_runs_to_the_close(codings: bytes) -> None:
    raw_body = b"3\r\nabc\r\n0\r\n\r\n"  # not de-chunked: chunked is not the final coding
    response, _ = new()
    feed(response, b"HTTP/1.1 200 OK\r\n" + codings + b"\r\n" + raw_body)
    assert response.state is State.BODY
    assert await take(response) == (raw_body, None)
    response.lost(None)
    assert (response.state, response.at_eof, response.keep_alive) == (State.DONE, True, False)


async def test_a_close_delimited_body_ends_at_a_clean_close() -> None:
    response, link = new()
    feed(response, b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n", b"data: 1\n\n")
    assert response.state is State.BODY
    assert await take(response) == (b"data: 1\n\n", None)
    feed(response, b"data: 2\n\n")
    response.lost(None)
    assert response.state is State.DONE
    assert await response.read() == b"data: 2\n\n"
    assert response.at_eof
    assert (response.keep_alive, response.reusable, link.calls) == (False, False, [])


async def test_a_close_delimited_body_cut_by_an_error_is_an_error() -> None:
    response, link = new()
    feed(response, b"HTTP/1.1 200 OK\r\n\r\npartial")
    response.lost(ConnectionResetError("reset by peer"))
    assert response.state is State.ERROR
    data, exc = await take(response)
    assert data == b"partial"
    assert isinstance(exc, Disconnected) and not isinstance(exc, NothingReceived)
    assert link.calls == ["abort"]


async def test_a_content_length_body_cut_short_is_an_error_even_on_a_clean_close() -> None:
    response, _ = new()
    feed(response, b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
    response.lost(None)
    data, exc = await take(response)
    assert data == b"partial"
    assert isinstance(exc, Disconnected)
    assert "before the body was complete" in str(exc)


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"HTTP/1.1 204 No Content\r\n\r\n", id="204"),
        pytest.param(b"HTTP/1.1 304 Not Modified\r\nETag: x\r\n\r\n", id="304"),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", id="empty-content-length"),
    ],
)
async def test_bodyless_responses_are_done_at_once(raw: bytes) -> None:
    response, _ = new()
    feed(response, raw)
    assert (response.state, response.reusable) == (State.DONE, True)
    response.lost(None)  # a close afterwards changes nothing
    assert (response.state, response.reusable) == (State.DONE, True)


# -- keep-alive ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "version, lines, keep_alive",
    [
        pytest.param(b"1.1", b"", True, id="http11-default"),
        pytest.param(
            b"1.1", b"Connection: keep-alive\r\nConnection: close\r\n", False, id="two-lines-close-last"
        ),
        pytest.param(
            b"1.1", b"Connection: close\r\nConnection: keep-alive\r\n", False, id="two-lines-close-first"
        ),
        pytest.param(b"1.1", b"Connection: keep-alive, close\r\n", False, id="token-list"),
        pytest.param(b"1.1", b"Connection: CLOSE\r\n", False, id="case-insensitive"),
        pytest.param(b"1.1", b"Connection: xclosex\r\n", True, id="token-not-substring"),
        pytest.param(b"1.1", b"X-Connection: close\r\n", True, id="other-header"),
        pytest.param(b"1.0", b"", False, id="http10-default"),
        pytest.param(b"1.0", b"Connection: keep-alive\r\n", True, id="http10-keep-alive"),
    ],
)
async def test_keep_alive_follows_the_connection_tokens(
    version: bytes, lines: bytes, keep_alive: bool
) -> None:
    response, _ = new()
    feed(response, b"HTTP/" + version + b" 200 OK\r\n" + lines + b"Content-Length: 1\r\n\r\nx")
    assert await take(response) == (b"x", None)
    assert response.state is State.DONE
    assert (response.keep_alive, response.reusable) == (keep_alive, keep_alive)


# -- trailers ----------------------------------------------------------------------------


async def test_trailers_are_not_headers_and_leave_the_body_intact() -> None:
    response, _ = new()
    feed(
        response,
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Checksum\r\n\r\n",
        chunked(b"hello ", b"world", trailers=b"X-Checksum: abc\r\nX-Other: 1\r\n"),
    )
    assert await take(response) == (b"hello world", None)
    assert "X-Checksum" not in response.headers and "X-Other" not in response.headers
    assert list(response.headers) == ["Transfer-Encoding", "Trailer"]
    assert (response.state, response.reusable) == (State.DONE, True)


async def test_a_trailer_section_over_the_head_limit_is_refused() -> None:
    response, link = new()
    feed(response, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n")
    for i in range(MAX_HEAD // 1000 + 2):
        feed(response, b"X-T%d: %s\r\n" % (i, b"t" * 1000))
    data, exc = await take(response)
    assert data == b"abc"
    assert isinstance(exc, BadResponse) and "64 KB" in str(exc)
    assert "abort" in link.calls  # (the unread bytes also passed the pause mark on the way)


# -- interim responses and protocol switches -------------------------------------------------


@pytest.mark.parametrize(
    "interim",
    [
        pytest.param(b"HTTP/1.1 100 Continue\r\n\r\n", id="100"),
        pytest.param(b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n", id="103"),
        pytest.param(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n", id="100-103"
        ),
    ],
)
async def test_interim_responses_are_skipped(interim: bytes) -> None:
    response, link = new()
    feed(response, interim)
    assert (response.state, response.status, response.headers.get("Link")) == (State.HEAD, 0, None)
    feed(response, b"HTTP/1.1 200 OK\r\nX-Final: 1\r\nContent-Length: 2\r\n\r\nok")
    await response.wait_head()
    assert (response.status, list(response.headers)) == (200, ["X-Final", "Content-Length"])
    assert await take(response) == (b"ok", None)
    assert (response.reusable, link.calls) == (True, [])


async def test_a_close_after_an_interim_response_is_not_nothing_received() -> None:
    # The upstream did answer (100 Continue): the request must not be sent again.
    response, _ = new()
    feed(response, b"HTTP/1.1 100 Continue\r\n\r\n")
    response.lost(None)
    with pytest.raises(Disconnected) as caught:
        await response.wait_head()
    assert not isinstance(caught.value, NothingReceived)


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"HTTP/1.1 101 Switching Protocols\r\n\r\n", id="bare"),
        pytest.param(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
            id="websocket-upgrade",
        ),
        pytest.param(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 101 Switching\r\n\r\n", id="after-100"),
    ],
)
async def test_101_is_a_bad_response(raw: bytes) -> None:
    response, link = new()
    feed(response, raw + b"\x00\x01binary protocol bytes")
    assert response.state is State.ERROR
    with pytest.raises(BadResponse, match="101"):
        await response.wait_head()
    assert (response.status, response.keep_alive, response.reusable) == (0, False, False)
    assert link.calls == ["abort"]


# -- malformed bytes ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"HTTP/1.1 999 Nope\r\nContent-Length: 0\r\n\r\n", id="status-999"),
        pytest.param(b"HTTP/1.1 000 Zero\r\nContent-Length: 0\r\n\r\n", id="status-000"),
        pytest.param(b"HTTP/1.1 600 Big\r\nContent-Length: 0\r\n\r\n", id="status-600"),
        pytest.param(b"HTTP/1.1 099 Small\r\nContent-Length: 0\r\n\r\n", id="status-099"),
        pytest.param(b"HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n\r\n", id="status-4-digits"),
        pytest.param(b"HTTP/2 200 OK\r\nContent-Length: 0\r\n\r\n", id="http2-version"),
        pytest.param(b"HTTP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n", id="http2.0-version"),
        pytest.param(b"HTTP/0.9 200 OK\r\nContent-Length: 0\r\n\r\n", id="http0.9-version"),
        pytest.param(b"HTTP/1.1 200 O\rK\r\nContent-Length: 0\r\n\r\n", id="bare-cr-in-reason"),
        pytest.param(b"HTTP/1.1 200 OK\nContent-Length: 0\r\n\r\n", id="bare-lf-after-status-line"),
        pytest.param(b"HTTP/1.1 200 OK\r\nX-Odd: 1\nSet-Cookie: evil=1\r\n\r\n", id="bare-lf-in-header"),
        pytest.param(b"HTTP/1.1 200 OK\r\nX-Odd: a\x00b\r\nContent-Length: 0\r\n\r\n", id="nul-in-value"),
        pytest.param(b"HTTP/1.1 200 OK\r\nX-Odd: a\r\n folded\r\nContent-Length: 0\r\n\r\n", id="obs-fold"),
        pytest.param(b"HTTP/1.1 200 OK\r\nnocolon\r\nContent-Length: 0\r\n\r\n", id="no-colon"),
        pytest.param(b"HTTP/1.1 200 OK\r\nX-Odd : 1\r\nContent-Length: 0\r\n\r\n", id="space-before-colon"),
        pytest.param("HTTP/1.1 200 OK\r\nContent-Length: \u00b2\r\n\r\n".encode(), id="superscript-length"),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nx", id="two-lengths"),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
            id="chunked-and-length",
        ),
    ],
)
async def test_malformed_heads_are_bad_responses(raw: bytes) -> None:
    response, link = new()
    feed(response, raw)
    assert response.state is State.ERROR
    with pytest.raises(BadResponse):
        await response.wait_head()
    assert (response.status, dict(response.headers)) == (0, {})
    assert link.calls == ["abort"]


@pytest.mark.parametrize(
    "body, readable",
    [
        pytest.param(b"3\r\nabc\r\nzz\r\n7\r\nINJECT!\r\n0\r\n\r\n", b"abc", id="bad-chunk-size"),
        pytest.param(b"3\r\nabc\r\n-1\r\n7\r\nINJECT!\r\n0\r\n\r\n", b"abc", id="negative-size"),
        pytest.param(b"3\r\nabcX\r\n7\r\nINJECT!\r\n0\r\n\r\n", b"abc", id="chunk-longer-than-size"),
    ],
)
async def test_a_chunk_framing_error_stops_everything_after_it(body: bytes, readable: bytes) -> None:
    response, link = new()
    feed(response, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body)  # one feed
    assert response.state is State.ERROR
    assert await response.readany() == readable  # what came before the error...
    for _ in range(2):  # ...then the error, every time
        with pytest.raises(BadResponse):
            await response.readany()
    assert link.calls == ["abort"]


async def test_nothing_is_parsed_after_the_error_state() -> None:
    response, link = new()
    feed(response, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\nzz\r\n")
    first = await failure(response)
    before = (response.status, list(response.headers.items()), response.keep_alive)
    feed(response, b"7\r\nINJECT!\r\n0\r\n\r\n", OK_5, b"HTTP/1.1 500 Other\r\nContent-Length: 0\r\n\r\n")
    response.lost(None)
    assert response.state is State.ERROR
    assert (response.status, list(response.headers.items()), response.keep_alive) == before
    with pytest.raises(BadResponse) as again:
        await response.readany()
    assert again.value is first
    assert link.calls == ["abort"]


@pytest.mark.parametrize(
    "chunks",
    [
        pytest.param([OK_5 + b"HTTP/1.1 500 Later\r\nContent-Length: 3\r\n\r\nbad"], id="same-feed"),
        pytest.param([OK_5, b"HTTP/1.1 500 Later\r\nContent-Length: 3\r\n\r\nbad"], id="next-feed"),
        pytest.param([OK_5, b"x"], id="one-stray-byte"),
        pytest.param(
            [b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 5\r\n\r\nhelloEXTRA"],
            id="after-connection-close",
        ),
    ],
)
async def test_bytes_after_a_complete_response_are_not_parsed(chunks: list[bytes]) -> None:
    response, link = new()
    feed(response, *chunks)
    assert (response.state, response.status) == (State.DONE, 200)
    assert await response.read() == b"hello"
    assert response.headers.get("Content-Length") == "5"
    assert (response.keep_alive, response.reusable, link.calls) == (False, False, [])


# -- the head size limit ---------------------------------------------------------------------


async def test_a_head_of_many_headers_over_64_kb_is_refused() -> None:
    lines = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 1000) for i in range(MAX_HEAD // 1000 + 2))
    response, link = new()
    feed(response, b"HTTP/1.1 200 OK\r\n" + lines + b"Content-Length: 0\r\n\r\n")
    with pytest.raises(BadResponse, match="64 KB"):
        await response.wait_head()
    assert link.calls == ["abort"]


async def test_one_endless_header_value_is_refused_before_it_ends() -> None:
    response, link = new()
    feed(response, b"HTTP/1.1 200 OK\r\nX-Endless: ")
    for _ in range(MAX_HEAD // 1024 + 1):
        feed(response, b"a" * 1024)
    assert response.state is State.ERROR
    with pytest.raises(BadResponse, match="64 KB"):
        await response.wait_head()
    assert link.calls == ["abort"]


async def test_a_head_just_under_the_limit_is_fine() -> None:
    lines = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 1000) for i in range(60))
    body = b"b" * (2 * MAX_HEAD)  # the body in the same feed does not count
    response, _ = new()
    feed(response, b"HTTP/1.1 200 OK\r\n" + lines + b"Content-Length: %d\r\n\r\n" % len(body) + body)
    assert await take(response) == (body, None)
    assert len(response.headers) == 61


# -- flow control ---------------------------------------------------------------------------


async def test_reading_pauses_past_the_high_water_mark_and_resumes_when_the_reader_is_back() -> None:
    piece = b"x" * (HIGH_WATER // 4)
    response, link = new()
    feed(response, b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (len(piece) * 8))
    feed(response, *[piece] * 4)
    assert link.calls == []  # exactly HIGH_WATER unread bytes: still reading
    feed(response, b"x")
    assert link.calls == ["pause"]
    feed(response, piece[1:])
    assert link.calls == ["pause"]  # paused once, not once per feed
    assert await response.readany() == piece * 5
    # Still paused while the reader passes those bytes on (to a client that may be slow):
    # no second buffer fills up behind it.
    assert link.calls == ["pause"]
    waiting = asyncio.ensure_future(response.readany())
    await asyncio.sleep(0)
    assert link.calls == ["pause", "resume"]  # back with nothing left to take: resumed
    feed(response, piece, piece)
    assert await waiting == piece * 2
    assert link.calls == ["pause", "resume"]  # below the mark: never paused, nothing to resume
    feed(response, piece)
    assert await response.read() == piece
    assert response.reusable


# -- timeouts on the real loop, with small values --------------------------------------------


async def test_no_head_within_the_read_timeout_is_a_read_timeout() -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    response, link = new(read_timeout=0.05)
    with pytest.raises(ReadTimeout, match="no response headers") as caught:
        await response.wait_head()
    assert not isinstance(caught.value, DeadlineReached)
    assert loop.time() >= started + 0.05
    assert (response.state, link.calls) == (State.ERROR, ["abort"])


async def test_a_gap_in_the_body_is_a_read_timeout() -> None:
    response, link = new()
    feed(response, b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    response.set_read_timeout(0.05)
    assert await response.readany() == b"abc"
    with pytest.raises(ReadTimeout, match="no data"):
        await response.readany()
    assert (response.state, link.calls) == (State.ERROR, ["abort"])


async def test_the_deadline_cuts_the_wait_for_the_head() -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 0.05
    response, link = new(read_timeout=30, deadline=deadline)
    with pytest.raises(DeadlineReached):
        await response.wait_head()
    assert loop.time() >= deadline
    assert link.calls == ["abort"]


# -- timeouts on a clock moved by hand ---------------------------------------------------------


async def test_each_byte_restarts_the_read_timeout() -> None:
    clock = ManualClock()
    response, link = new(read_timeout=1.0, loop=clock)
    clock.advance(0.9)
    feed(response, b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n")
    clock.advance(0.9)
    feed(response, b"a")
    clock.advance(0.9)
    assert (response.state, link.calls) == (State.BODY, [])
    clock.advance(0.2)
    assert response.state is State.ERROR
    with pytest.raises(ReadTimeout, match="no data from the upstream for 1 s"):
        await response.read()


async def test_time_paused_for_a_slow_reader_does_not_count() -> None:
    clock = ManualClock()
    response, link = new(read_timeout=1.0, loop=clock)
    feed(response, b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (HIGH_WATER + 2))
    feed(response, b"x" * (HIGH_WATER + 1))
    assert link.calls == ["pause"]
    clock.advance(60)  # the reader is slow, not the upstream
    assert response.state is State.BODY
    assert len(await response.readany()) == HIGH_WATER + 1
    clock.advance(60)  # still passing those bytes on: paused, so not counted either
    assert response.state is State.BODY and link.calls == ["pause"]
    waiting = asyncio.ensure_future(response.readany())
    await asyncio.sleep(0)
    assert link.calls == ["pause", "resume"]
    clock.advance(0.9)
    assert response.state is State.BODY  # counted from the resume
    clock.advance(0.2)
    assert response.state is State.ERROR
    assert link.calls == ["pause", "resume", "abort"]
    with pytest.raises(ReadTimeout):
        await waiting


async def test_the_deadline_is_for_the_head_only() -> None:
    clock = ManualClock()
    response, _ = new(read_timeout=10, deadline=clock.now + 2, loop=clock)
    clock.advance(1)
    feed(response, b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n")
    clock.advance(5)  # past the deadline, within the read timeout
    assert response.state is State.BODY
    clock.advance(6)
    assert isinstance(await failure(response), ReadTimeout)
    assert not isinstance(await failure(response), DeadlineReached)


async def test_the_deadline_before_the_read_timeout() -> None:
    clock = ManualClock()
    response, _ = new(read_timeout=10, deadline=clock.now + 2, loop=clock)
    clock.advance(1.9)
    assert response.state is State.HEAD
    clock.advance(0.1)
    with pytest.raises(DeadlineReached, match="deadline"):
        await response.wait_head()


async def test_set_read_timeout_changes_the_gap_and_zero_turns_it_off() -> None:
    clock = ManualClock()
    response, _ = new(read_timeout=30, loop=clock)
    feed(response, b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n")
    response.set_read_timeout(0)
    assert clock.pending() == []
    clock.advance(3600)
    assert response.state is State.BODY
    response.set_read_timeout(0.5)  # counted from the last byte, an hour ago
    clock.advance(0)
    with pytest.raises(ReadTimeout, match="0.5 s"):
        await response.readany()


async def test_no_timer_without_a_timeout_and_none_left_once_done() -> None:
    clock = ManualClock()
    response, _ = new(read_timeout=0, loop=clock)
    assert clock.pending() == []
    timed, _ = new(read_timeout=5, loop=clock)
    assert clock.pending() == [clock.now + 5]
    feed(timed, OK_5)
    assert clock.pending() == []
    clock.advance(10)
    assert (response.state, timed.state) == (State.HEAD, State.DONE)


async def test_release_stops_the_timer_and_hands_the_response_to_the_link() -> None:
    clock = ManualClock()
    response, link = new(read_timeout=1, loop=clock)
    feed(response, OK_5[:-2])
    response.release()
    assert link.released == [response]
    assert clock.pending() == []
    clock.advance(10)
    assert link.calls == ["release"]


# -- the end of the connection ----------------------------------------------------------------


async def test_a_close_before_any_byte_is_nothing_received() -> None:
    response, link = new()
    response.lost(None)
    with pytest.raises(NothingReceived):
        await response.wait_head()
    assert link.calls == ["abort"]


async def test_a_close_in_the_middle_of_the_head_is_disconnected() -> None:
    response, _ = new()
    feed(response, b"HTTP/1.1 200 OK\r\nContent-Le")
    response.lost(None)
    with pytest.raises(Disconnected, match="middle of the response head") as caught:
        await response.wait_head()
    assert not isinstance(caught.value, NothingReceived)


async def test_close_abandons_the_response() -> None:
    response, link = new()
    feed(response, b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    response.close()
    assert (response.state, response.reusable) == (State.ERROR, False)
    assert "abort" in link.calls
    data, exc = await take(response)
    assert data == b"abc"
    assert isinstance(exc, Disconnected) and "abandoned" in str(exc)
    feed(response, b"defghij")
    assert response.state is State.ERROR


async def test_an_unawaited_failed_head_logs_nothing() -> None:
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: errors.append(context))
    try:
        response, _ = new()
        feed(response, b"garbage\r\n\r\n")
        assert response.state is State.ERROR
        del response
        gc.collect()
    finally:
        loop.set_exception_handler(previous)
    assert errors == []


# -- reuse -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "chunks, read, lost, reusable",
    [
        pytest.param([OK_5], True, False, True, id="done-keep-alive-read"),
        pytest.param([OK_5], False, False, False, id="not-read"),
        pytest.param([OK_5[:-1]], True, False, False, id="body-incomplete"),
        pytest.param(
            [b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 5\r\n\r\nhello"],
            True,
            False,
            False,
            id="connection-close",
        ),
        pytest.param([b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nhello"], True, False, False, id="http10"),
        pytest.param([b"HTTP/1.1 200 OK\r\n\r\nhello"], True, True, False, id="close-delimited"),
        pytest.param([b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel"], True, True, False, id="cut"),
        pytest.param([b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n"], True, False, False, id="error"),
        pytest.param([], False, False, False, id="no-head"),
    ],
)
async def test_reusable_only_when_done_keep_alive_and_fully_read(
    chunks: list[bytes], read: bool, lost: bool, reusable: bool
) -> None:
    response, _ = new()
    feed(response, *chunks)
    if lost:
        response.lost(None)
    if read:
        await take(response)
    assert response.reusable is reusable


async def test_a_first_event_behind_a_large_head_does_not_wait_on_its_own_pause() -> None:
    # The pause mark counts every fed byte, head included: a big head plus the start of an
    # event can pause the upstream with less than HIGH_WATER of body buffered.
    response, link = new(read_timeout=5)
    big_header = b"X-Pad: " + b"p" * (HIGH_WATER - 100) + b"\r\n"
    feed(
        response,
        b"HTTP/1.1 200 OK\r\n" + big_header + b"Content-Type: text/event-stream\r\n"
        b"Content-Length: 200\r\n\r\n" + b"event: ping\ndata: " + b"x" * 150,
    )
    assert link.calls == ["pause"]
    waiting = asyncio.ensure_future(response.first_event())
    await asyncio.sleep(0)
    assert link.calls == ["pause", "resume"]  # it asks for the rest instead of waiting out the timeout
    feed(response, b"y" * 13 + b"\n\n")
    assert (await waiting).endswith(b"\n\n")
