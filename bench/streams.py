"""Many long streams at once: the client side of the bench's long-stream scenario.

Opens ``--count`` streaming requests (the fast upstream then sends a delta every
``--interval-ms``, stamped with its CLOCK_MONOTONIC send time), waits until
every stream is flowing, then records for ``--window-s`` seconds: delivery
delay (arrival minus send stamp, same machine, same clock) and the gap between
consecutive events of a stream.  Prints progress lines the harness acts on
(``OPEN``, ``WINDOW_START``, ``WINDOW_END``) and, last, one JSON line.

    python bench/streams.py --port 9000 --count 5000 --key ccx-bench-key
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import time
from array import array

from http1 import build_request
from latency import summary

_STAMP = re.compile(rb'"t":(\d+)\}')


class Recorder:
    def __init__(self, count: int) -> None:
        self.count = count
        self.flowing = 0
        self.recording = False
        self.delays = array("d")
        self.gaps = array("d")
        self.events = 0
        self.errors = 0
        self.all_flowing = asyncio.get_running_loop().create_future()


class StreamClient(asyncio.Protocol):
    __slots__ = ("rec", "request", "transport", "tail", "last", "status_ok", "started")

    def __init__(self, rec: Recorder, request: bytes) -> None:
        self.rec = rec
        self.request = request
        self.transport: asyncio.Transport | None = None
        self.tail = b""
        self.last = 0
        self.started = False
        self.status_ok = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(self.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        now = time.monotonic_ns()
        buf = self.tail + data if self.tail else data
        if not self.status_ok:
            if len(buf) < 12:
                self.tail = buf
                return
            if not buf.startswith(b"HTTP/1.1 200"):
                self.rec.errors += 1
                self.transport.close()  # type: ignore[union-attr]
                return
            self.status_ok = True
        end = 0
        rec = self.rec
        for match in _STAMP.finditer(buf):
            end = match.end()
            if not self.started:
                self.started = True
                rec.flowing += 1
                if rec.flowing == rec.count and not rec.all_flowing.done():
                    rec.all_flowing.set_result(None)
            elif rec.recording:
                rec.delays.append((now - int(match.group(1))) / 1000)
                rec.gaps.append((now - self.last) / 1000)
                rec.events += 1
            self.last = now
        self.tail = buf[end:][-256:]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.rec.recording:
            self.rec.errors += 1


async def run(args: argparse.Namespace) -> dict[str, object]:
    loop = asyncio.get_running_loop()
    rec = Recorder(args.count)
    headers = {
        "content-type": "application/json",
        "anthropic-version": "2023-06-01",
        "x-api-key": args.key,
        "x-bench-interval-ms": str(args.interval_ms),
        "x-bench-duration-ms": str(int((args.window_s + 120) * 1000)),
    }
    body = (
        b'{"model":"claude-sonnet-4-5","max_tokens":4096,"stream":true,'
        b'"messages":[{"role":"user","content":"go"}]}'
    )
    request = build_request("/v1/messages", f"127.0.0.1:{args.port}", headers, body)
    gate = asyncio.Semaphore(args.connect_concurrency)
    transports: list[asyncio.BaseTransport] = []

    async def open_one() -> None:
        async with gate:
            transport, _ = await loop.create_connection(
                lambda: StreamClient(rec, request), "127.0.0.1", args.port
            )
            transports.append(transport)

    started = loop.time()
    await asyncio.gather(*(open_one() for _ in range(args.count)))
    connected_s = loop.time() - started
    try:
        await asyncio.wait_for(asyncio.shield(rec.all_flowing), args.open_timeout_s)
    except TimeoutError:
        pass
    open_s = loop.time() - started
    print(f"OPEN {rec.flowing}", flush=True)
    await asyncio.sleep(args.settle_s)
    print("WINDOW_START", flush=True)
    rec.recording = True
    await asyncio.sleep(args.window_s)
    rec.recording = False
    print("WINDOW_END", flush=True)
    for transport in transports:
        transport.close()
    await asyncio.sleep(0.2)
    return {
        "streams": args.count,
        "flowing": rec.flowing,
        "connect_s": round(connected_s, 3),
        "open_s": round(open_s, 3),
        "window_s": args.window_s,
        "events": rec.events,
        "events_per_s": round(rec.events / args.window_s, 1),
        "errors": rec.errors,
        "delay_us": summary(list(rec.delays)),
        "gap_us": summary(list(rec.gaps)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--interval-ms", type=int, default=50)
    parser.add_argument("--window-s", type=float, default=4.0)
    parser.add_argument("--settle-s", type=float, default=1.0)
    parser.add_argument("--open-timeout-s", type=float, default=30.0)
    parser.add_argument("--connect-concurrency", type=int, default=64)
    args = parser.parse_args()
    try:
        import uvloop

        result = uvloop.run(run(args))
    except ImportError:  # pragma: no cover
        result = asyncio.run(run(args))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
