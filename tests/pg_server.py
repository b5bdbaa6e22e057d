"""A throwaway PostgreSQL server for the tests: one cluster per test session, one fresh
database per test.

The cluster lives in a temporary directory, listens on 127.0.0.1 on a free port (and on a
Unix socket in the same directory), trusts every local connection and runs with
``fsync=off``: nothing in it outlives the session.  ``initdb`` refuses to run as root, so
under root the server runs as the ``postgres`` user (which the Debian package creates),
through ``runuser``.

No PostgreSQL binaries: the tests that need the server are skipped with the reason, except
when ``CCX_REQUIRE_SERVICES=1`` (CI): then they fail, so a CI image that lost its server
cannot pass silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REQUIRE_ENV = "CCX_REQUIRE_SERVICES"
_SEARCH = ("/usr/lib/postgresql", "/usr/local/pgsql/bin", "/opt/homebrew/bin", "/usr/local/bin")
START_TIMEOUT_S = 60


def find_bindir() -> Path | None:
    """The directory holding initdb, pg_ctl and postgres: PG_BINDIR, Debian's newest
    /usr/lib/postgresql/N/bin, or the PATH."""
    explicit = os.environ.get("PG_BINDIR")
    candidates: list[Path] = [Path(explicit)] if explicit else []
    debian = Path(_SEARCH[0])
    if debian.is_dir():
        versions = sorted(
            (p for p in debian.iterdir() if p.name.isdigit()), key=lambda p: int(p.name), reverse=True
        )
        candidates += [p / "bin" for p in versions]
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(Path(on_path).parent)
    candidates += [Path(p) for p in _SEARCH[1:]]
    for bindir in candidates:
        if all((bindir / name).is_file() for name in ("initdb", "pg_ctl", "postgres")):
            return bindir
    return None


def unavailable(reason: str) -> None:
    """Skip, or fail where the services are required (CI)."""
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{reason} ({REQUIRE_ENV}=1: PostgreSQL is required here)", pytrace=False)
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PostgresServer:
    """A running cluster: ``url(name)`` for a database in it, ``admin`` statements on
    the ``postgres`` database (outside any transaction: CREATE/DROP DATABASE)."""

    bindir: Path
    root: Path
    port: int
    prefix: list[str]

    @property
    def data(self) -> Path:
        return self.root / "data"

    def url(self, database: str = "postgres", user: str = "postgres", password: str | None = None) -> str:
        auth = f"{user}:{password}" if password is not None else user
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{database}"

    def admin(self, *statements: str, database: str = "postgres") -> list[list[Any]]:
        """Run statements one by one with asyncpg on a loop of their own (never the test's)."""
        import asyncpg

        async def go() -> list[list[Any]]:
            conn = await asyncpg.connect(self.url(database), timeout=10)
            try:
                return [[tuple(r) for r in await conn.fetch(s)] for s in statements]
            finally:
                await conn.close()

        loop = asyncio.new_event_loop()
        try:
            return loop.run_until_complete(go())
        finally:
            loop.close()

    def ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.prefix, str(self.bindir / "pg_ctl"), "-D", str(self.data), *args],
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT_S,
            check=False,
        )


def start(bindir: Path) -> PostgresServer:
    root = Path(tempfile.mkdtemp(prefix="ccx-pg-"))
    prefix: list[str] = []
    if os.geteuid() == 0:
        runuser = shutil.which("runuser")
        if runuser is None:
            raise RuntimeError("running as root and no runuser to start PostgreSQL as 'postgres'")
        try:
            import pwd

            pwd.getpwnam("postgres")
        except KeyError:
            raise RuntimeError("running as root and no 'postgres' user to run PostgreSQL as") from None
        shutil.chown(root, "postgres", "postgres")
        prefix = [runuser, "-u", "postgres", "--"]
    init = subprocess.run(
        [*prefix, str(bindir / "initdb"), "-D", str(root / "data"), "-U", "postgres", "-A", "trust",
         "-E", "UTF8", "--no-sync", "--no-instructions"],
        capture_output=True, text=True, timeout=START_TIMEOUT_S, check=False,
    )  # fmt: skip
    if init.returncode != 0:
        raise RuntimeError(f"initdb failed: {init.stderr.strip() or init.stdout.strip()}")
    for attempt in range(3):  # the free port may be taken between the probe and the bind
        server = PostgresServer(bindir, root, _free_port(), prefix)
        options = (
            f"-k {root} -c listen_addresses=127.0.0.1 -p {server.port} -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
        )
        started = server.ctl("-o", options, "-l", str(root / "server.log"), "-w", "-t", "60", "start")
        if started.returncode == 0:
            return server
        if attempt == 2:
            log = (root / "server.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"pg_ctl start failed: {started.stderr.strip()}\n{log}")
    raise AssertionError("unreachable")


def stop(server: PostgresServer) -> None:
    with contextlib.suppress(Exception):
        server.ctl("-m", "immediate", "-w", "stop")
    shutil.rmtree(server.root, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    """The session's PostgreSQL cluster (skips, or fails under CCX_REQUIRE_SERVICES=1,
    when there is none to start)."""
    bindir = find_bindir()
    if bindir is None:
        unavailable("PostgreSQL is not installed (no initdb/pg_ctl/postgres; set PG_BINDIR)")
        raise AssertionError("unreachable")
    try:
        import asyncpg  # noqa: F401
    except ImportError:
        unavailable("asyncpg is not installed (pip install -e '.[test]')")
    try:
        server = start(bindir)
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        unavailable(f"cannot start a PostgreSQL server from {bindir}: {exc}")
        raise AssertionError("unreachable") from None
    try:
        yield server
    finally:
        stop(server)


_NUMBERS = itertools.count(1)


@pytest.fixture
def pg_url(pg_server: PostgresServer) -> Iterator[str]:
    """A fresh, empty database for one test (dropped afterwards, its connections with it)."""
    name = f"ccx_test_{os.getpid()}_{next(_NUMBERS)}"
    pg_server.admin(f"CREATE DATABASE {name} TEMPLATE template0")
    try:
        yield pg_server.url(name)
    finally:
        pg_server.admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
