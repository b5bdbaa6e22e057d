"""Just enough HTTP/1.1 for the bench's own clients: build a request, tell when a
response is complete (``Content-Length`` or chunked), keep-alive.

The same client code measures the direct and the gateway paths, so its own cost
cancels out of every difference the bench reports.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass


def build_request(path: str, host: str, headers: dict[str, str], body: bytes) -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class ResponseTracker:
    """Fed the bytes of one response as they arrive; ``feed`` returns True once it is complete."""

    __slots__ = ("buf", "status", "head_len", "length", "chunked", "pos")

    def __init__(self) -> None:
        self.buf = b""
        self.status = 0
        self.head_len = -1
        self.length = -1
        self.chunked = False
        self.pos = 0  # chunked: offset of the next chunk-size line

    def feed(self, data: bytes) -> bool:
        self.buf += data
        if self.head_len < 0:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return False
            self.head_len = end + 4
            head = self.buf[:end].decode("latin-1").lower()
            self.status = int(head[9:12])
            for line in head.split("\r\n")[1:]:
                name, _, value = line.partition(":")
                if name == "content-length":
                    self.length = int(value)
                elif name == "transfer-encoding" and "chunked" in value:
                    self.chunked = True
            self.pos = self.head_len
        if not self.chunked:
            return len(self.buf) - self.head_len >= max(self.length, 0)
        buf = self.buf
        while True:
            line_end = buf.find(b"\r\n", self.pos)
            if line_end < 0:
                return False
            size = int(buf[self.pos : line_end].split(b";")[0], 16)
            if size == 0:
                return buf.endswith(b"\r\n\r\n") and len(buf) >= line_end + 4
            nxt = line_end + 2 + size + 2
            if nxt > len(buf):
                return False
            self.pos = nxt

    @property
    def body_bytes(self) -> int:
        return len(self.buf) - self.head_len


@dataclass
class Timing:
    status: int
    ttfb_ns: int
    total_ns: int
    size: int


class BlockingClient:
    """One keep-alive connection; one request at a time; nanosecond timings."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.sock: socket.socket | None = None

    def _connect(self) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout=30)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        return sock

    def request(self, raw: bytes) -> Timing:
        sock = self.sock or self._connect()
        tracker = ResponseTracker()
        t0 = time.perf_counter_ns()
        sock.sendall(raw)
        data = sock.recv(262144)
        t1 = time.perf_counter_ns()
        while data and not tracker.feed(data):
            data = sock.recv(262144)
        t2 = time.perf_counter_ns()
        if not data:
            self.close()
            raise ConnectionError("the server closed the connection mid-response")
        return Timing(tracker.status, t1 - t0, t2 - t0, tracker.body_bytes)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
