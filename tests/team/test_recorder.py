"""The usage recorder: batches of any size, daily totals, bounded queue, retention; on
SQLite and on PostgreSQL (the ``backend`` fixture, tests/team/conftest.py)."""

from __future__ import annotations

import logging
import time

import pytest

from ccx_proxy.team import recorder as recorder_module
from ccx_proxy.team.db import Database, DatabaseError
from ccx_proxy.team.recorder import Record, Recorder, delete_before, write_batch
from tests.team.conftest import Backend

pytestmark = pytest.mark.backends("sqlite", "postgresql")


def record(i: int, ts: float, member: str = "alice", cost: float | None = 0.5) -> Record:
    return Record(
        ts, f"r{i}", member, None, "messages", "up", "sk-…abcd", "claude-sonnet-4-5", "up-sonnet",
        1, 200, None, "complete", 1, 1.0, 2.0, 10, 20, 3, 4, 5, cost,
    )  # fmt: skip


@pytest.mark.parametrize("count", [1, 2, 255, 256, 257, 600, 1000])
def test_a_batch_of_any_size_is_written_whole(backend: Backend, count: int) -> None:
    conn = backend.connect()
    now = time.time()
    write_batch(conn, [record(i, now) for i in range(count)])
    assert conn.execute("SELECT count(*), sum(input_tokens), min(request_id) FROM usage").fetchone() == (
        count,
        10 * count,
        "r0",
    )
    day = conn.execute("SELECT requests, input_tokens, cache_read, cost_usd FROM usage_daily").fetchone()
    assert day == (count, 10 * count, 5 * count, pytest.approx(0.5 * count))


def test_daily_totals_count_errors_and_unpriced_requests(backend: Backend) -> None:
    conn = backend.connect()
    now = time.time()
    failed = record(1, now)._replace(status=529, outcome="error", input_tokens=0)
    write_batch(conn, [record(0, now, cost=None), failed, record(2, now - 86400)])
    rows = conn.execute("SELECT day, requests, errors, unpriced FROM usage_daily ORDER BY day").fetchall()
    today, yesterday = (
        time.strftime("%Y-%m-%d", time.gmtime(now)),
        time.strftime("%Y-%m-%d", time.gmtime(now - 86400)),
    )
    assert rows == [(yesterday, 1, 0, 0), (today, 2, 1, 1)]  # one error; one with tokens and no price


def test_retention_deletes_rows_and_keeps_daily_totals(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(recorder_module, "RETENTION_BATCH", 7)
    conn = backend.connect()
    now = time.time()
    write_batch(conn, [record(i, now - 100 * 86400) for i in range(30)] + [record(99, now)])
    assert delete_before(conn, now - 90 * 86400) == 30
    assert conn.execute("SELECT request_id FROM usage").fetchall() == [("r99",)]
    assert conn.execute("SELECT sum(requests) FROM usage_daily").fetchone() == (31,)


async def test_a_full_queue_drops_and_counts(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(recorder_module, "MAX_PENDING", 3)
    rec = Recorder(None)
    for i in range(5):
        rec.add(record(i, time.time()))
    assert rec.pending == 3 and rec.dropped == 2
    assert "the queue of unwritten usage records is full" in caplog.text
    caplog.clear()
    await rec.flush()  # no database: counted as lost, logged at most once a minute
    assert rec.dropped == 5 and caplog.text == ""


async def test_a_failing_write_is_counted_not_raised(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    db = Database(backend.target)
    await db.open()
    try:
        await db.run(lambda conn: conn.execute("DROP TABLE usage_daily"))
        rec = Recorder(db)
        rec.add(record(0, time.time()))
        with caplog.at_level(logging.ERROR):
            await rec.flush()  # tried once more with the next flush
            assert rec.dropped == 0 and rec.pending == 1 and caplog.text == ""
            await rec.flush()
        assert rec.dropped == 1 and rec.written == 0 and rec.pending == 0
        assert "usage records lost: 1" in caplog.text and backend.missing_table_words in caplog.text
        rows = await db.run(lambda conn: conn.execute("SELECT count(*) FROM usage").fetchone())
        assert rows == (0,)  # the transaction was rolled back whole
    finally:
        db.close()


async def test_a_write_that_fails_once_is_written_with_the_next_flush(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = Database(backend.target)
    await db.open()
    try:
        real, calls = recorder_module.write_batch, []

        def flaky(conn: object, batch: list[Record]) -> None:
            calls.append(len(batch))
            if len(calls) == 1:
                raise DatabaseError("the server restarted")  # a blip
            real(conn, batch)  # type: ignore[arg-type]

        monkeypatch.setattr(recorder_module, "write_batch", flaky)
        rec = Recorder(db)
        rec.add(record(0, time.time()))
        await rec.flush()
        rec.add(record(1, time.time()))  # arrived meanwhile: goes with the retried batch
        await rec.flush()
        assert calls == [1, 2] and rec.written == 2 and rec.dropped == 0
        rows = await db.run(lambda conn: conn.execute("SELECT request_id FROM usage ORDER BY id").fetchall())
        assert rows == [("r0",), ("r1",)]
    finally:
        db.close()


async def test_the_final_flush_always_says_what_it_lost(caplog: pytest.LogCaptureFixture) -> None:
    rec = Recorder(None)
    rec._last_log = time.monotonic()  # a loss was just logged: the next would be held back
    rec.add(record(0, time.time()))
    with caplog.at_level(logging.ERROR):
        await rec.flush(final=True)
    assert rec.dropped == 1 and "usage records lost: 1" in caplog.text


def test_a_newer_schema_is_refused(backend: Backend) -> None:
    conn = backend.connect()
    backend.set_schema_version(conn, 99)
    conn.close()
    from ccx_proxy.team.db import DatabaseError

    with pytest.raises(
        DatabaseError, match="schema version 99, newer than this gateway's 1: upgrade ccx-proxy"
    ):
        backend.connect()
