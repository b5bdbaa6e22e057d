"""Usage totals for a date range, grouped by member, model, channel and/or day.

Read from the daily totals (``usage_daily``), which outlive the per-request rows, so a
report covers any range since the gateway first ran.  Days are UTC, ``YYYY-MM-DD``, both
ends included.  ``model`` is the upstream model (what was billed), or the requested name
when no upstream answered.
"""

from __future__ import annotations

import calendar
import csv
import io
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .db import Connection
from .recorder import DAILY_TOTALS

GROUPS = ("day", "member", "model", "channel")
COLUMNS = DAILY_TOTALS
_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")
_SINCE = re.compile(r"(\d{1,4})d")
MAX_DAYS = 3660


class ReportError(Exception):
    """A bad report request (a 400 in the admin API, exit 2 in the CLI)."""


@dataclass(frozen=True, slots=True)
class Query:
    start: str  # first day, included
    end: str  # last day, included
    group_by: tuple[str, ...] = ("member",)
    member: str | None = None
    model: str | None = None
    channel: str | None = None


def day_of(ts: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(ts))


def parse_query(
    raw: dict[str, str], now: float, *, member: str | None = None, default_days: int = 30
) -> Query:
    """From query parameters: ``from``, ``to`` (days), ``since`` (``7d``), ``groupBy``
    (comma-separated), ``member``, ``model``, ``channel``.  ``member`` given here wins
    (``/api/me/usage``: a member sees only their own)."""
    end = raw.get("to") or day_of(now)
    since = raw.get("since")
    if since:
        match = _SINCE.fullmatch(since)
        if not match:
            raise ReportError(f"since: a number of days such as 7d, not {since!r}")
        start = day_of(now - (int(match.group(1)) - 1) * 86400)
    else:
        start = raw.get("from") or ""
    for name, value in (("to", end), ("from", start)) if start else (("to", end),):
        if not _DAY.fullmatch(value):
            raise ReportError(f"{name}: a UTC day as YYYY-MM-DD, not {value!r}")
        try:
            time.strptime(value, "%Y-%m-%d")
        except ValueError:
            raise ReportError(f"{name}: {value!r} is not a date") from None
    if not start:  # the default range ends at ``to``
        start = day_of(calendar.timegm(time.strptime(end, "%Y-%m-%d")) - (default_days - 1) * 86400)
    if start > end:
        raise ReportError(f"from ({start}) is after to ({end})")
    groups = tuple(g.strip() for g in (raw.get("groupBy") or "member").split(",") if g.strip())
    unknown = [g for g in groups if g not in GROUPS]
    if unknown or not groups or len(set(groups)) != len(groups):
        raise ReportError(f"groupBy: one or more of {', '.join(GROUPS)}, comma-separated, each once")
    return Query(
        start=start,
        end=end,
        group_by=groups,
        member=member if member is not None else raw.get("member") or None,
        model=raw.get("model") or None,
        channel=raw.get("channel") or None,
    )


def run(conn: Connection, query: Query) -> list[dict[str, Any]]:
    """The grouped totals, ordered by the group columns (days ascending)."""
    where = ["day >= ?", "day <= ?"]
    params: list[Any] = [query.start, query.end]
    for column in ("member", "model", "channel"):
        value = getattr(query, column)
        if value is not None:
            where.append(f"{column} = ?")
            params.append(value)
    groups = ", ".join(query.group_by)  # names from GROUPS only: safe to splice
    sums = ", ".join(f"sum({c})" for c in COLUMNS)
    sql = (
        f"SELECT {groups}, {sums} FROM usage_daily WHERE {' AND '.join(where)} "
        f"GROUP BY {groups} ORDER BY {groups}"
    )
    rows = []
    for row in conn.execute(sql, params):
        item: dict[str, Any] = dict(zip(query.group_by, row, strict=False))
        values = row[len(query.group_by) :]
        for column, value in zip(COLUMNS, values, strict=True):
            item[column] = round(value or 0.0, 6) if column == "cost_usd" else int(value or 0)
        rows.append(item)
    return rows


def totals(rows: Iterable[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = dict.fromkeys(COLUMNS, 0)
    for row in rows:
        for column in COLUMNS:
            out[column] += row[column]
    out["cost_usd"] = round(out["cost_usd"], 6)
    return out


def to_csv(rows: Sequence[dict[str, Any]], group_by: Sequence[str]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*group_by, *COLUMNS])
    for row in rows:
        writer.writerow([row[g] for g in group_by] + [row[c] for c in COLUMNS])
    return out.getvalue()


def recent_requests(conn: Connection, member: str | None, limit: int = 50) -> list[dict[str, Any]]:
    """The latest per-request rows (newest first), for the console and ``/api/me/usage``."""
    sql = (
        "SELECT ts, request_id, member, session, endpoint, channel, key_id, model, upstream_model, stream, "
        "status, error_type, outcome, attempts, ttfb_ms, duration_ms, input_tokens, output_tokens, "
        "cache_write_5m, cache_write_1h, cache_read, cost_usd FROM usage"
    )
    params: list[Any] = []
    if member is not None:
        sql += " WHERE member = ?"
        params.append(member)
    sql += " ORDER BY ts DESC LIMIT ?"
    params.append(max(1, min(limit, 1000)))
    cursor = conn.execute(sql, params)
    names = [d[0] for d in cursor.description]
    rows = [dict(zip(names, row, strict=True)) for row in cursor]
    for row in rows:
        row["stream"] = bool(row["stream"])
    return rows
