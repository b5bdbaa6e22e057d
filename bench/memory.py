"""Memory of the gateway as a process (RSS from /proc), printed as a small Markdown table.

* **idle keep-alive connection**: N clients each make one request, then stay connected and idle;
* **active stream**: N streams held open mid-stream by a slow upstream (one event a second),
  read by their clients;
* **stalled stream**: N clients start a 32 MB stream and read nothing (the figure is the peak
  while they are stalled; the gateway's write-stall timeout is set well past the measurement);
* **drift**: RSS growth over R requests (after a warm-up) with 2% wrong keys, per request.

Every figure comes from a freshly started gateway, so one measurement's heap does not blur the
next.  ``--baseline SRC_DIR`` (another checkout's ``src/``) or ``--baseline REF`` (a git ref,
extracted with ``git archive``, no worktree) measures that tree the same way, side by side.

    python bench/memory.py [--baseline 3c70b95] [--idle 1000] [--streams 200] [--stalled 200]
                           [--requests 50000]

The upstream is this script's own raw asyncio server, run as a separate process
(``python bench/memory.py upstream --port P``): a small JSON answer, a slow stream
(``x-mem: slow``) or 32 MB as fast as the reader takes it (``x-mem: big``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from procs import Proc, free_port, python

REPO = Path(__file__).resolve().parent.parent
ACCESS_KEY = "memory-bench-access-key-0123"
UPSTREAM_KEY = "sk-memory-bench-upstream-4567"
MB = 1024 * 1024

# -- the upstream (its own process) -------------------------------------------------------

JSON_BODY = b'{"type":"message","id":"msg_mem","role":"assistant","content":[{"type":"text","text":"hi"}]}'
JSON_ANSWER = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (
    len(JSON_BODY),
    JSON_BODY,
)
SLOW_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    + b"%x\r\n%s\r\n"
    % (
        len(ev := b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_mem"}}\n\n'),
        ev,
    )
)
_DELTA = (
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":{"text":"tick"}}\n\n'
)
SLOW_DELTA = b"%x\r\n%s\r\n" % (len(_DELTA), _DELTA)
_PIECE_HEAD = b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":{"text":"'
PIECE = _PIECE_HEAD + b"x" * (65536 - len(_PIECE_HEAD) - 5) + b'"}}\n\n'
BIG = 32 * MB
BIG_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: %d\r\n\r\n" % BIG


class _Upstream(asyncio.Protocol):
    def __init__(self) -> None:
        self.buf = b""
        self.transport: asyncio.Transport | None = None
        self.left = 0
        self.paused = False
        self.ticker: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.ticker is not None:
            self.ticker.cancel()

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

    def _tick(self) -> None:
        assert self.transport is not None
        if not self.transport.is_closing():
            self.transport.write(SLOW_DELTA)
            self.ticker = asyncio.get_running_loop().call_later(1.0, self._tick)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.buf += data
        while (end := self.buf.find(b"\r\n\r\n")) >= 0:
            head = self.buf[:end].lower()
            at = head.find(b"\r\ncontent-length:")
            line_end = head.find(b"\r\n", at + 2)
            size = int(head[at + 17 : line_end if line_end >= 0 else None]) if at >= 0 else 0
            if len(self.buf) < end + 4 + size:
                return
            self.buf = self.buf[end + 4 + size :]
            if b"\r\nx-mem: big" in head:
                self.transport.write(BIG_HEAD)
                self.left = BIG
                self._pump()
            elif b"\r\nx-mem: slow" in head:
                self.transport.write(SLOW_HEAD)
                self.ticker = asyncio.get_running_loop().call_later(1.0, self._tick)
            else:
                self.transport.write(JSON_ANSWER)


def serve_upstream(port: int) -> None:
    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(_Upstream, "127.0.0.1", port, backlog=4096)
        async with server:
            await server.serve_forever()

    try:
        import uvloop

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())


# -- clients --------------------------------------------------------------------------


def _request(key: str = ACCESS_KEY, stream: bool = False, extra: str = "") -> bytes:
    body = json.dumps(
        {
            "model": "claude-haiku-4-5",
            "max_tokens": 8,
            "stream": stream,
            "messages": [{"role": "user", "content": "hi"}],
        }
    ).encode()
    return (
        f"POST /v1/messages HTTP/1.1\r\nHost: gw\r\nx-api-key: {key}\r\ncontent-type: application/json\r\n"
        f"anthropic-version: 2023-06-01\r\n{extra}content-length: {len(body)}\r\n\r\n"
    ).encode() + body


async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    lower = head.lower()
    if b"transfer-encoding: chunked" in lower:
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            await reader.readexactly(size + 2)
        await reader.readuntil(b"\r\n")
    else:
        at = lower.find(b"content-length:")
        await reader.readexactly(int(lower[at + 15 : lower.find(b"\r\n", at)]) if at >= 0 else 0)
    return status


class Gateway:
    """One gateway process: ``source`` None runs this tree, else that ``src/``."""

    def __init__(self, name: str, source: Path | None, tmp: Path, config: Path) -> None:
        self.port = free_port()
        env = {
            "PROXY_ACCESS_KEY": ACCESS_KEY,
            "LOG_LEVEL": "WARNING",
            "WORKERS": "",
            "CONFIG_WATCH_INTERVAL_MS": "0",
            "CLIENT_WRITE_TIMEOUT_MS": "30000",  # stalled streams outlive their measurement
            "PYTHONPATH": str(source) if source else str(REPO / "src"),
        }
        argv = [python(), "-m", "ccx_proxy", "serve", "--config", str(config), "--port", str(self.port)]
        self.proc = Proc(name, argv, None, tmp, env, self.port)

    def rss(self) -> int:
        return self.proc.rss()

    async def open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.port)

    def stop(self) -> None:
        self.proc.stop()


async def _settle(gw: Gateway, seconds: float = 0.5) -> int:
    await asyncio.sleep(seconds)
    return gw.rss()


async def idle_connections(gw: Gateway, n: int) -> float:
    """Bytes of RSS per idle keep-alive connection that made one request."""
    await _warm(gw)
    before = await _settle(gw)
    conns = []

    async def one() -> None:
        reader, writer = await gw.open()
        conns.append(writer)
        writer.write(_request())
        assert await _read_response(reader) == 200

    for at in range(0, n, 100):
        await asyncio.gather(*(one() for _ in range(min(100, n - at))))
    after = await _settle(gw)
    for writer in conns:
        writer.close()
    return (after - before) / n


async def active_streams(gw: Gateway, n: int) -> float:
    """Bytes of RSS per stream held open mid-stream (a slow upstream), read by its client."""
    await _warm(gw)
    before = await _settle(gw)
    raw = _request(stream=True, extra="x-mem: slow\r\n")
    writers: list[asyncio.StreamWriter] = []
    readers: list[asyncio.Task[None]] = []

    async def drain(reader: asyncio.StreamReader) -> None:
        while await reader.read(65536):
            pass

    async def one() -> None:
        reader, writer = await gw.open()
        writers.append(writer)
        writer.write(raw)
        await reader.readuntil(b"message_start")  # the stream is under way
        readers.append(asyncio.ensure_future(drain(reader)))

    for at in range(0, n, 100):
        await asyncio.gather(*(one() for _ in range(min(100, n - at))))
    after = await _settle(gw, 1.5)  # a tick or so on every stream
    for task in readers:
        task.cancel()
    for writer in writers:
        writer.close()
    return (after - before) / n


async def stalled_streams(gw: Gateway, n: int) -> float:
    """Peak bytes of RSS per stalled stream: 32 MB offered, the client reads nothing."""
    await _warm(gw)
    loop = asyncio.get_running_loop()
    before = await _settle(gw)
    raw = _request(stream=True, extra="x-mem: big\r\n")
    socks = []
    peak = before
    for _ in range(n):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", gw.port))
        await loop.sock_sendall(sock, raw)
        socks.append(sock)
        peak = max(peak, gw.rss())
    deadline = time.monotonic() + 3.0  # the buffers fill up, then nothing moves
    while time.monotonic() < deadline:
        peak = max(peak, gw.rss())
        await asyncio.sleep(0.05)
    for sock in socks:
        sock.close()
    return (peak - before) / n


async def _load(gw: Gateway, total: int, bad_every: int, connections: int = 16, depth: int = 8) -> None:
    """``total`` non-streaming requests, pipelined ``depth`` deep on ``connections`` keep-alive
    connections; every ``bad_every``-th carries a wrong key."""
    good, bad = _request(), _request(key="wrong-key-0000")
    per = total // connections

    async def one(index: int) -> None:
        reader, writer = await gw.open()
        sent = 0
        while sent < per:
            batch = min(depth, per - sent)
            numbers = range(index * per + sent, index * per + sent + batch)
            writer.write(b"".join(bad if bad_every and i % bad_every == 0 else good for i in numbers))
            for i in numbers:
                status = await _read_response(reader)
                assert status == (401 if bad_every and i % bad_every == 0 else 200), status
            sent += batch
        writer.close()

    await asyncio.gather(*(one(i) for i in range(connections)))


async def _warm(gw: Gateway) -> None:
    await _load(gw, 400, 50, connections=4)


async def drift(gw: Gateway, total: int, bad_ratio: float) -> tuple[float, float]:
    """(bytes of RSS growth per request after a warm-up, requests per second)."""
    bad_every = round(1 / bad_ratio) if bad_ratio else 0
    await _load(gw, max(total // 10, 1000), bad_every)  # warm-up
    before = await _settle(gw)
    started = time.monotonic()
    await _load(gw, total, bad_every)
    took = time.monotonic() - started
    after = await _settle(gw)
    return (after - before) / total, total / took


# -- the run ----------------------------------------------------------------------------


def _source(ref: str, tmp: Path) -> Path:
    """A ``src/`` to run: a directory holding ccx_proxy/ as it is, else a git ref extracted."""
    if (Path(ref) / "ccx_proxy").is_dir():
        return Path(ref).resolve()
    dest = tmp / "baseline"
    dest.mkdir()
    archive = subprocess.run(["git", "archive", ref, "src"], capture_output=True, cwd=REPO, check=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest / "src"


def _kb(value: float) -> str:
    return f"{value / 1024:.1f} KB"


async def measure(
    name: str, source: Path | None, tmp: Path, config: Path, args: argparse.Namespace
) -> dict[str, str]:
    rows: dict[str, str] = {}
    steps: list[tuple[str, Callable[[Gateway], object]]] = [
        (
            f"idle keep-alive connection (N={args.idle}), per connection",
            lambda g: idle_connections(g, args.idle),
        ),
        (
            f"active stream, slow upstream (N={args.streams}), per stream",
            lambda g: active_streams(g, args.streams),
        ),
        (
            f"stalled stream, client not reading (N={args.stalled}), peak per stream",
            lambda g: stalled_streams(g, args.stalled),
        ),
        (
            f"drift over {args.requests:,} requests ({args.bad_ratio:.0%} bad keys), per request",
            lambda g: drift(g, args.requests, args.bad_ratio),
        ),
    ]
    for label, step in steps:
        gw = Gateway(name, source, tmp, config)
        try:
            rows.setdefault("RSS at start (fresh process)", f"{gw.rss() / MB:.1f} MB")
            result = await step(gw)  # type: ignore[misc]
        finally:
            gw.stop()
        if isinstance(result, tuple):
            per_request, rate = result
            rows[label] = (
                f"{per_request:.1f} B ({per_request * args.requests / MB:.1f} MB in all; {rate:,.0f} req/s)"
            )
        else:
            rows[label] = _kb(result)
        print(f"  {name}: {label}: {rows[label]}", file=sys.stderr, flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("mode", nargs="?", choices=["run", "upstream"], default="run")
    parser.add_argument("--port", type=int, help="upstream mode: the port")
    parser.add_argument("--baseline", help="another checkout's src/ directory, or a git ref")
    parser.add_argument("--idle", type=int, default=1000)
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--stalled", type=int, default=200)
    parser.add_argument("--requests", type=int, default=50_000)
    parser.add_argument("--bad-ratio", type=float, default=0.02)
    args = parser.parse_args()
    if args.mode == "upstream":
        serve_upstream(args.port)
        return 0
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(args.idle, args.streams, args.stalled) * 2 + 256
    if soft < want:  # the gateways inherit it
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="ccx-memory-") as name:
        tmp = Path(name)
        up_port = free_port()
        upstream = Proc(
            "upstream", [python(), __file__, "upstream", "--port", str(up_port)], None, tmp, None, up_port
        )
        config = tmp / "channels.json"
        channel = {"name": "up", "baseUrl": f"http://127.0.0.1:{up_port}", "apiKeys": [UPSTREAM_KEY]}
        config.write_text(json.dumps({"channels": [channel]}))
        try:
            columns = {"this tree": asyncio.run(measure("gateway", None, tmp, config, args))}
            if args.baseline:
                source = _source(args.baseline, tmp)
                columns[f"baseline ({args.baseline})"] = asyncio.run(
                    measure("baseline", source, tmp, config, args)
                )
        finally:
            upstream.stop()
    names = list(columns)
    print(f"| gateway RSS | {' | '.join(names)} |")
    print(f"|---|{'---:|' * len(names)}")
    for row in columns["this tree"]:
        print(f"| {row} | {' | '.join(columns[n].get(row, '-') for n in names)} |")
    print(
        f"\n({time.monotonic() - started:.0f} s; the gateway process's RSS from /proc; "
        "a fresh process for each row)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
