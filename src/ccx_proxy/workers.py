"""``serve --workers N``: N gateway processes sharing one port.

Each worker is an ordinary ``ccx-proxy serve`` process that binds the port with
``SO_REUSEPORT``, so the kernel spreads new connections across them and no
process hands sockets to another.  The parent only supervises: it checks the
port first (so a busy port is one clear error, and ``--port 0`` resolves to one
port for all), starts the workers, forwards SIGTERM / SIGINT / SIGHUP to them
(SIGHUP only to those that listen: one still starting has no handler for it yet),
and exits when they have exited: 0 after a clean stop, else the first failing
worker's status.  If a worker dies on its own, the others are stopped too: a
supervisor (systemd, Kubernetes) restarts the whole service, rather than this
process hiding a crash loop.

Workers share nothing at run time: each has its own upstream connections,
health and circuit-breaker state, session affinity and reload watcher.

Each worker reports to the parent over its own pipe, one byte per event (see
:mod:`ccx_proxy.ops.systemd`): listening, reload done, and a heartbeat from its event loop
when systemd's watchdog is on.  The parent alone talks to systemd (``NotifyAccess=main``):
READY=1 once every worker listens, RELOADING=1 then READY=1 around a SIGHUP reload,
STOPPING=1 on SIGTERM / SIGINT (each worker then drains: :mod:`ccx_proxy.ops.drain`), and
WATCHDOG=1 only while every worker's loop beats.
"""

from __future__ import annotations

import ctypes
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from types import FrameType

from .ops import systemd
from .ops.metrics import prepare_workers

log = logging.getLogger("ccx_proxy.workers")

_PR_SET_PDEATHSIG = 1
_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_TICK = 0.05  # seconds: how often the parent looks at its workers
_RELOAD_WAIT = 10.0  # seconds: READY=1 after a SIGHUP even if a worker never reported back


class WorkersError(Exception):
    """A bad ``--workers`` / ``WORKERS`` value; the message is one line."""


def worker_count(option: int | None, env: Mapping[str, str]) -> int:
    """``--workers`` wins over ``WORKERS``; default 1."""
    if option is None:
        raw = env.get("WORKERS", "").strip() or "1"
        if not raw.isdigit():
            raise WorkersError(f"WORKERS must be a whole number of processes, not {raw!r}")
        option = int(raw)
    if not 1 <= option <= 1024:
        raise WorkersError(f"--workers must be between 1 and 1024, not {option}")
    if option > 1 and not hasattr(socket, "SO_REUSEPORT"):
        raise WorkersError("--workers above 1 needs SO_REUSEPORT, which this platform lacks")
    return option


def reserve_port(host: str, port: int) -> socket.socket:
    """Bind (without listening) a SO_REUSEPORT socket on host:port.

    Proves the port is free for workers before any starts, and turns port 0 into
    a real one.  The socket never listens, so it never takes a connection; the
    parent keeps it until the end so the port stays ours between worker starts.
    """
    family, kind, proto, _, address = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    # A worker must not outlive a supervisor that was killed outright (SIGKILL).
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class Reports:
    """What the workers said over their pipes, turned into the parent's systemd notices."""

    def __init__(self, count: int, notifier: systemd.Systemd | None, now: float) -> None:
        self.count = count
        self.notifier = notifier
        self.interval = notifier.interval if notifier is not None else None  # watchdog pings
        self.listening: set[int] = set()
        self.ready = False
        self.beats = [now] * count  # the last heartbeat of each
        self.reload_waiting: set[int] | None = None  # workers yet to finish a SIGHUP reload
        self.reload_since = 0.0
        self.next_ping = now
        self.late = False  # a worker missed its heartbeat: pings held back (logged once)

    def feed(self, index: int, data: bytes, now: float) -> None:
        if systemd.HEARTBEAT in data:
            self.beats[index] = now
        if systemd.LISTENING in data:
            self.listening.add(index)
            self.beats[index] = now
        if systemd.RELOADED in data and self.reload_waiting is not None:
            self.reload_waiting.discard(index)

    def reload_begins(self, now: float) -> list[int]:
        """A SIGHUP: RELOADING=1 now; returns the workers to forward it to (those that
        listen: one still starting has no SIGHUP handler yet, and loads the file anyway)."""
        if self.notifier is not None:
            self.notifier.reloading()
        self.reload_waiting = set(self.listening)
        self.reload_since = now
        return sorted(self.listening)

    def tick(self, now: float, live: set[int]) -> None:
        notifier = self.notifier
        if not self.ready and len(self.listening) == self.count:
            self.ready = True
            log.info("all %d workers listening", self.count)
            if notifier is not None:
                notifier.ready(f"{self.count} workers listening")
        waiting = self.reload_waiting
        if waiting is not None and not (waiting & live and now - self.reload_since < _RELOAD_WAIT):
            if waiting & live:
                log.warning("workers %s did not report their reload: READY=1 anyway", sorted(waiting))
            self.reload_waiting = None
            if notifier is not None:
                notifier.reloaded()
        interval = self.interval
        if notifier is None or interval is None or now < self.next_ping:
            return
        # One still starting is not late: TimeoutStartSec covers it until READY=1.
        stuck = [i for i in sorted(live & self.listening) if now - self.beats[i] > interval]
        if stuck:
            if not self.late:
                self.late = True
                log.error(
                    "worker %s: no heartbeat for over %g s (its event loop is stuck): "
                    "holding back systemd's watchdog ping",
                    ", ".join(str(i) for i in stuck),
                    interval,
                )
            return  # looked at again next tick: the ping goes out as soon as all beat
        if self.late:
            self.late = False
            log.info("every worker beats again: watchdog pings resume")
        notifier.ping()
        self.next_ping = now + interval


def supervise(
    count: int,
    worker_argv: Callable[[int], list[str]],
    notifier: systemd.Systemd | None = None,
    env: Mapping[str, str] | None = None,
) -> int:
    """Run ``count`` workers to completion; returns the exit status for the parent."""
    workers: list[subprocess.Popen[bytes]] = []
    pipes: dict[int, int] = {}  # read end -> worker index
    reports = Reports(count, notifier, time.monotonic())
    stopping = False
    base_env = dict(os.environ if env is None else env)
    for name in systemd.SYSTEMD_VARIABLES:  # NotifyAccess=main: only this process notifies
        base_env.pop(name, None)
    if reports.interval is not None:
        # Two beats per ping interval: a worker is late when it missed both.
        base_env[systemd.WORKER_BEAT] = str(max(1, round(reports.interval * 500)))

    def forward(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        targets = list(range(len(workers)))
        if signum == signal.SIGHUP:
            if stopping:
                return
            targets = reports.reload_begins(time.monotonic())
        elif not stopping:
            stopping = True
            if notifier is not None:
                notifier.stopping()
        for index in targets:
            worker = workers[index]
            if worker.returncode is None:
                try:
                    worker.send_signal(signum)
                except ProcessLookupError:
                    pass

    previous = {sig: signal.signal(sig, forward) for sig in _FORWARDED}
    status = 0
    try:
        for index in range(count):
            if stopping:
                break
            read_end, write_end = os.pipe()
            try:
                # Own session: a terminal's Ctrl-C reaches the parent only, which forwards it once.
                workers.append(
                    subprocess.Popen(
                        worker_argv(index),
                        start_new_session=True,
                        preexec_fn=_die_with_parent,
                        env={**base_env, systemd.WORKER_PIPE: str(write_end)},
                        pass_fds=(write_end,),
                    )
                )
            except BaseException:
                os.close(read_end)
                raise
            finally:
                os.close(write_end)  # the worker holds it: EOF here when the worker is gone
            os.set_blocking(read_end, False)
            pipes[read_end] = index
        log.info("started %d workers: pids %s", len(workers), " ".join(str(w.pid) for w in workers))
        running = set(range(len(workers)))
        while running:
            for index in sorted(running):
                code = workers[index].poll()
                if code is None:
                    continue
                running.discard(index)
                if not stopping:
                    log.error(
                        "worker %d (pid %d) exited with status %d: stopping the others",
                        index,
                        workers[index].pid,
                        code,
                    )
                    status = code or 1
                    forward(signal.SIGTERM, None)
                elif code != 0 and status == 0:
                    status = code
            if not running:
                break
            readable, _, _ = select.select(list(pipes), [], [], _TICK)
            now = time.monotonic()
            for fd in readable:
                try:
                    data = os.read(fd, 4096)
                except BlockingIOError:
                    continue
                if data:
                    reports.feed(pipes[fd], data, now)
                else:  # the worker closed its end: it is exiting (poll() sees it soon)
                    os.close(fd)
                    del pipes[fd]
            reports.tick(now, running)  # during the drain too: the watchdog stays fed
    finally:
        for fd in pipes:
            os.close(fd)
        for worker in workers:  # only reached with live workers if this process itself is failing
            if worker.poll() is None:
                worker.kill()
                worker.wait()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return status


def serve_workers(host: str, port: int, config_path: str, count: int) -> int:
    """``serve --workers N`` with N > 1: reserve the port, then supervise N workers."""
    try:
        reserved = reserve_port(host, port)
    except OSError as exc:
        print(f"ccx-proxy: cannot listen on {host}:{port}: {exc.strerror}", file=sys.stderr)
        return 1
    with reserved:
        port = reserved.getsockname()[1]
        base = ["--config", config_path, "--host", host, "--port", str(port), "--workers", "1"]

        def argv(index: int) -> list[str]:
            return [sys.executable, "-m", "ccx_proxy", "serve", *base, "--worker-index", str(index)]

        log.info("supervisor pid %d: %d workers on %s:%d (SO_REUSEPORT)", os.getpid(), count, host, port)
        env = dict(os.environ)
        cleanup = prepare_workers(env)  # PROMETHEUS_MULTIPROC_DIR for the workers, emptied
        try:
            return supervise(count, argv, systemd.Systemd.from_env(os.environ), env)
        finally:
            cleanup()
