"""Graceful drain on SIGTERM, and the readiness probe ``GET /ready``.

::

    SIGTERM ─► /ready answers 503; the listening sockets close (new connections are refused);
               a request that starts on a connection already open gets 503 overloaded_error,
               Retry-After and Connection: close (/ready and /health are still answered)
            ─► requests and streams under way run on, for up to DRAIN_TIMEOUT_S (default 120)
            ─► then every stream still open ends with an SSE error event (overloaded_error,
               "the gateway is shutting down; retry"); what is left after a short grace
               (a request still waiting for its upstream) is cancelled
            ─► exit 0

A second SIGINT (Ctrl-C) during the drain skips the rest of the wait; a second SIGTERM does
not (a supervisor may deliver one twice).  With ``serve --workers N`` each worker drains on
the SIGTERM its supervisor forwards.

``/ready`` (readiness) is 200 while the gateway can serve: its configuration loaded, the
data directory (DATA_DIR) writable, and at least one active channel that is not held back
(circuit breaker open, back-off, every key disabled); else 503 with the reasons.  ``/health``
stays liveness: 200 whenever the process answers.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import orjson
from aiohttp import web

from .. import __version__
from ..config import Channel
from ..errors import JSON_CONTENT_TYPE, GatewayError, render
from ..server import RequestHandlerFunc, divert_requests, requests_in_progress
from ..state import GATEWAY, Gateway

log = logging.getLogger("ccx_proxy.drain")

DEFAULT_TIMEOUT = 120.0  # seconds; DRAIN_TIMEOUT_S
GRACE = 2.0  # seconds after the deadline: the error events are written, then the rest is cancelled
_POLL = 0.05  # seconds between looks at the requests in progress (only while draining)
_REPORT = 10.0  # seconds between progress lines in the log while draining
SHUTTING_DOWN = "the gateway is shutting down; retry"
_PROBES = frozenset(("/ready", "/health"))  # still answered on open connections while draining


class ShuttingDown(GatewayError):
    """A request that starts during the drain (503 overloaded_error: retry elsewhere)."""

    status = 503
    error_type = "overloaded_error"


class Closable(Protocol):
    def close(self) -> None: ...


def drain_timeout(env: Mapping[str, str]) -> float:
    """``DRAIN_TIMEOUT_S``: seconds in-flight requests get after SIGTERM (default 120; 0: none)."""
    raw = env.get("DRAIN_TIMEOUT_S", "").strip()
    if not raw:
        return DEFAULT_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 86400:
        raise ValueError(f"DRAIN_TIMEOUT_S must be a number of seconds from 0 to 86400, not {raw!r}")
    return value


class Drain:
    """One app's drain state (``app[DRAIN]``): read by /ready and by every SSE relay."""

    __slots__ = ("timeout", "draining", "cut", "streams", "refused")

    def __init__(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.timeout = timeout
        self.draining = False
        self.cut = False  # the deadline passed: open streams are being ended
        # The upstream responses being relayed as SSE now (ccx_proxy.stream registers them):
        # closing one makes its relay stop and append the shutdown error event.
        self.streams: set[Closable] = set()
        self.refused = 0  # requests answered 503 during the drain

    def track(self, upstream: Closable) -> None:
        self.streams.add(upstream)
        if self.cut:  # a stream that got going after the deadline ends at once
            upstream.close()

    def end_streams(self) -> int:
        self.cut = True
        streams = list(self.streams)
        for upstream in streams:
            upstream.close()
        return len(streams)


DRAIN: web.AppKey[Drain] = web.AppKey("drain", Drain)


def setup(app: web.Application, gateway: Gateway) -> None:
    """Give the gateway's app its drain state and the ``/ready`` route."""
    app[DRAIN] = Drain(drain_timeout(os.environ))
    app.router.add_get("/ready", ready)


def _available(gateway: Gateway, channel: Channel, now: float) -> bool:
    health = gateway.health.get(channel.name)
    if health is None:  # never used yet: nothing holds it back
        return True
    if not health.available(now):
        return False
    keys = health.keys
    return any((key := keys.get(k)) is None or not key.disabled for k in channel.api_keys)


def _data_dir_writable(path: str) -> bool:
    return os.path.isdir(path) and os.access(path, os.W_OK | os.X_OK)


async def ready(request: web.Request) -> web.Response:
    """Readiness: 200 when this process should get traffic, else 503 with the reasons."""
    gateway = request.app[GATEWAY]
    state = request.app.get(DRAIN)
    config = gateway.runtime.config
    reasons = []
    if state is not None and state.draining:
        reasons.append("draining: the gateway is shutting down")
    data_dir = gateway.settings.data_dir
    writable = _data_dir_writable(data_dir) if data_dir else None
    if writable is False:
        reasons.append("the data directory (DATA_DIR) is not writable")
    now = gateway.health.clock()
    available = sum(1 for c in config.active if _available(gateway, c, now))
    if not available:
        reasons.append(
            "no active channel can take requests" if config.active else "no active channel is configured"
        )
    body: dict[str, Any] = {
        "status": "not_ready" if reasons else "ready",
        "version": __version__,
        "draining": bool(state is not None and state.draining),
        "data_dir_writable": writable,
        "channels": {"active": len(config.active), "available": available, "total": len(config.channels)},
    }
    if reasons:
        body["reasons"] = reasons
    response = web.Response(
        status=503 if reasons else 200, body=orjson.dumps(body), content_type=JSON_CONTENT_TYPE
    )
    response.headers["Cache-Control"] = "no-store"
    return response


def _while_draining(state: Drain, retry_after: float) -> Callable[[RequestHandlerFunc], RequestHandlerFunc]:
    def wrap(app_handler: RequestHandlerFunc) -> RequestHandlerFunc:
        async def draining(request: web.BaseRequest) -> web.StreamResponse:
            if request.path in _PROBES:
                response = await app_handler(request)  # /ready says 503 itself; /health: alive
            else:
                state.refused += 1
                response = render(ShuttingDown(SHUTTING_DOWN, retry_after=retry_after))
                response.headers["x-should-retry"] = "true"  # the SDKs retry, on a new connection
            response.force_close()  # Connection: close
            return response

        return draining

    return wrap


async def drain(runners: Sequence[web.AppRunner], hurry: asyncio.Event | None = None) -> None:
    """Drain the gateway apps served by ``runners`` (others are left alone); returns when
    nothing is in progress any more, or at the deadline plus :data:`GRACE`.  The caller
    then cleans the runners up (idle connections are closed, handlers left are cancelled)."""
    draining = [(r, r.app[DRAIN]) for r in runners if DRAIN in r.app and r.server is not None]
    if not draining:
        return
    loop = asyncio.get_running_loop()
    servers: list[web.Server] = []
    for runner, state in draining:
        for site in list(runner.sites):
            await site.stop()  # the listening socket closes: new connections are refused
        server = runner.server
        assert server is not None
        divert_requests(server, _while_draining(state, retry_after=1))
        servers.append(server)
        state.draining = True
    timeout = max(state.timeout for _, state in draining)
    busy = sum(requests_in_progress(s) for s in servers)
    log.info(
        "draining: no new connections; %d requests in progress get up to %g s (DRAIN_TIMEOUT_S)",
        busy,
        timeout,
    )
    started = loop.time()
    if not await _settle(servers, started + timeout, hurry):
        streams = sum(state.end_streams() for _, state in draining)
        left = sum(requests_in_progress(s) for s in servers)
        log.warning(
            "drain %s: ending %d open streams with an error event (%d requests in progress)",
            "cut short (SIGINT)" if hurry is not None and hurry.is_set() else "deadline reached",
            streams,
            left,
        )
        await _settle(servers, loop.time() + GRACE, None)
    refused = sum(state.refused for _, state in draining)
    left = sum(requests_in_progress(s) for s in servers)
    log.info(
        "drained in %.1f s: %d requests answered 503 on open connections%s",
        loop.time() - started,
        refused,
        f"; cancelling {left} still in progress" if left else "",
    )


async def _settle(servers: list[web.Server], deadline: float, hurry: asyncio.Event | None) -> bool:
    """Wait until no request is in progress (True), or the deadline or ``hurry`` (False)."""
    loop = asyncio.get_running_loop()
    report = loop.time() + _REPORT
    while busy := sum(requests_in_progress(s) for s in servers):
        now = loop.time()
        left = deadline - now
        if left <= 0 or (hurry is not None and hurry.is_set()):
            return False
        if now >= report:
            log.info("draining: %d requests still in progress, %.0f s left", busy, left)
            report = now + _REPORT
        await asyncio.sleep(min(_POLL, left))
    return True
