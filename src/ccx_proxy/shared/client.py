"""The one Redis connection of a process: bounded waits, a fail policy, batched round trips.

Every shared-state call goes through :class:`SharedStore`:

* :meth:`SharedStore.call` (a result is needed: limits, affinity) and :meth:`SharedStore.send`
  (fire and forget: releases, spend, health events) queue a command; everything queued in one
  turn of the event loop goes out as **one pipeline** (one write, one read), so 64
  concurrent requests cost a handful of round trips, not 64.
* No caller waits longer than ``REDIS_TIMEOUT_MS`` (default 50 ms): the pipeline runs under
  that timeout, and the connection pool hands out a connection within it or not at all.
* A refused connection, or three round trips in a row slower than the timeout, mark Redis
  **down** (one slow round trip fails only its own callers): from then on calls fail at once with
  :class:`SharedDown` (callers use their local state: ``REDIS_FAILURE=open``) and no request
  pays the timeout again.  A background task pings with a growing back-off (0.1 s to 5 s) and
  marks it **up** again; each transition is logged once and counted (:data:`STATS`, exported
  by :mod:`ccx_proxy.ops.metrics`), and the ``on_up`` callbacks resynchronise (scripts
  reloaded, state re-read, budgets re-seeded).
* Pub/sub (health events, configuration versions) has its own connection and task
  (:mod:`.pubsub`), which reconnects by itself and calls the same resync callbacks after each
  (re)subscription.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import logging
import os
import secrets
import socket
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from ..settings import RedisSettings
from ..tasks import cancel_and_wait
from .pubsub import BACKOFF_MAX, BACKOFF_MIN, Subscriber

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = logging.getLogger("ccx_proxy.shared")

MAX_CONNECTIONS = 32  # pipelines in flight at once (a pool connection each)
MAX_QUEUED = 10_000  # fire-and-forget commands waiting for the next pipeline; more are dropped
PING_TIMEOUT = 1.0  # the background reconnect's own wait (never a request's)
RESYNC_TIMEOUT = 10.0  # each resync part (re-reading state, seeding budgets)
SLOW_LIMIT = 3  # timed-out round trips in a row that mark Redis down (a refused connection: one)

# Read by ccx_proxy.ops.metrics (this process's numbers).
STATS: dict[str, int] = {
    "up": 0,  # 1 while Redis answers
    "transitions": 0,  # up -> down and down -> up
    "errors": 0,  # round trips that failed or timed out
    "fallbacks": 0,  # decisions taken on local state because Redis was down
    "dropped": 0,  # fire-and-forget commands not sent (down, or the queue was full)
}


class SharedDown(Exception):
    """Redis did not answer in time (or is known to be down): decide on local state."""


def instance_id() -> str:
    """This process, as other instances see it: host, pid and a random tag."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


def masked_url(url: str) -> str:
    """``url`` fit for a log line: the user info's password (whatever characters it holds:
    everything up to the last ``@``) and any query (``?password=...``) masked."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "***"
    userinfo, at, host = rest.rpartition("@")
    host, query, _ = host.partition("?")
    if at:
        user, colon, _ = userinfo.partition(":")
        host = (f"{user}:***@" if colon else "***@") + host
    return f"{scheme}://{host}{'?***' if query else ''}"


def _redis_module() -> Any:
    global _PACK
    try:
        import hiredis
        import redis.asyncio
    except ImportError:  # pragma: no cover - the extra is installed in every test run
        raise SystemExit("REDIS_URL needs the redis extra: pip install 'ccx-proxy[redis]'") from None
    _PACK = hiredis.pack_command
    return redis.asyncio


_PACK: Callable[[tuple[Any, ...]], bytes] = bytes  # hiredis.pack_command, set on first use


class Script:
    """A Lua script, sent by its SHA1 (loaded again whenever Redis comes back)."""

    __slots__ = ("source", "sha")

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()


Queued = tuple[tuple[Any, ...], "asyncio.Future[Any] | None"]


class SharedStore:
    def __init__(self, settings: RedisSettings, instance: str | None = None) -> None:
        self.settings = settings
        self.prefix = settings.prefix
        self.timeout = settings.timeout
        self.instance = instance or instance_id()
        self.up = False
        self.on_up: list[Callable[[], Awaitable[None]]] = []
        self._redis: Redis | None = None
        self._scripts: dict[str, Script] = {}
        self._subscriber = Subscriber(settings.url)
        self._queue: list[Queued] = []
        self._flush_due = False
        self._flushes: set[asyncio.Task[None]] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._down = asyncio.Event()
        self._ran_once = False
        self._reply_error: type[Exception] = Exception
        self._slow = 0  # round trips in a row that timed out
        self._refusal_logged = -1e9
        self.subscribed = self._subscriber.subscribed  # set while the pub/sub connection listens

    def key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    def script(self, source: str) -> Script:
        script = Script(source)
        self._scripts[script.sha] = script
        return script

    def subscribe(self, channel: str, handler: Callable[[bytes], None]) -> None:
        """``handler(message)`` for every message on ``channel`` (set up before :meth:`start`)."""
        self._subscriber.handlers[self.key(channel)] = handler

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect (never blocks startup for long: an unreachable Redis is retried in the
        background while the gateway runs on local state)."""
        aioredis = _redis_module()
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff
        from redis.exceptions import ResponseError

        self._reply_error = ResponseError

        pool = aioredis.BlockingConnectionPool.from_url(
            self.settings.url,
            max_connections=MAX_CONNECTIONS,
            timeout=self.timeout,
            socket_timeout=None,  # every call runs under asyncio.timeout (no second timer per reply)
            socket_connect_timeout=PING_TIMEOUT,
            retry=Retry(NoBackoff(), 0),
            **_without_maintenance_notifications(aioredis.ConnectionPool),
        )
        self._redis = aioredis.Redis(connection_pool=pool)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._reconnect())]
        if self._subscriber.handlers:
            self._tasks.append(loop.create_task(self._subscriber.run(aioredis, self._resync_if_up)))
        if not await self._try_up():
            log.warning(
                "Redis at %s is unreachable: running on local state until it answers (REDIS_FAILURE=%s)",
                masked_url(self.settings.url),
                self.settings.failure,
            )
            self._down.set()

    async def stop(self) -> None:
        await cancel_and_wait(*self._tasks)
        self._tasks = []
        if self._queue and self.up:  # releases and spend queued at the end: one last pipeline
            batch, self._queue = self._queue, []
            await self._flush(batch)
        for flush in list(self._flushes):
            with contextlib.suppress(asyncio.CancelledError):
                await flush
        if self._redis is not None:
            await self._redis.aclose(close_connection_pool=True)
            self._redis = None
        self.up = False
        STATS["up"] = 0

    async def _try_up(self) -> bool:
        redis = self._redis
        assert redis is not None
        try:
            async with asyncio.timeout(PING_TIMEOUT):
                await redis.ping()
                for script in self._scripts.values():
                    await redis.script_load(script.source)
        except Exception as exc:  # anything: the server is not usable yet
            log.debug("Redis ping failed: %s", exc)
            return False
        self.up = True
        STATS["up"] = 1
        if self._ran_once:
            STATS["transitions"] += 1
            log.warning("Redis answers again: shared limits and state resume")
        else:
            log.info(
                "shared state in Redis at %s (instance %s)", masked_url(self.settings.url), self.instance
            )
        self._ran_once = True
        await self._resync()
        return True

    async def _resync(self) -> None:
        for callback in self.on_up:
            try:
                async with asyncio.timeout(RESYNC_TIMEOUT):  # e.g. a database query seeding budgets
                    await callback()
            except (SharedDown, TimeoutError):
                continue  # Redis went again (the reconnect loop retries) or a part is slow
            except Exception:  # one part failing to resync must not stop the others
                log.exception("resynchronising shared state failed")

    async def _resync_if_up(self) -> None:
        if self.up:
            await self._resync()

    def failed(self, exc: BaseException) -> None:
        """Redis is down until a ping answers."""
        STATS["errors"] += 1
        self._slow = 0
        if self.up:
            self.up = False
            STATS["up"] = 0
            STATS["transitions"] += 1
            log.warning(
                "Redis unreachable (%s): %s",
                type(exc).__name__ if isinstance(exc, TimeoutError) else exc,
                "limits and state fall back to this process's own (REDIS_FAILURE=open)"
                if self.settings.failure == "open"
                else "members with limits are refused with 503 until it answers (REDIS_FAILURE=closed)",
            )
        self._down.set()

    async def _reconnect(self) -> None:
        while True:
            await self._down.wait()
            # Cleared before trying, not after: a failure during the resync below sets it
            # again, and this loop must see that.
            self._down.clear()
            delay = BACKOFF_MIN
            while not self.up:
                await asyncio.sleep(delay)
                if await self._try_up():
                    break
                delay = min(delay * 2, BACKOFF_MAX)

    # -- commands ----------------------------------------------------------------------------

    async def call(self, *args: Any) -> Any:
        """Run one command in the next pipeline; :class:`SharedDown` when Redis is down or slow."""
        if not self.up:
            raise SharedDown("Redis is down")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append((args, future))
        self._schedule()
        return await future

    async def call_within(self, timeout: float, *args: Any) -> Any:
        """One command outside the batched pipeline, bounded by ``timeout`` instead of
        ``REDIS_TIMEOUT_MS``: for the rare large ones (the channels document, :mod:`.config`),
        never on a request's path.  :class:`SharedDown` like :meth:`call`."""
        redis = self._redis
        if redis is None or not self.up:
            raise SharedDown("Redis is down")
        from redis.exceptions import ResponseError

        try:
            async with asyncio.timeout(timeout):
                result = await redis.execute_command(*args)  # type: ignore[no-untyped-call]
            self._slow = 0
            return result
        except ResponseError as exc:  # it answered: refused, not down
            self._refused(str(args[0]), exc)
            raise SharedDown(str(exc)) from None
        except asyncio.CancelledError:
            raise
        except TimeoutError as exc:  # slow, as in a pipeline: only a run of them means down
            self._slow += 1
            if self._slow >= SLOW_LIMIT:
                self.failed(exc)
            else:
                STATS["errors"] += 1
            raise SharedDown("timeout") from None
        except Exception as exc:  # OSError, connection errors: down
            self.failed(exc)
            raise SharedDown(str(exc) or type(exc).__name__) from None

    async def eval(self, script: Script, keys: list[str], args: list[Any]) -> Any:
        return await self.call("EVALSHA", script.sha, len(keys), *keys, *args)

    def send(self, *args: Any) -> None:
        """Queue a command whose answer nobody waits for (dropped, and counted, when down)."""
        if not self.up or len(self._queue) >= MAX_QUEUED:
            STATS["dropped"] += 1
            return
        self._queue.append((args, None))
        self._schedule()

    def send_eval(self, script: Script, keys: list[str], args: list[Any]) -> None:
        self.send("EVALSHA", script.sha, len(keys), *keys, *args)

    def _schedule(self) -> None:
        if not self._flush_due:
            self._flush_due = True
            asyncio.get_running_loop().call_soon(self._start_flush)

    def _start_flush(self) -> None:
        self._flush_due = False
        batch, self._queue = self._queue, []
        if batch:
            task = asyncio.get_running_loop().create_task(self._flush(batch))
            self._flushes.add(task)
            task.add_done_callback(self._flushes.discard)

    async def _flush(self, batch: list[Queued]) -> None:
        redis = self._redis
        try:
            if redis is None or not self.up:
                raise SharedDown("Redis is down")
            deadline = asyncio.get_running_loop().time() + self.timeout  # one bound for all of it
            results = await self._pipeline(redis, batch, deadline)
            missing = [i for i, r in enumerate(results) if _noscript(r)]
            if missing:  # Redis restarted (or flushed its scripts): send their source this time
                again = await self._pipeline(redis, [self._with_source(batch[i]) for i in missing], deadline)
                for i, result in zip(missing, again, strict=True):
                    results[i] = result
                for script in self._scripts.values():  # and have them by SHA again next time
                    self.send("SCRIPT", "LOAD", script.source)
        except SharedDown as exc:
            _settle(batch, exc)
            return
        except asyncio.CancelledError:
            _settle(batch, SharedDown("cancelled"))
            raise
        except TimeoutError as exc:
            # Slow, not gone (a busy event loop can make a loopback answer late): these
            # callers decide locally; only a run of them marks Redis down.
            self._slow += 1
            if self._slow >= SLOW_LIMIT:
                self.failed(exc)
            else:
                STATS["errors"] += 1
            _settle(batch, SharedDown("timeout"))
            return
        except Exception as exc:  # redis errors, OSError: down
            self.failed(exc)
            _settle(batch, SharedDown(str(exc) or type(exc).__name__))
            return
        self._slow = 0
        for (args, future), result in zip(batch, results, strict=True):
            if isinstance(result, Exception):
                self._refused(args[0], result)
                if future is not None and not future.done():
                    future.set_exception(SharedDown(str(result)))
            elif future is not None and not future.done():
                future.set_result(result)

    def _refused(self, command: str, error: Exception) -> None:
        """An error reply (e.g. OOM under maxmemory): logged at most once a minute."""
        STATS["errors"] += 1
        now = asyncio.get_running_loop().time()
        if now >= self._refusal_logged + 60:
            self._refusal_logged = now
            log.error("Redis refused %s: %s (logged at most once a minute)", command, error)

    def _with_source(self, queued: Queued) -> Queued:
        args, future = queued
        script = self._scripts.get(args[1]) if args[0] == "EVALSHA" else None
        return (("EVAL", script.source, *args[2:]), future) if script is not None else queued

    async def _pipeline(self, redis: Redis, batch: list[Queued], deadline: float) -> list[Any]:
        """One write of every command (RESP-encoded by hiredis), then their answers in order,
        each through redis-py's own reply conversion (as its Pipeline would; this path
        skips that class's per-command bookkeeping, a third of the client's CPU per
        request).  An error reply is that command's result; anything else loses the
        connection (it may hold a half-read answer)."""
        pool: Any = redis.connection_pool  # redis-py's pool methods are untyped
        callbacks = redis.response_callbacks
        conn: Any = None
        results: list[Any] = []
        try:
            async with asyncio.timeout_at(deadline):
                conn = await pool.get_connection()
                await conn.send_packed_command(
                    b"".join([_pack(args) for args, _ in batch]), check_health=False
                )
                for args, _ in batch:
                    try:
                        reply = await conn.read_response()  # no timer of its own: the deadline above
                    except self._reply_error as exc:
                        results.append(exc)
                        continue
                    callback = callbacks.get(args[0])
                    results.append(reply if callback is None else callback(reply))
        except BaseException:
            if conn is not None:
                await asyncio.shield(conn.disconnect(nowait=True))
            raise
        finally:
            if conn is not None:  # outside the deadline: a connection is never lost to the pool
                await asyncio.shield(pool.release(conn))
        return results

    # -- pub/sub -----------------------------------------------------------------------------

    def publish(self, channel: str, message: bytes) -> None:
        self.send("PUBLISH", self.key(channel), message)


def _without_maintenance_notifications(pool_class: type) -> dict[str, Any]:
    """redis-py 8.1 turns its maintenance notifications (a Redis Enterprise feature) on by
    default ("auto"), and while they are on its pool skips the check that replaces a connection
    the server has closed.  Every pooled connection a Redis restart (or its idle ``timeout``)
    closed would then fail one round trip and mark Redis down for a moment.  Off, the pool
    checks each connection it hands out.  Only a pool that takes the setting gets it: before
    8.1 the asyncio pool passed unknown settings on to every connection, which refuses them
    (and that pool always checked)."""
    parameters = inspect.signature(pool_class).parameters
    if "maint_notifications_config" not in parameters:
        return {}
    from redis.maint_notifications import MaintNotificationsConfig

    return {"maint_notifications_config": MaintNotificationsConfig(enabled=False)}


def _pack(args: tuple[Any, ...]) -> bytes:
    return _PACK(args)


def _noscript(result: Any) -> bool:
    return isinstance(result, Exception) and (
        type(result).__name__ == "NoScriptError" or str(result).startswith("NOSCRIPT")
    )


def _settle(batch: list[Queued], exc: SharedDown) -> None:
    for _, future in batch:
        if future is not None and not future.done():
            future.set_exception(exc)
