"""The embedded database: SQLite at ``DATA_DIR/ccx.db``, created and migrated on open.

WAL mode (readers never wait for the writer; several worker processes and the CLI share
the file), ``synchronous=NORMAL`` (a power cut may lose the last second of usage, never
corrupt the file), a 512 KiB page cache (the writes are appends), a busy timeout so a
writer waits a little for another process's lock instead of failing at once.  The
schema's version is ``PRAGMA user_version``; each entry of :data:`MIGRATIONS` takes the
schema one version up, in one transaction.

In the gateway every statement runs on one thread of its own (:class:`Database`): the
event loop only ever awaits a future.  The CLI uses :func:`open_connection` directly.

With ``DATABASE_URL=postgresql://...`` the same schema and statements live in PostgreSQL
instead (:mod:`ccx_proxy.team.pg`): a database *target* is a path (SQLite) or such a URL,
and the code above the :class:`Connection` interface does not know which.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol, TypeVar

T = TypeVar("T")

FILENAME = "ccx.db"
BUSY_TIMEOUT_S = 2.0
CACHE_KIB = 512  # SQLite's page cache per connection (its default is 2,000 KiB)

MIGRATIONS: tuple[str, ...] = (
    # 1: members, usage rows, daily totals
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
    INSERT INTO meta (key, value) VALUES ('members_version', 0);
    CREATE TABLE members (
        name TEXT PRIMARY KEY,
        key_hash TEXT NOT NULL UNIQUE,
        key_prefix TEXT NOT NULL,
        status TEXT NOT NULL DEFAULT 'active',
        limits TEXT NOT NULL DEFAULT '{}',
        models TEXT NOT NULL DEFAULT '[]',
        channels TEXT NOT NULL DEFAULT '[]',
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        last_used_at REAL
    );
    CREATE TABLE usage (
        id INTEGER PRIMARY KEY,
        ts REAL NOT NULL,
        request_id TEXT NOT NULL,
        member TEXT NOT NULL,
        session TEXT,
        endpoint TEXT NOT NULL,
        channel TEXT,
        key_id TEXT,
        model TEXT,
        upstream_model TEXT,
        stream INTEGER NOT NULL,
        status INTEGER NOT NULL,
        error_type TEXT,
        outcome TEXT NOT NULL,
        attempts INTEGER NOT NULL,
        ttfb_ms REAL,
        duration_ms REAL NOT NULL,
        input_tokens INTEGER NOT NULL,
        output_tokens INTEGER NOT NULL,
        cache_write_5m INTEGER NOT NULL,
        cache_write_1h INTEGER NOT NULL,
        cache_read INTEGER NOT NULL,
        cost_usd REAL
    );
    CREATE INDEX usage_ts ON usage (ts);

    CREATE TABLE usage_daily (
        day TEXT NOT NULL,
        member TEXT NOT NULL,
        model TEXT NOT NULL,
        channel TEXT NOT NULL,
        requests INTEGER NOT NULL,
        errors INTEGER NOT NULL,
        input_tokens INTEGER NOT NULL,
        output_tokens INTEGER NOT NULL,
        cache_write_5m INTEGER NOT NULL,
        cache_write_1h INTEGER NOT NULL,
        cache_read INTEGER NOT NULL,
        cost_usd REAL NOT NULL,
        unpriced INTEGER NOT NULL,
        PRIMARY KEY (day, member, model, channel)
    );
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)


class DatabaseError(Exception):
    """The database cannot be opened or is newer than this gateway, or (PostgreSQL) a
    statement failed; one line for humans, never a password."""


class Cursor(Protocol):
    """What ``execute`` returns: the part of ``sqlite3.Cursor`` the team code uses."""

    @property
    def rowcount(self) -> int: ...

    @property
    def description(self) -> Any: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class Connection(Protocol):
    """The part of ``sqlite3.Connection`` the team code uses; :class:`~.pg.PgConnection`
    gives PostgreSQL the same."""

    def execute(self, sql: str, parameters: Sequence[Any] = ..., /) -> Cursor: ...

    def executemany(self, sql: str, seq_of_parameters: Iterable[Sequence[Any]], /) -> Cursor: ...

    def close(self) -> None: ...


Target = str | Path  # a SQLite file, or a postgresql:// URL


def dialect(conn: Connection) -> str:
    """``sqlite`` or ``postgresql``: for the few statements the two spell differently."""
    return str(getattr(conn, "dialect", "sqlite"))


def is_url(target: Target) -> bool:
    """Whether ``target`` is a PostgreSQL URL rather than a file."""
    from . import pg

    return pg.is_url(target)


def display(target: Target) -> str:
    """How a target may be named in a message: a path, or a URL with its password masked."""
    from . import pg

    return pg.mask(str(target)) if pg.is_url(target) else str(target)


def newer_schema(version: int) -> DatabaseError:
    return DatabaseError(
        f"the database is at schema version {version}, newer than this gateway's "
        f"{SCHEMA_VERSION}: upgrade ccx-proxy"
    )


def path_in(data_dir: str | Path) -> Path:
    return Path(data_dir) / FILENAME


def open_connection(target: Target, *, create: bool = True) -> Connection:
    """An open, migrated connection to a SQLite file or a PostgreSQL URL."""
    if is_url(target):
        from . import pg

        return pg.connect(str(target))
    return connect(target, create=create)


def connect(path: str | Path, *, create: bool = True) -> sqlite3.Connection:
    """An open, migrated SQLite connection (autocommit off: callers commit)."""
    conn = _open_sqlite(path, create)
    try:
        migrate(conn)
    except sqlite3.Error as exc:
        conn.close()
        raise DatabaseError(f"cannot open the database {path}: {exc}") from None
    except BaseException:
        conn.close()
        raise
    return conn


def _open_sqlite(path: str | Path, create: bool) -> sqlite3.Connection:
    path = Path(path)
    if create:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DatabaseError(f"cannot create the data directory {path.parent}: {exc.strerror}") from None
    elif not path.exists():
        raise DatabaseError(f"no database at {path} (start the gateway once, or check DATA_DIR)")
    try:
        conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, check_same_thread=False, isolation_level=None)
    except sqlite3.Error as exc:
        raise DatabaseError(f"cannot open the database {path}: {exc}") from None
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute(f"PRAGMA cache_size=-{CACHE_KIB}")  # the page cache's bound, in KiB
        conn.execute("PRAGMA foreign_keys=ON")
    except sqlite3.Error as exc:
        conn.close()
        raise DatabaseError(f"cannot open the database {path}: {exc}") from None
    return conn


def upgrade(target: Target) -> tuple[int, int]:
    """``ccx-proxy migrate``: apply the pending migrations; (from, to) schema versions."""
    if is_url(target):
        from . import pg

        conn = pg.PgConnection(str(target))
        try:
            conn.open()
            return pg.migrate(conn)
        finally:
            conn.close()
    sqlite = _open_sqlite(target, True)
    try:
        before = int(sqlite.execute("PRAGMA user_version").fetchone()[0])
        return before, migrate(sqlite)
    except sqlite3.Error as exc:
        raise DatabaseError(f"cannot migrate the database {target}: {exc}") from None
    finally:
        sqlite.close()


def migrate(conn: sqlite3.Connection) -> int:
    """Apply the migrations the file lacks; the schema version it ends at."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise newer_schema(version)
    for number in range(version, SCHEMA_VERSION):
        conn.execute("BEGIN IMMEDIATE")
        try:
            # The version may have moved while this process waited for the lock.
            if conn.execute("PRAGMA user_version").fetchone()[0] != number:
                conn.execute("ROLLBACK")
                continue
            for statement in MIGRATIONS[number].split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {number + 1}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    return SCHEMA_VERSION


class Database:
    """One connection on one thread of its own: statements never run on the event loop.

    ``target``: a SQLite file, or a PostgreSQL URL (``name`` is what messages show: the
    path, or the URL with its password masked; ``path`` is None for PostgreSQL)."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.url = str(target) if is_url(target) else None
        self.path = None if self.url else Path(target)
        self.name = display(target)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ccx-db")
        self._conn: Connection | None = None

    @property
    def is_open(self) -> bool:
        return self._conn is not None

    async def open(self) -> None:
        """Connect and migrate (on the database thread); raises :class:`DatabaseError`."""
        self._conn = await self.run_raw(lambda: open_connection(self.target))

    async def run_raw(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    async def run(self, fn: Callable[[Connection], T]) -> T:
        """``fn(connection)`` on the database thread."""
        conn = self._conn
        if conn is None:
            raise DatabaseError(f"the database {self.name} is not open")
        return await self.run_raw(lambda: fn(conn))

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self._executor.submit(conn.close).result()
        self._executor.shutdown(wait=True)


def transaction(conn: Connection, fn: Callable[[Connection], T]) -> T:
    """``fn`` inside BEGIN IMMEDIATE ... COMMIT (rolled back if it raises).  SQLite: the
    database's write lock is taken at once; PostgreSQL: READ COMMITTED (see
    :mod:`~ccx_proxy.team.pg`: writers that must exclude each other lock a row)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = fn(conn)
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return result
