"""Process-level settings: where to listen, who may call, limits.

Read once from the environment (and CLI flags, which win) into a frozen
dataclass.  Channel configuration lives in :mod:`ccx_proxy.config`.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from .forwarded import TrustedProxies

DEFAULT_PORT = 3000
DEFAULT_HOST = "127.0.0.1"
DEFAULT_CHANNELS_FILE = "./channels.json"
DEFAULT_MAX_BODY_MB = 50.0
DEFAULT_DATA_DIR = "./data"


class SettingsError(Exception):
    """A setting that makes starting pointless; the message is one line."""


@dataclass(frozen=True, slots=True)
class RedisSettings:
    """Shared state across workers and hosts (:mod:`ccx_proxy.shared`): ``REDIS_URL`` and its knobs."""

    url: str = field(repr=False)  # may carry a password
    failure: str = "open"  # REDIS_FAILURE: open (local state) | closed (refuse limited requests)
    timeout: float = 0.05  # REDIS_TIMEOUT_MS: the longest a request waits on Redis
    prefix: str = "ccx:"  # REDIS_PREFIX: every key and channel starts with it
    slot_ttl: float = 30.0  # REDIS_SLOT_TTL_S: a concurrency slot of a process that died expires

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> RedisSettings | None:
        url = env.get("REDIS_URL", "").strip()
        if not url:
            return None
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise SettingsError("REDIS_URL must start with redis://, rediss:// or unix://")
        shape = "redis://[:password@]host:port/db, with / # ? @ in the password percent-encoded"
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 - raises on a port that is not a number
        except ValueError:
            raise SettingsError(f"REDIS_URL is not a valid URL ({shape})") from None
        if parts.scheme != "unix":
            if not parts.hostname:
                raise SettingsError(f"REDIS_URL names no host ({shape})")
            db = parts.path.lstrip("/")
            if db and not db.isdigit():
                raise SettingsError(f"REDIS_URL's database must be a number ({shape})")
        failure = env.get("REDIS_FAILURE", "").strip().lower() or "open"
        if failure not in ("open", "closed"):
            raise SettingsError(f"REDIS_FAILURE must be open or closed, not {failure!r}")
        timeout_ms = _non_negative_int(env, "REDIS_TIMEOUT_MS", 50)
        if not 1 <= timeout_ms <= 10_000:
            raise SettingsError("REDIS_TIMEOUT_MS must be between 1 and 10000")
        slot_ttl = _non_negative_int(env, "REDIS_SLOT_TTL_S", 30)
        if slot_ttl < 1:
            raise SettingsError("REDIS_SLOT_TTL_S must be at least 1")
        prefix = env.get("REDIS_PREFIX", "").strip() or "ccx:"
        return cls(url, failure, timeout_ms / 1000, prefix, float(slot_ttl))


@dataclass(frozen=True, slots=True)
class Settings:
    access_keys: tuple[str, ...] = field(repr=False)
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    channels_file: str = DEFAULT_CHANNELS_FILE
    max_body_bytes: int = int(DEFAULT_MAX_BODY_MB * 1024 * 1024)
    admin_keys: tuple[str, ...] = field(default=(), repr=False)  # empty: admin API disabled
    config_backups: int = 10
    watch_interval: float = 0.5  # seconds between channels-file checks; 0 disables
    # Client-side limits, seconds (0 turns one off): see ccx_proxy.server.
    client_header_timeout: float = 10.0  # a request head, from its first byte
    client_body_timeout: float = 30.0  # longest pause while a request body arrives
    client_keepalive_timeout: float = 75.0  # an idle keep-alive connection
    client_write_timeout: float = 60.0  # a client that accepts no bytes loses its stream
    # The team database (members, usage): DATA_DIR/ccx.db.  None: no database (members
    # cannot exist, usage is not kept); from_env defaults it to ./data.
    data_dir: str | None = None
    allow_shared_key: bool = True  # PROXY_ACCESS_KEY still works once members exist
    usage_recording: bool = True
    usage_retention_days: int = 90
    access_log: bool = True  # one line per request (ccx_proxy.ops.accesslog); ACCESS_LOG=off
    log_format: str = "text"  # LOG_FORMAT: text | json
    # DATABASE_URL=postgresql://...: members and usage in PostgreSQL instead of DATA_DIR/ccx.db.
    database_url: str | None = field(default=None, repr=False)  # may carry a password
    redis: RedisSettings | None = None  # REDIS_URL unset: every process keeps its own state
    # FORWARDED_ALLOW_IPS: the load balancers whose X-Forwarded-For names the client (the
    # access log's address); empty: the header is ignored.
    forwarded_allow_ips: TrustedProxies = TrustedProxies()

    @classmethod
    def from_env(
        cls,
        env: Mapping[str, str],
        *,
        config: str | None = None,
        host: str | None = None,
        port: int | None = None,
    ) -> Settings:
        primary = env.get("PROXY_ACCESS_KEY", "").strip()
        if not primary:
            raise SettingsError(
                "PROXY_ACCESS_KEY is not set: it is the key clients must send "
                "(ANTHROPIC_API_KEY on their side); set it, e.g. "
                "export PROXY_ACCESS_KEY=$(python3 -c 'import secrets; print(secrets.token_urlsafe(32))')"
            )
        extra = [k.strip() for k in env.get("EXTRA_PROXY_ACCESS_KEYS", "").split(",") if k.strip()]
        port_value: int
        if port is not None:
            port_value = port
        else:
            raw_port = env.get("PORT", str(DEFAULT_PORT)).strip()
            if not raw_port.isdigit():
                raise SettingsError(f"PORT must be a number between 1 and 65535, not {raw_port!r}")
            port_value = int(raw_port)
        if not 0 <= port_value <= 65535:
            raise SettingsError(f"port must be between 1 and 65535, not {port_value}")
        raw_size = env.get("MAX_REQUEST_BODY_SIZE_MB", str(DEFAULT_MAX_BODY_MB)).strip()
        try:
            size_mb = float(raw_size)
        except ValueError:
            size_mb = -1.0
        if not size_mb > 0:
            raise SettingsError(f"MAX_REQUEST_BODY_SIZE_MB must be a positive number, not {raw_size!r}")
        admin = env.get("ADMIN_ACCESS_KEY", "").strip()
        if admin and any(hmac.compare_digest(admin.encode(), k.encode()) for k in (primary, *extra)):
            raise SettingsError("ADMIN_ACCESS_KEY must differ from the proxy access keys")
        backups = _non_negative_int(env, "CONFIG_BACKUPS", 10)
        header_ms = _non_negative_int(env, "CLIENT_HEADER_TIMEOUT_MS", 10_000)
        body_ms = _non_negative_int(env, "CLIENT_BODY_TIMEOUT_MS", 30_000)
        keepalive_ms = _non_negative_int(env, "CLIENT_KEEPALIVE_TIMEOUT_MS", 75_000)
        write_ms = _non_negative_int(env, "CLIENT_WRITE_TIMEOUT_MS", 60_000)
        watch_ms = _non_negative_int(env, "CONFIG_WATCH_INTERVAL_MS", 500)
        retention = _non_negative_int(env, "USAGE_RETENTION_DAYS", 90)
        if retention < 1:
            raise SettingsError("USAGE_RETENTION_DAYS must be at least 1")
        log_format = env.get("LOG_FORMAT", "").strip().lower() or "text"
        if log_format not in ("text", "json"):
            raise SettingsError(f"LOG_FORMAT must be text or json, not {log_format!r}")
        for name in ("METRICS_PUBLIC", "METRICS_PER_MEMBER"):  # read by ops.metrics: a typo stops serve
            flag(env, name, False)
        try:
            trusted = TrustedProxies.parse(env.get("FORWARDED_ALLOW_IPS", ""))
        except ValueError as exc:
            raise SettingsError(str(exc)) from None
        return cls(
            redis=RedisSettings.from_env(env),
            forwarded_allow_ips=trusted,
            access_log=flag(env, "ACCESS_LOG", True),
            log_format=log_format,
            data_dir=env.get("DATA_DIR", "").strip() or DEFAULT_DATA_DIR,
            database_url=database_url(env),
            allow_shared_key=flag(env, "ALLOW_SHARED_KEY", True),
            usage_recording=flag(env, "USAGE_RECORDING", True),
            usage_retention_days=retention,
            admin_keys=(admin,) if admin else (),
            config_backups=backups,
            watch_interval=watch_ms / 1000,
            client_header_timeout=header_ms / 1000,
            client_body_timeout=body_ms / 1000,
            client_keepalive_timeout=keepalive_ms / 1000,
            client_write_timeout=write_ms / 1000,
            access_keys=(primary, *extra),
            host=host or env.get("BIND_HOST", "").strip() or DEFAULT_HOST,
            port=port_value,
            channels_file=config or env.get("CHANNELS_FILE", "").strip() or DEFAULT_CHANNELS_FILE,
            max_body_bytes=int(size_mb * 1024 * 1024),
        )


def database_url(env: Mapping[str, str]) -> str | None:
    """DATABASE_URL: a postgresql:// (or postgres://) URL, or None (SQLite in DATA_DIR)."""
    url = env.get("DATABASE_URL", "").strip()
    if not url:
        return None
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme not in ("postgresql", "postgres"):
        shown = f"a {scheme}:// URL" if scheme else "no URL"
        raise SettingsError(
            f"DATABASE_URL must be a postgresql:// URL (unset: SQLite in DATA_DIR), not {shown}"
        )
    return url


def _non_negative_int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    if not raw.isdigit():
        raise SettingsError(f"{name} must be a non-negative integer, not {raw!r}")
    return int(raw)


def flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    """A true/false variable; anything else is a :class:`SettingsError` naming it."""
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("true", "1", "yes", "on"):
        return True
    if raw in ("false", "0", "no", "off"):
        return False
    raise SettingsError(f"{name} must be true or false, not {raw!r}")
