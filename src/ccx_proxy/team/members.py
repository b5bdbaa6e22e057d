"""Members: who may call the gateway, with which key, under which limits.

A key is ``ccx-`` + 43 URL-safe random characters (256 bits), shown once when it is made
(creation, rotation) and stored only as its SHA-256 (hex) plus a display prefix
(``ccx-AbCd…``).  Requests are authenticated against :class:`MemberIndex`, a dict from
hash to :class:`Member` held in memory and swapped whole when the member table changes
(``meta.members_version`` is bumped by every write, and polled): no database read per
request.  A SHA-256 lookup leaks nothing useful through timing (the hash of a guess
says nothing about the hash of the key).

The functions below take a :class:`~.db.Connection` (SQLite or PostgreSQL) and are shared
by the admin API (on the database thread) and the CLI (directly), so that all three ways
agree.  Every write bumps ``members_version`` inside a transaction that excludes other
member writes (SQLite: its write lock; PostgreSQL: the ``members_version`` row, locked
first), so a check ("is the name free?") and the write it guards cannot interleave with
another process's.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

import orjson

from ..mapping import Allowlist, pattern_problem
from .db import Connection, dialect, transaction

KEY_PREFIX = "ccx-"
SHARED = "shared"  # PROXY_ACCESS_KEY / EXTRA_PROXY_ACCESS_KEYS are accounted as this member
STATUSES = ("active", "revoked")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
LIMIT_MAX = 10**15  # far above any real limit, far below what a deque or orjson can hold


class MemberError(Exception):
    """A member operation that cannot be done; ``status`` for the admin API (400/404/409)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-member limits; None = no limit.  Token budgets count every token the upstream
    reported (input, output, cache writes and reads); USD budgets need a price."""

    rpm: int | None = None
    maxConcurrent: int | None = None
    dailyTokens: int | None = None
    monthlyTokens: int | None = None
    dailyUsd: float | None = None
    monthlyUsd: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    @property
    def any(self) -> bool:
        return any(getattr(self, f.name) is not None for f in fields(self))


LIMIT_FIELDS = tuple(f.name for f in fields(Limits))
_USD_FIELDS = ("dailyUsd", "monthlyUsd")


@dataclass(frozen=True, slots=True)
class Member:
    name: str
    key_prefix: str
    status: str = "active"
    limits: Limits = field(default_factory=Limits)
    models: tuple[str, ...] = ()  # allowlist patterns (supportedModels syntax); empty: all
    channels: tuple[str, ...] = ()  # channel names; empty: all
    created_at: float = 0.0
    updated_at: float = 0.0
    last_used_at: float | None = None
    allowlist: Allowlist = field(default_factory=Allowlist, compare=False, repr=False)
    limited: bool = field(init=False, compare=False, repr=False)  # any limit set (hot path)

    def __post_init__(self) -> None:
        object.__setattr__(self, "limited", self.limits.any)

    @property
    def active(self) -> bool:
        return self.status == "active"

    def view(self) -> dict[str, Any]:
        """As the admin API and the CLI show it: never the key, only its prefix."""
        return {
            "name": self.name,
            "keyPrefix": self.key_prefix,
            "status": self.status,
            "limits": self.limits.to_dict(),
            "models": list(self.models),
            "channels": list(self.channels),
            "createdAt": self.created_at,
            "updatedAt": self.updated_at,
            "lastUsedAt": self.last_used_at,
        }


SHARED_MEMBER = Member(name=SHARED, key_prefix="PROXY_ACCESS_KEY")


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)  # 32 bytes -> 43 characters


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


def display_prefix(key: str) -> str:
    return key[: len(KEY_PREFIX) + 4] + "…"


def parse_limits(raw: Any, base: Limits | None = None) -> Limits:
    """Limits from JSON (admin API, CLI): unknown names and bad values are MemberErrors;
    ``null`` clears a limit; fields not given keep ``base``'s."""
    if raw is None:
        return base or Limits()
    if not isinstance(raw, Mapping):
        raise MemberError("limits: must be an object")
    values = base.to_dict() if base is not None else {}
    for name, value in raw.items():
        if name not in LIMIT_FIELDS:
            raise MemberError(f"limits.{name}: unknown limit (known: {', '.join(LIMIT_FIELDS)})")
        if value is None:
            values.pop(name, None)
            continue
        if name in _USD_FIELDS:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= LIMIT_MAX
        else:
            ok = isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= LIMIT_MAX
        if not ok:
            kind = "a number (USD)" if name in _USD_FIELDS else "an integer"
            kind += f" from 0 to {LIMIT_MAX:.0e}"
            raise MemberError(f"limits.{name}: must be {kind} or null (got {value!r})")
        values[name] = float(value) if name in _USD_FIELDS else value
    return Limits(**values)


def parse_names(raw: Any, what: str) -> tuple[str, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list) or not all(isinstance(p, str) and p.strip() for p in raw):
        raise MemberError(f"{what}: must be a list of non-empty strings")
    names = tuple(p.strip() for p in raw)
    if what == "models":
        for pattern in names:
            problem = pattern_problem(pattern)
            if problem:
                raise MemberError(f"models: {problem}")
    return names


def check_name(name: Any) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise MemberError(
            "name: 1-64 characters, letters, digits and . _ @ - (starting with a letter or digit)"
        )
    if name == SHARED:
        raise MemberError(f"name: {SHARED!r} is reserved for PROXY_ACCESS_KEY")
    return name


def _member(row: Sequence[Any]) -> tuple[str, Member]:
    name, digest, prefix, status, limits, models, channels, created, updated, used = row
    model_patterns = tuple(orjson.loads(models))
    member = Member(
        name=name,
        key_prefix=prefix,
        status=status,
        limits=Limits(**orjson.loads(limits)),
        models=model_patterns,
        channels=tuple(orjson.loads(channels)),
        created_at=created,
        updated_at=updated,
        last_used_at=used,
        allowlist=Allowlist(model_patterns),
    )
    return digest, member


_COLUMNS = (
    "name, key_hash, key_prefix, status, limits, models, channels, created_at, updated_at, last_used_at"
)


def load_all(conn: Connection) -> tuple[int, dict[str, Member]]:
    """(members_version, {key hash: member}) in one read transaction."""
    conn.execute("BEGIN")
    try:
        version = conn.execute("SELECT value FROM meta WHERE key = 'members_version'").fetchone()[0]
        rows = conn.execute(f"SELECT {_COLUMNS} FROM members ORDER BY name").fetchall()
    finally:
        conn.execute("COMMIT")
    return version, dict(_member(row) for row in rows)


def members_version(conn: Connection) -> int:
    return int(conn.execute("SELECT value FROM meta WHERE key = 'members_version'").fetchone()[0])


def get(conn: Connection, name: str) -> Member:
    row = conn.execute(f"SELECT {_COLUMNS} FROM members WHERE name = ?", (name,)).fetchone()
    if row is None:
        raise MemberError(f"no member named {name!r}", 404)
    return _member(row)[1]


def list_all(conn: Connection) -> list[Member]:
    return [_member(row)[1] for row in conn.execute(f"SELECT {_COLUMNS} FROM members ORDER BY name")]


def _bump(conn: Connection) -> None:
    conn.execute("UPDATE meta SET value = value + 1 WHERE key = 'members_version'")


T = TypeVar("T")


def _write(conn: Connection, fn: Callable[[Connection], T]) -> T:
    """``fn`` in a transaction no other member write runs beside (see the module's docstring)."""

    def locked(conn: Connection) -> T:
        if dialect(conn) == "postgresql":
            conn.execute("SELECT value FROM meta WHERE key = 'members_version' FOR UPDATE")
        return fn(conn)

    return transaction(conn, locked)


def add(
    conn: Connection,
    name: str,
    limits: Limits | None = None,
    models: Iterable[str] = (),
    channels: Iterable[str] = (),
) -> tuple[Member, str]:
    """A new active member and its key (the only time the key exists in clear)."""
    check_name(name)
    key = new_key()
    now = time.time()

    def write(conn: Connection) -> None:
        if conn.execute("SELECT 1 FROM members WHERE name = ?", (name,)).fetchone():
            raise MemberError(f"a member named {name!r} exists already", 409)
        conn.execute(
            f"INSERT INTO members ({_COLUMNS}) VALUES (?, ?, ?, 'active', ?, ?, ?, ?, ?, NULL)",
            (
                name,
                key_hash(key),
                display_prefix(key),
                orjson.dumps((limits or Limits()).to_dict()).decode(),
                orjson.dumps(list(models)).decode(),
                orjson.dumps(list(channels)).decode(),
                now,
                now,
            ),
        )
        _bump(conn)

    _write(conn, write)
    return get(conn, name), key


def update(
    conn: Connection,
    name: str,
    *,
    status: str | None = None,
    limits: Limits | None = None,
    models: Iterable[str] | None = None,
    channels: Iterable[str] | None = None,
    limits_patch: Any = None,
) -> Member:
    """Change what is given; ``limits_patch`` (JSON, ``null`` clears one) is merged into the
    stored limits inside the write transaction, so concurrent writers lose nothing."""
    if status is not None and status not in STATUSES:
        raise MemberError(f"status: must be one of {', '.join(STATUSES)}")

    def write(conn: Connection) -> None:
        current = get(conn, name)
        new_limits = parse_limits(limits_patch, base=current.limits) if limits_patch is not None else limits
        conn.execute(
            "UPDATE members SET status = ?, limits = ?, models = ?, channels = ?, updated_at = ? "
            "WHERE name = ?",
            (
                status or current.status,
                orjson.dumps((new_limits or current.limits).to_dict()).decode(),
                orjson.dumps(list(current.models if models is None else models)).decode(),
                orjson.dumps(list(current.channels if channels is None else channels)).decode(),
                time.time(),
                name,
            ),
        )
        _bump(conn)

    _write(conn, write)
    return get(conn, name)


def rotate(conn: Connection, name: str) -> tuple[Member, str]:
    """A new key for ``name``; the old one stops working at the next index refresh."""
    key = new_key()

    def write(conn: Connection) -> None:
        get(conn, name)
        conn.execute(
            "UPDATE members SET key_hash = ?, key_prefix = ?, updated_at = ? WHERE name = ?",
            (key_hash(key), display_prefix(key), time.time(), name),
        )
        _bump(conn)

    _write(conn, write)
    return get(conn, name), key


def delete(conn: Connection, name: str) -> None:
    """Remove the member (their usage rows stay, under their name)."""

    def write(conn: Connection) -> None:
        if conn.execute("DELETE FROM members WHERE name = ?", (name,)).rowcount == 0:
            raise MemberError(f"no member named {name!r}", 404)
        _bump(conn)

    _write(conn, write)


class MemberIndex:
    """Key hash -> member, swapped whole on refresh; lookups are one dict access."""

    __slots__ = ("version", "_by_hash", "_by_name")

    def __init__(self, version: int = -1, by_hash: Mapping[str, Member] | None = None) -> None:
        self.version = version
        self._by_hash: dict[str, Member] = dict(by_hash or {})
        self._by_name = {m.name: m for m in self._by_hash.values()}

    def __len__(self) -> int:
        return len(self._by_hash)

    def lookup(self, key: str) -> Member | None:
        return self._by_hash.get(key_hash(key))

    def by_name(self, name: str) -> Member | None:
        return self._by_name.get(name)
