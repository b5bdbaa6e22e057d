"""``ccx-proxy members ...``, ``ccx-proxy usage [export]`` and ``ccx-proxy migrate``: the
team database from a shell.

They open ``DATA_DIR/ccx.db`` directly, also while the gateway runs (WAL: readers never
wait; a write waits up to :data:`~ccx_proxy.team.db.BUSY_TIMEOUT_S` for the gateway's
lock), or, when ``DATABASE_URL`` is set, the PostgreSQL database it names.  A running
gateway sees a member change within a second (it polls the table's version).  A key is
printed once, when it is made; afterwards only its prefix exists.

Errors are one line on stderr (a database URL's password masked): exit 1 when the
operation cannot be done (no such member, name taken, bad value, no database, a schema
newer than this ccx-proxy, an export target that is not empty), 2 for a bad command line.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson

from ..settings import DEFAULT_DATA_DIR, SettingsError, database_url
from . import members, reports
from .db import Connection, DatabaseError, Target, display, is_url, open_connection, path_in, upgrade
from .export import BATCH_ROWS, ExportError, export
from .members import LIMIT_FIELDS, Limits, Member, MemberError

# --flag -> limit name, in the order the help lists them.
LIMIT_FLAGS = {
    "rpm": "rpm",
    "max-concurrent": "maxConcurrent",
    "daily-tokens": "dailyTokens",
    "monthly-tokens": "monthlyTokens",
    "daily-usd": "dailyUsd",
    "monthly-usd": "monthlyUsd",
}
_LIMIT_HELP = {
    "rpm": "requests per minute",
    "maxConcurrent": "requests in flight at once",
    "dailyTokens": "tokens per UTC day (input, output, cache writes and reads)",
    "monthlyTokens": "tokens per UTC month",
    "dailyUsd": "USD per UTC day (needs prices in channels.json)",
    "monthlyUsd": "USD per UTC month (needs prices in channels.json)",
}
CLEARABLE = (*LIMIT_FLAGS, "models", "channels")
SHOWN_ONCE = "store it now: it is not shown again"
_DATA_DIR_HELP = (
    f"the gateway's data directory, holding ccx.db (env DATA_DIR, default {DEFAULT_DATA_DIR}; "
    "not used when env DATABASE_URL names a PostgreSQL database)"
)
MAX_LIMIT = 10**15
TOKEN_COLUMNS = ("input_tokens", "output_tokens", "cache_write_5m", "cache_write_1h", "cache_read")

Command = Callable[..., argparse.ArgumentParser]


class UsageError(Exception):
    """A command line that asks for nothing sensible (exit 2)."""


# -- the parser ---------------------------------------------------------------------------


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value > MAX_LIMIT:  # the database stores 64-bit integers; no real limit is near this
        raise argparse.ArgumentTypeError(f"{value} is more than {MAX_LIMIT:,}")
    return value


def _usd(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of USD: {text!r}") from None
    if not math.isfinite(value) or value > MAX_LIMIT:
        raise argparse.ArgumentTypeError(f"not a number of USD up to {MAX_LIMIT:,}: {text!r}")
    return value


def _list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _clearable(text: str) -> str:
    name = text.strip()
    for flag, field in LIMIT_FLAGS.items():
        if name in (flag, field):
            return flag
    if name in ("models", "channels"):
        return name
    raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(CLEARABLE)}")


def _limit_options(parser: argparse.ArgumentParser, when_unset: str) -> None:
    for flag, field in LIMIT_FLAGS.items():
        usd = field.endswith("Usd")
        parser.add_argument(
            f"--{flag}",
            dest=field,
            type=_usd if usd else _count,
            metavar="USD" if usd else "N",
            help=f"limit: {_LIMIT_HELP[field]} (no env, {when_unset})",
        )
    parser.add_argument(
        "--models",
        type=_list,
        metavar="P,...",
        help=f"model allowlist, comma-separated patterns such as claude-sonnet-*,*haiku* "
        f"(no env, {when_unset.replace('no limit', 'all models')}; '' allows all)",
    )
    parser.add_argument(
        "--channels",
        type=_list,
        metavar="C,...",
        help=f"channels the member may use, comma-separated names "
        f"(no env, {when_unset.replace('no limit', 'all channels')}; '' allows all)",
    )


def _data_dir_option(parser: argparse.ArgumentParser, text: str = _DATA_DIR_HELP) -> None:
    parser.add_argument("--data-dir", metavar="DIR", help=text)


def add_commands(command: Command) -> None:
    """``members``, ``usage`` and ``migrate``, made by ``command(name, help)`` (the main
    parser's)."""
    parser = command(
        "members",
        "add, list, change and remove team members and their keys (in DATA_DIR/ccx.db, or "
        "DATABASE_URL; a running gateway follows within a second)",
    )
    sub = parser.add_subparsers(
        dest="members_command", required=True, metavar="ACTION", help="what to do (required)"
    )

    def action(name: str, text: str, member: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=text, description=f"ccx-proxy members {name}: {text}.")
        if member:
            p.add_argument("name", metavar="NAME", help="the member's name (required)")
        _data_dir_option(p)
        return p

    add = action("add", "add a member and print their key (shown only this once)")
    _limit_options(add, "default no limit")
    listing = action("list", "list the members with today's and this month's spend", member=False)
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table (default off)")
    action("show", "show one member")
    change = action("set", "change a member's limits, models or channels (other values stay)")
    _limit_options(change, "default unchanged")
    change.add_argument(
        "--clear",
        nargs="+",
        action="extend",
        type=_clearable,
        default=[],
        metavar="LIMIT",
        help=f"remove limits, or the model / channel restriction: any of {', '.join(CLEARABLE)} "
        "(no env, default none)",
    )
    action("rotate", "give a member a new key and print it (the old key stops working)")
    action("revoke", "turn a member's key off (their usage stays; 'activate' turns it back on)")
    action("activate", "turn a revoked member's key back on")
    action("delete", "remove a member (their usage stays in reports, under their name)")

    report = command(
        "usage", "usage and cost totals from DATA_DIR/ccx.db (or DATABASE_URL), as a table or CSV"
    )
    report.add_argument(
        "--by",
        default="member",
        metavar="GROUP",
        help="group by member, model, channel or day; several comma-separated, e.g. day,member "
        "(no env, default member)",
    )
    span = report.add_mutually_exclusive_group()
    span.add_argument(
        "--since", metavar="Nd", help="the last N days, today included, e.g. 7d (no env, default 30d)"
    )
    span.add_argument(
        "--from",
        dest="start",
        metavar="DAY",
        help="first UTC day, YYYY-MM-DD (no env, default 30 days ago: today and the 29 before)",
    )
    report.add_argument(
        "--to", dest="end", metavar="DAY", help="last UTC day, YYYY-MM-DD (no env, default today)"
    )
    report.add_argument("--member", metavar="NAME", help="only this member (no env, default all)")
    report.add_argument("--model", metavar="MODEL", help="only this upstream model (no env, default all)")
    report.add_argument("--channel", metavar="NAME", help="only this channel (no env, default all)")
    report.add_argument("--csv", action="store_true", help="print CSV instead of a table (default off)")
    _data_dir_option(report)
    _export_command(report)
    _migrate_command(command)


def _export_command(report: argparse.ArgumentParser) -> None:
    verbs = report.add_subparsers(
        dest="usage_command",
        metavar="[export]",
        help="'export --to postgresql://...' copies the SQLite history into PostgreSQL "
        "(optional; default: print the report)",
    )
    text = (
        "copy members (key hashes only), usage rows, daily totals and members_version from a "
        "SQLite ccx.db into PostgreSQL, migrating it first"
    )
    export = verbs.add_parser(
        "export",
        help=text,
        description=f"ccx-proxy usage export: {text}. All in one transaction: a failed export "
        "leaves the target as it was, and can be run again.",
    )
    export.add_argument(
        "--to",
        metavar="URL",
        help="the PostgreSQL database, postgresql://user:password@host/db (env DATABASE_URL; "
        "required when that is unset)",
    )
    export.add_argument(
        "--from",
        dest="source",
        metavar="PATH",
        help="the SQLite file to copy (no env, default ccx.db in --data-dir)",
    )
    export.add_argument(
        "--replace",
        action="store_true",
        help="delete the target's members, usage rows and daily totals first (default off: a "
        "target that holds any is refused and nothing is copied)",
    )
    export.add_argument(
        "--batch",
        type=_batch,
        default=BATCH_ROWS,
        metavar="N",
        help=f"rows per COPY (no env, default {BATCH_ROWS:,})",
    )
    _data_dir_option(
        export,
        f"the data directory whose ccx.db is copied (env DATA_DIR, default {DEFAULT_DATA_DIR})",
    )


def _migrate_command(command: Command) -> None:
    migrate = command(
        "migrate",
        "apply pending schema migrations to the team database: DATABASE_URL when set, else "
        "DATA_DIR/ccx.db (the gateway also migrates when it starts)",
    )
    _data_dir_option(migrate)


def _batch(text: str) -> int:
    value = _count(text)
    if not 1 <= value <= 1_000_000:
        raise argparse.ArgumentTypeError(f"a number of rows from 1 to 1,000,000, not {value}")
    return value


# -- running ------------------------------------------------------------------------------


def main(args: argparse.Namespace) -> int:
    data_dir = args.data_dir or os.environ.get("DATA_DIR", "").strip() or DEFAULT_DATA_DIR
    target: Target = path_in(data_dir)
    try:
        url = database_url(os.environ)
        if args.command == "usage" and getattr(args, "usage_command", None) == "export":
            return _export(path_in(data_dir), url, args)
        target = url or target
        if args.command == "migrate":
            return _migrate(target)
        if args.command == "usage":
            return _usage(target, args)
        return _members(target, args)
    except SettingsError as exc:
        _error(str(exc))
        return 2
    except UsageError as exc:
        _error(str(exc))
        return 2
    except reports.ReportError as exc:
        _error(str(exc))
        return 2
    except MemberError as exc:
        _error(exc.message)
        return 1
    except (DatabaseError, ExportError) as exc:
        _error(str(exc))
        return 1
    except sqlite3.Error as exc:
        _error(f"the database {display(target)}: {exc}")
        return 1


def _error(message: str) -> None:
    print(f"ccx-proxy: {message}", file=sys.stderr)


@contextlib.contextmanager
def _open(target: Target, *, create: bool = False) -> Iterator[Connection]:
    conn = open_connection(target, create=create)
    try:
        yield conn
    finally:
        conn.close()


def _migrate(target: Target) -> int:
    before, after = upgrade(target)
    if before == after:
        print(f"{display(target)}: schema version {after}, up to date (nothing to do)")
    else:
        print(f"migrated {display(target)}: schema version {before} -> {after}")
    return 0


def _export(data_dir_db: Path, env_url: str | None, args: argparse.Namespace) -> int:
    url = args.to or env_url
    if not url:
        raise UsageError("usage export: give --to postgresql://... (or set DATABASE_URL)")
    if not is_url(url):
        raise UsageError("usage export: --to must be a postgresql:// URL")
    source = Path(args.source) if args.source else data_dir_db
    counts = export(source, url, replace=args.replace, batch=args.batch)
    print(f"exported {source} to {display(url)} (one transaction)")
    if counts.replaced:
        print("  replaced:        the target's earlier members, usage rows and daily totals")
    print(f"  members:         {counts.members:,} (key hashes and prefixes only)")
    print(f"  usage rows:      {counts.usage:,}")
    print(f"  daily totals:    {counts.daily:,}")
    print(f"  members_version: {counts.members_version}")
    return 0


def _members(path: Target, args: argparse.Namespace) -> int:
    action = args.members_command
    if action == "add":
        limits = members.parse_limits(_given_limits(args))
        models = members.parse_names(args.models, "models")
        channels = members.parse_names(args.channels, "channels")
        with _open(path, create=True) as conn:
            member, key = members.add(conn, args.name, limits, models, channels)
        print(f"added member {member.name}")
        _describe(member)
        _print_key(key)
        return 0
    with _open(path) as conn:
        if action == "list":
            return _list_members(conn, args.json)
        if action == "show":
            member = members.get(conn, args.name)
            spent = _spent(conn).get(member.name, (0, 0.0, 0, 0.0))
            _describe(member, spent)
            return 0
        if action == "set":
            return _set(conn, args)
        if action == "rotate":
            member, key = members.rotate(conn, args.name)
            print(f"new key for member {member.name} (the old key stops working within a second)")
            _print_key(key)
            return 0
        if action in ("revoke", "activate"):
            status = "revoked" if action == "revoke" else "active"
            member = members.update(conn, args.name, status=status)
            print(f"member {member.name} is {member.status}")
            return 0
        members.delete(conn, args.name)
        print(f"deleted member {args.name} (their usage stays in reports)")
        return 0


def _given_limits(args: argparse.Namespace) -> dict[str, Any]:
    return {field: getattr(args, field) for field in LIMIT_FIELDS if getattr(args, field) is not None}


def _set(conn: Connection, args: argparse.Namespace) -> int:
    raw: dict[str, Any] = _given_limits(args)
    models, channels = args.models, args.channels
    for name in args.clear:
        if name == "models":
            models = []
        elif name == "channels":
            channels = []
        else:
            field = LIMIT_FLAGS[name]
            if field in raw:
                raise UsageError(f"--{name} and --clear {name} contradict each other")
            raw[field] = None
    if not raw and models is None and channels is None:
        raise UsageError(
            "members set: nothing to change (give a limit such as --rpm 60, --clear LIMIT, "
            "--models or --channels)"
        )
    models = None if models is None else members.parse_names(models, "models")
    channels = None if channels is None else members.parse_names(channels, "channels")
    current = members.get(conn, args.name)
    limits = members.parse_limits(raw, base=current.limits) if raw else None
    member = members.update(conn, args.name, limits=limits, models=models, channels=channels)
    print(f"updated member {member.name}")
    _describe(member)
    return 0


def _print_key(key: str) -> None:
    # The key alone on the last line: `ccx-proxy members add bob | tail -n 1` gives it.
    print(f"key ({SHOWN_ONCE}):")
    print(key)


def _limits_text(limits: Limits) -> str:
    parts = []
    for flag, field in LIMIT_FLAGS.items():
        value = getattr(limits, field)
        if value is not None:
            parts.append(f"{flag} {_usd_text(value) if field.endswith('Usd') else f'{value:,}'}")
    return ", ".join(parts) or "none"


def _usd_text(value: float) -> str:
    return f"${value:,.2f}" if value >= 1 or value == 0 else f"${value:.4f}"


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(ts)) if ts else "never"


def _describe(member: Member, spent: tuple[int, float, int, float] | None = None) -> None:
    print(f"  name:      {member.name}")
    print(f"  status:    {member.status}")
    print(f"  key:       {member.key_prefix}")
    print(f"  limits:    {_limits_text(member.limits)}")
    print(f"  models:    {', '.join(member.models) or 'all'}")
    print(f"  channels:  {', '.join(member.channels) or 'all'}")
    if spent is not None:
        print(f"  today:     {spent[0]:,} tokens, {_usd_text(spent[1])}")
        print(f"  month:     {spent[2]:,} tokens, {_usd_text(spent[3])}")
        print(f"  created:   {_when(member.created_at)}")
        print(f"  last used: {_when(member.last_used_at)}")


def _spent(conn: Connection) -> dict[str, tuple[int, float, int, float]]:
    """Per member: (tokens today, USD today, tokens this month, USD this month), UTC."""
    today = reports.day_of(time.time())
    found: dict[str, list[Any]] = {}
    for start, offset in ((today, 0), (today[:7] + "-01", 2)):
        query = reports.Query(start=start, end=today, group_by=("member",))
        for row in reports.run(conn, query):
            entry = found.setdefault(row["member"], [0, 0.0, 0, 0.0])
            entry[offset] = sum(row[c] for c in TOKEN_COLUMNS)
            entry[offset + 1] = row["cost_usd"]
    return {name: (int(v[0]), float(v[1]), int(v[2]), float(v[3])) for name, v in found.items()}


def _list_members(conn: Connection, as_json: bool) -> int:
    found = members.list_all(conn)
    spent = _spent(conn)
    if as_json:
        views = []
        for member in found:
            day_tokens, day_usd, month_tokens, month_usd = spent.get(member.name, (0, 0.0, 0, 0.0))
            views.append(
                {
                    **member.view(),
                    "today": {"tokens": day_tokens, "usd": round(day_usd, 6)},
                    "month": {"tokens": month_tokens, "usd": round(month_usd, 6)},
                }
            )
        print(orjson.dumps({"members": views}, option=orjson.OPT_INDENT_2).decode())
        return 0
    if not found:
        print("no members yet: add one with 'ccx-proxy members add NAME'")
        return 0
    header = ("NAME", "STATUS", "KEY", "LIMITS", "MODELS", "CHANNELS", "TODAY", "MONTH", "LAST USED")
    rows = []
    for member in found:
        day_tokens, day_usd, month_tokens, month_usd = spent.get(member.name, (0, 0.0, 0, 0.0))
        rows.append(
            (
                member.name,
                member.status,
                member.key_prefix,
                _limits_text(member.limits),
                ",".join(member.models) or "all",
                ",".join(member.channels) or "all",
                f"{day_tokens:,} tok {_usd_text(day_usd)}",
                f"{month_tokens:,} tok {_usd_text(month_usd)}",
                _when(member.last_used_at),
            )
        )
    _table(header, rows, right=())
    return 0


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[int]) -> None:
    widths = [max(len(str(row[i])) for row in (header, *rows)) for i in range(len(header))]
    for row in (header, *rows):
        cells = [
            str(cell).rjust(widths[i]) if i in right else str(cell).ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        print("  ".join(cells).rstrip())


def _usage(path: Target, args: argparse.Namespace) -> int:
    raw = {
        "groupBy": args.by,
        "since": args.since or "",
        "from": args.start or "",
        "to": args.end or "",
        "member": args.member or "",
        "model": args.model or "",
        "channel": args.channel or "",
    }
    query = reports.parse_query(raw, time.time())
    with _open(path) as conn:
        rows = reports.run(conn, query)
    if args.csv:
        sys.stdout.write(reports.to_csv(rows, query.group_by))
        return 0
    if not rows:
        print(f"no usage from {query.start} to {query.end}")
        return 0
    header = (
        *(g.upper() for g in query.group_by),
        "REQUESTS",
        "ERRORS",
        "INPUT",
        "OUTPUT",
        "CACHE WRITE",
        "CACHE READ",
        "COST",
    )

    def line(first: Sequence[str], row: dict[str, Any]) -> tuple[str, ...]:
        cost = _usd_text(row["cost_usd"]) + (f" (+{row['unpriced']} unpriced)" if row["unpriced"] else "")
        return (
            *first,
            f"{row['requests']:,}",
            f"{row['errors']:,}",
            f"{row['input_tokens']:,}",
            f"{row['output_tokens']:,}",
            f"{row['cache_write_5m'] + row['cache_write_1h']:,}",
            f"{row['cache_read']:,}",
            cost,
        )

    body = [line([str(row[g]) or "-" for g in query.group_by], row) for row in rows]
    total = reports.totals(rows)
    blank = [""] * (len(query.group_by) - 1)
    body.append(line(["TOTAL", *blank], total))
    print(f"usage from {query.start} to {query.end} (UTC), by {', '.join(query.group_by)}")
    groups = len(query.group_by)
    _table(header, body, right=range(groups, groups + 7))
    return 0
