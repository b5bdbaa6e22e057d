"""Talking to upstreams: endpoint URLs, the shared client session, timeouts, and
the single mapping from client-side exceptions to gateway errors.

Relayed requests go through the gateway's own HTTP/1.1 client
(:mod:`ccx_proxy.client`); the aiohttp session stays for everything else (the
admin API's channel probe).  Both belong to the app and close with it."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import aiohttp
from yarl import URL

from .client import KEEPALIVE_TIMEOUT, ConnectFailed
from .errors import GatewayError, UpstreamTimeout, UpstreamUnreachable
from .h1 import UpstreamClientError
from .policy import Timeouts

_VERSION_SUFFIX = re.compile(r"/v\d+$")


@dataclass(frozen=True, slots=True)
class Endpoints:
    messages: str
    count_tokens: str
    models: str


def endpoints(base_url: str) -> Endpoints:
    """Upstream endpoint URLs for a channel's ``baseUrl``.

    ``https://api.deepseek.com/anthropic`` -> ``.../anthropic/v1/messages``;
    trailing slashes are ignored; a base that already ends in a version segment
    (``.../v1``) gets no second one; a base ending in ``#`` is used verbatim: the
    ``#`` is dropped and nothing but the endpoint name is appended.
    """
    if base_url.endswith("#"):
        root = base_url[:-1].rstrip("/")
    else:
        root = base_url.rstrip("/")
        if not _VERSION_SUFFIX.search(URL(root).path):
            root += "/v1"
    return Endpoints(
        messages=root + "/messages",
        count_tokens=root + "/messages/count_tokens",
        models=root + "/models",
    )


def make_session() -> aiohttp.ClientSession:
    """The one client session; every request passes its channel's own timeouts."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=KEEPALIVE_TIMEOUT),
        timeout=Timeouts().client_timeout,
        # Relay bytes exactly as the upstream sent them, encoding included.
        auto_decompress=False,
        # Send only the client's own headers: no invented User-Agent / Accept-Encoding.
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
        cookie_jar=aiohttp.DummyCookieJar(),
        trust_env=False,
        raise_for_status=False,
    )


def gateway_error(exc: BaseException, channel: str) -> GatewayError | None:
    """The gateway error for a client-side exception, or None if it is not one.

    Messages name the channel and the failure, never a key.
    """
    if isinstance(exc, GatewayError):
        return exc
    if isinstance(exc, UpstreamClientError):
        if isinstance(exc, TimeoutError):
            return UpstreamTimeout(f"upstream channel {channel!r} timed out: {exc}")
        if isinstance(exc, ConnectFailed):
            return UpstreamUnreachable(f"upstream channel {channel!r} is unreachable: {exc}")
        return UpstreamUnreachable(f"upstream channel {channel!r} failed: {exc}")
    if isinstance(exc, (aiohttp.ServerTimeoutError, TimeoutError)):
        return UpstreamTimeout(f"upstream channel {channel!r} timed out: {_describe(exc)}")
    if isinstance(exc, aiohttp.ClientConnectorError):
        reason = exc.os_error.strerror or type(exc.os_error).__name__
        return UpstreamUnreachable(
            f"upstream channel {channel!r} is unreachable: cannot connect to {exc.host}:{exc.port} ({reason})"
        )
    if isinstance(exc, (aiohttp.ClientError, OSError)):
        return UpstreamUnreachable(f"upstream channel {channel!r} failed: {_describe(exc)}")
    return None


@contextmanager
def upstream_errors(channel: str) -> Iterator[None]:
    """Re-raise client-side exceptions as the matching gateway error."""
    try:
        yield
    except Exception as exc:
        error = gateway_error(exc, channel)
        if error is None or error is exc:
            raise
        raise error from exc


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
