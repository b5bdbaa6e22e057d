"""The embedded database: SQLite at ``DATA_DIR/ccx.db``, created and migrated on open.

WAL mode (readers never wait for the writer; several worker processes and the CLI share
the file), ``synchronous=NORMAL`` (a power cut may lose the last second of usage, never
corrupt the file), a 512 KiB page cache (the writes are appends), a busy timeout so a
writer waits a little for another process's lock instead of failing at once.  The
schema's version is ``PRAGMA user_version``; each entry of :data:`MIGRATIONS` takes the
schema one version up, in one transaction.

In the gateway every statement runs on one thread of its own (:class:`Database`): the
event loop only ever awaits a future.  The CLI uses :func:`connect` directly.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

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
    """The database cannot be opened or is newer than this gateway; one line for humans."""


def path_in(data_dir: str | Path) -> Path:
    return Path(data_dir) / FILENAME


def connect(path: str | Path, *, create: bool = True) -> sqlite3.Connection:
    """An open, migrated connection (autocommit off: callers commit)."""
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
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute(f"PRAGMA cache_size=-{CACHE_KIB}")  # the page cache's bound, in KiB
        conn.execute("PRAGMA foreign_keys=ON")
        migrate(conn)
    except sqlite3.Error as exc:
        raise DatabaseError(f"cannot open the database {path}: {exc}") from None
    return conn


def migrate(conn: sqlite3.Connection) -> int:
    """Apply the migrations the file lacks; the schema version it ends at."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise DatabaseError(
            f"the database is at schema version {version}, newer than this gateway's "
            f"{SCHEMA_VERSION}: upgrade ccx-proxy"
        )
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
    """One connection on one thread of its own: statements never run on the event loop."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ccx-db")
        self._conn: sqlite3.Connection | None = None

    @property
    def is_open(self) -> bool:
        return self._conn is not None

    async def open(self) -> None:
        """Connect and migrate (on the database thread); raises :class:`DatabaseError`."""
        self._conn = await self.run_raw(lambda: connect(self.path))

    async def run_raw(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """``fn(connection)`` on the database thread."""
        conn = self._conn
        if conn is None:
            raise DatabaseError(f"the database {self.path} is not open")
        return await self.run_raw(lambda: fn(conn))

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self._executor.submit(conn.close).result()
        self._executor.shutdown(wait=True)


def transaction(conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], T]) -> T:
    """``fn`` inside BEGIN IMMEDIATE ... COMMIT (rolled back if it raises)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = fn(conn)
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return result
