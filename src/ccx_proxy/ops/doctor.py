"""``ccx-proxy doctor``: check the environment, the channels file, the data directory,
the port, every active channel and this machine's client settings; one line per check.

::

    OK    what: how it stands
    WARN  what: what may bite later -- the fix
    FAIL  what: what stops a client -- the fix

Exit 0 when nothing FAILs (warnings included: a weak key still serves), 1 otherwise,
2 for usage errors.  Nothing it prints holds a secret: keys appear masked
(:func:`~ccx_proxy.headers.mask_secret`), and every line is scrubbed of every key
it knows (the gateway's, the channels', the client's) before it is written.
Every network wait is bounded: a channel probe by ``--timeout``, a local HTTP
check by :data:`HTTP_TIMEOUT`.

Side effects: creates the data directory and ``ccx.db`` (migrated) when missing,
as ``serve`` would; one ``count_tokens`` per active channel (free on Anthropic) or,
where the upstream has no such route, a 1-token message.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import hmac
import os
import secrets
import socket
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TextIO

import aiohttp
import orjson
from yarl import URL

from .. import __version__
from ..admin.probe import DEFAULT_MODEL, probe_channel
from ..config import Channel, ConfigError, GatewayConfig, load_config, unset_variables
from ..headers import mask_secret, scrub_text
from ..mock_upstream import DEFAULT_KEY as MOCK_KEY
from ..mock_upstream import DEFAULT_PORT as MOCK_PORT
from ..redact import MIN_SECRET
from ..settings import (
    DEFAULT_CHANNELS_FILE,
    DEFAULT_DATA_DIR,
    DEFAULT_HOST,
    DEFAULT_PORT,
    RedisSettings,
    Settings,
    SettingsError,
)
from ..team import db
from ..upstream.client import UpstreamClient

Level = Literal["OK", "WARN", "FAIL"]

DEFAULT_TIMEOUT = 10.0  # seconds per channel probe
HTTP_TIMEOUT = 2.0  # seconds for a GET to a gateway (/health, /v1/models)
MIN_KEY_LENGTH = 24
MIN_DISTINCT = 10  # distinct characters a key needs
_GENERATE = "export {var}=$(python3 -c 'import secrets; print(secrets.token_urlsafe(32))')"
# Keys that are someone's example, not a secret: compared lower-case, letters and digits
# only, trailing digits dropped ("Test-123" is "test").
_PLACEHOLDERS = frozenset(
    """k sk key apikey test testkey sktest secret secretkey password passwd pass admin adminkey
    demo demokey example examplekey proxykey accesskey proxyaccesskey gatewaykey mykey token
    default dev local mockupstreamkey qwerty letmein abc abcdef foobar foo bar none null""".split()
)
_PLACEHOLDER_PARTS = ("changeme", "replaceme", "yourkey", "yourapikey", "yourproxy", "placeholder", "xxxxxx")
_TEMPLATE_MARKS = ("...", "…", "<", ">", "${")
_EPHEMERAL = ("0.0.0.0", "::", "")
# Statuses that mean "no such route here": count_tokens falls back to a 1-token message.
_NO_COUNT_TOKENS = (404, 405, 501)

EPILOG = """\
Checks, one line each (OK, WARN or FAIL, and the fix):
  PROXY_ACCESS_KEY set and strong, ADMIN_ACCESS_KEY distinct, the other settings valid;
  the channels file (unset ${VAR}s of active channels FAIL, of disabled ones WARN);
  DATA_DIR writable and its database opening (or DATABASE_URL's PostgreSQL); the port free;
  REDIS_URL (when set) answering, fast enough, Redis 6.2+, with a password;
  one count_tokens (or 1-token message) through every active channel;
  on a client machine: ANTHROPIC_BASE_URL, ANTHROPIC_API_KEY / ANTHROPIC_AUTH_TOKEN.
Exit status: 0 no FAIL (warnings allowed), 1 a FAIL, 2 a usage error.
Keys are never printed, only masked (sk-...abcd)."""


@dataclass(frozen=True, slots=True)
class Check:
    level: Level
    subject: str
    message: str
    fix: str = ""

    def line(self) -> str:
        fix = f" -- {self.fix}" if self.fix else ""
        return f"{self.level:<4}  {self.subject}: {self.message}{fix}"


class Report:
    """Prints each check as it comes, scrubbed of every known secret; counts them."""

    def __init__(self, out: TextIO, secrets: Iterable[str]) -> None:
        self.out = out
        self.secrets: list[str] = []
        self.checks: list[Check] = []
        self.hide(secrets)

    def hide(self, values: Iterable[str]) -> None:
        # As in the log (redact.py): shorter "secrets" would mangle every line, protect nothing.
        self.secrets.extend(v for v in values if len(v) >= MIN_SECRET and v not in self.secrets)

    def say(self, text: str) -> None:
        print(scrub_text(text, self.secrets), file=self.out, flush=True)

    def add(self, *checks: Check) -> None:
        for check in checks:
            self.checks.append(check)
            self.say(check.line())

    def count(self, level: Level) -> int:
        return sum(1 for c in self.checks if c.level == level)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", metavar="PATH", help="channels file (env CHANNELS_FILE, default ./channels.json)"
    )
    parser.add_argument("--data-dir", metavar="DIR", help="data directory (env DATA_DIR, default ./data)")
    parser.add_argument(
        "--port", type=int, metavar="P", help="gateway port to check (env PORT, default 3000)"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="S",
        help=f"seconds each channel probe may take (default {DEFAULT_TIMEOUT:g})",
    )


def main(args: argparse.Namespace, env: Mapping[str, str] | None = None, out: TextIO | None = None) -> int:
    env = os.environ if env is None else env
    out = sys.stdout if out is None else out
    if not args.timeout > 0 or args.timeout > 600:
        print("ccx-proxy doctor: --timeout must be between 0 and 600 seconds", file=sys.stderr)
        return 2
    if args.port is not None and not 1 <= args.port <= 65535:
        print("ccx-proxy doctor: --port must be between 1 and 65535", file=sys.stderr)
        return 2
    report = Report(out, _gateway_keys(env))
    report.say(f"ccx-proxy doctor {__version__}")

    report.add(*access_key_checks(env))
    settings_check, settings = check_settings(env, args.config, args.port)
    report.add(settings_check)
    host = settings.host if settings else env.get("BIND_HOST", "").strip() or DEFAULT_HOST
    port = settings.port if settings else _port(args.port, env)
    channels_file = args.config or env.get("CHANNELS_FILE", "").strip() or DEFAULT_CHANNELS_FILE
    data_dir = args.data_dir or env.get("DATA_DIR", "").strip() or DEFAULT_DATA_DIR

    config_checks, config = check_channels_file(channels_file, env)
    if config is not None:
        report.hide(s for c in config.channels for s in c.secrets)
        report.hide(_proxy_passwords(config, env))
    report.add(*config_checks)
    database_url = settings.database_url if settings else None
    data_check, members = check_database_url(database_url) if database_url else check_data_dir(data_dir)
    report.add(data_check)
    report.hide(_client_keys(env))
    redis = settings.redis if settings else None
    asyncio.run(_network(report, config, host, port, args.timeout, env, redis))

    fails, warns = report.count("FAIL"), report.count("WARN")
    report.say("")
    if fails:
        report.say(f"{_plural(fails, 'failure')}, {_plural(warns, 'warning')}: fix the FAIL lines above.")
    else:
        tail = f" ({_plural(warns, 'warning')} to look at)" if warns else ""
        report.say(f"No failures{tail}: clients can use this gateway.")
    report.say("")
    for line in export_lines(host, port or DEFAULT_PORT, env.get("PROXY_ACCESS_KEY", "").strip(), members):
        report.say(line)
    return 1 if fails else 0


async def _network(
    report: Report,
    config: GatewayConfig | None,
    host: str,
    port: int | None,
    timeout: float,
    env: Mapping[str, str],
    redis: RedisSettings | None = None,
) -> None:
    if port is not None:
        report.add(await check_port(host, port))
    if redis is not None:
        from ..shared.check import check as check_redis

        report.add(Check(*await check_redis(redis)))
    if config is not None:
        report.add(*await probe_channels(config.active, timeout))
    report.add(*await client_checks(env))


# -- keys and settings -----------------------------------------------------------------


def _port(option: int | None, env: Mapping[str, str]) -> int | None:
    """The port to check when the settings do not load: the option's, else a valid PORT."""
    raw = env.get("PORT", "").strip() or str(DEFAULT_PORT)
    if option is not None:
        return option
    return int(raw) if raw.isdigit() and 1 <= int(raw) <= 65535 else None


def _gateway_keys(env: Mapping[str, str]) -> list[str]:
    extra = [k.strip() for k in env.get("EXTRA_PROXY_ACCESS_KEYS", "").split(",")]
    keys = [env.get("PROXY_ACCESS_KEY", "").strip(), *extra, env.get("ADMIN_ACCESS_KEY", "").strip()]
    return [k for k in keys if k]


def _proxy_passwords(config: GatewayConfig, env: Mapping[str, str]) -> list[str]:
    """Passwords in the egress proxy URLs (proxyUrl, HTTP(S)_PROXY): shown masked anyway,
    hidden here too in case an error quotes one."""
    names = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
    passwords = []
    for raw in (*(c.proxy_url for c in config.channels), *(env.get(n, "") for n in names)):
        try:
            password = URL(raw.strip()).password if raw.strip() else None
        except ValueError:
            password = None
        if password:
            passwords.append(password)
    return passwords


def _client_keys(env: Mapping[str, str]) -> list[str]:
    keys = [env.get("ANTHROPIC_API_KEY", "").strip(), env.get("ANTHROPIC_AUTH_TOKEN", "").strip()]
    return [k for k in keys if k]


def key_weakness(key: str) -> str | None:
    """Why ``key`` is a weak access key (a placeholder, short, little variety), or None."""
    folded = "".join(c for c in key.lower() if c.isalnum())
    if (
        folded.rstrip("0123456789") in _PLACEHOLDERS
        or any(part in folded for part in _PLACEHOLDER_PARTS)
        or any(mark in key for mark in _TEMPLATE_MARKS)
    ):
        return f"it is a well-known placeholder ({mask_secret(key)})"
    if len(key) < MIN_KEY_LENGTH:
        return f"it has only {len(key)} characters (use {MIN_KEY_LENGTH} or more, random)"
    distinct = len(set(key))
    if distinct < MIN_DISTINCT:
        return f"it uses only {distinct} distinct characters (use a random key)"
    return None


def access_key_checks(env: Mapping[str, str]) -> list[Check]:
    checks: list[Check] = []
    primary = env.get("PROXY_ACCESS_KEY", "").strip()
    generate = _GENERATE.format(var="PROXY_ACCESS_KEY")
    if not primary:
        checks.append(
            Check(
                "FAIL",
                "PROXY_ACCESS_KEY",
                "not set: serve refuses to start without it (clients send it as ANTHROPIC_API_KEY)",
                generate,
            )
        )
    else:
        weak = key_weakness(primary)
        if weak:
            checks.append(
                Check(
                    "WARN", "PROXY_ACCESS_KEY", f"weak: {weak}", f"{generate}, then give clients the new key"
                )
            )
        else:
            checks.append(
                Check("OK", "PROXY_ACCESS_KEY", f"set ({mask_secret(primary)}, {len(primary)} characters)")
            )
    extra = [k.strip() for k in env.get("EXTRA_PROXY_ACCESS_KEYS", "").split(",") if k.strip()]
    for i, key in enumerate(extra):
        weak = key_weakness(key)
        if weak:
            checks.append(
                Check(
                    "WARN",
                    f"EXTRA_PROXY_ACCESS_KEYS[{i}]",
                    f"weak: {weak}",
                    "replace it with a random key of 24 or more characters",
                )
            )
    admin = env.get("ADMIN_ACCESS_KEY", "").strip()
    if not admin:
        checks.append(
            Check("OK", "ADMIN_ACCESS_KEY", "not set: the admin API and console are off (optional)")
        )
    elif any(hmac.compare_digest(admin.encode(), k.encode()) for k in (primary, *extra) if k):
        checks.append(
            Check(
                "FAIL",
                "ADMIN_ACCESS_KEY",
                "equals a proxy access key: serve refuses to start (every client could edit the channels)",
                _GENERATE.format(var="ADMIN_ACCESS_KEY"),
            )
        )
    elif weak := key_weakness(admin):
        checks.append(
            Check(
                "WARN",
                "ADMIN_ACCESS_KEY",
                f"weak: {weak}; it guards the channels and their keys",
                _GENERATE.format(var="ADMIN_ACCESS_KEY"),
            )
        )
    else:
        checks.append(
            Check("OK", "ADMIN_ACCESS_KEY", f"set ({mask_secret(admin)}), distinct from the proxy keys")
        )
    return checks


def check_settings(
    env: Mapping[str, str], config: str | None, port: int | None
) -> tuple[Check, Settings | None]:
    """Every other setting ``serve`` reads, validated as ``serve`` does.  The access keys
    have their own checks: a stand-in takes a missing PROXY_ACCESS_KEY's place here, and an
    ADMIN_ACCESS_KEY equal to it is left out, so that each problem is reported once."""
    probe = dict(env)
    if not probe.get("PROXY_ACCESS_KEY", "").strip():
        probe["PROXY_ACCESS_KEY"] = secrets.token_urlsafe(32)
    if probe.get("ADMIN_ACCESS_KEY", "").strip() in _gateway_keys({**probe, "ADMIN_ACCESS_KEY": ""}):
        probe.pop("ADMIN_ACCESS_KEY", None)
    try:
        settings = Settings.from_env(probe, config=config, port=port)
    except SettingsError as exc:
        return Check("FAIL", "settings", str(exc)), None
    return (
        Check(
            "OK",
            "settings",
            f"valid (serve would listen on {settings.host}:{settings.port})",
        ),
        settings,
    )


# -- channels file ---------------------------------------------------------------------


def check_channels_file(path: str, env: Mapping[str, str]) -> tuple[list[Check], GatewayConfig | None]:
    """The file as ``serve`` loads it: each problem a FAIL (the config's own message, fix
    included), each warning a WARN, and a WARN per inactive channel whose ``${VAR}``s are
    unset (it would fail to load once activated)."""
    try:
        config = load_config(path, env)
    except ConfigError as exc:
        checks = [Check("FAIL", "channels file", problem) for problem in exc.problems]
        checks.append(
            Check("FAIL", "channels", "not probed: the channels file does not load", "fix the lines above")
        )
        return checks, None
    checks = [Check("WARN", "channels file", f"{path}: {warning}") for warning in config.warnings]
    active = config.active
    if active:
        summary = f"{path}: {len(active)} active of {_plural(len(config.channels), 'channel')}"
        checks.insert(0, Check("OK", "channels file", summary))
    else:
        checks.insert(
            0,
            Check(
                "FAIL",
                "channels file",
                f"{path}: none of {len(config.channels)} channels is active: every request would fail",
                'set a channel\'s "status" to "active" (and export its key variable)',
            ),
        )
    checks.extend(_inactive_unset(path, config, env))
    return checks, config


def _inactive_unset(path: str, config: GatewayConfig, env: Mapping[str, str]) -> list[Check]:
    try:
        raw = orjson.loads(Path(path).read_bytes())
    except (OSError, orjson.JSONDecodeError):  # pragma: no cover - it loaded a moment ago
        return []
    items = raw.get("channels") if isinstance(raw, dict) else None
    inactive = {c.name: c for c in config.channels if not c.active}
    checks: list[Check] = []
    for item in items if isinstance(items, list) else ():
        if not isinstance(item, dict) or item.get("name") not in inactive:
            continue
        channel = inactive[item["name"]]
        unset = unset_variables(tuple(_strings(item)), env)
        if not unset:
            continue
        exports = " ".join(f"{var}=..." for var in unset)
        verb = "is" if len(unset) == 1 else "are"
        checks.append(
            Check(
                "WARN",
                f"channel {channel.name} ({channel.status})",
                f"environment variable {', '.join(unset)} {verb} not set: it cannot be activated as it is",
                f'export {exports} before setting its "status" to "active"',
            )
        )
    return checks


def _strings(value: Any) -> Iterable[str]:
    """Every string in a channel object, comment fields ("_...") left out."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            if not (isinstance(key, str) and key.startswith("_")):
                yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


# -- data directory --------------------------------------------------------------------


def check_database_url(url: str) -> tuple[Check, int]:
    """DATABASE_URL: PostgreSQL answers, the schema is migrated; the number of members."""
    shown = db.display(url)  # the password masked
    fix = "start PostgreSQL or fix DATABASE_URL (the gateway runs on the shared keys meanwhile)"
    try:
        conn = db.open_connection(url)
    except db.DatabaseError as exc:
        return Check("FAIL", "database", str(exc), fix), 0
    try:
        members = int(conn.execute("SELECT count(*) FROM members").fetchone()[0])
    except db.DatabaseError as exc:
        return Check("FAIL", "database", str(exc), fix), 0
    finally:
        conn.close()
    who = f", {_plural(members, 'member')}" if members else ""
    return Check("OK", "database", f"{shown} opens (schema version {db.SCHEMA_VERSION}{who})"), members


def check_data_dir(data_dir: str) -> tuple[Check, int]:
    """A file can be created in ``data_dir`` and the team database opens and migrates there;
    also the number of members in it (0 when it cannot be read)."""
    fix = "set DATA_DIR (or --data-dir) to a directory the gateway's user can write, or fix its permissions"
    path = Path(data_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".doctor-"):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        return Check("FAIL", "data directory", f"{data_dir} is not writable: {reason}", fix), 0
    try:
        conn = db.connect(db.path_in(path))
    except db.DatabaseError as exc:
        return Check("FAIL", "data directory", str(exc), fix), 0
    try:
        members = int(conn.execute("SELECT count(*) FROM members").fetchone()[0])
    finally:
        conn.close()
    who = f", {_plural(members, 'member')}" if members else ""
    shown = data_dir if path.is_absolute() else f"{data_dir} ({path.resolve()})"
    message = f"{shown} is writable; {db.FILENAME} opens (schema version {db.SCHEMA_VERSION}{who})"
    return Check("OK", "data directory", message), members


# -- the port --------------------------------------------------------------------------


async def check_port(host: str, port: int) -> Check:
    """Whether ``serve`` could listen on host:port (bound as aiohttp binds: SO_REUSEADDR);
    when it is taken, whether a ccx-proxy answers there."""
    where = f"{host}:{port}"
    find = f"find what listens there: ss -ltnp 'sport = :{port}'"
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return Check("FAIL", "port", f"BIND_HOST {host!r} does not resolve: {exc.strerror}", "set BIND_HOST")
    family, kind, proto, _, address = infos[0]
    try:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            health = await _get_health(f"http://{_connect_host(host)}:{port}")
            if isinstance(health, dict):
                running = _describe(health)
                return Check(
                    "WARN",
                    "port",
                    f"{where} is taken by a running ccx-proxy ({running}): clients can use it; "
                    "another `ccx-proxy serve` there would fail",
                    f"stop the running one first, or choose another port with --port or PORT; {find}",
                )
            return Check(
                "FAIL",
                "port",
                f"{where} is in use (another ccx-proxy may be running there)",
                f"choose another port with --port or PORT, or stop it; {find}",
            )
        if exc.errno == errno.EACCES:
            fix = "choose a port of 1024 or more with --port or PORT (or grant CAP_NET_BIND_SERVICE)"
            return Check("FAIL", "port", f"{where}: permission denied", fix)
        if exc.errno == errno.EADDRNOTAVAIL:
            fix = "set BIND_HOST to an address of this machine (127.0.0.1, or 0.0.0.0 for all)"
            return Check("FAIL", "port", f"{where}: {host} is not an address of this machine", fix)
        return Check(
            "FAIL", "port", f"cannot bind {where}: {exc.strerror}", "choose another --port or BIND_HOST"
        )
    return Check("OK", "port", f"{where} is free")


def _connect_host(host: str) -> str:
    """Where to reach a server bound to ``host`` from this machine."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def _describe(health: Mapping[str, Any]) -> str:
    version = health.get("version", "?")
    channels = health.get("channels")
    active = channels.get("active") if isinstance(channels, dict) else None
    return f"version {version}" + (
        f", {_plural(active, 'active channel')}" if isinstance(active, int) else ""
    )


async def _get_health(base: str, trust_env: bool = False) -> dict[str, Any] | str:
    """``GET {base}/health`` within :data:`HTTP_TIMEOUT`: the body when a ccx-proxy
    answered (``{"status": "ok", ...}``), else why not, in words."""
    url = base.rstrip("/") + "/health"
    try:
        async with (
            aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=HTTP_TIMEOUT), trust_env=trust_env
            ) as session,
            session.get(url, allow_redirects=False) as response,
        ):
            raw = await response.content.read(64 * 1024)
            status = response.status
    except TimeoutError:
        return f"no answer from {url} within {HTTP_TIMEOUT:g} s"
    except (aiohttp.ClientError, OSError, ValueError) as exc:
        return f"{url}: {_reason(exc)}"
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        body = None
    if status == 200 and isinstance(body, dict) and body.get("status") == "ok":
        return body
    return f"{url} answered HTTP {status}, not as a ccx-proxy"


def _reason(exc: BaseException) -> str:
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect ({exc.os_error.strerror or exc.os_error})"
    return str(exc) or type(exc).__name__


# -- channel probes --------------------------------------------------------------------


def probe_model(channel: Channel) -> str:
    """A model the channel serves: the console's default when it is admitted, else the
    first it advertises or names exactly in ``supportedModels``."""
    if channel.serves(DEFAULT_MODEL, channel.models.lookup(DEFAULT_MODEL)):
        return DEFAULT_MODEL
    for model in (*channel.advertised_models, *channel.allowlist.exact_names()):
        return model
    return DEFAULT_MODEL


async def probe_channels(channels: Sequence[Channel], timeout: float) -> list[Check]:
    """One probe per channel, all at once, each bounded by ``timeout`` seconds."""
    if not channels:
        return []
    client = UpstreamClient()
    try:
        return list(await asyncio.gather(*(_probe(client, c, timeout) for c in channels)))
    finally:
        client.close()


async def _probe(client: UpstreamClient, channel: Channel, timeout: float) -> Check:
    subject = f"channel {channel.name}"
    model = probe_model(channel)
    started = time.perf_counter()
    try:
        async with asyncio.timeout(timeout):
            result = await probe_channel(client, channel, {"mode": "count_tokens", "model": model})
            if not result["ok"] and result["status"] in _NO_COUNT_TOKENS:
                result = await probe_channel(client, channel, {"mode": "message", "model": model})
    except TimeoutError:
        return Check(
            "FAIL",
            subject,
            f"no answer from {channel.base_url} within {timeout:g} s",
            "check that the upstream is reachable from this machine (egress proxy: proxyUrl or HTTPS_PROXY), "
            "or allow more time with --timeout",
        )
    except Exception as exc:  # a bug, not an upstream's answer: still one line, never a traceback
        text = scrub_text(f"{type(exc).__name__}: {exc}", channel.secrets)
        return Check("FAIL", subject, f"probe failed after {time.perf_counter() - started:.1f} s: {text}")
    route = "count_tokens" if result["mode"] == "count_tokens" else "1-token message"
    mapped = result.get("upstreamModel")
    models = f"{model} -> {mapped}" if mapped and mapped != model else model
    urls = result.get("urls") or []
    where = channel.base_url + (f" and {len(urls) - 1} more URL(s)" if len(urls) > 1 else "")
    status, latency = result["status"], result["latencyMs"]
    timing = f" in {latency:g} ms" if latency is not None else ""
    if result["ok"]:
        return Check("OK", subject, f"{route} {status}{timing} ({where}, model {models})")
    error = scrub_text(str(result["error"]), channel.secrets)
    text = f"{route} {status}{timing}: {error}" if status is not None else f"{route} failed{timing}: {error}"
    level: Level = "WARN" if status == 429 else "FAIL"
    return Check(level, subject, f"{text} ({where}, model {models})", _probe_fix(channel, status))


def _probe_fix(channel: Channel, status: int | None) -> str:
    keys = ", ".join(ref if ref.startswith("${") else mask_secret(ref) for ref in channel.key_refs)
    if status in (401, 403):
        return (
            f"the upstream refuses the channel's key [{keys}]: check the key (and its variable's value) "
            f'and "authHeader" ({channel.auth_header}: x-api-key or bearer, as the provider documents)'
        )
    if status == 429:
        return "the key works but is rate limited or out of quota: check the provider's usage page"
    if status == 404:
        return '"baseUrl" should be the provider\'s Anthropic-compatible root, without /v1 or /v1/messages'
    if status == 400:
        return 'the upstream refused the request: check "modelMapping" / "supportedModels" for this provider'
    if status is None:
        demo = (
            URL(channel.base_url).host in ("127.0.0.1", "localhost")
            and URL(channel.base_url).port == MOCK_PORT
        )
        if demo and MOCK_KEY in channel.api_keys:
            return (
                "this is the demo channel: run the mock upstream (ccx-proxy serve --with-mock-upstream, "
                'or ccx-proxy mock-upstream), or set its "status" to "disabled"'
            )
        return (
            'check "baseUrl" and that this machine reaches it (DNS, firewall, egress proxy: '
            '"proxyUrl" or HTTPS_PROXY)'
        )
    return "the upstream is failing: try again later, or check the provider's status page"


# -- this machine as a client ----------------------------------------------------------


async def client_checks(env: Mapping[str, str]) -> list[Check]:
    """Claude Code's settings on this machine, when it has them: ANTHROPIC_BASE_URL's form,
    whether a ccx-proxy answers there and takes the key, and the key variables."""
    base = env.get("ANTHROPIC_BASE_URL", "").strip()
    api_key = env.get("ANTHROPIC_API_KEY", "").strip()
    token = env.get("ANTHROPIC_AUTH_TOKEN", "").strip()
    checks: list[Check] = []
    if api_key and token and not hmac.compare_digest(api_key.encode(), token.encode()):
        checks.append(
            Check(
                "WARN",
                "client keys",
                f"ANTHROPIC_API_KEY ({mask_secret(api_key)}) and ANTHROPIC_AUTH_TOKEN ({mask_secret(token)}) "
                "differ: Claude Code sends the first as x-api-key and the second as Authorization: Bearer, "
                "and ccx-proxy reads x-api-key first",
                "set only one of them, to your gateway key",
            )
        )
    if not base:
        checks.append(
            Check("OK", "client", "ANTHROPIC_BASE_URL is not set on this machine: no client to check")
        )
        return checks
    try:
        url = URL(base)
    except ValueError:
        url = URL()
    if url.scheme not in ("http", "https") or not url.host:
        fix = "export ANTHROPIC_BASE_URL=http://HOST:PORT (the gateway's address)"
        checks.append(Check("FAIL", "ANTHROPIC_BASE_URL", f"{base!r} is not an http(s) URL", fix))
        return checks
    path = url.path.rstrip("/")
    root = base.rstrip("/")
    for suffix in ("/v1/messages", "/v1"):
        if path.endswith(suffix):
            root = str(url.with_path(path[: -len(suffix)] or "/", encoded=False)).rstrip("/")
            checks.append(
                Check(
                    "FAIL",
                    "ANTHROPIC_BASE_URL",
                    f"{base} ends in {suffix}: Claude Code appends /v1/messages itself "
                    f"(requests would go to {path}/v1/messages)",
                    f'export ANTHROPIC_BASE_URL="{root}"',
                )
            )
            break
    health = await _get_health(root, trust_env=True)
    if isinstance(health, str):
        level: Level = "WARN" if "answered HTTP" in health else "FAIL"
        fix = (
            "it may be another gateway or the provider itself: point ANTHROPIC_BASE_URL at the ccx-proxy"
            if level == "WARN"
            else "start the gateway (ccx-proxy serve) or correct ANTHROPIC_BASE_URL; "
            "on the gateway's machine, run ccx-proxy doctor"
        )
        checks.append(Check(level, "gateway", f"no ccx-proxy at {root}: {health}", fix))
        return checks
    checks.append(Check("OK", "gateway", f"a ccx-proxy answers at {root} ({_describe(health)})"))
    if not api_key and not token:
        checks.append(
            Check(
                "WARN",
                "client keys",
                "neither ANTHROPIC_API_KEY nor ANTHROPIC_AUTH_TOKEN is set: Claude Code would send "
                "its claude.ai login, which the gateway refuses (unless an apiKeyHelper supplies a key)",
                'export ANTHROPIC_API_KEY="<your gateway key>"',
            )
        )
        return checks
    checks.append(await _check_client_key(root, api_key, token))
    return checks


async def _check_client_key(root: str, api_key: str, token: str) -> Check:
    """``GET {root}/v1/models`` with the headers Claude Code would send."""
    headers = {"anthropic-version": "2023-06-01"}
    if api_key:
        headers["x-api-key"] = api_key
    if token:
        headers["Authorization"] = f"Bearer {token}"
    used, variable = (api_key, "ANTHROPIC_API_KEY") if api_key else (token, "ANTHROPIC_AUTH_TOKEN")
    url = f"{root}/v1/models"
    try:
        async with (
            aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=HTTP_TIMEOUT), trust_env=True
            ) as session,
            session.get(url, headers=headers, allow_redirects=False) as response,
        ):
            status = response.status
    except TimeoutError:
        return Check("WARN", "client keys", f"no answer from {url} within {HTTP_TIMEOUT:g} s")
    except (aiohttp.ClientError, OSError, ValueError) as exc:
        return Check("WARN", "client keys", f"{url}: {_reason(exc)}")
    if status == 200:
        return Check("OK", "client keys", f"the gateway accepts {variable} ({mask_secret(used)})")
    if status == 401:
        return Check(
            "FAIL",
            "client keys",
            f"the gateway refuses {variable} ({mask_secret(used)}): HTTP 401",
            f"set {variable} to the gateway's PROXY_ACCESS_KEY or your member key",
        )
    return Check("WARN", "client keys", f"GET {url} with {variable} answered HTTP {status}")


# -- what to tell clients --------------------------------------------------------------


def export_lines(host: str, port: int, key: str, members: int = 0) -> list[str]:
    """The two lines that point Claude Code at this gateway: the key as a template, masked."""
    if host in _EPHEMERAL:
        host = socket.gethostname() or "127.0.0.1"
    elif ":" in host:
        host = f"[{host}]"
    shown = f"<your PROXY_ACCESS_KEY ({mask_secret(key)})>" if key else "<your PROXY_ACCESS_KEY>"
    if members:
        shown = f"<your member key, or PROXY_ACCESS_KEY ({mask_secret(key)})>" if key else "<your member key>"
    return [
        "Point Claude Code at this gateway (on each client machine):",
        f'  export ANTHROPIC_BASE_URL="http://{host}:{port}"',
        f'  export ANTHROPIC_API_KEY="{shown}"',
    ]


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"
