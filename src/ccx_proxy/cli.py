"""The ``ccx-proxy`` command: ``serve``, ``check-config``, ``mock-upstream``, ``bench``,
``members``, ``usage`` and ``migrate``."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import NamedTuple

from aiohttp import web
from yarl import URL

from . import __version__, benchmark, redact
from .app import WATCHER, create_app
from .config import Channel, ConfigError, GatewayConfig, load_config
from .headers import mask_secret
from .mock_upstream import DEFAULT_KEY, DEFAULT_PORT, MockUpstream
from .ops import doctor, drain, systemd
from .ops.accesslog import JsonFormatter
from .reload import ConfigWatcher
from .server import install, server_kwargs
from .settings import Settings, SettingsError
from .state import GATEWAY
from .team import cli as team_cli
from .workers import WorkersError, serve_workers, worker_count

log = logging.getLogger("ccx_proxy")
LISTEN_BACKLOG = 1024
_LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


class _Listen(NamedTuple):
    """One app to serve, where, and the option that sets its port (named when it is busy)."""

    app: web.Application
    host: str
    port: int
    option: str


_DESCRIPTION = "ccx-proxy: an Anthropic Messages gateway that relays to the channels in a channels file."
_EPILOG = (
    "Environment: PROXY_ACCESS_KEY (required by serve: the key clients send), ADMIN_ACCESS_KEY "
    "(enables /admin/), LOG_LEVEL (default INFO). Run 'ccx-proxy COMMAND --help' for a command's options."
)
_CONFIG_HELP = "channels file (env CHANNELS_FILE, default ./channels.json)"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ccx-proxy", description=_DESCRIPTION, epilog=_EPILOG)
    parser.add_argument("--version", action="version", version=f"ccx-proxy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, text: str, epilog: str | None = None) -> argparse.ArgumentParser:
        # An epilog keeps its line breaks (a command in it must stay copyable).
        formatter = argparse.RawDescriptionHelpFormatter if epilog else argparse.HelpFormatter
        return sub.add_parser(
            name,
            help=text,
            description=f"ccx-proxy {name}: {text}.",
            epilog=epilog,
            formatter_class=formatter,
        )

    serve = command("serve", "run the gateway (needs PROXY_ACCESS_KEY)")
    serve.add_argument("--config", metavar="PATH", help=_CONFIG_HELP)
    serve.add_argument("--host", metavar="HOST", help="bind address (env BIND_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, metavar="PORT", help="gateway port (env PORT, default 3000)")
    serve.add_argument(
        "--with-mock-upstream",
        action="store_true",
        help="also run the built-in mock upstream (the demo) in the same process (default off)",
    )
    serve.add_argument(
        "--mock-port",
        type=int,
        default=DEFAULT_PORT,
        metavar="PORT",
        help=f"mock upstream port for --with-mock-upstream; a channel on 127.0.0.1:{DEFAULT_PORT} "
        f"follows it (no env, default {DEFAULT_PORT})",
    )
    serve.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="worker processes sharing the port via SO_REUSEPORT (env WORKERS, default 1)",
    )
    serve.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)  # set by the supervisor

    check = command("check-config", "validate a channels file and summarise it")
    check.add_argument("--config", metavar="PATH", help=_CONFIG_HELP)

    mock = command("mock-upstream", "run the built-in Anthropic-compatible mock upstream alone")
    mock.add_argument("--host", default="127.0.0.1", metavar="HOST", help="bind address (default 127.0.0.1)")
    mock.add_argument(
        "--port", type=int, default=DEFAULT_PORT, metavar="PORT", help=f"port (default {DEFAULT_PORT})"
    )
    mock.add_argument("--key", help=f"upstream key it accepts (env MOCK_UPSTREAM_KEY, default {DEFAULT_KEY})")

    bench = command("bench", "time an upstream direct vs through a gateway, side by side", benchmark.EPILOG)
    benchmark.add_arguments(bench)
    _complete_help(
        bench, {"prompt": "the user message sent both ways", "max_tokens": "max_tokens per request"}
    )
    team_cli.add_commands(command)
    doctor_parser = command(
        "doctor", "check the environment, config, port and channels; print the fixes", doctor.EPILOG
    )
    doctor.add_arguments(doctor_parser)
    return parser


def _complete_help(parser: argparse.ArgumentParser, missing: dict[str, str]) -> None:
    """Give every option of ``parser`` a help text (``missing``, by dest, where it has none)
    that states its default."""
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
            continue
        text = action.help or missing.get(action.dest) or action.dest.replace("_", " ")
        if action.required:
            text += " (required)" if "required" not in text else ""
        elif "default" not in text and action.default is False:
            text += " (default off)"
        elif "default" not in text and action.default is not None:
            text += " (default %(default)s)"
        elif "default" not in text and "env " not in text:
            text += " (default none)"
        action.help = text


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if os.environ.get("LOG_FORMAT", "").strip().lower() == "json":  # one JSON object per line
        for handler in logging.getLogger().handlers:
            handler.setFormatter(JsonFormatter())
    redact.install()  # every log record, aiohttp's included, has its secrets masked
    if args.command == "check-config":
        return check_config(args.config)
    if args.command == "bench":
        return benchmark.main(args)
    if args.command == "doctor":
        return doctor.main(args)
    if args.command in ("members", "usage", "migrate"):
        return team_cli.main(args)
    if args.command == "mock-upstream":
        key = args.key or os.environ.get("MOCK_UPSTREAM_KEY") or DEFAULT_KEY
        return _run(_serve_apps([_Listen(MockUpstream(key).app(), args.host, args.port, "--port")], None))
    return serve(args)


def _load(path: str) -> GatewayConfig | None:
    try:
        config = load_config(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return None
    for warning in config.warnings:
        log.warning("%s: %s", path, warning)
    return config


def check_config(path: str | None) -> int:
    path = path or os.environ.get("CHANNELS_FILE") or "./channels.json"
    config = _load(path)
    if config is None:
        return 1
    for channel in config.channels:
        print(channel.summary())
    print(f"{path}: OK, {len(config.active)} active of {len(config.channels)} channels")
    return 0


def serve(args: argparse.Namespace) -> int:
    try:
        settings = Settings.from_env(os.environ, config=args.config, host=args.host, port=args.port)
    except SettingsError as exc:
        print(f"ccx-proxy: {exc}", file=sys.stderr)
        return 2
    redact.REDACTOR.set_keys((*settings.access_keys, *settings.admin_keys))
    missing = _missing_extras(settings)
    if missing:
        print(f"ccx-proxy: {missing}", file=sys.stderr)
        return 2
    config = _load(settings.channels_file)
    if config is None:
        return 1
    try:
        workers = worker_count(args.workers, os.environ)
        drain.drain_timeout(os.environ)  # checked here: one clear error before anything starts
    except (WorkersError, ValueError) as exc:
        print(f"ccx-proxy: {exc}", file=sys.stderr)
        return 2
    if workers > 1:
        if args.with_mock_upstream:
            print("ccx-proxy: --with-mock-upstream runs in one process: use --workers 1", file=sys.stderr)
            return 2
        if settings.redis is None:
            log.warning(
                "--workers %d: member limits (requests per minute, concurrency, budgets) are enforced per "
                "worker, so a member may get up to %d times a limit (set REDIS_URL to share them); "
                "members, keys and usage are shared through %s",
                workers,
                workers,
                settings.data_dir,
            )
        else:
            log.info("--workers %d: limits, upstream health and affinity shared through Redis", workers)
        return serve_workers(settings.host, settings.port, settings.channels_file, workers)
    if args.with_mock_upstream and args.mock_port != DEFAULT_PORT:
        config = follow_mock_port(config, args.mock_port)
    for channel in config.channels:
        log.info("channel %s", channel.summary())
    if not config.active:
        log.warning("no active channel: every request will get model_not_found")
    if settings.admin_keys:
        log.info(
            "admin console: http://%s:%d/admin/ (sign in with ADMIN_ACCESS_KEY)", settings.host, settings.port
        )
    else:
        log.info("admin API and console disabled: set ADMIN_ACCESS_KEY (not the proxy key) to enable /admin/")
    gateway_app = create_app(settings, config)
    if args.with_mock_upstream and args.mock_port != DEFAULT_PORT:
        mock_port = args.mock_port
        gateway_app[GATEWAY].adjust = lambda loaded: follow_mock_port(loaded, mock_port)
    redact.REDACTOR.follow(lambda: gateway_app[GATEWAY].runtime.config)  # reloads included
    apps = [_Listen(gateway_app, settings.host, settings.port, "--port or PORT")]
    if args.with_mock_upstream:
        key = os.environ.get("MOCK_UPSTREAM_KEY") or DEFAULT_KEY
        apps.append(_Listen(MockUpstream(key).app(), "127.0.0.1", args.mock_port, "--mock-port"))
    show_key = args.with_mock_upstream or sys.stdout.isatty()
    worker = args.worker_index  # a worker of serve --workers N: shares the port, one banner for all
    banner = (settings, show_key) if not worker else None
    return _run(_serve_apps(apps, banner, reuse_port=worker is not None))


def _missing_extras(settings: Settings) -> str | None:
    """The install command for what REDIS_URL / DATABASE_URL need and is not installed."""
    import importlib.util

    if settings.redis is not None and not all(importlib.util.find_spec(m) for m in ("redis", "hiredis")):
        return "REDIS_URL needs the redis extra: pip install 'ccx-proxy[redis]'"
    if settings.database_url and importlib.util.find_spec("asyncpg") is None:
        return "DATABASE_URL needs the postgres extra: pip install 'ccx-proxy[postgres]'"
    return None


def follow_mock_port(config: GatewayConfig, port: int) -> GatewayConfig:
    """``config`` with every channel that points at the mock upstream's default address
    (127.0.0.1:3001, the shipped demo channel) pointed at ``port`` instead, in memory only."""

    def moved(url: str) -> str:
        try:
            parsed = URL(url)
        except ValueError:
            return url
        if parsed.host not in _LOCAL_HOSTS or parsed.port != DEFAULT_PORT:
            return url
        return url.replace(f":{DEFAULT_PORT}", f":{port}", 1)  # as written, a trailing '#' included

    channels: list[Channel] = []
    for channel in config.channels:
        base_url, base_urls = moved(channel.base_url), tuple(moved(u) for u in channel.base_urls)
        if (base_url, base_urls) != (channel.base_url, channel.base_urls):
            log.info(
                "--mock-port %d: channel %s now uses %s instead of %s (in memory, reloads "
                "included; %s keeps what it says)",
                port,
                channel.name,
                base_url,
                channel.base_url,
                config.source or "the channels file",
            )
            channel = dataclasses.replace(channel, base_url=base_url, base_urls=base_urls)
        channels.append(channel)
    return dataclasses.replace(config, channels=tuple(channels))


def _banner(settings: Settings, show_key: bool) -> str:
    host = settings.host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    elif ":" in host:
        host = f"[{host}]"
    key = settings.access_keys[0]
    shown = key if show_key else f"<your PROXY_ACCESS_KEY ({mask_secret(key)})>"
    lines = (
        f"ccx-proxy {__version__} listening on http://{host}:{settings.port}\n"
        "Point Claude Code or any Anthropic client at it:\n"
        f'  export ANTHROPIC_API_KEY="{shown}"\n'
        f'  export ANTHROPIC_BASE_URL="http://{host}:{settings.port}"'
    )
    if settings.admin_keys:
        admin = settings.admin_keys[0] if show_key else "your ADMIN_ACCESS_KEY"
        lines += f"\nAdmin console: http://{host}:{settings.port}/admin/ (sign in with {admin})"
    return lines


async def _serve_apps(
    apps: list[_Listen],
    banner: tuple[Settings, bool] | None,
    reuse_port: bool = False,
) -> int:
    # systemd's NOTIFY_SOCKET, or the pipe to the supervisor of serve --workers N, or None.
    notifier = systemd.for_process(os.environ)
    watchdog: systemd.Watchdog | None = None
    runners = []
    try:
        for app, host, port, option in apps:
            gateway = app.get(GATEWAY)
            if gateway is not None:  # the gateway: its client-side limits (ccx_proxy.server)
                runner = web.AppRunner(
                    app, access_log=None, shutdown_timeout=drain.GRACE, **server_kwargs(gateway.settings)
                )
                await runner.setup()
                assert runner.server is not None
                install(runner.server, gateway.settings)
            else:
                runner = web.AppRunner(
                    app, access_log=None, handler_cancellation=True, shutdown_timeout=drain.GRACE
                )
                await runner.setup()
            runners.append(runner)
            try:
                # backlog: bursts of new streams overflowed the default 128 (SYN retries cost 1 s)
                await web.TCPSite(runner, host, port, backlog=LISTEN_BACKLOG, reuse_port=reuse_port).start()
            except OSError as exc:
                print(
                    f"ccx-proxy: cannot listen on {host}:{port}: {exc.strerror} -- choose another port "
                    f"with {option}; another ccx-proxy may already be running there",
                    file=sys.stderr,
                )
                return 1
            log.info("listening on %s:%d", host, port)
        if banner is not None:
            print(_banner(*banner), flush=True)
        # Everything loaded so far (modules, the app, the configuration) lives as long as
        # the process: keep it out of the cycle collector's full passes, which otherwise
        # walk it again and again under load (objects still free on refcount as usual).
        gc.freeze()
        stop, hurry = asyncio.Event(), asyncio.Event()  # hurry: a second Ctrl-C ends the drain now
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, _on_stop_signal, sig, stop, hurry)
        watchers = [listen.app[WATCHER] for listen in apps if WATCHER in listen.app]
        if watchers or notifier is not None:  # SIGHUP: re-read the channels file now
            loop.add_signal_handler(signal.SIGHUP, _reload, watchers, notifier)
        if notifier is not None:
            bound = runners[0].addresses[0]  # the real port, for --port 0 too
            notifier.ready(f"listening on {apps[0].host}:{bound[1]}")
            if notifier.interval is not None:
                watchdog = systemd.Watchdog(loop, notifier.interval, notifier.ping).start()
        await stop.wait()
        log.info("shutting down")
        if notifier is not None:
            notifier.stopping()
        await drain.drain(runners, hurry)
        return 0
    finally:
        # The gateway first: in-process upstreams (--with-mock-upstream) serve it to the end.
        for runner in runners:
            await runner.cleanup()
        if watchdog is not None:
            watchdog.stop()


def _on_stop_signal(sig: signal.Signals, stop: asyncio.Event, hurry: asyncio.Event) -> None:
    """The first SIGTERM / SIGINT starts the drain; a second SIGINT (Ctrl-C) ends it now.  A
    second SIGTERM does not: a supervisor may deliver one twice (systemd's KillMode=
    control-group signals the workers as well as the parent, which forwards it)."""
    if not stop.is_set():
        stop.set()
    elif sig == signal.SIGINT:
        hurry.set()
    else:
        log.info("SIGTERM again: still draining (SIGINT ends the drain now)")


def _reload(watchers: list[ConfigWatcher], notifier: systemd.Notifier | None) -> None:
    """SIGHUP: re-read the channels file (RELOADING=1 ... READY=1 around it under systemd)."""
    if notifier is not None:
        notifier.reloading()
    for watcher in watchers:
        watcher.reload("SIGHUP")
    if notifier is not None:
        notifier.reloaded()


def _run(main_coro: object) -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux/macOS
        return asyncio.run(main_coro)  # type: ignore[arg-type]
    return uvloop.run(main_coro)  # type: ignore[arg-type]
