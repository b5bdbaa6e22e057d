"""The admin API under ``/api/messages/...``: channels CRUD, status, order, keys,
a live test request, and routing previews.

Every read carries the file's version as an ``ETag``; writes may send it back in
``If-Match`` and get a 409 if the file changed meanwhile.  Writes are validated
like ``check-config``, persisted by :class:`~ccx_proxy.store.ChannelStore` and
applied at once.  With ``REDIS_URL`` the file is every instance's copy of one shared
document (:mod:`ccx_proxy.shared.config`): the version is the same on every host, a
write is also a compare-and-set in Redis (409 when another instance's edit won,
503 with ``REDIS_FAILURE=closed`` while Redis is down) and reaches every instance.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from .. import __version__
from ..auth import AccessKeys
from ..catalog import CLAUDE_CODE_MODELS
from ..config import ConfigError, GatewayConfig
from ..errors import JSON_CONTENT_TYPE, InvalidRequest, NotFound, PermissionDenied
from ..headers import mask_secret
from ..presets import CHECKED as PRESETS_CHECKED
from ..presets import PRESETS
from ..reload import ConfigWatcher
from ..state import GATEWAY, Gateway
from ..store import ChannelStore, Document
from ..upstream.wire import mask_proxy_url
from .probe import probe_channel
from .views import live_state, masked_channel, unmask

STATIC = Path(__file__).parent / "static"
CONSOLE_FILES = frozenset(p.name for p in STATIC.iterdir() if p.is_file()) if STATIC.is_dir() else frozenset()
DISABLED = (
    "the admin API and console are disabled: set ADMIN_ACCESS_KEY (a key different from "
    "PROXY_ACCESS_KEY) and restart the gateway"
)


class Admin:
    def __init__(
        self, gateway: Gateway, keys: tuple[str, ...], store: ChannelStore, watcher: ConfigWatcher | None
    ) -> None:
        self.gateway = gateway
        self.keys = AccessKeys(keys, "ADMIN_ACCESS_KEY") if keys else None
        self.store = store
        self.watcher = watcher

    def check(self, request: web.Request) -> None:
        if self.keys is None:
            raise PermissionDenied(DISABLED)
        self.keys.check(request.headers)

    def applied(self, config: GatewayConfig) -> None:
        self.gateway.apply(config)
        if self.watcher is not None:
            self.watcher.written()


ADMIN: web.AppKey[Admin] = web.AppKey("admin", Admin)


class FieldError(Exception):
    """A problem with one field of the submitted object, found while applying it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def _json_response(data: Any, version: str | None = None, status: int = 200) -> web.Response:
    headers = {"ETag": f'"{version}"'} if version else None
    return web.Response(
        status=status, body=orjson.dumps(data), content_type=JSON_CONTENT_TYPE, headers=headers
    )


def _if_match(request: web.Request) -> tuple[str, ...] | None:
    """The versions an ``If-Match`` header accepts (a list is allowed); None: no condition."""
    value = request.headers.get("If-Match")
    if not value or value.strip() == "*":
        return None
    return tuple(v.strip().removeprefix("W/").strip('"') for v in value.split(",") if v.strip())


async def _body(request: web.Request) -> Any:
    raw = await request.read()
    try:
        return orjson.loads(raw) if raw else {}
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from None


def _channels(doc: Document) -> list[Any]:
    key = "channels" if "channels" in doc or "upstream" not in doc else "upstream"
    items = doc.setdefault(key, [])
    if not isinstance(items, list):
        raise InvalidRequest(f"the channels file's {key!r} is not an array")
    return items


def _index(items: list[Any], name: str) -> int:
    for i, item in enumerate(items):
        if isinstance(item, dict) and item.get("name") == name:
            return i
    raise NotFound(f"no channel named {name!r}")


def _problems_response(problems: list[str], channel_index: int | None) -> web.Response:
    detail = []
    for problem in problems:
        path, _, message = problem.partition(": ")
        field = path
        for prefix in (f"channels[{channel_index}].", f"upstream[{channel_index}]."):
            if channel_index is not None and path.startswith(prefix):
                field = path[len(prefix) :]
        detail.append({"path": path, "field": field, "message": message})
    body = {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": "; ".join(problems), "problems": detail},
    }
    return _json_response(body, status=400)


async def _write(
    request: web.Request, change: Callable[[Document], int | None], status: int = 200, name: str | None = None
) -> web.Response:
    """Run an edit; respond with the edited channel (or the list) and the new version."""
    admin = request.app[ADMIN]
    touched: list[int | None] = [None]

    def edit(doc: Document) -> None:
        touched[0] = change(doc)

    try:
        config, doc, version = await admin.store.update(edit, _if_match(request))
    except ConfigError as exc:
        return _problems_response(exc.problems, touched[0])
    except FieldError as exc:
        return _problems_response([f"{exc.field}: {exc.message}"], None)
    admin.applied(config)
    items = _channels(doc)
    if touched[0] is not None and touched[0] < len(items):
        return _json_response(_view(request, items[touched[0]]), version, status)
    return _json_response(
        {"channels": [_view(request, c) for c in items], "version": version}, version, status
    )


def _view(request: web.Request, raw: Any) -> Any:
    if not isinstance(raw, dict):
        return raw
    gateway = request.app[GATEWAY]
    name = raw.get("name")
    channel = next((c for c in gateway.runtime.config.channels if c.name == name), None)
    health = gateway.health.get(name) if isinstance(name, str) else None
    return {**masked_channel(raw), "state": live_state(channel, health, gateway.health.clock())}


async def list_channels(request: web.Request) -> web.Response:
    request.app[ADMIN].check(request)
    doc, version = request.app[ADMIN].store.read()
    return _json_response(
        {"channels": [_view(request, c) for c in _channels(doc)], "version": version}, version
    )


async def get_channel(request: web.Request) -> web.Response:
    request.app[ADMIN].check(request)
    doc, version = request.app[ADMIN].store.read()
    items = _channels(doc)
    return _json_response(_view(request, items[_index(items, request.match_info["name"])]), version)


def _channel_object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a channel object")
    if not isinstance(body.get("name"), str) or not body["name"].strip():
        raise InvalidRequest("name: must be a non-empty string")
    return {k: v for k, v in body.items() if k not in ("state", "version")}


async def create_channel(request: web.Request) -> web.Response:
    request.app[ADMIN].check(request)
    new = _channel_object(await _body(request))

    def change(doc: Document) -> int:
        items = _channels(doc)
        if any(isinstance(c, dict) and c.get("name") == new["name"] for c in items):
            raise FieldError("name", f"a channel named {new['name']!r} already exists")
        if "priority" not in new:
            priorities = [c.get("priority", i + 1) for i, c in enumerate(items) if isinstance(c, dict)]
            new["priority"] = max([p for p in priorities if isinstance(p, int)], default=0) + 1
        items.append(new)
        return len(items) - 1

    return await _write(request, change, status=201)


async def update_channel(request: web.Request) -> web.Response:
    request.app[ADMIN].check(request)
    name = request.match_info["name"]
    new = _channel_object(await _body(request))

    def change(doc: Document) -> int:
        items = _channels(doc)
        i = _index(items, name)
        old = items[i]
        if new["name"] != name and any(isinstance(c, dict) and c.get("name") == new["name"] for c in items):
            raise FieldError("name", f"a channel named {new['name']!r} already exists")
        if "apiKeys" not in new:
            new["apiKeys"] = old.get("apiKeys", [])
        elif isinstance(new["apiKeys"], list):
            try:
                new["apiKeys"] = unmask(new["apiKeys"], old.get("apiKeys") or [])
            except ValueError as exc:
                raise FieldError("apiKeys", str(exc)) from None
        headers, old_headers = new.get("customHeaders"), old.get("customHeaders") or {}
        if isinstance(headers, dict) and isinstance(old_headers, dict):
            new["customHeaders"] = {
                k: unmask([v], [old_headers[k]])[0] if k in old_headers else v for k, v in headers.items()
            }
        proxy, old_proxy = new.get("proxyUrl"), old.get("proxyUrl")
        if isinstance(proxy, str) and isinstance(old_proxy, str) and proxy == mask_proxy_url(old_proxy):
            new["proxyUrl"] = old_proxy  # sent back masked: keep the stored password
        items[i] = new
        return i

    return await _write(request, change)


def _priority(item: Any, index: int) -> float:
    value = item.get("priority") if isinstance(item, dict) else None
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else index + 1


async def delete_channel(request: web.Request) -> web.Response:
    request.app[ADMIN].check(request)
    name = request.match_info["name"]

    def change(doc: Document) -> None:
        items = _channels(doc)
        del items[_index(items, name)]
        # The rest renumbered 1..n in their routing order (priority, then file order): no gaps.
        order = sorted(range(len(items)), key=lambda i: (_priority(items[i], i), i))
        for rank, i in enumerate(order, start=1):
            if isinstance(items[i], dict):
                items[i]["priority"] = rank

    return await _write(request, change)


async def set_status(request: web.Request) -> web.Response:
    request.app[ADMIN].check(request)
    body = await _body(request)
    status = body.get("status") if isinstance(body, dict) else None
    if status not in ("active", "suspended", "disabled"):
        raise InvalidRequest("status: must be one of active, suspended, disabled")
    name = request.match_info["name"]

    def change(doc: Document) -> int:
        items = _channels(doc)
        i = _index(items, name)
        items[i]["status"] = status
        return i

    return await _write(request, change)


async def reorder(request: web.Request) -> web.Response:
    request.app[ADMIN].check(request)
    body = await _body(request)
    names = body.get("names") if isinstance(body, dict) else None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise InvalidRequest('names: must be an array of channel names, e.g. {"names": ["a", "b"]}')

    def change(doc: Document) -> None:
        items = _channels(doc)
        current = [str(c.get("name")) for c in items if isinstance(c, dict)]
        if sorted(current) != sorted(names) or len(set(names)) != len(names):
            raise InvalidRequest(f"names: must list every channel exactly once: {current}")
        position = {n: i for i, n in enumerate(names)}
        items.sort(key=lambda c: position[c["name"]])
        for i, item in enumerate(items):
            item["priority"] = i + 1

    return await _write(request, change)


async def add_key(request: web.Request) -> web.Response:
    request.app[ADMIN].check(request)
    body = await _body(request)
    key = body.get("key") if isinstance(body, dict) else None
    if not isinstance(key, str) or not key.strip():
        raise InvalidRequest('key: must be a non-empty string (a key, or a reference like "${MY_KEY}")')
    name = request.match_info["name"]

    def change(doc: Document) -> int:
        items = _channels(doc)
        i = _index(items, name)
        keys = items[i].setdefault("apiKeys", [])
        if key.strip() in keys:
            raise InvalidRequest("key: the channel already has this key")
        keys.append(key.strip())
        return i

    return await _write(request, change, status=201)


async def remove_key(request: web.Request) -> web.Response:
    request.app[ADMIN].check(request)
    body = await _body(request)
    name = request.match_info["name"]

    def change(doc: Document) -> int:
        items = _channels(doc)
        i = _index(items, name)
        keys = items[i].get("apiKeys") or []
        index = body.get("index") if isinstance(body, dict) else None
        wanted = body.get("key") if isinstance(body, dict) else None
        if isinstance(wanted, str):
            matches = [j for j, k in enumerate(keys) if k == wanted or mask_secret(k) == wanted]
            if len(matches) != 1:
                raise InvalidRequest('key: matches no key (or several); send {"index": n} instead')
            index = matches[0]
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(keys):
            raise InvalidRequest(f"index: must be between 0 and {len(keys) - 1}")
        del keys[index]
        return i

    return await _write(request, change)


async def test_channel(request: web.Request) -> web.Response:
    admin = request.app[ADMIN]
    admin.check(request)
    body = await _body(request)
    params = body if isinstance(body, dict) else {}
    name = request.match_info["name"]
    channel = next((c for c in admin.gateway.runtime.config.channels if c.name == name), None)
    if channel is None:
        raise NotFound(f"no channel named {name!r}")
    result = await probe_channel(admin.gateway.client, channel, params)
    return _json_response(result)


async def route_preview(request: web.Request) -> web.Response:
    admin = request.app[ADMIN]
    admin.check(request)
    model = request.query.get("model", "").strip()
    if not model:
        raise InvalidRequest("model: query parameter required, e.g. ?model=claude-sonnet-4-6")
    candidates = admin.gateway.runtime.router.candidates(model)
    return _json_response(
        {
            "model": model,
            "channel": candidates[0].channel.name if candidates else None,
            "upstreamModel": candidates[0].model if candidates else None,
            "candidates": [{"channel": c.channel.name, "upstreamModel": c.model} for c in candidates],
        }
    )


async def info(request: web.Request) -> web.Response:
    admin = request.app[ADMIN]
    admin.check(request)
    settings = admin.gateway.settings
    return _json_response(
        {
            "version": __version__,
            "channelsFile": str(admin.store.path),
            "proxyKeyHint": mask_secret(settings.access_keys[0]),
            "backupsKept": admin.store.backups,
            "serverTime": time.time(),
            "presets": PRESETS,  # the "Start from a preset" buttons
            "presetsChecked": PRESETS_CHECKED,
            "claudeCodeModels": [model_id for model_id, _, _ in CLAUDE_CODE_MODELS],
        }
    )


async def console(request: web.Request) -> web.StreamResponse:
    if request.app[ADMIN].keys is None:
        return web.Response(status=403, text=DISABLED + "\n", content_type="text/plain")
    if request.path == "/admin":
        raise web.HTTPFound("/admin/")
    name = request.match_info.get("file", "index.html")
    if name not in CONSOLE_FILES:
        raise NotFound(f"no console file {name!r}")
    # Revalidate every time: an upgraded gateway must never run a cached old app.js.
    return web.FileResponse(STATIC / name, headers={"Cache-Control": "no-cache"})


def setup_admin(
    app: web.Application, gateway: Gateway, store: ChannelStore, watcher: ConfigWatcher | None
) -> None:
    app[ADMIN] = Admin(gateway, gateway.settings.admin_keys, store, watcher)
    base = "/api/messages/channels"
    app.router.add_get(base, list_channels)
    app.router.add_post(base, create_channel)
    app.router.add_post(base + "/reorder", reorder)
    app.router.add_get(base + "/{name}", get_channel)
    app.router.add_put(base + "/{name}", update_channel)
    app.router.add_delete(base + "/{name}", delete_channel)
    app.router.add_patch(base + "/{name}/status", set_status)
    app.router.add_post(base + "/{name}/keys", add_key)
    app.router.add_delete(base + "/{name}/keys", remove_key)
    app.router.add_post(base + "/{name}/test", test_channel)
    app.router.add_get("/api/messages/route", route_preview)
    app.router.add_get("/api/messages/info", info)
    from .members import setup_members  # here: it imports this module

    setup_members(app)
    app.router.add_get("/admin", console)
    app.router.add_get("/admin/", console)
    app.router.add_get("/admin/static/{file}", console)
