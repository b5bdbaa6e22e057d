"""The Redis connection: batching, the timeout, down and up again, pub/sub."""

from __future__ import annotations

import asyncio
import logging

import pytest

from ccx_proxy.settings import RedisSettings
from ccx_proxy.shared.client import STATS, SharedDown, SharedStore, masked_url
from tests.redis_server import RedisServer


def store_for(server: RedisServer, prefix: str, timeout: float = 0.05) -> SharedStore:
    return SharedStore(RedisSettings(server.url, prefix=prefix, timeout=timeout), instance="test")


async def test_commands_queued_in_one_turn_share_one_pipeline(redis_server: RedisServer, prefix: str) -> None:
    store = store_for(redis_server, prefix)
    await store.start()
    try:
        key = store.key("n")
        before = await store.call("INFO", "stats")
        results = await asyncio.gather(*(store.call("INCR", key) for _ in range(50)))
        after = await store.call("INFO", "stats")
        assert sorted(results) == list(range(1, 51))

        def commands(info: dict[str, int]) -> int:
            return info["total_commands_processed"]

        # 50 INCRs and the second INFO went as one pipeline: exactly 51 commands, and one
        # connection was enough (the pool never opened a second one for them).
        assert commands(after) - commands(before) == 51
        pool = store._redis.connection_pool  # type: ignore[union-attr]
        assert len(pool._available_connections) + len(pool._in_use_connections) == 1
    finally:
        await store.stop()


async def test_script_survives_a_script_flush(redis_server: RedisServer, prefix: str) -> None:
    store = store_for(redis_server, prefix)
    script = store.script("return redis.call('INCRBY', KEYS[1], ARGV[1])")
    await store.start()
    try:
        assert await store.eval(script, [store.key("s")], [2]) == 2
        await store.call("SCRIPT", "FLUSH")
        assert await store.eval(script, [store.key("s")], [3]) == 5  # reloaded, run again
    finally:
        await store.stop()


async def test_down_fails_fast_and_comes_back(
    own_redis: RedisServer, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = store_for(own_redis, prefix)
    resynced = asyncio.Event()

    async def resync() -> None:
        resynced.set()

    store.on_up.append(resync)
    caplog.set_level(logging.INFO, "ccx_proxy.shared")
    await store.start()
    try:
        assert store.up and resynced.is_set()
        resynced.clear()
        own_redis.stop()
        errors = STATS["errors"]
        with pytest.raises(SharedDown):
            await store.call("PING")
        assert not store.up and STATS["errors"] == errors + 1
        loop = asyncio.get_running_loop()
        started = loop.time()
        for _ in range(100):  # known down: no request waits, no new error
            with pytest.raises(SharedDown):
                await store.call("PING")
        assert loop.time() - started < 0.05
        assert STATS["errors"] == errors + 1
        store.send("PING")  # fire and forget while down: dropped and counted
        down_lines = [r for r in caplog.records if "Redis unreachable" in r.getMessage()]
        assert len(down_lines) == 1 and "REDIS_FAILURE=open" in down_lines[0].getMessage()
        own_redis.start()
        await asyncio.wait_for(resynced.wait(), 10)
        assert store.up
        assert await store.call("PING") is True
        assert any("Redis answers again" in r.getMessage() for r in caplog.records)
    finally:
        await store.stop()


async def test_a_slow_redis_costs_at_most_the_timeout(own_redis: RedisServer, prefix: str) -> None:
    store = store_for(own_redis, prefix, timeout=0.05)
    await store.start()
    try:
        own_redis.proc.send_signal(19)  # type: ignore[union-attr]  # SIGSTOP: accepts, never answers
        loop = asyncio.get_running_loop()
        for _ in range(3):  # one slow round trip fails its callers; three in a row: down
            assert store.up
            started = loop.time()
            with pytest.raises(SharedDown):
                await store.call("PING")
            assert loop.time() - started < 0.25  # 50 ms timeout, plus scheduling on a busy machine
        assert not store.up
        own_redis.proc.send_signal(18)  # type: ignore[union-attr]  # SIGCONT
    finally:
        await store.stop()


async def _open_pooled_connections(store: SharedStore, count: int) -> None:
    """``count`` connections in the pool: as many calls at once, each holding one for 50 ms."""
    key = store.key("nothing")
    assert (
        await asyncio.gather(*(store.call_within(2.0, "BLPOP", key, "0.05") for _ in range(count)))
        == [None] * count
    )
    pool = store._redis.connection_pool  # type: ignore[union-attr]
    assert len(pool._available_connections) == count


async def _every_connection_used_without_a_failure(store: SharedStore, count: int) -> None:
    errors, transitions = STATS["errors"], STATS["transitions"]
    script = next(iter(store._scripts.values()))
    key = store.key("nothing")
    for _ in range(3):  # all of the pool at once, and a pipeline beside them
        held = [store.call_within(2.0, "BLPOP", key, "0.02") for _ in range(count)]
        results = await asyncio.gather(*held, store.eval(script, [store.key("n")], [1]))
        assert results[:count] == [None] * count
    assert store.up and await store.call("GET", store.key("n")) == b"3"  # the script: loaded again
    assert (STATS["errors"], STATS["transitions"]) == (errors, transitions)


async def test_a_redis_restart_between_requests_costs_nobody_a_failure(
    own_redis: RedisServer, prefix: str
) -> None:
    # Every pooled connection the restart closed is replaced when the pool hands it out (as the
    # scripts it forgot are sent again): none fails a round trip, Redis is never marked down.
    store = store_for(own_redis, prefix, timeout=1.0)
    store.script("return redis.call('INCRBY', KEYS[1], ARGV[1])")
    await store.start()
    try:
        await _open_pooled_connections(store, 8)
        # In threads, so the event loop runs meanwhile (as a gateway's does) and sees the
        # connections close.
        await asyncio.to_thread(own_redis.stop)
        await asyncio.to_thread(own_redis.start)
        await _every_connection_used_without_a_failure(store, 8)
    finally:
        await store.stop()


async def test_connections_redis_closed_as_idle_are_replaced_without_a_failure(
    own_redis: RedisServer, prefix: str
) -> None:
    import redis as redis_sync

    store = store_for(own_redis, prefix, timeout=1.0)
    store.script("return redis.call('INCRBY', KEYS[1], ARGV[1])")
    await store.start()
    watcher = redis_sync.Redis.from_url(own_redis.url)
    try:
        watcher.config_set("timeout", 1)  # Redis closes a client idle for a second
        await _open_pooled_connections(store, 8)
        deadline = asyncio.get_running_loop().time() + 10
        while len(watcher.client_list()) > 1:  # until only the watcher is left
            assert asyncio.get_running_loop().time() < deadline, "Redis did not close idle clients"
            await asyncio.sleep(0.1)
        await _every_connection_used_without_a_failure(store, 8)
    finally:
        watcher.close()
        await store.stop()


async def test_unreachable_at_start_runs_on_local_state(prefix: str) -> None:
    from tests.redis_server import free_port

    store = SharedStore(RedisSettings(f"redis://127.0.0.1:{free_port()}/0", prefix=prefix), instance="x")
    await store.start()
    try:
        assert not store.up
        with pytest.raises(SharedDown):
            await store.call("PING")
    finally:
        await store.stop()


async def test_pubsub_delivers_messages(redis_server: RedisServer, prefix: str) -> None:
    a, b = store_for(redis_server, prefix), store_for(redis_server, prefix)
    got: asyncio.Queue[bytes] = asyncio.Queue()
    b.subscribe("events", got.put_nowait)
    await a.start()
    await b.start()
    try:
        for _ in range(100):  # the subscription is set up in the background
            a.publish("events", b"hello")
            try:
                assert await asyncio.wait_for(got.get(), 0.1) == b"hello"
                break
            except TimeoutError:
                continue
        else:
            pytest.fail("no message arrived")
    finally:
        await a.stop()
        await b.stop()


def test_masked_url_hides_the_password() -> None:
    assert masked_url("redis://:s3cret@h:6379/0") == "redis://:***@h:6379/0"
    assert masked_url("redis://user:s3cret@h/1") == "redis://user:***@h/1"
    assert masked_url("redis://h:6379/0") == "redis://h:6379/0"


def test_masked_url_hides_passwords_with_any_characters_and_query_passwords() -> None:
    for url in ("redis://:pa/ss@h:6379/0", "redis://:pa#ss@h/0", "redis://:pa?ss@h/0", "redis://u:p@ss@h/0"):
        shown = masked_url(url)
        assert "pa" not in shown.replace("//", "") and "ss@" not in shown and ":***@h" in shown, shown
    assert masked_url("redis://h/0?password=s3cret") == "redis://h/0?***"
    assert masked_url("unix:///run/redis.sock?password=s3cret&db=1") == "unix:///run/redis.sock?***"


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("redis://h:notaport/0", "not a valid URL"),
        ("redis://:p/ss@h:6379/0", "percent-encoded"),
        ("redis:///0", "names no host"),
        ("redis://h:6379/x", "must be a number"),
        ("http://h:6379", "must start with redis://"),
    ],
)
def test_a_malformed_redis_url_stops_serve_with_one_line(url: str, words: str) -> None:
    from ccx_proxy.settings import SettingsError

    with pytest.raises(SettingsError, match=words) as caught:
        RedisSettings.from_env({"REDIS_URL": url})
    assert "ss@" not in str(caught.value)


async def test_a_failure_during_the_resync_is_not_forgotten(own_redis: RedisServer, prefix: str) -> None:
    store = store_for(own_redis, prefix)
    resyncs = 0

    async def flaky_resync() -> None:
        nonlocal resyncs
        resyncs += 1
        if resyncs == 2:  # the first resync after a restart: Redis goes again right away
            store.failed(ConnectionError("gone again"))

    store.on_up.append(flaky_resync)
    await store.start()
    try:
        own_redis.stop()
        with pytest.raises(SharedDown):
            await store.call("PING")
        own_redis.start()
        deadline = asyncio.get_running_loop().time() + 15
        while resyncs < 3 or not store.up:  # it must try again, and get there
            assert asyncio.get_running_loop().time() < deadline, (resyncs, store.up)
            await asyncio.sleep(0.05)
        assert await store.call("PING") is True
    finally:
        await store.stop()


async def test_error_replies_fail_their_callers_only_and_are_logged_once_a_minute(
    redis_server: RedisServer, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = store_for(redis_server, prefix)
    await store.start()
    try:
        await store.call("HSET", store.key("h"), "f", "v")
        for _ in range(10):  # WRONGTYPE: like OOM replies under maxmemory, one per command
            with pytest.raises(SharedDown, match="WRONGTYPE"):
                await store.call("INCR", store.key("h"))
            store.send("INCR", store.key("h"))
        assert store.up and await store.call("PING") is True  # an error reply is not an outage
        lines = [r for r in caplog.records if "Redis refused" in r.getMessage()]
        assert len(lines) == 1 and "at most once a minute" in lines[0].getMessage()
    finally:
        await store.stop()
