"""The application factory: routes, the error middleware, startup and cleanup."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import orjson
from aiohttp import web

from . import __version__, relay
from .admin.api import setup_admin
from .config import GatewayConfig
from .errors import (
    JSON_CONTENT_TYPE,
    GatewayError,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    RequestTooLarge,
    render,
)
from .health import Clock
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


def not_found_message(path: str) -> str:
    if path.startswith("/v1/v1/") or (path.endswith("/v1/messages") and path != "/v1/messages"):
        return (
            f"unknown path {path}: ANTHROPIC_BASE_URL must be the gateway root "
            "(e.g. http://gateway-host:3000), without /v1 -- clients append /v1/messages themselves"
        )
    return f"unknown path {path}: {ROUTES_HINT}"


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except GatewayError as exc:
        return render(exc)
    except web.HTTPNotFound:
        return render(NotFound(not_found_message(request.path)))
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
    gateway.access_keys.check(request.headers)
    page = gateway.runtime.catalog.page(dict(request.query))
    return web.Response(body=page, content_type=JSON_CONTENT_TYPE)


async def get_model(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY]
    gateway.access_keys.check(request.headers)
    model_id = request.match_info["model_id"]
    runtime = gateway.runtime
    entry = runtime.catalog.entry(model_id)
    if entry is None:
        if not runtime.router.candidates(model_id):
            raise NotFound(f"model_not_found: no active channel serves model {model_id!r}")
        entry = {
            "type": "model",
            "id": model_id,
            "display_name": model_id,
            "created_at": "1970-01-01T00:00:00Z",
        }
    return web.Response(body=orjson.dumps(entry), content_type=JSON_CONTENT_TYPE)


def create_app(settings: Settings, config: GatewayConfig, clock: Clock | None = None) -> web.Application:
    gateway = Gateway(settings, config, clock)
    app = web.Application(middlewares=[error_middleware], client_max_size=settings.max_body_bytes)
    app[GATEWAY] = gateway
    source = config.source
    watcher = ConfigWatcher(gateway, source, settings.watch_interval) if source else None
    if watcher is not None:
        app[WATCHER] = watcher

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        client = UpstreamClient()
        gateway.open_client(client)
        if watcher is not None:
            watcher.start()
        yield
        if watcher is not None:
            await watcher.stop()
        client.close()

    app.cleanup_ctx.append(lifecycle)
    setup_admin(
        app, gateway, ChannelStore(source or settings.channels_file, backups=settings.config_backups), watcher
    )
    app.router.add_post("/v1/messages", relay.messages)
    app.router.add_post("/v1/messages/count_tokens", relay.count_tokens)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model_id}", get_model)
    app.router.add_get("/health", health)
    app.router.add_get("/", root)
    return app
