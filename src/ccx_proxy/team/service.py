"""The Team object the gateway holds: who is calling, may they, and what it cost.

Per request: :meth:`Team.authenticate` (one hash lookup, or the shared keys),
:meth:`Team.admit` (limits, and a :class:`Ticket` the relay fills in as it goes),
:meth:`Team.finish` (usage, cost, budgets, one record queued).  In the background: the
member index follows the database (``members_version`` polled every
:data:`POLL_INTERVAL` s, so a revoked or rotated key stops working within a second on
every worker), and the recorder writes batches.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from ..auth import AccessKeys
from ..errors import AuthenticationFailed, PermissionDenied
from ..headers import client_key, mask_secret
from ..routing import Candidate
from ..tasks import cancel_and_wait
from .db import Connection, Database, DatabaseError, path_in
from .limits import Limiter, utc_day

if TYPE_CHECKING:
    from ..shared.limits import SharedLimiter
from .members import SHARED_MEMBER, Member, MemberIndex, load_all, members_version
from .meter import Usage, UsageMeter
from .prices import PriceTable
from .recorder import Record, Recorder

log = logging.getLogger("ccx_proxy.team")

POLL_INTERVAL = 0.5
REOPEN_INTERVAL = 5.0  # a PostgreSQL server not reachable at start: tried again this often
_MASKS: dict[str, str] = {}  # upstream key -> its mask (bounded: cleared when large)
CLIENT_CLOSED = 499  # the status recorded when the client left before any answer (nginx's)


def check_model(member: Member, model: str) -> None:
    """403 when the member's model allowlist refuses ``model``."""
    if not member.allowlist.admits(model):
        raise PermissionDenied(
            f"member {member.name!r} may not use model {model!r} (allowed: {', '.join(member.models)}); "
            "ask the gateway's operator"
        )


def allowed_channels(member: Member, candidates: tuple[Candidate, ...], model: str) -> tuple[Candidate, ...]:
    """The candidates on channels the member may use; 403 when none is left."""
    kept = tuple(c for c in candidates if c.channel.name in member.channels)
    if not kept:
        raise PermissionDenied(
            f"member {member.name!r} may not use the channels that serve model {model!r} "
            f"(allowed channels: {', '.join(member.channels)}); ask the gateway's operator"
        )
    return kept


def _text(value: str | None) -> str | None:
    """A client-supplied string as a database keeps it: PostgreSQL refuses NUL in text (one such
    record would fail its whole batch), so NUL becomes U+FFFD in every backend."""
    if isinstance(value, str) and "\x00" in value:
        return value.replace("\x00", "\ufffd")
    return value


def _mask(key: str) -> str:
    mask = _MASKS.get(key)
    if mask is None:
        if len(_MASKS) > 1024:
            _MASKS.clear()
        mask = _MASKS[key] = mask_secret(key)
    return mask


class Ticket:
    """One request's facts, filled in by the relay; becomes a usage record at the end."""

    __slots__ = (
        "member",
        "started",
        "request_id",
        "session",
        "endpoint",
        "channel",
        "api_key",
        "model",
        "upstream_model",
        "stream",
        "status",
        "error_type",
        "outcome",
        "attempts",
        "ttfb",
        "meter",
        "prices",
        "admitted",
        "slot",
        "trace",
    )

    def __init__(
        self, member: Member, started: float, session: str | None, endpoint: str, request_id: str
    ) -> None:
        self.member = member
        self.started = started
        self.request_id = request_id
        self.session = session
        self.endpoint = endpoint
        self.channel: str | None = None
        self.api_key: str | None = None  # the upstream key used: masked before it is recorded
        self.model: str | None = None
        self.upstream_model: str | None = None
        self.stream = False
        self.status = 0
        self.error_type: str | None = None
        self.outcome = "complete"
        self.attempts = 0
        self.ttfb: float | None = None
        self.meter: UsageMeter | None = None
        self.prices: tuple[PriceTable, ...] = ()
        self.admitted = False
        self.slot: str | None = None  # the Redis concurrency slot held (ccx_proxy.shared.limits)
        self.trace: list[Any] | None = None  # failover.AttemptTrace per attempt, when tracing

    @property
    def final_outcome(self) -> str:
        """How the request ended: the relay's word, or the stream's when it completed."""
        if self.outcome == "complete" and self.meter is not None:
            return self.meter.outcome
        return self.outcome


def _budget_totals(conn: Connection, day: str) -> dict[str, tuple[int, float, int, float]]:
    tokens = "input_tokens + output_tokens + cache_write_5m + cache_write_1h + cache_read"
    rows = conn.execute(
        f"SELECT member, sum(CASE WHEN day = ? THEN {tokens} ELSE 0 END), "
        "sum(CASE WHEN day = ? THEN cost_usd ELSE 0 END), "
        f"sum({tokens}), sum(cost_usd) FROM usage_daily WHERE day >= ? AND day <= ? GROUP BY member",
        (day, day, day[:7] + "-01", day),
    ).fetchall()
    return {
        row[0]: (int(row[1] or 0), float(row[2] or 0), int(row[3] or 0), float(row[4] or 0)) for row in rows
    }


class Team:
    def __init__(
        self,
        access_keys: AccessKeys,
        data_dir: str | None,
        *,
        allow_shared: bool = True,
        record_usage: bool = True,
        retention_days: int = 90,
        clock: Callable[[], float] = time.time,
        flush_interval: float = 0.5,
        database_url: str | None = None,
    ) -> None:
        self.access_keys = access_keys
        # DATABASE_URL (PostgreSQL) when set, else DATA_DIR/ccx.db; neither: no database.
        target = database_url or (path_in(data_dir) if data_dir else None)
        self.db = Database(target) if target else None
        self.allow_shared = allow_shared
        self.record_usage = record_usage
        self.clock = clock
        self.index = MemberIndex()
        self.limiter = Limiter(clock)
        self.shared_limits: SharedLimiter | None = None  # REDIS_URL: limits across the fleet
        self.recorder = Recorder(self.db if record_usage else None, flush_interval, retention_days)
        self._tasks: list[asyncio.Task[None]] = []
        # Called with every request's Record when it ends (on the loop): ccx_proxy.ops.
        self.observers: list[Callable[[Record], None]] = []
        # Tracing (ccx_proxy.ops.tracing): tickets then collect their attempts, and this gets
        # the record with the ticket.  None: off, at no cost.
        self.tracer: Callable[[Record, Ticket], None] | None = None

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Open the database and load members and budgets; a database that cannot be
        opened is logged and the gateway runs on (shared keys only, usage not kept).  A
        PostgreSQL server (DATABASE_URL) is a network service that may come up after the
        gateway: it is tried again every :data:`REOPEN_INTERVAL` s until it answers."""
        db = self.db
        if db is None:
            return
        try:
            await self._open(db)
        except (DatabaseError, sqlite3.Error, OSError) as exc:
            log.error("team database unavailable, running with the shared keys only: %s", exc)
            if db.url is not None:
                self._tasks = [asyncio.get_running_loop().create_task(self._reopen(db))]
            return
        self._opened(db)

    async def _open(self, db: Database) -> None:
        if not db.is_open:
            await db.open()
        await self.refresh(force=True)
        totals = await db.run(lambda conn: _budget_totals(conn, utc_day(self.clock())))
        self.limiter.load(totals, self.clock())

    def _opened(self, db: Database) -> None:
        log.info(
            "team database %s: %d member(s)%s",
            db.name,
            len(self.index),
            "" if self.record_usage else "; usage recording off (USAGE_RECORDING=false)",
        )
        self._tasks += [
            asyncio.get_running_loop().create_task(self._poll()),
            asyncio.get_running_loop().create_task(self.recorder.run()),
        ]

    async def _reopen(self, db: Database) -> None:
        while True:
            await asyncio.sleep(REOPEN_INTERVAL)
            try:
                await self._open(db)
            except (DatabaseError, sqlite3.Error, OSError):
                continue  # said once at start; the gateway runs on meanwhile
            self._opened(db)
            return

    async def stop(self) -> None:
        await cancel_and_wait(*self._tasks)
        self._tasks = []
        await self.recorder.flush(final=True)
        if self.db is not None:
            await asyncio.to_thread(self.db.close)

    async def budget_totals(self) -> dict[str, tuple[int, float, int, float]]:
        """Today's and this month's spend per member, as the database has it (seeds Redis)."""
        db = self.db
        if db is None or not db.is_open:
            return {}
        return await db.run(lambda conn: _budget_totals(conn, utc_day(self.clock())))

    async def refresh(self, force: bool = False) -> bool:
        """Reload the member index if the table changed; whether it did."""
        db = self.db
        if db is None or not db.is_open:
            return False
        if not force and await db.run(members_version) == self.index.version:
            return False
        version, by_hash = await db.run(load_all)
        self.index = MemberIndex(version, by_hash)
        return True

    async def _poll(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(POLL_INTERVAL)
            try:
                await self.refresh()
            except Exception as exc:  # keep the last index: requests go on
                if not failing:
                    log.error("reading members failed (the last list stays in use): %s", exc)
                failing = True
            else:
                if failing:
                    log.info("reading members works again")
                failing = False

    # -- per request -----------------------------------------------------------------------

    def authenticate(self, headers: Mapping[str, str]) -> Member:
        key = client_key(headers)
        if key is None:
            raise AuthenticationFailed(self.access_keys.missing_message)
        if len(self.index):
            member = self.index.lookup(key)
            if member is not None:
                if not member.active:
                    raise AuthenticationFailed(
                        f"the key of member {member.name!r} is {member.status}; "
                        "ask the gateway's operator for a new one"
                    )
                return member
        if not self.access_keys.matches(key):
            raise AuthenticationFailed(self.access_keys.wrong_message)
        if not self.allow_shared and len(self.index):
            raise AuthenticationFailed(
                "the shared PROXY_ACCESS_KEY is turned off on this gateway (ALLOW_SHARED_KEY=false); "
                "use your own member key (ask the gateway's operator for one)"
            )
        return SHARED_MEMBER

    async def admit(self, ticket: Ticket) -> None:
        """The member's limits let the request in (or raise); every ticket then goes to
        :meth:`finish`, admitted or not (a refusal is recorded too).  With ``REDIS_URL`` a
        limited member is counted in Redis, across every worker and host."""
        member = ticket.member
        if not member.limited:
            ticket.admitted = True
            return
        shared = self.shared_limits
        if shared is None:
            self.limiter.admit(member)
        else:
            ticket.slot = await shared.admit(member)
        ticket.admitted = True

    def finish(self, ticket: Ticket) -> None:
        member = ticket.member
        shared = self.shared_limits
        if ticket.admitted and member.limited and shared is None:
            self.limiter.release(member)
        now = self.clock()
        usage = ticket.meter.usage if ticket.meter is not None else Usage()
        cost = None
        model = ticket.upstream_model or ticket.model
        if model and ticket.prices:
            for table in ticket.prices:
                price = table.lookup(usage.model or model) or table.lookup(model)
                if price is not None:
                    cost = price.cost(usage)
                    break
        tokens = usage.total
        if shared is not None:
            # One command in Redis: the concurrency slot back (if the request held one) and
            # the spend added (unlimited members too: a budget set later counts from today).
            slot = ticket.slot if ticket.admitted and member.limited else ""
            shared.finish(member, slot, tokens, cost, now)
        elif tokens or cost:
            self.limiter.spend(member.name, tokens, cost, now)
        observers = self.observers
        if not self.record_usage and not observers and self.tracer is None:
            return
        outcome = ticket.final_outcome
        record = Record(
            now,
            _text(ticket.request_id) or "",
            member.name,
            _text(ticket.session),
            ticket.endpoint,
            ticket.channel,
            _mask(ticket.api_key) if ticket.api_key else None,
            _text(ticket.model),
            _text(ticket.upstream_model),
            1 if ticket.stream else 0,
            ticket.status or CLIENT_CLOSED,
            ticket.error_type,
            outcome,
            ticket.attempts,
            None if ticket.ttfb is None else round(ticket.ttfb * 1000, 3),
            round((now - ticket.started) * 1000, 3),
            usage.input_tokens,
            usage.output_tokens,
            usage.cache_write_5m,
            usage.cache_write_1h,
            usage.cache_read,
            cost,
        )
        if self.record_usage:
            self.recorder.add(record)
        for observe in observers:  # metrics, access log: cheap, never raise (ccx_proxy.ops)
            observe(record)
        if self.tracer is not None:
            self.tracer(record, ticket)

    def member_view(self, member: Member) -> dict[str, Any]:
        """A member with today's and this month's spend and requests in flight."""
        spent = self.limiter.spent(member.name)
        return {
            **member.view(),
            "today": {"tokens": spent.day_tokens, "usd": round(spent.day_usd, 6)},
            "month": {"tokens": spent.month_tokens, "usd": round(spent.month_usd, 6)},
            "active": self.limiter.active(member.name),
        }
