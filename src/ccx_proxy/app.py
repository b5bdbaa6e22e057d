"""The application factory: routes, the error middleware, startup and cleanup."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import orjson
from aiohttp import web

from . import __version__, ops, relay, shared
from .admin.api import setup_admin
from .config import GatewayConfig
from .errors import (
    JSON_CONTENT_TYPE,
    GatewayError,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    RequestTooLarge,
    model_not_found_message,
    render,
)
from .health import Clock
from .ops.accesslog import access_middleware
from .reload import ConfigWatcher
from .settings import Settings
from .state import GATEWAY, Gateway
from .store import ChannelStore
from .upstream.client import UpstreamClient

log = logging.getLogger("ccx_proxy")

WATCHER: web.AppKey[ConfigWatcher] = web.AppKey("watcher", ConfigWatcher)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

ROUTES_HINT = (
    "the gateway serves POST /v1/messages, POST /v1/messages/count_tokens, "
    "GET /v1/models, GET /v1/models/{id} and GET /health"
)


def wrong_base_url(path: str) -> bool:
    """A path a client builds from an ANTHROPIC_BASE_URL that is not the gateway root."""
    if path.startswith("/v1/v1/"):
        return True
    for route in ("/v1/messages", "/v1/models"):  # the real route after the base URL's own path
        at = path.find(route, 1)
        if at > 0 and path[at + len(route) :][:1] in ("", "/"):
            return True
    return False


def not_found_message(path: str) -> str:
    if wrong_base_url(path):
        return (
            "wrong ANTHROPIC_BASE_URL: set it to the gateway root (e.g. http://gateway-host:3000), "
            f"without /v1 -- clients append /v1/messages themselves (this request went to {path})"
        )
    return f"unknown path {path}: {ROUTES_HINT}"


def unknown_path(path: str) -> GatewayError:
    """A 400 for a wrong base URL (Claude Code prints a 400's message verbatim, but shows its
    own "There's an issue with the selected model" for any 404); a 404 for other paths."""
    message = not_found_message(path)
    return InvalidRequest(message) if wrong_base_url(path) else NotFound(message)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except GatewayError as exc:
        return render(exc)
    except web.HTTPNotFound:
        return render(unknown_path(request.path))
    except web.HTTPMethodNotAllowed as exc:
        allowed = ", ".join(sorted(exc.allowed_methods))
        response = render(
            MethodNotAllowed(f"method {request.method} is not allowed on {request.path} (use {allowed})")
        )
        response.headers["Allow"] = allowed
        return response
    except web.HTTPRequestEntityTooLarge:
        return render(RequestTooLarge("request body is too large"))
    except web.HTTPException as exc:
        if exc.status >= 400:
            return render(InvalidRequest(f"{exc.status} {exc.reason}"))
        raise
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("unexpected error handling %s %s", request.method, request.path)
        return render(GatewayError("internal gateway error; see the gateway's log"))


async def health(request: web.Request) -> web.Response:
    config = request.app[GATEWAY].runtime.config
    body = {
        "status": "ok",
        "version": __version__,
        "channels": {"active": len(config.active), "total": len(config.channels)},
    }
    return web.Response(body=orjson.dumps(body), content_type=JSON_CONTENT_TYPE)


async def root(request: web.Request) -> web.Response:
    # Some clients probe the base URL before the first request; answer plainly.
    body = {"name": "ccx-proxy", "version": __version__, "routes": ROUTES_HINT}
    return web.Response(body=orjson.dumps(body), content_type=JSON_CONTENT_TYPE)


async def list_models(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY]
    gateway.team.authenticate(request.headers)
    page = gateway.runtime.catalog.page(dict(request.query))
    return web.Response(body=page, content_type=JSON_CONTENT_TYPE)


async def get_model(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY]
    gateway.team.authenticate(request.headers)
    model_id = request.match_info["model_id"]
    catalog = gateway.runtime.catalog
    entry = catalog.entry(model_id)
    if entry is None:  # only what GET /v1/models lists (Anthropic answers 404 here too)
        raise NotFound(model_not_found_message(model_id, catalog.ids))
    return web.Response(body=orjson.dumps(entry), content_type=JSON_CONTENT_TYPE)


def create_app(settings: Settings, config: GatewayConfig, clock: Clock | None = None) -> web.Application:
    gateway = Gateway(settings, config, clock)
    app = web.Application(
        middlewares=[access_middleware, error_middleware], client_max_size=settings.max_body_bytes
    )
    app[GATEWAY] = gateway
    source = config.source
    watcher = ConfigWatcher(gateway, source, settings.watch_interval) if source else None
    if watcher is not None:
        app[WATCHER] = watcher

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        client = UpstreamClient()
        gateway.open_client(client)
        await gateway.team.start()
        shared_limits = gateway.team.shared_limits
        if gateway.shared is not None:
            await gateway.shared.start()
        if shared_limits is not None:
            shared_limits.start()
        if watcher is not None:
            watcher.start()
        yield
        if watcher is not None:
            await watcher.stop()
        if shared_limits is not None:
            await shared_limits.stop()
        await gateway.team.stop()
        if gateway.shared is not None:  # after the team: its last releases and spend go out
            await gateway.shared.stop()
        client.close()

    app.cleanup_ctx.append(lifecycle)
    channel_store = ChannelStore(source or settings.channels_file, backups=settings.config_backups)
    setup_admin(app, gateway, channel_store, watcher)
    ops.setup(app, gateway)
    shared.setup(app, gateway, channel_store)
    app.router.add_post("/v1/messages", relay.messages)
    app.router.add_post("/v1/messages/count_tokens", relay.count_tokens)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model_id}", get_model)
    app.router.add_get("/health", health)
    app.router.add_get("/", root)
    return app
