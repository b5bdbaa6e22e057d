"""The admin API for the team: members and their keys, usage reports, and a member's own
view of their usage.

::

    GET    /api/members                 the list, with today's and this month's spend
    POST   /api/members                 add one: 201 {"member", "key"} (the key only here)
    GET    /api/members/{name}
    PATCH  /api/members/{name}          status, limits (merged; null clears one), models, channels
    DELETE /api/members/{name}          their usage rows stay
    POST   /api/members/{name}/rotate   a new key: {"member", "key"} (the old one stops at once)
    GET    /api/usage                   totals grouped by day, member, model, channel
    GET    /api/usage.csv               the same as a CSV download
    GET    /api/usage/requests          the latest per-request rows
    GET    /api/me/usage                a member's own usage, with their MEMBER key

All but ``/api/me/usage`` take the admin key.  Every statement runs on the database
thread; after a write this process's member index is reloaded at once (other workers and
processes follow within a second by polling).  Keys and request bodies are never logged.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable
from typing import Any, TypeVar

from aiohttp import web

from ..errors import Conflict, GatewayError, InvalidRequest, NotFound
from ..state import GATEWAY
from ..team import members, reports
from ..team.db import Connection, Database, DatabaseError
from ..team.members import Member, MemberError
from ..team.service import Team
from .api import ADMIN, _body, _json_response

log = logging.getLogger("ccx_proxy.admin")

T = TypeVar("T")

UNAVAILABLE = (
    "the team database is unavailable, so members and usage cannot be read or changed: "
    "check DATA_DIR (or DATABASE_URL) and the gateway's log"
)
CREATE_FIELDS = frozenset({"name", "limits", "models", "channels"})
PATCH_FIELDS = frozenset({"status", "limits", "models", "channels"})
ME_RECENT = 20
ME_DAYS = 30
RECENT_DEFAULT = 50
# What a member sees of their own request rows: the masked upstream key is the operator's.
ME_HIDDEN = frozenset({"key_id"})


class TeamUnavailable(GatewayError):
    """The team database is not open (or failing): nothing to read or change."""

    status = 503
    error_type = "api_error"
    retryable = False


def _member_error(exc: MemberError) -> GatewayError:
    if exc.status == 404:
        return NotFound(exc.message)
    if exc.status == 409:
        return Conflict(exc.message)
    return InvalidRequest(exc.message)


def _team(request: web.Request) -> Team:
    return request.app[GATEWAY].team


def _database(team: Team) -> Database:
    if team.db is None or not team.db.is_open:
        raise TeamUnavailable(UNAVAILABLE)
    return team.db


async def _run(team: Team, fn: Callable[[Connection], T]) -> T:
    """``fn`` on the database thread; member errors as their HTTP errors, a failing
    database as a 503 (logged: the statement's error, never its parameters)."""
    db = _database(team)
    try:
        return await db.run(fn)
    except MemberError as exc:
        raise _member_error(exc) from None
    except (DatabaseError, sqlite3.Error) as exc:
        log.error("team database %s: %s", db.name, exc)
        raise TeamUnavailable(UNAVAILABLE) from None


async def _refresh(team: Team) -> None:
    """This process's index follows the write at once; if reading it back fails, the poll
    catches up later (the write itself is done)."""
    try:
        await team.refresh(force=True)
    except (DatabaseError, sqlite3.Error) as exc:
        log.error("reloading members after a change failed (retried by the poll): %s", exc)


def _object(body: Any, allowed: frozenset[str]) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise InvalidRequest(f"{unknown[0]}: unknown field (known: {', '.join(sorted(allowed))})")
    return body


def _channels(request: web.Request, raw: Any) -> tuple[str, ...]:
    """Channel names, each one the configuration has (a typo would lock the member out)."""
    try:
        names = members.parse_names(raw, "channels")
    except MemberError as exc:
        raise _member_error(exc) from None
    known = [c.name for c in request.app[GATEWAY].runtime.config.channels]
    for name in names:
        if name not in known:
            raise InvalidRequest(f"channels: no channel named {name!r} (channels: {', '.join(known)})")
    return names


def _parsed(fn: Callable[[], T]) -> T:
    try:
        return fn()
    except MemberError as exc:
        raise _member_error(exc) from None


# -- members ------------------------------------------------------------------------------


async def list_members(request: web.Request) -> web.Response:
    request.app[ADMIN].check(request)
    team = _team(request)
    db = team.db
    found: list[Member] = []
    if db is not None and db.is_open:
        found = await _run(team, members.list_all)
    return _json_response(
        {
            "members": [team.member_view(m) for m in found],
            "allowSharedKey": team.allow_shared,
            "database": db.name if db is not None else None,
            "databaseOpen": db is not None and db.is_open,
            "usageRecording": team.record_usage,
        }
    )


async def create_member(request: web.Request) -> web.Response:
    request.app[ADMIN].check(request)
    team = _team(request)
    _database(team)
    body = _object(await _body(request), CREATE_FIELDS)
    name = _parsed(lambda: members.check_name(body.get("name")))
    limits = _parsed(lambda: members.parse_limits(body.get("limits")))
    models = _parsed(lambda: members.parse_names(body.get("models"), "models"))
    channels = _channels(request, body.get("channels"))
    member, key = await _run(team, lambda conn: members.add(conn, name, limits, models, channels))
    await _refresh(team)
    log.info("member %r added (admin API)", name)
    return _json_response({"member": team.member_view(member), "key": key}, status=201)


async def get_member(request: web.Request) -> web.Response:
    request.app[ADMIN].check(request)
    team = _team(request)
    name = request.match_info["name"]
    member = await _run(team, lambda conn: members.get(conn, name))
    return _json_response(team.member_view(member))


async def update_member(request: web.Request) -> web.Response:
    request.app[ADMIN].check(request)
    team = _team(request)
    _database(team)
    name = request.match_info["name"]
    body = _object(await _body(request), PATCH_FIELDS)
    status = body.get("status")
    if "status" in body and status not in members.STATUSES:
        raise InvalidRequest(f"status: must be one of {', '.join(members.STATUSES)}")
    models = _parsed(lambda: members.parse_names(body["models"], "models")) if "models" in body else None
    channels = _channels(request, body["channels"]) if "channels" in body else None

    if not body:  # nothing to change: no write
        return _json_response(team.member_view(await _run(team, lambda conn: members.get(conn, name))))

    def change(conn: Connection) -> Member:
        return members.update(
            conn, name, status=status, models=models, channels=channels, limits_patch=body.get("limits")
        )

    member = await _run(team, change)
    await _refresh(team)
    log.info("member %r changed (admin API): %s", name, ", ".join(sorted(body)))
    return _json_response(team.member_view(member))


async def delete_member(request: web.Request) -> web.Response:
    request.app[ADMIN].check(request)
    team = _team(request)
    name = request.match_info["name"]
    await _run(team, lambda conn: members.delete(conn, name))
    await _refresh(team)
    log.info("member %r deleted (admin API)", name)
    return _json_response({"deleted": name})


async def rotate_key(request: web.Request) -> web.Response:
    request.app[ADMIN].check(request)
    team = _team(request)
    name = request.match_info["name"]
    member, key = await _run(team, lambda conn: members.rotate(conn, name))
    await _refresh(team)
    log.info("member %r: key rotated (admin API)", name)
    return _json_response({"member": team.member_view(member), "key": key})


# -- usage --------------------------------------------------------------------------------


def _query(request: web.Request, team: Team, member: str | None = None) -> reports.Query:
    raw = {k: request.query[k] for k in request.query}
    try:
        return reports.parse_query(raw, team.clock(), member=member)
    except reports.ReportError as exc:
        raise InvalidRequest(str(exc)) from None


async def usage(request: web.Request) -> web.Response:
    request.app[ADMIN].check(request)
    team = _team(request)
    _database(team)
    query = _query(request, team)
    rows = await _run(team, lambda conn: reports.run(conn, query))
    return _json_response(
        {
            "from": query.start,
            "to": query.end,
            "groupBy": list(query.group_by),
            "rows": rows,
            "totals": reports.totals(rows),
        }
    )


async def usage_csv(request: web.Request) -> web.Response:
    request.app[ADMIN].check(request)
    team = _team(request)
    _database(team)
    query = _query(request, team)
    rows = await _run(team, lambda conn: reports.run(conn, query))
    return web.Response(
        text=reports.to_csv(rows, query.group_by),
        content_type="text/csv",
        charset="utf-8",
        headers={"Content-Disposition": f'attachment; filename="ccx-usage-{query.start}-{query.end}.csv"'},
    )


async def usage_requests(request: web.Request) -> web.Response:
    request.app[ADMIN].check(request)
    team = _team(request)
    _database(team)
    member = request.query.get("member") or None
    raw_limit = request.query.get("limit", str(RECENT_DEFAULT))
    if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= 1000:
        raise InvalidRequest(f"limit: a number of rows from 1 to 1000, not {raw_limit!r}")
    limit = int(raw_limit)
    rows = await _run(team, lambda conn: reports.recent_requests(conn, member, limit))
    return _json_response({"requests": rows})


def _query_for(member: str, team: Team) -> reports.Query:
    """The last :data:`ME_DAYS` days by day, of ``member`` only (whatever the query says)."""
    return reports.parse_query({"groupBy": "day"}, team.clock(), member=member, default_days=ME_DAYS)


async def my_usage(request: web.Request) -> web.Response:
    """A member's own usage, authenticated with their member key (the shared key: "shared")."""
    team = _team(request)
    member = team.authenticate(request.headers)
    _database(team)
    query = _query_for(member.name, team)

    def read(conn: Connection) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        return reports.run(conn, query), reports.recent_requests(conn, member.name, ME_RECENT)

    rows, recent = await _run(team, read)
    view = team.member_view(member)
    return _json_response(
        {
            "member": view,
            "limits": member.limits.to_dict(),
            "today": view["today"],
            "month": view["month"],
            "from": query.start,
            "to": query.end,
            "usage": rows,
            "recent": [{k: v for k, v in row.items() if k not in ME_HIDDEN} for row in recent],
        }
    )


def setup_members(app: web.Application) -> None:
    app.router.add_get("/api/members", list_members)
    app.router.add_post("/api/members", create_member)
    app.router.add_get("/api/members/{name}", get_member)
    app.router.add_patch("/api/members/{name}", update_member)
    app.router.add_delete("/api/members/{name}", delete_member)
    app.router.add_post("/api/members/{name}/rotate", rotate_key)
    app.router.add_get("/api/usage", usage)
    app.router.add_get("/api/usage.csv", usage_csv)
    app.router.add_get("/api/usage/requests", usage_requests)
    app.router.add_get("/api/me/usage", my_usage)
