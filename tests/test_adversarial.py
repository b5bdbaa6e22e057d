"""Hostile clients against a REAL gateway process (``python -m ccx_proxy serve``) on 127.0.0.1.

Raw sockets only (asyncio streams or plain non-blocking sockets), and a tiny raw upstream
run on its own event loop in a thread, which records every request it gets and can echo
its key, answer any status, or stream 32 MB per response with backpressure.  Each test
asserts one bound; every wait is bounded.  The gateway runs with short client limits
(head and body 1 s, write stall 2 s) and logs at DEBUG into a file the last test greps.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gzip
import json
import os
import socket
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
ACCESS_KEY = "adv-access-Qm7vT2xK9pLw4RzN"
HEAD_TIMEOUT, BODY_TIMEOUT, WRITE_TIMEOUT = 1.0, 1.0, 2.0
ERROR_STATUSES = (400, 401, 404, 429, 500, 529)
ERROR_VARIANTS = ("json", "sse", "gzip")  # how the upstream's error body comes


def _key(name: str) -> str:
    return f"sk-adv-{name}-Hq3Zt8Vn1Yc6-{zlib.crc32(name.encode()) % 100000:05d}"  # masks differ


# -- the raw upstream -------------------------------------------------------------------

SSE_SMALL = (
    b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_adv","model":"m"}}\n\n'
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
    b'"delta":{"type":"text_delta","text":"hi"}}\n\n'
    b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
)
JSON_SMALL = b'{"type":"message","id":"msg_adv","content":[{"type":"text","text":"hi"}]}'
_PIECE_HEAD = b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":{"text":"'
_PIECE_TAIL = b'"}}\n\n'
PIECE = _PIECE_HEAD + b"x" * (65536 - len(_PIECE_HEAD) - len(_PIECE_TAIL)) + _PIECE_TAIL
FORGED = "2026-01-01 00:00:00,000 CRITICAL ccx_proxy: forged by the upstream"
BIG = 32 * 1024 * 1024  # a "big" response: 512 pieces of 64 KB


@dataclass
class Seen:
    line: str
    headers: dict[str, str]
    body: bytes


@dataclass
class RawUpstream:
    requests: list[Seen] = field(default_factory=list)
    open: int = 0
    big_started: int = 0
    big_open: int = 0
    big_sent: list[int] = field(default_factory=list)  # bytes sent by each finished big response
    port: int = 0


class _UpstreamConn(asyncio.Protocol):
    def __init__(self, up: RawUpstream) -> None:
        self.up = up
        self.buf = b""
        self.transport: asyncio.Transport | None = None
        self.paused = False
        self.left = 0  # bytes of a big response still to send
        self.sent = 0
        self.big = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.up.open += 1
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)  # less in flight per stream

    def connection_lost(self, exc: Exception | None) -> None:
        self.up.open -= 1
        if self.big:
            self.up.big_open -= 1
            self.up.big_sent.append(self.sent)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._pump()

    def _pump(self) -> None:
        assert self.transport is not None
        while self.left and not self.paused and not self.transport.is_closing():
            self.transport.write(PIECE)
            self.left -= len(PIECE)
            self.sent += len(PIECE)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while (end := self.buf.find(b"\r\n\r\n")) >= 0:
            lines = self.buf[:end].decode("latin-1").split("\r\n")
            headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
            size = int(headers.get("content-length", "0"))
            if len(self.buf) < end + 4 + size:
                return
            body, self.buf = self.buf[end + 4 : end + 4 + size], self.buf[end + 4 + size :]
            self.up.requests.append(Seen(lines[0], headers, body))
            self._respond(headers, body)

    def _respond(self, headers: dict[str, str], body: bytes) -> None:
        assert self.transport is not None
        mode = headers.get("x-adv", "")
        if mode == "big":
            self.big, self.left = True, BIG
            self.up.big_started += 1
            self.up.big_open += 1
            self.transport.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: %d\r\n\r\n" % BIG
            )
            self._pump()
            return
        if mode[:3].isdigit():
            self.transport.write(_error_answer(int(mode[:3]), mode[3:], headers))
            return
        stream = b'"stream":true' in body
        payload, kind = (SSE_SMALL, b"text/event-stream") if stream else (JSON_SMALL, b"application/json")
        self.transport.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: %s\r\ncontent-length: %d\r\n\r\n%s"
            % (kind, len(payload), payload)
        )


def _error_answer(status: int, variant: str, headers: dict[str, str]) -> bytes:
    """An error that echoes the key it got: in the reason, in two headers, in the body."""
    key = headers.get("x-api-key") or headers.get("authorization", "").removeprefix("Bearer ")
    body = orjson.dumps(
        {
            "type": "error",
            "error": {"type": "api_error", "message": f"key {key} refused", "key": key},
            "echo": {"x-api-key": key, "quoted": json.dumps(key)},
        }
    )
    kind = "application/json"
    extra = ""
    if variant == "forge":  # an error message with a line break and a log line after it
        body = b'{"type":"error","error":{"type":"api_error","message":"oops\n' + FORGED.encode() + b'"}}'
    elif variant == "sse":
        kind = "text/event-stream"
        body = b"event: error\ndata: " + body + b"\n\n"
    elif variant == "gzip":
        body = gzip.compress(body)
        extra = "content-encoding: gzip\r\n"
    head = (
        f"HTTP/1.1 {status} Bad {key}\r\ncontent-type: {kind}\r\ncontent-length: {len(body)}\r\n"
        f"x-echo-key: {key}\r\nwww-authenticate: Bearer error=invalid_key, key={key}\r\n"
        f"retry-after: 1\r\n{extra}\r\n"
    )
    return head.encode() + body


@pytest.fixture(scope="module")
def upstream() -> Iterator[RawUpstream]:
    up = RawUpstream()
    loop = asyncio.new_event_loop()
    ready = threading.Event()

    conns: list[_UpstreamConn] = []
    servers: list[asyncio.Server] = []

    def make() -> _UpstreamConn:
        conns.append(_UpstreamConn(up))
        return conns[-1]

    async def start() -> None:
        servers.append(await loop.create_server(make, "127.0.0.1", 0))
        up.port = servers[0].sockets[0].getsockname()[1]
        ready.set()

    async def stop() -> None:
        servers[0].close()
        for conn in conns:
            if conn.transport is not None:
                conn.transport.abort()
        await asyncio.sleep(0)
        await servers[0].wait_closed()

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(start(), loop).result(5)
    assert ready.is_set()
    try:
        yield up
    finally:
        asyncio.run_coroutine_threadsafe(stop(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


# -- the gateway process ----------------------------------------------------------------


@dataclass
class Gateway:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    def rss(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _channels(upstream_port: int) -> dict[str, object]:
    url = f"http://127.0.0.1:{upstream_port}"
    channels: list[dict[str, object]] = [
        {"name": "main", "baseUrl": url, "apiKeys": [_key("main")], "priority": 1}
    ]
    names = [f"e{s}{v}" for s in ERROR_STATUSES for v in ERROR_VARIANTS] + ["log429", "log500", "log529"]
    channels += [{"name": n, "baseUrl": url, "apiKeys": [_key(n)], "priority": 10} for n in names]
    down = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    channels.append({"name": "down", "baseUrl": down, "apiKeys": [_key("down")], "priority": 20})
    return {"channels": channels}


@contextlib.contextmanager
def _running_gateway(upstream: RawUpstream, tmp: Path) -> Iterator[Gateway]:
    """``python -m ccx_proxy serve`` with the test limits, logging at DEBUG to a file."""
    config = tmp / "channels.json"
    config.write_text(json.dumps(_channels(upstream.port)))
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLIENT_", "PROXY_", "EXTRA_PROXY"))}
    env.update(
        PROXY_ACCESS_KEY=ACCESS_KEY,
        CLIENT_HEADER_TIMEOUT_MS=str(int(HEAD_TIMEOUT * 1000)),
        CLIENT_BODY_TIMEOUT_MS=str(int(BODY_TIMEOUT * 1000)),
        CLIENT_WRITE_TIMEOUT_MS=str(int(WRITE_TIMEOUT * 1000)),
        LOG_LEVEL="DEBUG",
        CONFIG_WATCH_INTERVAL_MS="0",
        WORKERS="",
    )
    log = tmp / "gateway.stderr"
    with log.open("wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ccx_proxy", "serve", "--config", str(config), "--port", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env=env,
            cwd=REPO,
        )
    gw = Gateway(proc, port, log)
    try:
        deadline = time.monotonic() + 15
        while True:
            assert proc.poll() is None, gw.log_text()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the gateway did not start"
                time.sleep(0.05)
        yield gw
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def gateway(upstream: RawUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """One gateway for the whole module (the last test greps its whole log)."""
    with _running_gateway(upstream, tmp_path_factory.mktemp("adversarial")) as gw:
        yield gw


@pytest.fixture
def fresh_gateway(upstream: RawUpstream, tmp_path: Path) -> Iterator[Gateway]:
    """A gateway of its own, for a memory figure no earlier test's heap can blur."""
    with _running_gateway(upstream, tmp_path) as gw:
        yield gw


# -- raw HTTP ---------------------------------------------------------------------------


def _request(
    path: str = "/v1/messages",
    *,
    key: str | None = ACCESS_KEY,
    body: bytes = b"",
    extra: str = "",
    method: str = "POST",
) -> bytes:
    auth = f"x-api-key: {key}\r\n" if key is not None else ""
    length = f"Content-Length: {len(body)}\r\n" if method == "POST" else ""
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: gw\r\n{auth}Content-Type: application/json\r\n{length}{extra}\r\n"
    )
    return head.encode() + body


def _message(model: str = "claude-haiku-4-5", stream: bool = False) -> bytes:
    return orjson.dumps(
        {"model": model, "max_tokens": 8, "stream": stream, "messages": [{"role": "user", "content": "hi"}]}
    )


async def _open(gw: Gateway) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", gw.port)


async def _response(reader: asyncio.StreamReader, within: float = 5.0) -> tuple[int, bytes, bytes]:
    """One response off a raw socket: status, raw head, body (Content-Length or chunked)."""
    async with asyncio.timeout(within):
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        lower = head.lower()
        if b"transfer-encoding: chunked" in lower:
            parts = []
            while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
                parts.append(await reader.readexactly(size + 2))
            await reader.readuntil(b"\r\n")
            return status, head, b"".join(p[:-2] for p in parts)
        at = lower.find(b"content-length:")
        length = int(lower[at + 15 : lower.find(b"\r\n", at)]) if at >= 0 else 0
        return status, head, await reader.readexactly(length)


async def _exchange(gw: Gateway, raw: bytes, within: float = 5.0) -> tuple[int, bytes, bytes]:
    reader, writer = await _open(gw)
    try:
        writer.write(raw)
        return await _response(reader, within)
    finally:
        writer.close()


async def _closed_after(reader: asyncio.StreamReader, started: float, within: float) -> float:
    """Seconds from ``started`` until the gateway closes the connection (fails past ``within``)."""
    async with asyncio.timeout(within):
        try:
            while await reader.read(65536):
                pass
        except ConnectionResetError:
            pass
    return time.monotonic() - started


# -- 0. no key in any log line: the paths first (a fresh QuietLog budget), the whole log last --


async def test_no_key_in_any_log_line_at_debug(gateway: Gateway, upstream: RawUpstream) -> None:
    bearer = f"Authorization: Bearer {ACCESS_KEY}\r\n"
    cases: list[tuple[bytes, set[int]]] = [
        (_request(body=_message()), {200}),  # success, plain and streamed, both key headers
        (_request(body=_message(stream=True)), {200}),
        (_request(key=None, body=_message(), extra=bearer), {200}),
        (_request(key=None, body=_message()), {401}),  # missing, wrong, and the key plus a suffix
        (_request(key="wrong-key-123456", body=_message()), {401}),
        (_request(key=ACCESS_KEY + "X", body=_message()), {401}),
        (_request(key=None, body=_message(), extra=f"Authorization: Bearer {ACCESS_KEY}-no\r\n"), {401}),
        (f"GET /health HTTP/1.1\r\nHost: gw\r\nx-api-key {ACCESS_KEY}\r\n\r\n".encode(), {400}),  # malformed
        (f"GET /health HTTP/1.1\r\nHost: gw\r\nx-api-key: {ACCESS_KEY}\x01\r\n\r\n".encode(), {400}),
        (f"GET /health HTTP/1.1\r\nHost: gw\r\nx-api-key: {ACCESS_KEY}{'a' * 9000}\r\n\r\n".encode(), {431}),
        (f"GET /v1/{ACCESS_KEY} HTTX/1.1\r\nHost: gw\r\n\r\n".encode(), {400}),
        (f"GET /x?key={ACCESS_KEY} HTTP/1.1\r\nHost: gw\r\nx-api-key: {ACCESS_KEY}\r\n\r\n".encode(), {404}),
        (_request(body=b'{"model":"claude-haiku-4-5",', extra=""), {400}),
        (_request(body=_message(), extra="Content-Encoding: br\r\n"), {415}),
        (_request(body=_message(), extra="x-channel: log429\r\nx-adv: 429json\r\n"), {429}),  # upstream
        (_request(body=_message(), extra="x-channel: log500\r\nx-adv: 500json\r\n"), {500}),
        (_request(body=_message(), extra="x-channel: log529\r\nx-adv: 529json\r\n"), {529}),
        (_request(body=_message(stream=True), extra="x-channel: down\r\n"), {502, 503}),  # connection error
    ]
    for raw, statuses in cases:
        status, _, _ = await _exchange(gateway, raw)
        assert status in statuses, (raw[:80], status)
    # a body that stops arriving (408), with the key
    reader, writer = await _open(gateway)
    writer.write(_request(body=_message())[:-5])
    status, _, _ = await _response(reader, within=BODY_TIMEOUT + 3)
    writer.close()
    assert status == 408
    await asyncio.sleep(0.3)  # the last lines reach the file
    text = gateway.log_text()
    assert "upstream answered 429" in text and "upstream answered 500" in text  # the paths ran
    assert "bad request from" in text and "'down'" in text
    _assert_no_key(text)


def _assert_no_key(text: str) -> None:
    """No access key and no upstream key, nor all but their last 4 characters (a mask shows those)."""
    keys = [ACCESS_KEY, *(_key(n) for n in ("main", "log429", "log500", "log529", "down"))]
    keys += [_key(f"e{s}{v}") for s in ERROR_STATUSES for v in ERROR_VARIANTS]
    leaks = [line for line in text.splitlines() if any(k[:-4] in line for k in keys)]
    assert not leaks, leaks[:5]


# -- 1. unauthenticated floods cost O(1) memory and O(1) log lines --------------------


async def _wrong_key_flood(gw: Gateway, total: int, connections: int = 10, batch: int = 200) -> None:
    """``total`` wrong-key requests, pipelined ``batch`` at a time on ``connections`` keep-alive
    connections, each with a different wrong key; every answer must be a 401."""
    per_connection = total // connections

    async def one(index: int) -> None:
        reader, writer = await _open(gw)
        try:
            done = 0
            while done < per_connection:
                n = min(batch, per_connection - done)
                writer.write(
                    b"".join(
                        b"POST /v1/messages HTTP/1.1\r\nHost: gw\r\nx-api-key: wrong-%d-%08d\r\n"
                        b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}" % (index, done + i)
                        for i in range(n)
                    )
                )
                for _ in range(n):
                    status, _, _ = await _response(reader, within=10)
                    assert status == 401
                done += n
        finally:
            writer.close()

    await asyncio.gather(*(one(i) for i in range(connections)))


async def test_20000_wrong_key_requests_grow_rss_by_less_than_8_mb(gateway: Gateway) -> None:
    await _wrong_key_flood(gateway, 2_000)  # warm-up: allocator arenas, caches, code paths
    before = gateway.rss()
    await _wrong_key_flood(gateway, 20_000)
    growth = gateway.rss() - before
    assert growth < 8 * 1024 * 1024, f"RSS grew by {growth / 1048576:.1f} MB over 20,000 wrong-key requests"


async def test_a_wrong_key_flood_logs_a_bounded_number_of_lines(gateway: Gateway) -> None:
    before = len(gateway.log_text().splitlines())
    await _wrong_key_flood(gateway, 2_000, connections=4)
    await asyncio.sleep(0.2)
    added = len(gateway.log_text().splitlines()) - before
    assert added <= 25, f"{added} log lines for 2,000 wrong-key requests"


# -- 2. a gzip bomb is refused unread, and the gateway stays responsive ---------------------


@functools.cache
def _bomb() -> bytes:
    """~4 MB of gzip members of 16 MB of zeros each: ~4 GB inflated."""
    member = gzip.compress(b"\0" * (16 * 1024 * 1024), compresslevel=9)  # ~16 KB
    return member * (4 * 1024 * 1024 // len(member))


@pytest.mark.parametrize(
    "key, chunked, expected",
    [
        pytest.param(None, False, 401, id="no-key"),
        pytest.param(ACCESS_KEY, False, 415, id="key"),
        pytest.param(ACCESS_KEY, True, 415, id="key-chunked"),
    ],
)
async def test_health_answers_within_half_a_second_while_a_gzip_bomb_arrives(
    gateway: Gateway, upstream: RawUpstream, key: str | None, chunked: bool, expected: int
) -> None:
    seen = len(upstream.requests)
    rss_before = gateway.rss()
    bomb_bytes = _bomb()
    framing = "Transfer-Encoding: chunked\r\n" if chunked else f"Content-Length: {len(bomb_bytes)}\r\n"
    auth = f"x-api-key: {key}\r\n" if key else ""
    head = (
        f"POST /v1/messages HTTP/1.1\r\nHost: gw\r\n{auth}Content-Type: application/json\r\n"
        f"Content-Encoding: gzip\r\n{framing}\r\n"
    ).encode()
    sending = True

    async def bomb() -> int:
        """Sends the bomb on a plain socket until the gateway stops taking it; its status."""
        loop = asyncio.get_running_loop()
        sock = socket.socket()
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, ("127.0.0.1", gateway.port))
            await loop.sock_sendall(sock, head)
            try:
                for at in range(0, len(bomb_bytes), 65536):
                    piece = bomb_bytes[at : at + 65536]
                    await loop.sock_sendall(sock, b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
                    await asyncio.sleep(0.005)
            except OSError:
                pass  # refused and closed: the rest is not wanted
            answer = b""
            try:
                async with asyncio.timeout(5):
                    while b"\r\n\r\n" not in answer and (data := await loop.sock_recv(sock, 65536)):
                        answer += data
            except ConnectionResetError:
                pass
            return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0
        finally:
            sock.close()

    async def probe() -> list[float]:
        took = []
        while sending or not took:
            started = time.monotonic()
            status, _, _ = await _exchange(gateway, _request("/health", method="GET", key=None), within=2.0)
            took.append(time.monotonic() - started)
            assert status == 200
            await asyncio.sleep(0.02)
        return took

    prober = asyncio.ensure_future(probe())
    try:
        statuses = await asyncio.gather(*(bomb() for _ in range(4)))
    finally:
        sending = False
        took = await prober
    assert statuses == [expected] * 4
    assert max(took) < 0.5, f"/health took up to {max(took):.3f} s"
    assert gateway.rss() - rss_before < 32 * 1024 * 1024  # nothing was inflated
    assert len(upstream.requests) == seen


# -- 3. clients that stop reading a stream, or leave it ----------------------------------

STALLED = 200


def _tcp_state(sock: socket.socket) -> int:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]  # tcpi_state; 1: ESTABLISHED


async def _big_streams(gw: Gateway, n: int) -> list[socket.socket]:
    """``n`` streams of 32 MB each started on plain sockets that read nothing (tiny buffers)."""
    loop = asyncio.get_running_loop()
    raw = _request(body=_message(stream=True), extra="x-adv: big\r\n")
    socks = []
    try:
        for _ in range(n):
            sock = socket.socket()
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
            sock.setblocking(False)
            await loop.sock_connect(sock, ("127.0.0.1", gw.port))
            await loop.sock_sendall(sock, raw)
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


async def _all_started(upstream: RawUpstream, count: int, within: float = 10.0) -> None:
    async with asyncio.timeout(within):
        while upstream.big_started < count:
            await asyncio.sleep(0.02)


async def test_200_stalled_stream_clients_are_closed_and_the_upstream_released(
    gateway: Gateway, upstream: RawUpstream
) -> None:
    base_started, base_sent = upstream.big_started, len(upstream.big_sent)
    socks = await _big_streams(gateway, STALLED)
    try:
        await _all_started(upstream, base_started + STALLED)
        started = time.monotonic()  # every stream is under way; each stalls within moments
        # Closed WRITE_TIMEOUT after each stalled; the margin is for a loaded CI machine (200
        # streams filling their buffers on 2 cores): without the timeout they stay open forever.
        deadline = started + WRITE_TIMEOUT + 8.0
        while (still_open := sum(_tcp_state(s) == 1 for s in socks)) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        took = time.monotonic() - started
        assert still_open == 0, f"{still_open} of {STALLED} stalled clients still open after {took:.1f} s"
        async with asyncio.timeout(5):  # and the upstream connections are closed too
            while len(upstream.big_sent) - base_sent < STALLED:
                await asyncio.sleep(0.02)
        assert max(upstream.big_sent[base_sent:]) < BIG  # no response pulled to its end for nobody
    finally:
        for sock in socks:
            sock.close()


async def test_rss_per_stalled_stream_client_is_under_256_kb(
    fresh_gateway: Gateway, upstream: RawUpstream
) -> None:
    gw = fresh_gateway
    await _exchange(gw, _request(body=_message(stream=True)))  # warm-up: one stream end to end
    before = gw.rss()
    base_started = upstream.big_started
    socks = await _big_streams(gw, STALLED)
    try:
        peak = before
        deadline = time.monotonic() + 10
        while any(_tcp_state(s) == 1 for s in socks) and time.monotonic() < deadline:
            peak = max(peak, gw.rss())  # the stalled streams at their fullest, until they are closed
            await asyncio.sleep(0.02)
        assert upstream.big_started - base_started == STALLED
    finally:
        for sock in socks:
            sock.close()
    per_client = (peak - before) / STALLED
    assert per_client < 256 * 1024, f"{per_client / 1024:.0f} KB of RSS per stalled stream client"


async def test_streams_abandoned_mid_way_do_not_accumulate_rss(
    fresh_gateway: Gateway, upstream: RawUpstream
) -> None:
    gw = fresh_gateway
    after = []
    for _ in range(3):  # 100 clients start a 32 MB stream, stop reading, then leave
        base = upstream.big_started
        socks = await _big_streams(gw, 100)
        try:
            await _all_started(upstream, base + 100)
            await asyncio.sleep(0.3)  # the buffers fill
        finally:
            for sock in socks:
                sock.close()
        async with asyncio.timeout(5):
            while upstream.big_open:
                await asyncio.sleep(0.02)
        await asyncio.sleep(0.2)
        after.append(gw.rss())
    growth = after[-1] - after[0]  # the first round warms the heap up
    assert growth < 16 * 1024 * 1024, f"RSS after each round: {[f'{a / 1048576:.0f} MB' for a in after]}"


# -- 4. a head trickled a byte a second ---------------------------------------------------


@pytest.mark.parametrize("after_a_request", [False, True], ids=["fresh", "keep-alive"])
async def test_a_1_byte_per_second_head_is_closed_within_the_head_timeout(
    gateway: Gateway, after_a_request: bool
) -> None:
    reader, writer = await _open(gateway)
    if after_a_request:
        writer.write(_request("/health", method="GET", key=None))
        status, _, _ = await _response(reader)
        assert status == 200
    head = _request(body=_message())
    started = time.monotonic()

    async def trickle() -> None:
        for byte in head:
            writer.write(bytes([byte]))
            await asyncio.sleep(1.0)

    task = asyncio.ensure_future(trickle())
    try:
        took = await _closed_after(reader, started, within=HEAD_TIMEOUT + 3.0)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        writer.close()
    assert HEAD_TIMEOUT - 0.1 <= took < HEAD_TIMEOUT + 1.0


# -- 5. two "model" keys: the upstream never sees the second one ----------------------------


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b'{"model":"claude-haiku-4-5","model":"forbidden-model"}', id="plain"),
        pytest.param(
            b'{"model":"claude-haiku-4-5","max_tokens":8,"messages":[],"model":"forbidden-model"}', id="later"
        ),
        pytest.param(b'{"model":"claude-haiku-4-5","\\u006dodel":"forbidden-model"}', id="escaped"),
        pytest.param(b'{ "model" : "claude-haiku-4-5" , "model" : "forbidden-model" }', id="spaces"),
    ],
)
async def test_a_duplicate_model_never_reaches_the_upstream(
    gateway: Gateway, upstream: RawUpstream, body: bytes
) -> None:
    seen = len(upstream.requests)
    status, _, answer = await _exchange(gateway, _request(body=body))
    forwarded = [r.body for r in upstream.requests[seen:]]
    assert not any(b"forbidden-model" in b for b in forwarded), forwarded
    assert status == 400 and forwarded == [], (status, answer)


# -- 6. an upstream that echoes its key -------------------------------------------------------


@pytest.mark.parametrize("variant", ERROR_VARIANTS)
@pytest.mark.parametrize("status", ERROR_STATUSES)
async def test_no_upstream_key_reaches_the_client(
    gateway: Gateway, upstream: RawUpstream, status: int, variant: str
) -> None:
    name = f"e{status}{variant}"
    key = _key(name)
    seen = len(upstream.requests)
    got, head, body = await _exchange(
        gateway, _request(body=_message(), extra=f"x-channel: {name}\r\nx-adv: {status}{variant}\r\n")
    )
    assert any(r.headers.get("x-api-key") == key for r in upstream.requests[seen:]), (
        "the upstream was not asked"
    )
    assert got == (502 if status == 401 else status)
    plain = gzip.decompress(body) if body[:2] == b"\x1f\x8b" else body
    for where, text in (("head", head), ("body", body), ("decoded body", plain)):
        assert key[:-4].encode() not in text, f"{where}: {text[:400]!r}"


async def test_an_upstream_error_body_cannot_forge_log_lines(gateway: Gateway) -> None:
    raw = _request(body=_message(), extra="x-channel: log500\r\nx-adv: 500forge\r\n")
    status, _, _ = await _exchange(gateway, raw)
    assert status == 500
    await asyncio.sleep(0.2)
    forged = [line for line in gateway.log_text().splitlines() if line.startswith(FORGED)]
    assert not forged, forged


# -- last: the whole run's log ---------------------------------------------------------------


def test_no_key_in_the_whole_runs_log(gateway: Gateway) -> None:
    """Last: every line the module's gateway logged, at DEBUG, through every test above."""
    time.sleep(0.2)
    _assert_no_key(gateway.log_text())
