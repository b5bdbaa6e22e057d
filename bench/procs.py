"""Processes under test: start them pinned to CPUs, wait for their port, read
their CPU time and memory from /proc, stop them."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def cpu_list(cpus: Sequence[int]) -> str:
    return ",".join(str(c) for c in cpus)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process {proc.args!r} exited with {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on port {port} after {timeout:g}s")


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def tree(pid: int) -> list[int]:
    """pid and all its descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(_children(p))
    return out


def cpu_seconds(pids: Sequence[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime + stime
    return total / CLK_TCK


def cpu_split(pids: Sequence[int]) -> tuple[float, float]:
    """(user, system) CPU seconds of the processes."""
    user = system = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        user += int(fields[11])
        system += int(fields[12])
    return user / CLK_TCK, system / CLK_TCK


def rss_bytes(pids: Sequence[int]) -> int:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/statm").read_text().split()
        except OSError:
            continue
        total += int(fields[1]) * PAGE
    return total


class Proc:
    """A started process: pinned with taskset where available, output to a log file."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        cpus: Sequence[int] | None,
        log_dir: Path,
        env: dict[str, str] | None = None,
        port: int | None = None,
    ) -> None:
        self.name = name
        if cpus and shutil.which("taskset"):
            argv = ["taskset", "-c", cpu_list(cpus), *argv]
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("wb")
        self.popen = subprocess.Popen(
            argv, stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
        if port is not None:
            try:
                wait_port(port, self.popen)
            except RuntimeError:
                self.stop()
                raise RuntimeError(f"{name} did not start; see {self.log_path}") from None

    @property
    def pids(self) -> list[int]:
        # taskset execs the command in place, so the pid is the command's own
        return tree(self.popen.pid)

    def cpu(self) -> float:
        return cpu_seconds(self.pids)

    def cpu_split(self) -> tuple[float, float]:
        return cpu_split(self.pids)

    def rss(self) -> int:
        return rss_bytes(self.pids)

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._log.close()
        return self.popen.returncode


def find_program(name: str, package: str, install: bool) -> str | None:
    """``name``'s path; with install, apt-get ``package`` when missing (Debian/Ubuntu, as root)."""
    path = shutil.which(name)
    if path or not install or not shutil.which("apt-get"):
        return path
    print(f"{name} is missing: apt-get install -y {package}", flush=True)
    subprocess.run(["apt-get", "update", "-qq"], check=False)
    subprocess.run(["apt-get", "install", "-y", "-qq", package], check=False)
    return shutil.which(name)


def python() -> str:
    return sys.executable
