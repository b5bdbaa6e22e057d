"""The channels document shared through Redis: admin writes reach every instance, concurrent
edits conflict fleet-wide, late starters load the current version, hand edits publish, a
document invalid on one host is kept out there, and Redis going away and coming back."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient

from ccx_proxy import store as store_module
from ccx_proxy.admin.api import ADMIN
from ccx_proxy.app import WATCHER, create_app
from ccx_proxy.config import load_config
from ccx_proxy.reload import _stamp
from ccx_proxy.settings import RedisSettings
from ccx_proxy.shared import config as shared_config
from ccx_proxy.shared.client import SharedStore
from ccx_proxy.shared.config import PUT_SCRIPT, SHARED_CONFIG, SharedConfig
from ccx_proxy.state import GATEWAY
from ccx_proxy.store import version_of
from tests.conftest import make_settings
from tests.redis_server import RedisServer

ADMIN_KEY = "admin-key-0123456789"
ADMIN_HEADERS = {"x-api-key": ADMIN_KEY}
BASE = "/api/messages/channels"
Client = TestClient[Any, Any]


def channel(name: str, **fields: Any) -> dict[str, Any]:
    return {
        "name": name,
        "baseUrl": "http://127.0.0.1:1",
        "apiKeys": [f"sk-{name}-literal-key-0123"],
        **fields,
    }


def document(*names: str) -> dict[str, Any]:
    return {"channels": [channel(n, priority=i + 1) for i, n in enumerate(names)]}


async def until(condition: Callable[[], bool], seconds: float = 2.0) -> float:
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < seconds, "condition not met in time"
        await asyncio.sleep(0.01)
    return time.monotonic() - started


def names(client: Client) -> list[str]:
    return [c.name for c in client.app[GATEWAY].runtime.config.channels]


def file_of(client: Client) -> bytes:
    return Path(client.app[ADMIN].store.path).read_bytes()


def shared_of(client: Client) -> SharedConfig:
    return client.app[SHARED_CONFIG]


Start = Callable[..., Awaitable[Client]]


@pytest.fixture
def start(aiohttp_client: Any, tmp_path: Path, prefix: str) -> Start:
    async def start(
        name: str, server: RedisServer, doc: dict[str, Any] | None, failure: str = "open"
    ) -> Client:
        """An instance on host ``name``; ``doc`` None: another worker of a host already started."""
        directory = tmp_path / name
        path = directory / "channels.json"
        if doc is not None:
            directory.mkdir()
            path.write_text(json.dumps(doc))
        settings = make_settings(
            admin_keys=(ADMIN_KEY,),
            channels_file=str(path),
            watch_interval=0.05,
            redis=RedisSettings(server.url, failure=failure, prefix=prefix, timeout=0.5),
        )
        client: Client = await aiohttp_client(create_app(settings, load_config(path, env={})))
        store = client.app[GATEWAY].shared
        assert store is not None
        if store.up:  # subscribed: change notifications from now on reach it
            await asyncio.wait_for(store.subscribed.wait(), 5)
        return client

    return start


async def etag(client: Client) -> str:
    resp = await client.get(BASE, headers=ADMIN_HEADERS)
    assert resp.status == 200
    return resp.headers["ETag"]


async def add_channel(client: Client, name: str, if_match: str | None = None, **fields: Any) -> Any:
    headers = {**ADMIN_HEADERS, **({"If-Match": if_match} if if_match else {})}
    return await client.post(BASE, data=orjson.dumps(channel(name, **fields)), headers=headers)


async def redis_record(server: RedisServer, prefix: str) -> dict[bytes, bytes]:
    store = SharedStore(RedisSettings(server.url, prefix=prefix, timeout=1.0), instance="probe")
    await store.start()
    try:
        return dict(await store.call("HGETALL", store.key("config")) or {})
    finally:
        await store.stop()


async def test_an_admin_write_reaches_every_instance(
    start: Start, redis_server: RedisServer, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "ccx_proxy.shared.config")
    a = await start("a", redis_server, document("one"))  # first: seeds Redis with its file
    b = await start("b", redis_server, document("other"))  # later: loads the fleet's version
    assert names(b) == ["one"] and file_of(b) == file_of(a)
    assert await etag(b) == await etag(a) == f'"{version_of(file_of(a))}"'
    assert any("seeded the shared channels" in r.getMessage() for r in caplog.records)
    assert any("replacing this host's file" in r.getMessage() for r in caplog.records)

    resp = await add_channel(a, "two", if_match=await etag(a))
    assert resp.status == 201
    took = await until(lambda: names(b) == ["one", "two"])
    assert took < 2.0
    assert file_of(b) == file_of(a)
    assert await etag(b) == resp.headers["ETag"]
    record = await redis_record(redis_server, prefix)
    assert record[b"version"].decode() == version_of(file_of(a))
    assert record[b"doc"] == file_of(a) and record[b"seq"] == b"2"
    assert record[b"by"].decode() == a.app[GATEWAY].shared.instance  # type: ignore[union-attr]
    for record_line in caplog.records:  # versions and instance ids only, never the keys
        assert "literal-key" not in record_line.getMessage()


@pytest.mark.parametrize("path", ["notification", "periodic-check"])
async def test_each_path_alone_carries_a_change(
    start: Start, redis_server: RedisServer, prefix: str, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    if path == "notification":
        monkeypatch.setattr(shared_config, "CHECK_INTERVAL", 60.0)
    else:  # the message is lost: the check of seq every second catches up
        monkeypatch.setattr(SharedConfig, "_message", lambda self, data: None)
    a = await start("a", redis_server, document("one"))
    b = await start("b", redis_server, document("one"))
    assert (await add_channel(a, "two")).status == 201
    await until(lambda: names(b) == ["one", "two"])


async def test_concurrent_edits_from_one_version_one_wins_fleet_wide(
    start: Start, redis_server: RedisServer, prefix: str
) -> None:
    a = await start("a", redis_server, document("one"))
    b = await start("b", redis_server, document("one"))
    version = await etag(a)
    assert await etag(b) == version
    results = await asyncio.gather(
        add_channel(a, "from-a", if_match=version), add_channel(b, "from-b", if_match=version)
    )
    statuses = sorted(r.status for r in results)
    assert statuses == [201, 409], statuses
    loser = next(r for r in results if r.status == 409)
    assert "another gateway instance changed the channels" in (await loser.json())["error"]["message"]
    winner = "from-a" if results[0].status == 201 else "from-b"
    await until(lambda: names(a) == names(b) == ["one", winner])
    assert file_of(a) == file_of(b)


async def test_an_instance_started_later_loads_the_current_version(
    start: Start, redis_server: RedisServer, prefix: str
) -> None:
    a = await start("a", redis_server, document("one"))
    assert (await add_channel(a, "two")).status == 201
    assert (await add_channel(a, "three")).status == 201
    c = await start("c", redis_server, document("stale"))
    assert names(c) == ["one", "two", "three"]
    assert file_of(c) == file_of(a)
    assert shared_of(c).seq == shared_of(a).seq == 3
    backups = list((Path(c.app[ADMIN].store.path).parent / "backups").iterdir())
    assert len(backups) == 1 and b"stale" in backups[0].read_bytes()  # its own file, kept


async def test_a_document_that_does_not_load_on_one_host_keeps_its_configuration(
    start: Start, redis_server: RedisServer, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "ccx_proxy.shared.config")
    a = await start("a", redis_server, document("one"))
    b = await start("b", redis_server, document("one"))
    a.app[ADMIN].store.env = {"CCX_SHARED_TEST_KEY": "sk-only-on-host-a-0000"}
    b.app[ADMIN].store.env = {}  # the variable is not set on host b
    before = file_of(b)
    resp = await add_channel(a, "ref", apiKeys=["${CCX_SHARED_TEST_KEY}"])
    assert resp.status == 201
    new_version = resp.headers["ETag"].strip('"')

    def rejected() -> bool:
        return any(
            f"shared channels version {new_version}" in r.getMessage()
            and "CCX_SHARED_TEST_KEY" in r.getMessage()
            for r in caplog.records
        )

    await until(rejected)
    assert names(b) == ["one"] and file_of(b) == before
    # b cannot edit a version it cannot load: a 409 that says why.
    refused = await add_channel(b, "from-b", if_match=await etag(b))
    assert refused.status == 409
    assert "this host cannot load the fleet's channels version" in (await refused.json())["error"]["message"]
    assert any("keeping the running channels" in r.getMessage() for r in caplog.records)
    lines = sum("rejected here" in r.getMessage() for r in caplog.records)
    await asyncio.sleep(1.2)  # the next periodic checks do not log it again
    assert sum("rejected here" in r.getMessage() for r in caplog.records) == lines

    # A later version that loads here is applied.
    patch = await a.patch(
        f"{BASE}/ref/status", data=orjson.dumps({"status": "disabled"}), headers=ADMIN_HEADERS
    )
    assert patch.status == 200
    await until(lambda: names(b) == ["one", "ref"])
    assert file_of(b) == file_of(a)


async def test_a_hand_edit_on_one_host_is_published_once(
    start: Start, redis_server: RedisServer, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "ccx_proxy.shared.config")
    a = await start("a", redis_server, document("one"))
    b = await start("b", redis_server, document("one"))
    seq = shared_of(a).seq
    path = Path(b.app[ADMIN].store.path)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(document("one", "edited")))
    os.replace(tmp, path)
    await until(lambda: names(a) == ["one", "edited"])
    assert file_of(a) == path.read_bytes()
    assert any("published from this host's file" in r.getMessage() for r in caplog.records)
    reloads = a.app[WATCHER].reloads
    await asyncio.sleep(0.3)  # several watcher intervals: a's own write is not read back
    assert a.app[WATCHER].reloads == reloads
    assert shared_of(a).seq == shared_of(b).seq == seq + 1
    assert (await redis_record(redis_server, prefix))[b"seq"] == str(seq + 1).encode()


async def test_workers_of_one_host_write_their_shared_file_once(
    start: Start, redis_server: RedisServer, prefix: str
) -> None:
    a = await start("a", redis_server, document("one"))
    a2 = await start("a", redis_server, None)  # a second worker: the same channels file
    b = await start("b", redis_server, document("one"))
    backups = Path(a.app[ADMIN].store.path).parent / "backups"
    seq = shared_of(b).seq
    assert (await add_channel(b, "two")).status == 201
    await until(lambda: names(a) == names(a2) == ["one", "two"])
    assert file_of(a) == file_of(b)
    await asyncio.sleep(0.3)  # several watcher intervals: a sibling's write is not republished
    assert shared_of(a).seq == shared_of(a2).seq == seq + 1
    assert (await redis_record(redis_server, prefix))[b"seq"] == str(seq + 1).encode()
    assert len(list(backups.iterdir())) == 1  # one worker wrote the file, the other found it done


async def test_an_oversized_document_is_refused(
    start: Start, redis_server: RedisServer, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = await start("a", redis_server, document("one"))
    before = file_of(a)
    monkeypatch.setattr(shared_config, "MAX_DOCUMENT", len(before) + 10)
    resp = await add_channel(a, "two")
    assert resp.status == 400
    assert "a shared one holds at most" in (await resp.json())["error"]["message"]
    assert file_of(a) == before


async def test_redis_down_with_failure_closed_refuses_admin_writes(
    start: Start, own_redis: RedisServer, prefix: str
) -> None:
    a = await start("a", own_redis, document("one"), failure="closed")
    before = file_of(a)
    own_redis.stop()
    resp = await add_channel(a, "two")
    assert resp.status == 503
    assert (
        "shared store unavailable: the change would reach only this host"
        in (await resp.json())["error"]["message"]
    )
    assert file_of(a) == before and names(a) == ["one"]
    own_redis.start()  # empty: a seeds it again once it answers
    store = a.app[GATEWAY].shared
    assert store is not None
    await until(lambda: store.up, 10)
    assert (await add_channel(a, "two")).status == 201


async def test_redis_down_with_failure_open_applies_locally_then_the_fleet_converges(
    start: Start, own_redis: RedisServer, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "ccx_proxy.shared.config")
    a = await start("a", own_redis, document("one"))
    b = await start("b", own_redis, document("one"))
    own_redis.stop()
    resp = await add_channel(a, "offline")
    assert resp.status == 201 and names(a) == ["one", "offline"]
    assert any("applies to this host only" in r.getMessage() for r in caplog.records)
    assert names(b) == ["one"]
    own_redis.start()  # it lost everything: a's newer seq wins over b's re-seed
    await until(lambda: names(b) == ["one", "offline"], 15)
    assert file_of(b) == file_of(a)
    record = await redis_record(own_redis, prefix)
    assert record[b"version"].decode() == version_of(file_of(a))
    assert not shared_of(a).local_only


async def test_redis_down_and_a_newer_fleet_version_wins_over_local_edits(
    start: Start, own_redis: RedisServer, prefix: str
) -> None:
    """a edits while it cannot reach Redis (a partition, here: its store marked down); b edits
    through Redis meanwhile; when a reaches Redis again the fleet's version replaces its edit."""
    a = await start("a", own_redis, document("one"))
    b = await start("b", own_redis, document("one"))
    store_a = a.app[GATEWAY].shared
    assert store_a is not None
    store_a.failed(ConnectionError("partition"))  # a believes Redis is down; b still reaches it
    assert (await add_channel(a, "local")).status == 201
    assert shared_of(a).local_only
    assert (await add_channel(b, "fleet")).status == 201
    await until(lambda: store_a.up, 10)  # its reconnect loop finds Redis again
    await until(lambda: names(a) == ["one", "fleet"], 5)
    assert file_of(a) == file_of(b)
    backups = (Path(a.app[ADMIN].store.path).parent / "backups").iterdir()
    assert any(b'"local"' in p.read_bytes() for p in backups)  # the lost edit is kept


def shared_store_of(client: Client) -> SharedStore:
    store: SharedStore | None = client.app[GATEWAY].shared
    assert store is not None
    return store


async def redis_wiped(server: RedisServer, *clients: Client) -> None:
    """Redis restarts empty (no persistence, the usual cache setup); the instances notice."""
    server.stop()
    for client in clients:
        shared_store_of(client).failed(ConnectionError("restarted"))
    server.start()


async def record_when(
    server: RedisServer, prefix: str, condition: Callable[[dict[bytes, bytes]], bool], seconds: float
) -> dict[bytes, bytes]:
    """The shared record, once ``condition`` holds for it (asserted within ``seconds``)."""
    started = time.monotonic()
    while not condition(record := await redis_record(server, prefix)):
        assert time.monotonic() - started < seconds, record
        await asyncio.sleep(0.05)
    return record


def held_down(client: Client, monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """The instance's reconnect finds Redis only once the returned event is set."""
    store = shared_store_of(client)
    release = threading.Event()
    real = store._try_up

    async def gated() -> bool:
        return await real() if release.is_set() else False

    monkeypatch.setattr(store, "_try_up", gated)
    return release


async def test_a_slow_sibling_worker_never_writes_an_older_version_over_a_newer_one(
    start: Start, redis_server: RedisServer, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Worker a2 fetched version 2 and validates it slowly; meanwhile worker a (same file) writes
    version 3.  a2 must not put version 2 back in the file (a's watcher would publish it: the
    write lost fleet-wide, the workers flipping)."""
    a = await start("a", redis_server, document("one"))
    a2 = await start("a", redis_server, None)
    b = await start("b", redis_server, document("one"))
    validating, go = threading.Event(), threading.Event()
    real_load = shared_of(a2)._load

    def slow_load(doc: bytes, version: str) -> Any:
        if b'"two"' in doc and b'"three"' not in doc:
            validating.set()
            go.wait(5)
        return real_load(doc, version)

    monkeypatch.setattr(shared_of(a2), "_load", slow_load)
    outcomes: list[str] = []
    store2 = a2.app[ADMIN].store
    real_replace = store2.replace

    async def replace(*args: Any, **kwargs: Any) -> Any:
        outcome = await real_replace(*args, **kwargs)
        outcomes.append(outcome)
        return outcome

    monkeypatch.setattr(store2, "replace", replace)
    assert (await add_channel(b, "two")).status == 201
    await until(lambda: validating.is_set() and names(a) == ["one", "two"], 5)
    assert (await add_channel(a, "three")).status == 201
    newest = file_of(a)
    go.set()
    await until(lambda: bool(outcomes), 5)  # a2's adopt of version 2 is over
    assert outcomes[0] == "stale" and file_of(a) == newest
    await until(lambda: names(a) == names(a2) == names(b) == ["one", "two", "three"], 5)
    await until(lambda: a.app[WATCHER]._seen == _stamp(Path(store2.path)))  # a looked at the file
    record = await redis_record(redis_server, prefix)
    assert record[b"seq"] == b"3" and record[b"doc"] == newest == file_of(a)
    assert store2.recorded() == (3, version_of(newest))
    assert shared_of(a).seq == shared_of(a2).seq == shared_of(b).seq == 3


async def test_after_redis_lost_its_data_an_older_seed_does_not_win(
    start: Start, own_redis: RedisServer, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """b cannot load the fleet's newest version (a variable missing there) and runs an older
    one; Redis restarts empty and b seeds it first: a, which runs the newest, seeds over it."""
    a = await start("a", own_redis, document("one"))
    b = await start("b", own_redis, document("one"))
    a.app[ADMIN].store.env = {"CCX_SHARED_TEST_KEY": "sk-only-on-host-a-0000"}
    b.app[ADMIN].store.env = {}
    assert (await add_channel(a, "ref", apiKeys=["${CCX_SHARED_TEST_KEY}"])).status == 201
    newest = file_of(a)
    await until(lambda: shared_of(b).rejected is not None)
    release = held_down(a, monkeypatch)
    await redis_wiped(own_redis, a, b)
    record = await record_when(own_redis, prefix, lambda r: b"version" in r, 10)  # b seeded it
    assert record[b"version"].decode() == version_of(file_of(b)) and record[b"seq"] == b"1"
    release.set()
    await record_when(own_redis, prefix, lambda r: r.get(b"doc") == newest and r[b"seq"] == b"2", 10)
    assert names(a) == ["one", "ref"] and file_of(a) == newest
    assert names(b) == ["one"] and shared_of(b).rejected == (2, version_of(newest))


async def test_after_redis_lost_its_data_a_fresh_hosts_seed_does_not_win(
    start: Start, own_redis: RedisServer, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fleet never edited its first seed (seq 1); Redis restarts empty and a host that never
    held a seq (a new one) seeds it with its own file first: the fleet's version wins."""
    a = await start("a", own_redis, document("one"))
    fleet = file_of(a)
    assert shared_of(a).seq == 1
    release = held_down(a, monkeypatch)
    await redis_wiped(own_redis, a)
    c = await start("c", own_redis, document("fresh"))  # new host: it seeds the empty Redis
    assert (await redis_record(own_redis, prefix))[b"seeded"] == b"f"
    release.set()
    await until(lambda: names(c) == ["one"] and file_of(c) == fleet, 10)
    record = await redis_record(own_redis, prefix)
    assert record[b"doc"] == fleet and record[b"seq"] == b"1" and record[b"seeded"] == b"1"
    assert names(a) == ["one"] and file_of(a) == fleet


async def test_after_redis_lost_its_data_a_new_write_reaches_a_host_that_recorded_a_higher_seq(
    start: Start, own_redis: RedisServer, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis restarts empty while a and b cannot reach it; a new host seeds it and writes (seq 2,
    as b's file records for another version): that write, not b's record, is the fleet's."""
    a = await start("a", own_redis, document("one"))
    b = await start("b", own_redis, document("one"))
    assert (await add_channel(a, "two")).status == 201
    await until(lambda: shared_of(b).seq == 2)
    assert b.app[ADMIN].store.recorded() == (2, version_of(file_of(b)))
    held = [held_down(a, monkeypatch), held_down(b, monkeypatch)]
    await redis_wiped(own_redis, a, b)
    c = await start("c", own_redis, document("fresh"))
    assert (await add_channel(c, "from-c")).status == 201
    assert shared_of(c).seq == 2
    for release in held:
        release.set()
    await until(lambda: names(a) == names(b) == ["fresh", "from-c"], 10)
    assert file_of(a) == file_of(b) == file_of(c)
    assert b.app[ADMIN].store.recorded() == (2, version_of(file_of(c)))


async def test_a_write_redis_runs_after_its_deadline_does_nothing(
    start: Start, own_redis: RedisServer, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis pauses once the write's script is sent: the admin write is refused (503, closed)
    and, when Redis resumes and runs the script late, the fleet does not get it."""
    a = await start("a", own_redis, document("one"), failure="closed")
    b = await start("b", own_redis, document("one"), failure="closed")
    before = await redis_record(own_redis, prefix)
    store = shared_store_of(a)
    real_call = store.call_within
    assert own_redis.proc is not None
    pid = own_redis.proc.pid

    async def pausing(timeout: float, *args: Any) -> Any:
        if args[0] == "EVAL":
            os.kill(pid, signal.SIGSTOP)
        return await real_call(timeout, *args)

    async def evals() -> int:
        probe = SharedStore(RedisSettings(own_redis.url, prefix=prefix, timeout=1.0), instance="probe")
        await probe.start()
        try:
            stats = await probe.call("INFO", "commandstats")
            return int(stats.get("cmdstat_eval", {}).get("calls", 0))
        finally:
            await probe.stop()

    ran = await evals()
    monkeypatch.setattr(store, "call_within", pausing)
    try:
        resp = await add_channel(a, "two")
    finally:
        os.kill(pid, signal.SIGCONT)
    assert resp.status == 503
    started = time.monotonic()
    while await evals() == ran:  # Redis runs the script it received while paused
        assert time.monotonic() - started < 5
        await asyncio.sleep(0.02)
    record = await redis_record(own_redis, prefix)
    assert record[b"seq"] == before[b"seq"] and record[b"doc"] == before[b"doc"]
    assert names(a) == names(b) == ["one"]


async def test_a_hand_edit_publishes_the_bytes_the_watcher_validated(
    start: Start, redis_server: RedisServer, prefix: str
) -> None:
    """The file changes again (to an invalid one) right after the watcher loaded a hand edit:
    the fleet gets the edit that was validated, never bytes nobody loaded."""
    a = await start("a", redis_server, document("one"))
    b = await start("b", redis_server, document("one"))
    watcher = b.app[WATCHER]
    path = Path(b.app[ADMIN].store.path)
    publish = watcher.on_reload
    assert publish is not None

    def then_broken(*args: Any) -> None:
        path.write_text('{"channels": [{"name": "x", "baseUrl": "ftp://nope"}]}')
        publish(*args)

    watcher.on_reload = then_broken
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(document("one", "edited")))
    edited = tmp.read_bytes()
    os.replace(tmp, path)
    await until(lambda: names(a) == ["one", "edited"], 5)
    assert file_of(a) == edited
    assert (await redis_record(redis_server, prefix))[b"doc"] == edited
    await until(lambda: watcher.rejected == 1)  # b's watcher keeps the broken file out
    assert names(b) == ["one", "edited"]


async def test_a_refusing_redis_is_not_down_and_is_logged_once_a_minute(
    start: Start, own_redis: RedisServer, prefix: str, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    """Redis answers but refuses writes (out of memory): an admin write applies here
    (REDIS_FAILURE=open) and is offered again at each check, with one line, not one a check."""
    monkeypatch.setattr(shared_config, "CHECK_INTERVAL", 0.05)
    a = await start("a", own_redis, document("one"))
    b = await start("b", own_redis, document("one"))
    store = shared_store_of(a)
    await store.call("CONFIG", "SET", "maxmemory", "1")
    try:
        offers = 0
        real_put = shared_of(a)._put

        async def counting(*args: Any, **kwargs: Any) -> Any:
            nonlocal offers
            offers += 1
            return await real_put(*args, **kwargs)

        monkeypatch.setattr(shared_of(a), "_put", counting)
        caplog.set_level(logging.INFO, "ccx_proxy.shared.config")
        assert (await add_channel(a, "two")).status == 201
        await until(lambda: offers >= 15, 5)  # the admin write, then one offer a check
        assert store.up and shared_of(a).local_only
    finally:
        await store.call("CONFIG", "SET", "maxmemory", "0")
    lines = [
        r.getMessage() for r in caplog.records
        if r.name == "ccx_proxy.shared.config" and r.levelno >= logging.WARNING
    ]  # fmt: skip
    assert len(lines) == 2, lines  # the admin write's, and one for all the offers since
    assert all("Redis did not take channels version" in line for line in lines), lines
    assert not any("down" in line for line in lines), lines
    await until(lambda: names(b) == ["one", "two"], 5)  # it answers again: the fleet follows
    assert not shared_of(a).local_only and file_of(b) == file_of(a)


async def test_an_adopted_version_is_not_loaded_again_by_the_watcher(
    start: Start, redis_server: RedisServer, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The watcher polls between b's write of the fleet's version and the end of its adopt:
    it finds that version and does not load it a second time."""
    a = await start("a", redis_server, document("one"))
    b = await start("b", redis_server, document("one"))
    watcher = b.app[WATCHER]
    path = Path(b.app[ADMIN].store.path)
    real_write = store_module.atomic_write

    def write_then_wait_for_a_poll(target: Path, data: bytes, mode: int | None = None) -> None:
        real_write(target, data, mode)
        if target == path:  # hold b's adopt until its watcher has looked at the new file
            deadline = time.monotonic() + 2
            while watcher._seen != _stamp(path) and time.monotonic() < deadline:
                time.sleep(0.01)

    monkeypatch.setattr(store_module, "atomic_write", write_then_wait_for_a_poll)
    reloads = watcher.reloads
    assert (await add_channel(a, "two")).status == 201
    await until(lambda: shared_of(b).seq == shared_of(a).seq and names(b) == ["one", "two"], 5)
    assert watcher._seen == _stamp(path)
    assert watcher.reloads == reloads


FAR = 2**53  # a deadline no test reaches (ms)


@pytest.mark.parametrize(
    "current, offer, expected",
    [
        pytest.param(None, ("", "v1", 1, "1"), (1, 1), id="seed-on-empty"),
        pytest.param(None, ("", "v1", 0, "1"), (1, 1), id="fresh-seed-on-empty-is-seq-1"),
        pytest.param((1, "v1", "1"), ("", "v2", 1, "1"), (-1, 1), id="second-seed-loses"),
        pytest.param((1, "v1", "1"), ("", "v1", 1, "1"), (0, 1), id="same-version"),
        pytest.param((1, "v1", "1"), ("v1", "v2", 2, "0"), (1, 2), id="write-from-current"),
        pytest.param((5, "v5", "0"), ("v4", "v6", 5, "0"), (-1, 5), id="write-from-stale-base"),
        pytest.param((3, "v3", "1"), ("v9", "v7", 7, "1"), (1, 7), id="newer-seed-beats-seed"),
        pytest.param((7, "v7", "1"), ("v3", "v3b", 4, "0"), (-1, 7), id="older-write-loses-to-seed"),
        pytest.param((3, "v3", "0"), ("v9", "v7", 7, "1"), (-1, 3), id="seed-never-beats-a-write"),
        pytest.param((3, "v3", "0"), ("v3", "v4", 1, "0"), (1, 4), id="seq-never-goes-back"),
        pytest.param((1, "vf", "f"), ("v1", "v1b", 1, "1"), (1, 1), id="seed-at-1-beats-fresh-seed"),
        pytest.param((1, "vf", "f"), ("", "vg", 0, "1"), (-1, 1), id="fresh-seed-loses-to-fresh-seed"),
        pytest.param((1, "v1", "0"), ("v1", "v2", 2, "0", 1), (-2, 1), id="past-its-deadline-nothing"),
    ],
)
async def test_put_script(
    redis_server: RedisServer,
    prefix: str,
    current: tuple[int, str, str] | None,
    offer: tuple[Any, ...],
    expected: tuple[int, int],
) -> None:
    store = SharedStore(RedisSettings(redis_server.url, prefix=prefix, timeout=1.0), instance="t")
    await store.start()
    try:
        key = store.key("config")
        if current is not None:
            seq, version, seeded = current
            await store.call("HSET", key, "seq", seq, "version", version, "doc", b"old", "seeded", seeded)
        base, new, want, seed, *deadline = offer
        status, seq_after, *_ = await store.call_within(
            1.0, "EVAL", PUT_SCRIPT, 1, key, base, new, b"doc", "t", "0", store.key("config"), want, seed,
            deadline[0] if deadline else FAR,
        )  # fmt: skip
        assert (status, seq_after) == expected
        stored = await store.call("HGET", key, "version")
        assert stored == (new.encode() if status == 1 else (current[1].encode() if current else None))
        if status == 1 and seed == "1":  # a fresh host's seed is marked as such
            assert await store.call("HGET", key, "seeded") == (b"f" if want == 0 else b"1")
    finally:
        await store.stop()
