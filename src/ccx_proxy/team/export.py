"""``ccx-proxy usage export --to postgresql://...``: a SQLite history into PostgreSQL.

Copies the members (their key hashes and prefixes: a key never exists in clear), the
per-request usage rows (with their ids), the daily totals and ``members_version`` from a
``ccx.db`` into a PostgreSQL database, which is migrated first.

**One transaction.**  The target's tables are locked against writers, everything is
copied in batches of :data:`BATCH_ROWS` rows (binary COPY), the counts and sums of both
sides are compared, and only then is it committed: a failed or interrupted export leaves
the target exactly as it was, so it can simply be run again.  The source is read from one
snapshot (a running gateway may go on writing to it).

A target that already holds members or usage is refused (nothing is copied) unless
``replace`` is given: then its members, usage rows and daily totals are deleted first, in
the same transaction.  ``members_version`` ends above both sides' values, so every gateway
already running against the target reloads its member index.
"""

from __future__ import annotations

import contextlib
import math
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .db import DatabaseError, connect, display
from .pg import PgConnection
from .pg import connect as pg_connect
from .recorder import DAILY_TOTALS, Record

BATCH_ROWS = 5000
LOCK_TIMEOUT_S = 30.0  # a gateway writing to the target: its transaction ends well within this

MEMBER_COLUMNS = (
    "name",
    "key_hash",
    "key_prefix",
    "status",
    "limits",
    "models",
    "channels",
    "created_at",
    "updated_at",
    "last_used_at",
)
USAGE_COLUMNS = ("id", *Record._fields)
DAILY_COLUMNS = ("day", "member", "model", "channel", *DAILY_TOTALS)
_TOKENS = "input_tokens + output_tokens + cache_write_5m + cache_write_1h + cache_read"
# What must be equal on both sides after the copy (cost: to a millionth of a dollar).
CHECKS = {
    "members": "SELECT count(*), count(DISTINCT key_hash) FROM members",
    "usage": f"SELECT count(*), coalesce(sum({_TOKENS}), 0), coalesce(sum(cost_usd), 0) FROM usage",
    "usage_daily": (
        f"SELECT count(*), coalesce(sum(requests), 0), coalesce(sum({_TOKENS}), 0), "
        "coalesce(sum(cost_usd), 0) FROM usage_daily"
    ),
}


class ExportError(Exception):
    """An export that was refused or failed its check; nothing was written."""


@dataclass(frozen=True, slots=True)
class Counts:
    members: int
    usage: int
    daily: int
    members_version: int
    replaced: bool


def _same(mine: Sequence[Any], theirs: Sequence[Any]) -> bool:
    """Counts and token sums exactly; USD sums to a millionth (summed in another order)."""
    return len(mine) == len(theirs) and all(
        math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-6)
        if isinstance(a, float) or isinstance(b, float)
        else a == b
        for a, b in zip(mine, theirs, strict=True)
    )


def _batches(
    source: sqlite3.Connection, table: str, key: str, columns: tuple[str, ...], size: int
) -> Iterator[list[tuple[Any, ...]]]:
    """The table's rows in ``key`` order, ``size`` at a time (keyset paging: no OFFSET)."""
    last: Any = None
    listed = ", ".join(columns)
    while True:
        if last is None:
            sql = f"SELECT {key}, {listed} FROM {table} ORDER BY {key} LIMIT ?"
            rows = source.execute(sql, (size,)).fetchall()
        else:
            sql = f"SELECT {key}, {listed} FROM {table} WHERE {key} > ? ORDER BY {key} LIMIT ?"
            rows = source.execute(sql, (last, size)).fetchall()
        if not rows:
            return
        last = rows[-1][0]
        yield [row[1:] for row in rows]
        if len(rows) < size:
            return


def _contents(conn: Any) -> tuple[int, int, int]:
    row = conn.execute(
        "SELECT (SELECT count(*) FROM members), (SELECT count(*) FROM usage), "
        "(SELECT count(*) FROM usage_daily)"
    ).fetchone()
    return int(row[0]), int(row[1]), int(row[2])


def copy(
    source: sqlite3.Connection,
    target: PgConnection,
    *,
    replace: bool = False,
    batch: int = BATCH_ROWS,
) -> Counts:
    """Copy in one target transaction (see the module's docstring); both connections open
    and migrated."""
    source.execute("BEGIN")  # one snapshot of the source for the whole copy
    try:
        target.execute("BEGIN IMMEDIATE")
        try:
            counts = _copy(source, target, replace, batch)
            target.execute("COMMIT")
        except BaseException:
            target.execute("ROLLBACK")
            raise
    finally:
        source.execute("COMMIT")
    return counts


def _copy(
    source: sqlite3.Connection,
    target: PgConnection,
    replace: bool,
    batch: int,
) -> Counts:
    target.execute(f"SET LOCAL lock_timeout = '{round(LOCK_TIMEOUT_S * 1000)}ms'")
    # Readers go on; writers (a gateway already pointed here) wait until the commit.
    target.execute("LOCK TABLE meta, members, usage, usage_daily IN EXCLUSIVE MODE")
    found = _contents(target)
    if any(found) and not replace:
        raise ExportError(
            f"{target.name} already holds {found[0]} member(s), {found[1]} usage row(s) and "
            f"{found[2]} daily total(s): nothing copied (--replace deletes them first)"
        )
    if any(found):
        target.execute("TRUNCATE usage, usage_daily, members RESTART IDENTITY")
    members = 0
    for rows in _batches(source, "members", "name", MEMBER_COLUMNS, batch):
        members += target.copy("members", MEMBER_COLUMNS, rows)
    usage = 0
    for rows in _batches(source, "usage", "id", USAGE_COLUMNS, batch):
        usage += target.copy("usage", USAGE_COLUMNS, rows)
    daily = 0
    for rows in _batches(source, "usage_daily", "rowid", DAILY_COLUMNS, batch):
        daily += target.copy("usage_daily", DAILY_COLUMNS, rows)
    # New rows continue after the copied ids.
    target.execute("SELECT setval(pg_get_serial_sequence('usage', 'id'), (SELECT max(id) FROM usage))")
    version = int(source.execute("SELECT value FROM meta WHERE key = 'members_version'").fetchone()[0])
    target.execute("UPDATE meta SET value = greatest(value + 1, ?) WHERE key = 'members_version'", (version,))
    new_version = int(target.execute("SELECT value FROM meta WHERE key = 'members_version'").fetchone()[0])
    for table, sql in CHECKS.items():
        mine, theirs = source.execute(sql).fetchone(), target.execute(sql).fetchone()
        if not _same(mine, theirs):
            raise ExportError(
                f"{table}: the copy does not match its source ({theirs} != {mine}): rolled back"
            )
    return Counts(members, usage, daily, new_version, bool(any(found)))


def export(source: Path, url: str, *, replace: bool = False, batch: int = BATCH_ROWS) -> Counts:
    """``usage export``: open both sides (the target migrated first) and :func:`copy`."""
    with contextlib.closing(connect(source, create=False)) as sqlite:
        target = pg_connect(url)
        try:
            return copy(sqlite, target, replace=replace, batch=batch)
        except sqlite3.Error as exc:
            raise DatabaseError(f"reading {display(source)}: {exc}") from None
        finally:
            target.close()
