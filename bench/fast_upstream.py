"""A deliberately fast Anthropic-shaped upstream for the benchmarks.

Raw asyncio protocol on uvloop, responses pre-encoded once at start: the
upstream must never be what limits a measurement (the bench shows its direct
figures next to the gateway's to prove it).  HTTP/1.1 keep-alive and
pipelining; request bodies framed by ``Content-Length`` or chunked.

Every ``POST .../messages`` must carry ``x-api-key: <--key>`` (so the bench
also proves the gateway swapped the key in) and gets, by default, a ~6 KB SSE
stream (Anthropic's event sequence, 40 text deltas) in one write, chunked
like Anthropic's own.  Request headers change that:

* ``x-bench-framing: length`` -- the same bytes with ``Content-Length``;
* ``x-bench-interval-ms: M`` and ``x-bench-duration-ms: D`` -- a long
  stream: a delta every M ms for D ms, each carrying ``"t":<CLOCK_MONOTONIC
  ns>`` at send time, so a client on the same machine can measure delivery
  delay and inter-event gaps.

    python bench/fast_upstream.py --port 9001 [--procs K] [--key K]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import socket
import sys
import time

KEY = "bench-upstream-key"
DELTAS = 40
DELTA_TEXT = "Lorem ipsum dolor sit amet, "  # 28 bytes of text per delta


def _event(name: str, data: str) -> bytes:
    return f"event: {name}\ndata: {data}\n\n".encode()


HEAD_EVENTS = [
    _event(
        "message_start",
        '{"type":"message_start","message":{"id":"msg_bench_0001","type":"message","role":"assistant",'
        '"model":"bench-model","content":[],"stop_reason":null,"stop_sequence":null,'
        '"usage":{"input_tokens":25,"output_tokens":1}}}',
    ),
    _event(
        "content_block_start",
        '{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}',
    ),
    _event("ping", '{"type": "ping"}'),
]
DELTA_EVENT = _event(
    "content_block_delta",
    '{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"' + DELTA_TEXT + '"}}',
)
# A long stream's delta: the send time goes where %d is.
TIMED_DELTA = (
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
    b'"delta":{"type":"text_delta","text":"tick"},"t":%d}\n\n'
)
TAIL_EVENTS = [
    _event("content_block_stop", '{"type":"content_block_stop","index":0}'),
    _event(
        "message_delta",
        '{"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},'
        '"usage":{"output_tokens":40}}',
    ),
    _event("message_stop", '{"type":"message_stop"}'),
]
EVENTS = [*HEAD_EVENTS, *([DELTA_EVENT] * DELTAS), *TAIL_EVENTS]
SSE_BYTES = b"".join(EVENTS)

_COMMON = (
    b"content-type: text/event-stream; charset=utf-8\r\n"
    b"cache-control: no-cache\r\n"
    b"request-id: req_bench_0001\r\n"
    b"anthropic-organization-id: 00000000-0000-0000-0000-000000000000\r\n"
    b"anthropic-ratelimit-requests-limit: 4000\r\n"
    b"anthropic-ratelimit-requests-remaining: 3999\r\n"
    b"via: 1.1 google\r\n"
)


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\n" + _COMMON + b"transfer-encoding: chunked\r\n\r\n"
# One HTTP chunk per event, as a real upstream flushes them, all in one write.
CHUNKED_RESPONSE = CHUNKED_HEAD + b"".join(_chunk(e) for e in EVENTS) + b"0\r\n\r\n"
LENGTH_RESPONSE = (
    b"HTTP/1.1 200 OK\r\n" + _COMMON + b"content-length: %d\r\n\r\n" % len(SSE_BYTES) + SSE_BYTES
)
STREAM_HEAD = CHUNKED_HEAD + b"".join(_chunk(e) for e in HEAD_EVENTS)
STREAM_TAIL = b"".join(_chunk(e) for e in TAIL_EVENTS) + b"0\r\n\r\n"
_UNAUTHORIZED_BODY = b'{"type":"error","error":{"type":"authentication_error","message":"bad x-api-key"}}'
UNAUTHORIZED = (
    b"HTTP/1.1 401 Unauthorized\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
    % (len(_UNAUTHORIZED_BODY), _UNAUTHORIZED_BODY)
)
NOT_FOUND = b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"

_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)
_CHUNKED = re.compile(rb"\r\ntransfer-encoding:[ \t]*chunked", re.IGNORECASE)
_HEADER = re.compile(rb"\r\n(x-bench-[a-z-]+|x-api-key):[ \t]*([^\r\n]*)", re.IGNORECASE)


class _Stream:
    """A long stream: one timer, one delta per tick, then the tail."""

    __slots__ = ("transport", "interval", "end", "handle")

    def __init__(self, transport: asyncio.Transport, interval: float, duration: float) -> None:
        loop = asyncio.get_running_loop()
        self.transport = transport
        self.interval = interval
        self.end = loop.time() + duration
        transport.write(STREAM_HEAD)
        self.handle: asyncio.TimerHandle | None = loop.call_later(interval, self.tick)

    def tick(self) -> None:
        if self.transport.is_closing():
            self.handle = None
            return
        self.transport.write(_chunk(TIMED_DELTA % time.monotonic_ns()))
        loop = asyncio.get_running_loop()
        if loop.time() + self.interval > self.end:
            self.transport.write(STREAM_TAIL)
            self.handle = None
        else:
            self.handle = loop.call_later(self.interval, self.tick)

    @property
    def done(self) -> bool:
        return self.handle is None

    def cancel(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None


class UpstreamProtocol(asyncio.Protocol):
    __slots__ = ("transport", "buffer", "key", "stream")

    def __init__(self, key: bytes) -> None:
        self.key = key
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.stream: _Stream | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's are not asyncio.Transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.stream is not None:
            self.stream.cancel()

    def data_received(self, data: bytes) -> None:
        self.buffer = self.buffer + data if self.buffer else data
        while self.buffer:
            if self.stream is not None and not self.stream.done:
                return  # a long stream is still going: later requests wait (no pipelining over it)
            consumed = self._one_request(self.buffer)
            if consumed == 0:
                return
            self.buffer = self.buffer[consumed:]

    def _one_request(self, buf: bytes) -> int:
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return 0
        head = buf[: end + 2]
        body_at = end + 4
        if _CHUNKED.search(head):
            size = _chunked_length(buf, body_at)
            if size < 0:
                return 0
            consumed = size
        else:
            match = _CONTENT_LENGTH.search(head)
            consumed = body_at + (int(match.group(1)) if match else 0)
            if len(buf) < consumed:
                return 0
        assert self.transport is not None
        self._respond(head)
        return consumed

    def _respond(self, head: bytes) -> None:
        assert self.transport is not None
        line_end = head.find(b"\r\n")
        target = head[:line_end].split(b" ")[1] if line_end > 0 else b""
        if not target.split(b"?")[0].endswith(b"/messages"):
            self.transport.write(NOT_FOUND)
            return
        fields = {k.lower(): v for k, v in _HEADER.findall(head)}
        if fields.get(b"x-api-key") != self.key:
            self.transport.write(UNAUTHORIZED)
            return
        interval = fields.get(b"x-bench-interval-ms")
        if interval is not None:
            duration = int(fields.get(b"x-bench-duration-ms", b"5000"))
            self.stream = _Stream(self.transport, int(interval) / 1000, duration / 1000)
        elif fields.get(b"x-bench-framing") == b"length":
            self.transport.write(LENGTH_RESPONSE)
        else:
            self.transport.write(CHUNKED_RESPONSE)


def _chunked_length(buf: bytes, pos: int) -> int:
    """Bytes up to the end of a complete chunked body starting at pos, or -1."""
    while True:
        line_end = buf.find(b"\r\n", pos)
        if line_end < 0:
            return -1
        size = int(buf[pos:line_end].split(b";")[0], 16)
        pos = line_end + 2
        if size == 0:
            trailer_end = buf.find(b"\r\n\r\n", pos - 2)
            return -1 if trailer_end < 0 else trailer_end + 4
        pos += size + 2
        if pos > len(buf):
            return -1


async def serve(host: str, port: int, key: str, reuse_port: bool) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: UpstreamProtocol(key.encode()), host, port, reuse_port=reuse_port, backlog=4096
    )
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"fast upstream listening on {host}:{port} (pid {os.getpid()})", flush=True)
    async with server:
        await stop.wait()


def _run(host: str, port: int, key: str, reuse_port: bool) -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        asyncio.run(serve(host, port, key, reuse_port))
        return
    uvloop.run(serve(host, port, key, reuse_port))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--key", default=KEY)
    parser.add_argument("--procs", type=int, default=1, help="processes sharing the port (SO_REUSEPORT)")
    args = parser.parse_args()
    if args.procs <= 1:
        _run(args.host, args.port, args.key, False)
        return
    children = []
    for _ in range(args.procs):
        pid = os.fork()
        if pid == 0:
            _run(args.host, args.port, args.key, True)
            os._exit(0)
        children.append(pid)

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            try:
                os.kill(child, signum)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for child in children:
        os.waitpid(child, 0)
    sys.exit(0)


if __name__ == "__main__":
    main()
