"""The channels document, versioned in Redis and replicated to every instance.

With ``REDIS_URL`` set, the channels file of every gateway instance follows one document::

    <prefix>config   hash: seq (monotonic), version (the ETag: sha256 of doc, 20 hex),
                     doc (the file's exact bytes), by (instance id), at (unix time),
                     seeded ("1" while it is a copy an instance offered at start, not a write;
                     "f" when that instance had never held a seq: a fresh host)
    <prefix>config   pub/sub channel: "<seq> <version> <by>" after each change
    .<file>.seq      beside the channels file: "<seq> <version>" it was last written at

Every instance writes the same bytes to its file, so the admin API's ``ETag`` (the file's
version) is the same on every host.  The worker processes of one host share that file: each
write records its seq beside it under the file's ``flock``, and a worker never writes a version
older than the one recorded (a slower sibling finds its fetch stale and loads the newer one);
a restarted instance starts from the recorded seq.  How each path behaves:

* **Admin write** (any instance): validated as today, then, still under the file's lock, a
  compare-and-set in Redis (:data:`PUT_SCRIPT`: only if Redis still holds the version the write
  started from -- the file's ``If-Match`` made fleet-wide: the loser of two concurrent edits
  gets 409), which also publishes the new seq; then the local file is written (atomic,
  backups) and applied.  The script carries a deadline in Redis's own clock (read with
  ``TIME`` just before): a write this instance gave up on (503, or local-only) that a paused
  Redis runs later does nothing.
* **Every other instance**, on the message, on a cheap check of ``seq`` every second (a
  missed message) and whenever Redis comes back: fetches the document, validates it with
  this host's environment (``${VAR}`` is resolved locally), writes it to its file (a restart
  without Redis still has it), tells the watcher, applies it.  A document that does not load
  here (a variable missing on this host) is logged with its version and the running
  configuration stays.
* **Start**: Redis holds a document: it replaces this host's file if different (logged);
  none: this host's file seeds it, with the seq it records (the first of several starting
  instances wins, the others load its copy).  Redis came back empty (it lost its data): a
  seed is only a copy, so an instance running a newer version it can load (a higher seq, or
  the same seq over a fresh host's seed) offers its own file as the seed in its place, and
  the fleet ends on the newest version any instance still had.
* **A hand edit or SIGHUP** on one host: once the watcher has loaded it, a file that differs
  from the fleet's version is published as a new version and the fleet follows (logged): the
  bytes the watcher validated, not a second read.  If the fleet moved on meanwhile, the
  fleet's version wins and replaces the file (the edit is in ``backups/``).  A file this module
  wrote from Redis (its version is the one recorded beside it) is never published back, so
  nothing loops.
* **Redis down**: ``REDIS_FAILURE=closed``: admin writes are refused with 503 (the change
  would reach only this host).  ``open``: they apply to this host only (logged) and are
  offered to the fleet when Redis answers again; they win if the fleet did not change
  meanwhile (or Redis came back empty and this host's seq is the newest), otherwise the
  fleet's version replaces them (kept in ``backups/``).
* **Redis refuses** (it answers with an error, e.g. out of memory): like down for that write,
  but retried every check; the lines are logged at most once a minute.
* A document over :data:`MAX_DOCUMENT` is refused (admin write: 400; hand edit: logged).

Redis is a trusted store here: the document goes there as the file holds it, ``apiKeys``
included (usually ``${VAR}`` references, sometimes literal keys).  Give Redis a password and a
private network, as the reference deployment does.  Its content is never logged.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Coroutine
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from ..config import ConfigError, GatewayConfig, parse_config
from ..errors import Conflict, SharedStateUnavailable
from ..store import ChannelStore, version_of
from ..tasks import cancel_and_wait
from .client import SharedDown, SharedStore

if TYPE_CHECKING:
    from ..reload import ConfigWatcher
    from ..state import Gateway

log = logging.getLogger("ccx_proxy.shared.config")

CHANNEL = "config"
MAX_DOCUMENT = 4 * 1024 * 1024  # bytes: a channels file is a few KB; Redis holds one value
CHECK_INTERVAL = 1.0  # seconds between checks of seq (a missed message is caught within it)
DOCUMENT_TIMEOUT = 2.0  # seconds for a round trip carrying the document (never a request's wait)

# KEYS[1] the record; ARGV: base version ("" = none), new version, doc, by, at, channel,
# wanted seq, "1" for a seed (an instance offering its file at start) else "0", deadline (ms
# in Redis's clock: run later, the script does nothing).
# Returns {status, seq, version, by}: 1 stored (and published), 0 Redis already holds this
# version, -1 conflict (Redis holds another one), -2 expired (past the deadline: nothing done).
# A seed with wanted seq 0 comes from a fresh host: stored at seq 1 as seeded "f", which a seed
# at seq 1 or more replaces; any other seed replaces a seed only with a higher seq.
PUT_SCRIPT = """
if redis.replicate_commands then redis.replicate_commands() end
local cur = redis.call('HMGET', KEYS[1], 'seq', 'version', 'seeded', 'by')
local seq = tonumber(cur[1]) or 0
local version = cur[2] or ''
local now = redis.call('TIME')
if tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) > tonumber(ARGV[9]) then
  return {-2, seq, version, cur[4] or ''}
end
if version == ARGV[2] then return {0, seq, version, cur[4] or ''} end
local want = tonumber(ARGV[7])
local over_seed = (cur[3] == '1' and want > seq) or (cur[3] == 'f' and want >= seq)
if version ~= '' and version ~= ARGV[1] and not over_seed then
  return {-1, seq, version, cur[4] or ''}
end
local new = math.max(seq + 1, want)
local seeded = ARGV[8]
if seeded == '1' then
  new = math.max(want, 1)
  if want < 1 then seeded = 'f' end
end
redis.call('HSET', KEYS[1], 'seq', new, 'version', ARGV[2], 'doc', ARGV[3], 'by', ARGV[4],
  'at', ARGV[5], 'seeded', seeded)
redis.call('PUBLISH', ARGV[6], new .. ' ' .. ARGV[2] .. ' ' .. ARGV[4])
return {1, new, ARGV[2], ARGV[4]}
"""

STORED, SAME, CONFLICT, EXPIRED = 1, 0, -1, -2
REPLY_MARGIN = 0.5  # seconds this instance waits for an answer past the script's deadline
REFUSED_LOG_INTERVAL = 60.0  # seconds between lines about the same refused offer


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else "" if value is None else str(value)


def _mib(size: int) -> str:
    return f"{size / (1024 * 1024):.1f} MiB"


class SharedConfig:
    """One instance's side of the shared channels document (see the module docstring)."""

    def __init__(
        self,
        shared: SharedStore,
        gateway: Gateway,
        store: ChannelStore,
        watcher: ConfigWatcher | None,
        failure: str = "open",
    ) -> None:
        self.shared = shared
        self.gateway = gateway
        self.store = store
        self.watcher = watcher
        self.closed = failure == "closed"
        self.key = shared.key(CHANNEL)
        self.seq = 0  # the fleet's seq this instance runs (0: none known yet)
        self.version: str | None = None  # and its version
        self.local_only = False  # the file holds edits not in Redis yet (it was down, or refused)
        self._unpublished: bytes | None = None  # and their bytes (as validated here)
        self.rejected: tuple[int, str] | None = None  # a fleet version this host cannot load
        self._generation = 0  # bumped whenever seq/version change here: a slower fetch is stale
        self._lock = asyncio.Lock()  # one sync or publish at a time (admin writes take the file's)
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._spawned: set[asyncio.Task[None]] = set()
        self._refusal_logged = -REFUSED_LOG_INTERVAL  # loop time of the last "refused" line

    # -- wiring ------------------------------------------------------------------------------

    def install(self) -> None:
        self.shared.subscribe(CHANNEL, self._message)
        self.shared.on_up.append(self._on_up)
        self.store.before_commit = self._before_commit
        if self.watcher is not None:
            self.watcher.on_reload = self._file_reloaded
            self.store.on_write = self.watcher.expect
        # A restarted instance runs the seq its file was written at (a fresh one: 0).
        recorded = self.store.recorded()
        if recorded is not None:
            self.seq = recorded[0]
            if self._file_version() == recorded[1]:
                self.version = recorded[1]

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = self._loop.create_task(self._run())

    async def stop(self) -> None:
        await cancel_and_wait(self._task, *self._spawned)
        self._task = None

    def _message(self, data: bytes) -> None:
        seq, _, rest = data.partition(b" ")
        version, _, by = rest.partition(b" ")
        if by.decode(errors="replace") == self.shared.instance:
            return  # our own write, applied already
        if seq.decode(errors="replace") != str(self.seq) or version.decode(errors="replace") != self.version:
            self._wake.set()

    async def _on_up(self) -> None:
        try:
            await self.sync("Redis reachable")
        except SharedDown:
            pass  # down again: the next resync catches up

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CHECK_INTERVAL):
                    await self._wake.wait()
            reason = "change notification" if self._wake.is_set() else "periodic check"
            self._wake.clear()
            if not self.shared.up:
                continue
            try:
                await self.sync(reason)
            except SharedDown:
                pass
            except Exception:
                log.exception("synchronising the shared channels document failed")

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._spawned.add(task)
        task.add_done_callback(self._spawned.discard)

    # -- Redis -------------------------------------------------------------------------------

    async def _put(self, base: str | None, data: bytes, seed: bool = False) -> tuple[int, int, str, str]:
        """:data:`PUT_SCRIPT`; SharedDown also when it ran past its deadline (nothing done)."""
        want = self.seq if seed else self.seq + 1
        loop = asyncio.get_running_loop()
        ends = loop.time() + DOCUMENT_TIMEOUT
        # The deadline in Redis's clock (no skew between hosts): Redis read it at the latest
        # when its answer arrived, so what is left of the wait from then on bounds it.
        secs, micros = await self.shared.call_within(DOCUMENT_TIMEOUT, "TIME")
        left = ends - loop.time()
        deadline = int(secs) * 1000 + int(micros) // 1000 + int(left * 1000)
        result = await self.shared.call_within(
            max(left, 0.0) + REPLY_MARGIN, "EVAL", PUT_SCRIPT, 1, self.key,
            base or "", version_of(data), data, self.shared.instance, f"{time.time():.3f}",
            self.shared.key(CHANNEL), want, "1" if seed else "0", deadline,
        )  # fmt: skip
        status, seq, version, by = result
        if int(status) == EXPIRED:
            raise SharedDown("the shared store ran the write after its deadline: not applied")
        return int(status), int(seq), _text(version), _text(by)

    async def _fetch(self) -> tuple[int, str, bytes, str] | None:
        seq, version, doc, by = await self.shared.call_within(
            DOCUMENT_TIMEOUT, "HMGET", self.key, "seq", "version", "doc", "by"
        )
        if version is None or doc is None:
            return None
        return int(seq or 0), _text(version), bytes(doc), _text(by)

    def _now_at(self, seq: int, version: str) -> None:
        self.seq, self.version = seq, version
        self.local_only, self._unpublished = False, None
        self._generation += 1

    # -- an admin write (ChannelStore.update, in its writer thread, under the file's lock) ----

    def _before_commit(self, data: bytes, base: str) -> int | None:
        if len(data) > MAX_DOCUMENT:
            size, limit = _mib(len(data)), _mib(MAX_DOCUMENT)
            raise ConfigError([f"channels: the document would be {size}; a shared one holds at most {limit}"])
        loop = self._loop
        if loop is None:  # not started: nothing shared yet
            return None
        future = asyncio.run_coroutine_threadsafe(self._admin_write(data, base), loop)
        try:
            return future.result(timeout=DOCUMENT_TIMEOUT + 1)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise SharedStateUnavailable("shared store did not answer in time; file unchanged") from None

    async def _admin_write(self, data: bytes, base: str) -> int | None:
        """The fleet-wide compare-and-set; returns the new seq (None: this host only)."""
        new = version_of(data)
        # Edits made while Redis was down are not in Redis yet: they go with this one, from
        # the version the fleet had when they were made.
        start = (self.version or "") if self.local_only else base
        try:
            status, seq, current, by = await self._put(start, data)
        except SharedDown as exc:
            if self.closed:
                raise SharedStateUnavailable(
                    "shared store unavailable: the change would reach only this host "
                    "(REDIS_FAILURE=closed); try again when Redis answers"
                ) from None
            self.local_only, self._unpublished = True, data
            if self.shared.up:  # it answered: refused (e.g. out of memory), or too slow
                log.warning(
                    "Redis did not take channels version %s (%s): it applies to this host only; "
                    "it is offered to the fleet again every %.0f s (REDIS_FAILURE=open)",
                    new, exc, CHECK_INTERVAL,
                )  # fmt: skip
            else:
                log.warning(
                    "Redis is down: channels version %s applies to this host only; it is offered "
                    "to the fleet when Redis answers again (REDIS_FAILURE=open)",
                    new,
                )
            return None
        if status == CONFLICT:
            self._wake.set()  # this instance is behind: catch up
            if self.rejected is not None and self.rejected[1] == current:
                raise Conflict(
                    f"this host cannot load the fleet's channels version {current} (see its log: "
                    "usually a ${VAR} not set here), so it cannot edit them; edit from another "
                    "instance, or set the variable here and restart"
                )
            raise Conflict(
                f"another gateway instance changed the channels (version {start or 'none'} is stale, "
                f"the fleet's is {current}, by {by}); reload and apply your edit again"
            )
        self._now_at(seq, new)
        log.info("channels version %s (seq %d) written here, published to every instance", new, seq)
        return seq

    # -- a file the watcher loaded (hand edit, SIGHUP, or a sibling worker's write) ----------

    def _file_reloaded(self, reason: str, raw: bytes) -> None:
        self._spawn(self._file_changed(reason, raw))

    async def _file_changed(self, reason: str, raw: bytes) -> None:
        """``raw``: the bytes the watcher loaded (validated here), never a second read."""
        async with self._lock:
            new = version_of(raw)
            if new == self.version:
                return
            recorded = await asyncio.to_thread(self.store.recorded)
            if recorded is not None and recorded[1] == new:
                self._wake.set()  # a sibling worker wrote the fleet's version: follow Redis
                return
            try:
                await self._offer(raw, f"local file, {reason}")
            except SharedDown:
                self._wake.set()  # Redis went away while following the fleet: the loop retries

    async def _offer(self, raw: bytes, reason: str, seed: bool = False) -> None:
        """Publish this host's file (already loaded here) as the fleet's version."""
        new = version_of(raw)
        if len(raw) > MAX_DOCUMENT:
            log.error(
                "%s: channels version %s (%s) is over the %s a shared configuration holds: "
                "not published, this host runs it alone",
                reason, new, _mib(len(raw)), _mib(MAX_DOCUMENT),
            )  # fmt: skip
            return
        try:
            status, seq, current, by = await self._put(self.version, raw, seed=seed)
        except SharedDown as exc:
            if seed:
                return  # the next check offers it again (a refusal: the client logs it)
            self.local_only, self._unpublished = True, raw
            if not self.shared.up:
                log.warning(
                    "%s: Redis is down: channels version %s applies to this host only; it is "
                    "offered to the fleet when Redis answers again",
                    reason, new,
                )  # fmt: skip
                return
            # It answered (refused, e.g. out of memory; or too slow): offered again at each
            # check, one line a minute.
            now = asyncio.get_running_loop().time()
            if now >= self._refusal_logged + REFUSED_LOG_INTERVAL:
                self._refusal_logged = now
                log.warning(
                    "%s: Redis did not take channels version %s (%s): it applies to this host "
                    "only; offered again every %.0f s (logged at most once a minute)",
                    reason, new, exc, CHECK_INTERVAL,
                )  # fmt: skip
            return
        self._refusal_logged = -REFUSED_LOG_INTERVAL
        if status == CONFLICT:
            if seed:
                log.info("another instance seeded the shared channels first: loading its version %s", current)
            else:
                log.warning(
                    "%s: channels version %s was not published: the fleet moved on to version %s "
                    "(seq %d, by %s) meanwhile; this host follows the fleet (its file is kept in backups/)",
                    reason, new, current, seq, by,
                )  # fmt: skip
            self.local_only, self._unpublished = False, None
            await self._adopt(reason, force=True)
            return
        self._now_at(seq, new)
        await self.store.record(seq, new)
        if status == STORED and seed:
            log.info("seeded the shared channels with this host's file: version %s (seq %d)", new, seq)
        elif status == STORED:
            log.warning(
                "%s: channels version %s (seq %d) published from this host's file: every instance follows",
                reason, new, seq,
            )  # fmt: skip

    # -- following the fleet -----------------------------------------------------------------

    async def sync(self, reason: str) -> None:
        """Bring this instance to the fleet's version (or the fleet to this host's unpublished
        edits, or an empty Redis to this host's file).  Raises SharedDown when Redis is down."""
        async with self._lock:
            if self.local_only:
                raw = self._unpublished
                if raw is None:
                    raw = await asyncio.to_thread(self.store.path.read_bytes)
                await self._offer(raw, f"edits not in the shared store yet ({reason})")
                return
            seq_raw, version_raw, seeded = await self.shared.call(
                "HMGET", self.key, "seq", "version", "seeded"
            )
            if version_raw is None:  # no document (first start, or Redis lost its data)
                await self._seed(reason)
                return
            head = (int(seq_raw or 0), _text(version_raw))
            if head == (self.seq, self.version) or head == self.rejected:
                return
            if self._newer_than_seed(head[0], _text(seeded)):
                reason = f"{reason}: the shared store holds an older copy (seq {head[0]})"
                await self._seed(reason, challenge=True)
                return
            await self._adopt(reason)

    def _newer_than_seed(self, seq: int, seeded: str) -> bool:
        """Redis holds a seed (a copy offered at start, after it lost its data) older than the
        version this instance runs and can load: offer that instead.  A fresh host's seed
        ("f": it never held a seq) is older than any seq."""
        if self.version is None or self.rejected is not None or self.seq < 1:
            return False
        return (seeded == "1" and seq < self.seq) or (seeded == "f" and seq <= self.seq)

    async def _seed(self, reason: str, challenge: bool = False) -> None:
        """Offer this host's file as the seed (``challenge``: in place of an older one, only
        while the file holds the version this instance runs)."""
        try:
            raw = await asyncio.to_thread(self.store.path.read_bytes)
        except OSError as exc:
            log.error("cannot read %s to seed the shared channels: %s", self.store.path, exc)
            return
        if challenge and version_of(raw) != self.version:
            return  # the file changed here: the watcher loads it, then offers it
        await self._offer(raw, reason, seed=True)

    async def _adopt(self, reason: str, force: bool = False) -> None:
        generation = self._generation
        record = await self._fetch()
        if record is None:
            return
        seq, version, doc, by = record
        if not force and (seq, version) == (self.seq, self.version):
            return
        try:
            config = await asyncio.to_thread(self._load, doc, version)
        except ConfigError as exc:
            if self.rejected != (seq, version) or force:
                for problem in exc.problems:
                    log.error("shared channels version %s (seq %d) rejected here: %s", version, seq, problem)
                log.error(
                    "keeping the running channels (version %s) on this host; fix the document, or "
                    "this host's environment and restart",
                    self.version or "from the local file",
                )
                self.rejected = (seq, version)
            return
        before = await asyncio.to_thread(self._file_version)

        def wanted() -> bool:
            return self._generation == generation

        outcome = await self.store.replace(doc, seq, wanted)
        if outcome == "stale":
            if not wanted():
                return  # an admin write here won meanwhile
            # The file records another seq: a sibling worker's newer write (Redis moved on: the
            # next sync loads it), or one from before Redis lost its data (Redis still holds
            # what was fetched: the fleet's version, which replaces that record).
            recorded = await asyncio.to_thread(self.store.recorded)
            head_seq, head_version = await self.shared.call("HMGET", self.key, "seq", "version")
            if (int(head_seq or 0), _text(head_version)) == (seq, version):
                outcome = await self.store.replace(doc, seq, wanted, over=recorded)
            if outcome == "stale":
                self._wake.set()
                return
        self._now_at(seq, version)
        self.rejected = None
        for warning in config.warnings:
            log.warning("%s: %s", self.store.path, warning)
        self.gateway.apply(config)
        if self.watcher is not None:
            self.watcher.written(version)
        if outcome == "written":
            log.info(
                "channels version %s (seq %d, by %s) applied (%s), replacing this host's file "
                "(version %s; kept in backups/)",
                version, seq, by, reason, before,
            )  # fmt: skip
        else:
            log.info("channels version %s (seq %d, by %s) applied (%s)", version, seq, by, reason)

    def _load(self, doc: bytes, version: str) -> GatewayConfig:
        if len(doc) > MAX_DOCUMENT:
            raise ConfigError([f"the document is {_mib(len(doc))}, over the {_mib(MAX_DOCUMENT)} allowed"])
        if version_of(doc) != version:
            raise ConfigError([f"the document's content does not match its version {version}"])
        try:
            data = orjson.loads(doc)
        except orjson.JSONDecodeError as exc:
            raise ConfigError([f"not valid JSON: {exc}"]) from None
        return parse_config(data, self.store.env, source=str(self.store.path))

    def _file_version(self) -> str:
        try:
            return version_of(self.store.path.read_bytes())
        except OSError:
            return "none"


SHARED_CONFIG: web.AppKey[SharedConfig] = web.AppKey("shared_config", SharedConfig)


def setup(app: web.Application, gateway: Gateway, store: ChannelStore) -> None:
    """Replicate the channels file through Redis (only for a gateway that runs from one)."""
    shared = gateway.shared
    if shared is None or gateway.runtime.config.source is None:
        return
    from ..admin.api import ADMIN  # here: the admin API imports the gateway state

    config = SharedConfig(shared, gateway, store, app[ADMIN].watcher, shared.settings.failure)
    config.install()
    app[SHARED_CONFIG] = config

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        await config.start()  # after the store started (and loaded or seeded the document)
        yield
        await config.stop()

    app.cleanup_ctx.append(lifecycle)
