"""``serve --workers N``: N gateway processes sharing one port.

Each worker is an ordinary ``ccx-proxy serve`` process that binds the port with
``SO_REUSEPORT``, so the kernel spreads new connections across them and no
process hands sockets to another.  The parent only supervises: it checks the
port first (so a busy port is one clear error, and ``--port 0`` resolves to one
port for all), starts the workers, forwards SIGTERM / SIGINT / SIGHUP to them,
and exits when they have exited: 0 after a clean stop, else the first failing
worker's status.  If a worker dies on its own, the others are stopped too: a
supervisor (systemd, Kubernetes) restarts the whole service, rather than this
process hiding a crash loop.

Workers share nothing at run time: each has its own upstream connections,
health and circuit-breaker state, session affinity and reload watcher.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from types import FrameType

log = logging.getLogger("ccx_proxy.workers")

_PR_SET_PDEATHSIG = 1
_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


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


def supervise(count: int, worker_argv: Callable[[int], list[str]]) -> int:
    """Run ``count`` workers to completion; returns the exit status for the parent."""
    workers: list[subprocess.Popen[bytes]] = []
    stopping = False

    def forward(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        if signum != signal.SIGHUP:
            stopping = True
        for worker in workers:
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
            # Own session: a terminal's Ctrl-C reaches the parent only, which forwards it once.
            workers.append(
                subprocess.Popen(worker_argv(index), start_new_session=True, preexec_fn=_die_with_parent)
            )
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
            time.sleep(0.05)
    finally:
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
        return supervise(count, argv)
