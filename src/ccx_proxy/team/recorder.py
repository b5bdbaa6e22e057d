"""One usage record per request, written in batches on the database thread.

The request path appends a :class:`Record` to a list (bounded: past
:data:`MAX_PENDING` records waiting, new ones are dropped and counted).  Every
``interval`` seconds, and at shutdown, the list is swapped out and written in one
transaction: the rows, the daily totals (kept after ``USAGE_RETENTION_DAYS`` deletes
the rows), and each member's last use.  A failing write (a locked file, a PostgreSQL that
stalled or restarted) is tried once more with the next flush; failing again, the batch is
dropped: the records are counted in :attr:`Recorder.dropped` and logged at most once a
minute (at shutdown, always); the requests they describe were answered long before.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import time
from typing import NamedTuple

from .db import Connection, Database, dialect, transaction

# The summed columns of usage_daily (after its key: day, member, model, channel).
DAILY_TOTALS = (
    "requests",
    "errors",
    "input_tokens",
    "output_tokens",
    "cache_write_5m",
    "cache_write_1h",
    "cache_read",
    "cost_usd",
    "unpriced",
)

log = logging.getLogger("ccx_proxy.usage")

MAX_PENDING = 100_000
LOG_EVERY = 60.0
RETENTION_EVERY = 3600.0
RETENTION_BATCH = 20_000


class Record(NamedTuple):
    """One request, in the usage table's column order (a plain tuple: no per-row conversion
    on the way to ``executemany``, and the garbage collector stops tracking it)."""

    ts: float
    request_id: str
    member: str
    session: str | None
    endpoint: str  # "messages" | "count_tokens"
    channel: str | None
    key_id: str | None  # masked
    model: str | None  # as requested
    upstream_model: str | None  # as sent upstream (after mapping)
    stream: int  # 0 | 1
    status: int
    error_type: str | None
    outcome: str  # complete | error | client_left | upstream_cut | stalled | shutdown
    attempts: int
    ttfb_ms: float | None
    duration_ms: float
    input_tokens: int = 0
    output_tokens: int = 0
    cache_write_5m: int = 0
    cache_write_1h: int = 0
    cache_read: int = 0
    cost_usd: float | None = None

    @property
    def tokens(self) -> int:
        return (
            self.input_tokens
            + self.output_tokens
            + self.cache_write_5m
            + self.cache_write_1h
            + self.cache_read
        )


_COLUMNS = ", ".join(Record._fields)
_ROWS_PER_INSERT = 256  # 256 x 22 values: well under SQLite's 32,766 bound variables


@functools.lru_cache(maxsize=16)
def _insert(rows: int) -> str:
    """One INSERT of ``rows`` rows.  Many rows per statement, not executemany: the sqlite3
    module lets go of the GIL around every step, and a row per step would hand the GIL back
    and forth with the event loop thousands of times a second."""
    one = "(" + ", ".join("?" * len(Record._fields)) + ")"
    return f"INSERT INTO usage ({_COLUMNS}) VALUES " + ", ".join([one] * rows)


_DAILY = (
    "INSERT INTO usage_daily (day, member, model, channel, requests, errors, input_tokens, "
    "output_tokens, cache_write_5m, cache_write_1h, cache_read, cost_usd, unpriced) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (day, member, model, channel) DO UPDATE SET "
    # The stored row named by its table: PostgreSQL finds a bare ``requests`` ambiguous
    # beside ``excluded.requests`` (SQLite reads both spellings the same).
    + ", ".join(f"{c} = usage_daily.{c} + excluded.{c}" for c in DAILY_TOTALS)
)
# A member's last use only moves forward (two-argument max: SQLite's max, PostgreSQL's greatest).
_LAST_USED = {
    name: f"UPDATE members SET last_used_at = {fn}(coalesce(last_used_at, 0), ?) WHERE name = ?"
    for name, fn in (("sqlite", "max"), ("postgresql", "greatest"))
}


_DAYS: dict[int, str] = {}


def daily_key(record: Record) -> tuple[str, str, str, str]:
    number = int(record.ts // 86400)
    day = _DAYS.get(number)
    if day is None:
        if len(_DAYS) > 64:
            _DAYS.clear()
        day = _DAYS[number] = time.strftime("%Y-%m-%d", time.gmtime(record.ts))
    model = record.upstream_model or record.model or ""
    return day, record.member, model, record.channel or ""


def write_batch(conn: Connection, records: list[Record]) -> None:
    """Rows, daily totals and last use, in one transaction.  The daily totals and members
    are updated in key order: two processes writing batches at once (PostgreSQL: row
    locks, not one database lock) then lock rows in the same order and never deadlock."""
    daily: dict[tuple[str, str, str, str], list[float]] = {}
    last_used: dict[str, float] = {}
    for record in records:
        totals = daily.get(key := daily_key(record))
        if totals is None:
            totals = daily[key] = [0, 0, 0, 0, 0, 0, 0, 0.0, 0]
        totals[0] += 1
        totals[1] += record.status >= 400 or record.outcome != "complete"
        totals[2] += record.input_tokens
        totals[3] += record.output_tokens
        totals[4] += record.cache_write_5m
        totals[5] += record.cache_write_1h
        totals[6] += record.cache_read
        if record.cost_usd is not None:
            totals[7] += record.cost_usd
        elif record.tokens:
            totals[8] += 1
        last_used[record.member] = max(last_used.get(record.member, 0.0), record.ts)

    def write(conn: Connection) -> None:
        start = 0
        while start < len(records):
            # 256 rows at a time, the rest in powers of two: at most 9 distinct statements
            # (a prepared statement of 256 rows is large; one per remainder size would pile
            # up in the statement cache).
            size = min(_ROWS_PER_INSERT, 1 << ((len(records) - start).bit_length() - 1))
            part = records[start : start + size]
            conn.execute(_insert(size), list(itertools.chain.from_iterable(part)))
            start += size
        conn.executemany(_DAILY, [(*key, *totals) for key, totals in sorted(daily.items())])
        conn.executemany(_LAST_USED[dialect(conn)], [(ts, name) for name, ts in sorted(last_used.items())])

    transaction(conn, write)


def delete_before(conn: Connection, cutoff: float) -> int:
    """Per-request rows older than ``cutoff`` (daily totals stay), in bounded batches."""
    total = 0
    while True:
        deleted = conn.execute(
            "DELETE FROM usage WHERE id IN (SELECT id FROM usage WHERE ts < ? LIMIT ?)",
            (cutoff, RETENTION_BATCH),
        ).rowcount
        total += deleted
        if deleted < RETENTION_BATCH:
            return total


class Recorder:
    __slots__ = (
        "db",
        "interval",
        "retention_days",
        "dropped",
        "written",
        "_pending",
        "_last_log",
        "_last_prune",
        "_retrying",
    )

    def __init__(self, db: Database | None, interval: float = 0.5, retention_days: int = 90) -> None:
        self.db = db
        self.interval = interval
        self.retention_days = retention_days
        self.dropped = 0  # records lost (queue full, database failing, no database)
        self.written = 0
        self._pending: list[Record] = []
        self._last_log = 0.0
        self._retrying = False  # the pending list starts with a batch whose write failed once
        self._last_prune = 0.0

    def add(self, record: Record) -> None:
        if len(self._pending) >= MAX_PENDING:
            self._lost(1, "the queue of unwritten usage records is full")
            return
        self._pending.append(record)

    @property
    def pending(self) -> int:
        return len(self._pending)

    def _lost(self, count: int, why: str) -> None:
        self.dropped += count
        now = time.monotonic()
        if now - self._last_log >= LOG_EVERY:
            self._last_log = now
            log.error("usage records lost: %d (%d in all so far): %s", count, self.dropped, why)

    async def flush(self, final: bool = False) -> None:
        """Write what is pending now (one transaction); ``final``: the last one (at shutdown)."""
        batch, self._pending = self._pending, []
        if not batch:
            return
        db = self.db
        if db is None or not db.is_open:
            if final:
                self._last_log = -LOG_EVERY  # the last word is always logged
            self._lost(len(batch), "the usage database is not open (see the startup log)")
            return
        try:
            await db.run(lambda conn: write_batch(conn, batch))
        except Exception as exc:  # sqlite3.Error, DatabaseError, OSError: never the request's problem
            if not final and not self._retrying:  # a blip: once more with the next flush
                self._retrying = True
                kept = batch + self._pending
                self._pending = kept[:MAX_PENDING]
                if len(kept) > MAX_PENDING:
                    self._lost(len(kept) - MAX_PENDING, "the queue of unwritten usage records is full")
                return
            self._retrying = False
            if final:
                self._last_log = -LOG_EVERY
            self._lost(len(batch), f"writing to {db.name} failed: {exc}")
            return
        self._retrying = False
        self.written += len(batch)

    async def prune(self, now: float) -> None:
        if self.db is None or not self.db.is_open or now - self._last_prune < RETENTION_EVERY:
            return
        self._last_prune = now
        cutoff = now - self.retention_days * 86400
        try:
            deleted = await self.db.run(lambda conn: delete_before(conn, cutoff))
        except Exception as exc:
            log.error("pruning usage rows older than %d days failed: %s", self.retention_days, exc)
            return
        if deleted:
            log.info("usage: deleted %d request rows older than %d days", deleted, self.retention_days)

    async def run(self) -> None:
        """Flush every ``interval`` until cancelled (then once more, by :meth:`close`)."""
        while True:
            await asyncio.sleep(self.interval)
            await self.flush()
            await self.prune(time.time())
