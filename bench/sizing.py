"""The sizing note of deploy/README.md: RSS and CPU of one gateway process (one worker) holding
N open, slowly ticking streams from the built-in mock upstream (run as its own process, so its
memory is not counted).

    make bench-sizing                                  # N = 0,500,1000,2000,4000,8000, 1 event/s
    .venv/bin/python bench/sizing.py 0,250,500,1000 50 # 20 events/s per stream

For each N: the gateway's VmRSS after 3 s of settling, its user + system CPU over the next 10 s,
and what the clients received; then RSS per open stream over the first row.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

from procs import cpu_seconds, free_port, python, wait_port

KEY = "sizing-access-key-0123456789"


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


async def main(levels: list[int], delay_ms: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 2 * max(levels) + 1000  # the clients' sockets are in this process
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))
    tmp = tempfile.mkdtemp(prefix="ccx-sizing-")
    mock_port, port = free_port(), free_port()
    config = os.path.join(tmp, "channels.json")
    with open(config, "w") as out:
        channel = {
            "name": "mock",
            "baseUrl": f"http://127.0.0.1:{mock_port}",
            "apiKeys": ["mock-upstream-key"],
        }
        json.dump({"channels": [channel]}, out)
    env = {
        **os.environ,
        "PROXY_ACCESS_KEY": KEY,
        "DATA_DIR": os.path.join(tmp, "data"),
        "LOG_LEVEL": "WARNING",
        "ACCESS_LOG": "off",
        "CONFIG_WATCH_INTERVAL_MS": "0",
        "WORKERS": "1",
    }
    cmd = [python(), "-m", "ccx_proxy"]
    quiet = {"env": env, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    mock = subprocess.Popen([*cmd, "mock-upstream", "--port", str(mock_port)], **quiet)
    gateway = subprocess.Popen([*cmd, "serve", "--port", str(port), "--config", config], **quiet)
    try:
        wait_port(mock_port, mock)
        wait_port(port, gateway)
        body = json.dumps({"model": "mock-sonnet", "max_tokens": 100000, "stream": True,
                           "messages": [{"role": "user", "content": "hi"}]}).encode()  # fmt: skip
        head = (
            f"POST /v1/messages HTTP/1.1\r\nHost: x\r\nx-api-key: {KEY}\r\ncontent-type: application/json\r\n"
            f"x-mock-deltas: 900\r\nx-mock-delta-bytes: 16\r\nx-mock-delay-ms: {delay_ms}\r\n"
            f"content-length: {len(body)}\r\n\r\n"
        ).encode() + body
        short = head.replace(b"x-mock-deltas: 900", b"x-mock-deltas: 3")
        for _ in range(20):  # warm-up: complete requests
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(short.replace(f"x-mock-delay-ms: {delay_ms}".encode(), b"x-mock-delay-ms: 0"))
            await reader.readuntil(b"message_stop")
            writer.close()
        await asyncio.sleep(1)
        writers: list[asyncio.StreamWriter] = []
        readers: list[asyncio.Task[None]] = []
        received = [0]

        async def drain(reader: asyncio.StreamReader) -> None:
            while data := await reader.read(65536):
                received[0] += len(data)

        async def one() -> None:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(head)
            await reader.readuntil(b"message_start")
            writers.append(writer)
            readers.append(asyncio.ensure_future(drain(reader)))

        rows = []
        for n in levels:
            while len(writers) < n:
                await asyncio.gather(*(one() for _ in range(min(100, n - len(writers)))))
            await asyncio.sleep(3)
            cpu0, t0, got0 = cpu_seconds([gateway.pid]), time.monotonic(), received[0]
            await asyncio.sleep(10)
            memory, cpu = rss(gateway.pid), (cpu_seconds([gateway.pid]) - cpu0) / (time.monotonic() - t0)
            rate = (received[0] - got0) / (time.monotonic() - t0)
            rows.append((n, memory))
            print(f"N={n:5d}  gateway RSS {memory / 2**20:7.1f} MiB  CPU {100 * cpu:5.1f}% of one core  "
                  f"clients received {rate / 1024:8.1f} KiB/s", flush=True)  # fmt: skip
        base_n, base_rss = rows[0]
        for n, memory in rows[1:]:
            print(
                f"N={n}: {(memory - base_rss) / (n - base_n) / 1024:.1f} KiB RSS per open stream "
                f"over N={base_n}"
            )
        for task in readers:
            task.cancel()
        for writer in writers:
            writer.close()
    finally:
        for proc in (gateway, mock):
            proc.terminate()
        for proc in (gateway, mock):
            proc.wait(10)


if __name__ == "__main__":
    counts = [int(x) for x in (sys.argv[1] if len(sys.argv) > 1 else "0,500,1000,2000,4000,8000").split(",")]
    asyncio.run(main(counts, int(sys.argv[2]) if len(sys.argv) > 2 else 1000))
