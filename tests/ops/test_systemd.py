"""systemd Type=notify: the sender, the loop-driven watchdog, the supervisor's bookkeeping, and
real ``ccx-proxy serve`` processes (one, and ``--workers 2``) talking to a fake NOTIFY_SOCKET."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import queue
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ccx_proxy.ops import systemd
from ccx_proxy.workers import Reports, supervise

from ..conftest import unused_port

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="unix sockets, /proc: Linux")
KEY = "systemd-test-key-0123456789"
WATCHDOG_USEC = 300_000  # pings every 0.15 s


@dataclass(frozen=True)
class Notice:
    at: float  # time.monotonic() when it arrived
    pid: int  # the sender (SCM_CREDENTIALS, as systemd checks NotifyAccess=main)
    message: str


class NotifySocket:
    """A fake systemd notify socket: a unix datagram socket in the test's directory; a thread
    stamps each datagram with its arrival time and its sender's pid."""

    def __init__(self, path: Path | str) -> None:
        self.address = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind("\0" + self.address[1:] if self.address.startswith("@") else self.address)
        self.sock.settimeout(0.05)
        self.notices: queue.Queue[Notice] = queue.Queue()
        self.seen: list[Notice] = []  # every notice, read or not
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
            except TimeoutError:
                continue
            except OSError:
                return
            pid = 0
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("3i", payload[:12])[0]
            notice = Notice(time.monotonic(), pid, data.decode())
            self.seen.append(notice)
            self.notices.put(notice)

    async def next(self, timeout: float = 15.0) -> Notice:
        try:
            return await asyncio.to_thread(self.notices.get, timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no notice within {timeout} s") from None

    async def until(self, prefix: str, timeout: float = 15.0) -> tuple[Notice, list[Notice]]:
        """The first notice that starts with ``prefix``, and those before it."""
        deadline = time.monotonic() + timeout
        seen: list[Notice] = []
        while True:
            notice = await self.next(max(0.01, deadline - time.monotonic()))
            if notice.message.startswith(prefix):
                return notice, seen
            seen.append(notice)

    def drain(self) -> list[Notice]:
        out = []
        while True:
            try:
                out.append(self.notices.get_nowait())
            except queue.Empty:
                return out

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Any:
    listener = NotifySocket(tmp_path / "notify")
    yield listener
    listener.close()


def serve_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    drop = ("PROXY_ACCESS_KEY", "WORKERS", "PORT", *systemd.SYSTEMD_VARIABLES, systemd.WORKER_PIPE)
    env = {k: v for k, v in os.environ.items() if k not in drop}
    return {**env, "PROXY_ACCESS_KEY": KEY, "DATA_DIR": str(tmp_path / "data"), **extra}


def write_config(tmp_path: Path, base_url: str = "http://127.0.0.1:1") -> Path:
    config = tmp_path / "channels.json"
    channel = {"name": "up", "baseUrl": base_url, "apiKeys": ["sk-upstream-key-0123456789"]}
    config.write_text(json.dumps({"channels": [channel]}))
    return config


def start_serve(tmp_path: Path, port: int, env: dict[str, str], *extra: str) -> subprocess.Popen[str]:
    argv = [sys.executable, "-m", "ccx_proxy", "serve", "--port", str(port)]
    return subprocess.Popen(
        [*argv, "--config", str(write_config(tmp_path)), *extra],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


async def stop(proc: subprocess.Popen[str]) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        _, stderr = await asyncio.to_thread(proc.communicate, timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return stderr


def listens(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


# -- the sender and the environment --------------------------------------------------------


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract-namespace"])
def test_send_reaches_the_notify_socket(tmp_path: Path, abstract: bool) -> None:
    address = f"@ccx-test-{os.getpid()}-{time.monotonic_ns()}" if abstract else str(tmp_path / "n")
    listener = NotifySocket(address)
    try:
        assert systemd.send(address, "READY=1\nSTATUS=ok")
        notice = listener.notices.get(timeout=5)
        assert notice.message == "READY=1\nSTATUS=ok" and notice.pid == os.getpid()
    finally:
        listener.close()


def test_send_without_a_socket_fails_quietly(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert systemd.send("", "READY=1") is False
    with caplog.at_level(logging.WARNING, "ccx_proxy.systemd"):
        assert systemd.send(str(tmp_path / "nobody-listens"), "READY=1") is False
    assert "systemd notify (READY=1) failed" in caplog.text
    assert systemd.for_process({}) is None  # no NOTIFY_SOCKET, no supervisor: nothing is sent
    assert systemd.Systemd.from_env({"NOTIFY_SOCKET": " "}) is None


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        pytest.param({}, None, id="unset"),
        pytest.param({"WATCHDOG_USEC": "30000000"}, 15.0, id="30s-pings-every-15s"),
        pytest.param({"WATCHDOG_USEC": "0"}, None, id="zero"),
        pytest.param({"WATCHDOG_USEC": "soon"}, None, id="not-a-number"),
        pytest.param({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "4242"}, 0.5, id="pid-matches"),
        pytest.param({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}, None, id="pid-of-another"),
    ],
)
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    assert systemd.watchdog_interval(env, pid=4242) == expected


def test_for_process_prefers_the_supervisor_pipe() -> None:
    read_end, write_end = os.pipe()
    try:
        env = {"NOTIFY_SOCKET": "/run/x", systemd.WORKER_PIPE: str(write_end), systemd.WORKER_BEAT: "250"}
        pipe = systemd.for_process(env)
        assert isinstance(pipe, systemd.SupervisorPipe) and pipe.interval == 0.25
        pipe.ready()
        pipe.reloading()  # nothing: the supervisor says RELOADING=1 itself
        pipe.reloaded()
        pipe.stopping()  # nothing: the supervisor says STOPPING=1 itself
        pipe.ping()
        assert os.read(read_end, 100) == b"LRH"
        for _ in range(100_000):  # a full pipe (a stuck supervisor) never blocks the worker
            pipe.ping()
        os.close(read_end)
        read_end = -1
        pipe.ping()  # nor does a supervisor that is gone
        direct = systemd.for_process({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "2000000"})
        assert isinstance(direct, systemd.Systemd) and direct.interval == 1.0
    finally:
        os.close(write_end)
        if read_end >= 0:
            os.close(read_end)


def test_nothing_but_stopping_after_stopping(notify_socket: NotifySocket) -> None:
    notifier = systemd.Systemd(notify_socket.address)
    notifier.stopping()
    notifier.ready()
    notifier.reloading()
    notifier.stopping()
    assert notify_socket.notices.get(timeout=5).message == "STOPPING=1"
    time.sleep(0.1)
    assert notify_socket.drain() == []


async def test_watchdog_pings_stop_while_the_loop_is_blocked(notify_socket: NotifySocket) -> None:
    loop = asyncio.get_running_loop()
    interval = 0.05
    notifier = systemd.Systemd(notify_socket.address, interval)
    watchdog = systemd.Watchdog(loop, interval, notifier.ping).start()
    try:
        await asyncio.sleep(0.3)
        blocked_at = time.monotonic()
        time.sleep(0.5)  # the event loop is stuck: a blocking call in a handler, say
        unblocked_at = time.monotonic()
        await asyncio.sleep(0.3)
    finally:
        watchdog.stop()
    pings = [n.at for n in notify_socket.drain() if n.message == "WATCHDOG=1"]
    before = [t for t in pings if t < blocked_at]
    during = [t for t in pings if blocked_at + interval < t < unblocked_at - 0.01]
    after = [t for t in pings if t > unblocked_at]
    assert len(before) >= 3 and len(after) >= 3, pings
    assert during == [], "a ping went out while the event loop was blocked"


# -- the supervisor's bookkeeping (serve --workers N) ------------------------------------


class FakeSystemd(systemd.Systemd):
    def __init__(self, interval: float | None) -> None:
        super().__init__("@unused", interval)
        self.sent: list[str] = []

    def ready(self, status: str = "") -> None:
        self.sent.append("READY=1")

    def reloading(self) -> None:
        self.sent.append("RELOADING=1")

    def ping(self) -> None:
        self.sent.append("WATCHDOG=1")


def test_supervisor_reports_ready_reload_and_watchdog(caplog: pytest.LogCaptureFixture) -> None:
    notifier = FakeSystemd(interval=1.0)
    reports = Reports(2, notifier, now=0.0)
    live = {0, 1}
    reports.feed(0, b"L", 0.1)
    reports.tick(0.1, live)
    assert notifier.sent == ["WATCHDOG=1"]  # alive while starting; not ready: one listens
    reports.feed(1, b"LH", 0.2)
    reports.tick(0.2, live)
    assert notifier.sent == ["WATCHDOG=1", "READY=1"]
    notifier.sent.clear()
    # A reload: RELOADING=1 at once, READY=1 when both workers say they are done.
    assert reports.reload_begins(0.3) == [0, 1]
    reports.feed(0, b"R", 0.4)
    reports.tick(0.4, live)
    assert notifier.sent == ["RELOADING=1"]
    reports.feed(1, b"HR", 0.5)
    reports.tick(0.5, live)
    assert notifier.sent == ["RELOADING=1", "READY=1"]
    notifier.sent.clear()
    # The watchdog: one ping per interval while both beat; none while one is silent.
    reports.feed(0, b"H", 1.0)
    reports.feed(1, b"H", 1.0)
    reports.tick(1.15, live)  # the first went out at 0.1
    assert notifier.sent == ["WATCHDOG=1"]
    reports.tick(1.5, live)
    assert notifier.sent == ["WATCHDOG=1"]  # not yet due
    reports.feed(0, b"H", 2.0)  # worker 1 stays silent
    with caplog.at_level(logging.INFO, "ccx_proxy.workers"):
        reports.tick(2.2, live)
        reports.tick(2.6, live)
        assert notifier.sent == ["WATCHDOG=1"]
        assert caplog.text.count("worker 1: no heartbeat for over 1 s") == 1
        reports.feed(1, b"H", 2.7)
        reports.feed(0, b"H", 2.7)
        reports.tick(2.7, live)  # due since 2.15: goes out as soon as both beat again
    assert notifier.sent == ["WATCHDOG=1", "WATCHDOG=1"]
    assert "watchdog pings resume" in caplog.text
    # A worker that never reports its reload: READY=1 after the wait anyway.
    reports.reload_begins(3.0)
    reports.feed(0, b"R", 3.1)
    reports.tick(3.1, live)
    assert notifier.sent[-1] == "RELOADING=1"
    reports.tick(14.0, {0, 1})
    assert notifier.sent[-1] == "READY=1"


def test_supervisor_without_systemd_only_logs(caplog: pytest.LogCaptureFixture) -> None:
    reports = Reports(1, None, now=0.0)
    with caplog.at_level(logging.INFO, "ccx_proxy.workers"):
        reports.feed(0, b"L", 0.0)
        reports.tick(0.0, {0})
        assert reports.reload_begins(1.0) == [0]
        reports.tick(1.0, {0})  # the worker is still reloading
        assert reports.reload_waiting == {0}
        reports.tick(1.1, set())  # ... and exited: nothing to wait for
        assert reports.reload_waiting is None
    assert "all 1 workers listening" in caplog.text


FAKE_WORKER = """
import os, signal, sys, time
pipe = int(os.environ["CCX_WORKER_PIPE"])
if any(name in os.environ for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")):
    sys.exit(3)  # NotifyAccess=main: a worker must not see systemd's variables
signal.signal(signal.SIGHUP, lambda *_: os.write(pipe, b"R"))
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
os.write(pipe, b"L")
beat = int(os.environ["CCX_WORKER_BEAT_MS"]) / 1000
started = time.monotonic()
while True:
    time.sleep(beat)
    os.write(pipe, b"H")
    if sys.argv[1] == "0":  # worker 0 plays the operator: a reload, then a stop
        if started and time.monotonic() - started > 0.4:
            os.kill(os.getppid(), signal.SIGHUP)
            started = 0
        elif not started:
            time.sleep(0.3)
            os.kill(os.getppid(), signal.SIGTERM)
"""


def test_supervise_in_process(notify_socket: NotifySocket) -> None:
    """The supervisor's loop with two stand-in workers (they report over their pipes and
    signal the supervisor, i.e. this process, themselves)."""
    notifier = systemd.Systemd(notify_socket.address, 0.1)
    env = {**os.environ, "NOTIFY_SOCKET": notify_socket.address, "WATCHDOG_USEC": "200000"}

    def argv(index: int) -> list[str]:
        return [sys.executable, "-c", FAKE_WORKER, str(index)]

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    assert supervise(2, argv, notifier, env) == 0
    assert {sig: signal.getsignal(sig) for sig in before} == before  # handlers given back
    messages = [n.message for n in notify_socket.drain()]
    kinds = [m.split("\n")[0] for m in messages if m != "WATCHDOG=1"]
    assert kinds == ["READY=1", "RELOADING=1", "READY=1", "STOPPING=1"], messages
    assert messages.count("WATCHDOG=1") >= 3


# -- real processes ---------------------------------------------------------------------


@pytest.mark.timeout(40)
async def test_serve_tells_systemd_ready_reloading_stopping_and_pings(
    tmp_path: Path, notify_socket: NotifySocket
) -> None:
    port = unused_port()
    env = serve_env(tmp_path, NOTIFY_SOCKET=notify_socket.address, WATCHDOG_USEC=str(WATCHDOG_USEC))
    proc = start_serve(tmp_path, port, env)
    try:
        ready, _ = await notify_socket.until("READY=1")
        assert ready.message == f"READY=1\nSTATUS=listening on 127.0.0.1:{port}"
        assert listens(port)  # READY=1 comes after the socket listens
        await notify_socket.until("WATCHDOG=1", timeout=5)
        last, _ = await notify_socket.until("WATCHDOG=1", timeout=5)
        pings = [last.at]
        for _ in range(3):
            pings.append((await notify_socket.until("WATCHDOG=1", timeout=5))[0].at)
        gaps = [b - a for a, b in zip(pings, pings[1:], strict=False)]
        assert all(0.1 < gap < 0.5 for gap in gaps), gaps  # WATCHDOG_USEC / 2 = 0.15 s apart

        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        proc.send_signal(signal.SIGHUP)
        reloading, _ = await notify_socket.until("RELOADING=1", timeout=10)
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        lines = reloading.message.split("\n")
        assert lines[0] == "RELOADING=1" and lines[1].startswith("MONOTONIC_USEC=")
        assert before <= int(lines[1].removeprefix("MONOTONIC_USEC=")) <= after
        ready_again, between = await notify_socket.until("READY=1", timeout=10)
        assert ready_again.message == "READY=1"
        assert all(n.message == "WATCHDOG=1" for n in between)

        proc.send_signal(signal.SIGTERM)
        stopping, _ = await notify_socket.until("STOPPING=1", timeout=10)
        stderr = await stop(proc)
    finally:
        if proc.poll() is None:
            await stop(proc)
    assert proc.returncode == 0, stderr
    assert "reloaded" in stderr and "SIGHUP" in stderr
    assert {n.pid for n in notify_socket.seen} == {proc.pid}


@pytest.mark.timeout(60)
async def test_workers_parent_tells_systemd_when_all_listen_and_holds_pings_for_a_stuck_worker(
    tmp_path: Path, notify_socket: NotifySocket
) -> None:
    from ..test_workers import _children, _listening_inodes, _socket_inodes

    port = unused_port()
    env = serve_env(tmp_path, NOTIFY_SOCKET=notify_socket.address, WATCHDOG_USEC=str(WATCHDOG_USEC))
    proc = start_serve(tmp_path, port, env, "--workers", "2")
    stopped: int | None = None
    try:
        ready, _ = await notify_socket.until("READY=1", timeout=30)
        assert ready.message == "READY=1\nSTATUS=2 workers listening"
        workers = _children(proc.pid)
        assert len(workers) == 2
        listening = _listening_inodes(port)
        assert all(_socket_inodes(w) & listening for w in workers)  # both listen at READY=1
        await notify_socket.until("WATCHDOG=1", timeout=5)

        proc.send_signal(signal.SIGHUP)
        await notify_socket.until("RELOADING=1", timeout=10)
        await notify_socket.until("READY=1", timeout=10)

        # One worker's loop is stuck (SIGSTOP stands in for a blocking call): no more pings.
        await notify_socket.until("WATCHDOG=1", timeout=5)
        stopped = workers[1]
        os.kill(stopped, signal.SIGSTOP)
        stuck_at = time.monotonic()
        await asyncio.sleep(1.0)
        late = [n for n in notify_socket.drain() if n.message == "WATCHDOG=1" and n.at > stuck_at + 0.35]
        assert late == [], "the parent pinged while a worker's loop was stuck"
        os.kill(stopped, signal.SIGCONT)
        stopped = None
        await notify_socket.until("WATCHDOG=1", timeout=5)  # the pings resume

        proc.send_signal(signal.SIGTERM)
        await notify_socket.until("STOPPING=1", timeout=10)
        stderr = await stop(proc)
    finally:
        if stopped is not None:
            os.kill(stopped, signal.SIGCONT)
        if proc.poll() is None:
            await stop(proc)
    assert proc.returncode == 0, stderr
    assert stderr.count("reloaded") == 2  # each worker reloaded before READY=1
    assert "no heartbeat" in stderr and "watchdog pings resume" in stderr
    # NotifyAccess=main: every notice came from the parent, none from a worker.
    assert {n.pid for n in notify_socket.seen} == {proc.pid}
