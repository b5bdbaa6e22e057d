"""systemd ``Type=notify``: readiness, reload and stop notices, and the watchdog.

systemd hands the service ``NOTIFY_SOCKET`` (a unix datagram socket; a leading ``@`` means
the abstract namespace) and, with ``WatchdogSec=``, ``WATCHDOG_USEC`` (and ``WATCHDOG_PID``).
Only the main process talks to it (``NotifyAccess=main``)::

    READY=1                          every worker listens; again once a SIGHUP reload is done
    RELOADING=1 + MONOTONIC_USEC=…   a SIGHUP reload begins (CLOCK_MONOTONIC, microseconds)
    STOPPING=1                       SIGTERM / SIGINT: the drain begins (ccx_proxy.ops.drain)
    WATCHDOG=1                       every WATCHDOG_USEC / 2, from the event loop

The watchdog ping is a ``loop.call_later`` timer, so an event loop that is stuck (a blocking
call, a busy loop) stops pinging and systemd restarts the service.

With ``serve --workers N`` the workers do not talk to systemd.  Each has a pipe to the
supervisor (its write end's number in ``CCX_WORKER_PIPE``) and writes one byte per event --
``L`` listening, ``R`` reload done, ``H`` heartbeat (every ``CCX_WORKER_BEAT_MS``, from its
event loop) -- and the supervisor (:mod:`ccx_proxy.workers`) turns them into the notices
above: READY=1 once all N listen, WATCHDOG=1 only while every worker's loop beats.

Without ``NOTIFY_SOCKET`` (and outside a supervisor) there is no notifier: nothing is sent.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping
from typing import Protocol

log = logging.getLogger("ccx_proxy.systemd")

WORKER_PIPE = "CCX_WORKER_PIPE"  # supervisor -> worker: the fd to report on
WORKER_BEAT = "CCX_WORKER_BEAT_MS"  # supervisor -> worker: heartbeat interval (unset: none)
SYSTEMD_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")  # never passed to workers

LISTENING, RELOADED, HEARTBEAT = b"L", b"R", b"H"


def send(address: str, message: str) -> bool:
    """One datagram to systemd's notify socket; False if it could not be sent.

    Never blocks (MSG_DONTWAIT): a notice is not worth stalling the event loop for."""
    if not address:
        return False
    target = "\0" + address[1:] if address.startswith("@") else address
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message.encode(), socket.MSG_DONTWAIT, target)
    except OSError as exc:
        log.warning("systemd notify (%s) failed: %s", message.split("\n", 1)[0], exc)
        return False
    return True


def monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def watchdog_interval(env: Mapping[str, str], pid: int | None = None) -> float | None:
    """Seconds between watchdog pings (WATCHDOG_USEC / 2), or None: no watchdog for this
    process (unset, 0, not a number, or WATCHDOG_PID names another process)."""
    raw = env.get("WATCHDOG_USEC", "").strip()
    if not raw.isdigit() or int(raw) == 0:
        return None
    owner = env.get("WATCHDOG_PID", "").strip()
    if owner and owner != str(os.getpid() if pid is None else pid):
        return None
    return int(raw) / 2_000_000


class Notifier(Protocol):
    """What the serve loop tells its manager (systemd, or the workers' supervisor)."""

    @property
    def interval(self) -> float | None:
        """Seconds between pings from the event loop (None: no watchdog)."""

    def ready(self, status: str = "") -> None: ...
    def reloading(self) -> None: ...
    def reloaded(self) -> None: ...
    def stopping(self) -> None: ...
    def ping(self) -> None: ...


class Systemd:
    """The main process, talking to systemd over ``NOTIFY_SOCKET``."""

    __slots__ = ("address", "_interval", "_stopping")

    def __init__(self, address: str, interval: float | None = None) -> None:
        self.address = address
        self._interval = interval
        self._stopping = False

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Systemd | None:
        address = env.get("NOTIFY_SOCKET", "").strip()
        return cls(address, watchdog_interval(env)) if address else None

    @property
    def interval(self) -> float | None:
        return self._interval

    def ready(self, status: str = "") -> None:
        if not self._stopping:  # a READY=1 after STOPPING=1 would confuse the manager
            send(self.address, f"READY=1\nSTATUS={status}" if status else "READY=1")

    def reloading(self) -> None:
        if not self._stopping:
            send(self.address, f"RELOADING=1\nMONOTONIC_USEC={monotonic_usec()}")

    def reloaded(self) -> None:
        self.ready()

    def stopping(self) -> None:
        if not self._stopping:
            self._stopping = True
            send(self.address, "STOPPING=1")

    def ping(self) -> None:
        send(self.address, "WATCHDOG=1")


class SupervisorPipe:
    """A worker of ``serve --workers N``: one byte per event to the supervisor's pipe."""

    __slots__ = ("fd", "_interval")

    def __init__(self, fd: int, interval: float | None = None) -> None:
        self.fd = fd
        self._interval = interval
        os.set_blocking(fd, False)  # a stuck supervisor must not stall this worker's loop

    @property
    def interval(self) -> float | None:
        return self._interval

    def _write(self, byte: bytes) -> None:
        try:
            os.write(self.fd, byte)
        except BlockingIOError:
            pass  # the supervisor is behind: it is stuck itself, or will read the bytes before
        except OSError:
            pass  # the supervisor is gone (this worker gets SIGTERM from PR_SET_PDEATHSIG)

    def ready(self, status: str = "") -> None:
        self._write(LISTENING)

    def reloading(self) -> None:
        pass  # the supervisor said RELOADING=1 when it forwarded the SIGHUP

    def reloaded(self) -> None:
        self._write(RELOADED)

    def stopping(self) -> None:
        pass  # the supervisor said STOPPING=1 when it forwarded the SIGTERM

    def ping(self) -> None:
        self._write(HEARTBEAT)


def for_process(env: Mapping[str, str]) -> Notifier | None:
    """This process's notifier: a worker's pipe, systemd's socket, or None (no manager)."""
    pipe = env.get(WORKER_PIPE, "").strip()
    if pipe.isdigit():
        beat = env.get(WORKER_BEAT, "").strip()
        return SupervisorPipe(int(pipe), int(beat) / 1000 if beat.isdigit() and int(beat) else None)
    return Systemd.from_env(env)


class Watchdog:
    """Calls ``ping`` now and every ``interval`` seconds from the event loop (a
    ``call_later`` timer): while the loop is stuck, no ping goes out."""

    __slots__ = ("_loop", "_interval", "_ping", "_handle")

    def __init__(self, loop: asyncio.AbstractEventLoop, interval: float, ping: Callable[[], None]) -> None:
        self._loop = loop
        self._interval = interval
        self._ping = ping
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> Watchdog:
        self._tick()
        return self

    def _tick(self) -> None:
        self._ping()
        self._handle = self._loop.call_later(self._interval, self._tick)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
