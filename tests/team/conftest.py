"""The team tests run against SQLite and, where a module opts in, PostgreSQL too.

A module opts in with ``pytestmark = pytest.mark.backends("sqlite", "postgresql")``; a
test narrows it with its own ``@pytest.mark.backends("sqlite")`` (a test that inspects the
SQLite file itself, with a PostgreSQL counterpart in ``test_postgres.py``).  Such tests get
the ``backend`` fixture once per backend, and ``start_gateway`` here points the gateway at
that backend: the same test bodies run against both.  Modules that do not opt in see
SQLite only, as before, with unchanged test ids.

PostgreSQL is a real server (``tests/pg_server.py``): a throwaway cluster for the session,
a fresh database per test.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ccx_proxy.team.db import Connection, Target, open_connection, path_in
from tests.conftest import GatewayFactory
from tests.pg_server import pg_server, pg_url  # noqa: F401  (fixtures, used by name)

BACKENDS = ("sqlite", "postgresql")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "backends(*names): run the test once per team database backend (sqlite, postgresql)"
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    marker = metafunc.definition.get_closest_marker("backends")
    if marker is not None and "backend" in metafunc.fixturenames:
        unknown = set(marker.args) - set(BACKENDS)
        assert not unknown, f"unknown backends {unknown}"
        metafunc.parametrize("backend", marker.args, indirect=True)


@pytest.fixture(autouse=True)
def _no_database_url_from_the_shell(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI reads DATABASE_URL: a developer's own must not point the tests elsewhere."""
    monkeypatch.delenv("DATABASE_URL", raising=False)


@dataclasses.dataclass
class Backend:
    """One team database for one test: a SQLite file in ``tmp_path``, or a fresh
    PostgreSQL database (``url``)."""

    kind: str
    tmp_path: Path
    url: str | None = None
    opened: list[Connection] = dataclasses.field(default_factory=list)

    @property
    def target(self) -> Target:
        return self.url or path_in(self.tmp_path)

    def connect(self) -> Any:
        """An open, migrated connection, closed after the test (sync tests only: the
        PostgreSQL one runs its own event loop)."""
        conn = open_connection(self.target)
        self.opened.append(conn)
        return conn

    def set_schema_version(self, conn: Any, version: int) -> None:
        if self.kind == "sqlite":
            conn.execute(f"PRAGMA user_version = {version}")
        else:
            conn.execute("UPDATE schema_version SET version = ?", (version,))

    @property
    def missing_table_words(self) -> str:
        """How the backend says that a table is not there."""
        return "no such table" if self.kind == "sqlite" else "does not exist"


@pytest.fixture
def backend(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Backend]:
    """The test's team database; PostgreSQL's URL is also in DATABASE_URL, so that the
    CLI (``ccx-proxy members ...``) finds the database the gateway uses, as it would."""
    kind = getattr(request, "param", "sqlite")
    url = request.getfixturevalue("pg_url") if kind == "postgresql" else None
    if url is not None:
        monkeypatch.setenv("DATABASE_URL", url)
    found = Backend(kind, tmp_path, url)
    try:
        yield found
    finally:
        for conn in found.opened:
            conn.close()


@pytest.fixture
def start_gateway(backend: Backend, start_gateway: GatewayFactory) -> GatewayFactory:
    """The gateway on the test's backend: a gateway given a DATA_DIR gets DATABASE_URL too
    when the backend is PostgreSQL.  (``backend`` first: set up before the gateway, so
    its database is dropped only after the gateway has stopped and flushed.)"""
    if backend.url is None:
        return start_gateway
    url = backend.url

    async def start(*channels: dict[str, Any], settings: Any = None, **kwargs: Any) -> Any:
        if settings is not None and settings.data_dir is not None:
            settings = dataclasses.replace(settings, database_url=url)
        return await start_gateway(*channels, settings=settings, **kwargs)

    return start  # type: ignore[return-value]
