"""Talking to upstreams: endpoint URLs, the shared client session, timeouts, and
the single mapping from client-side exceptions to gateway errors."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import aiohttp
from yarl import URL

from .errors import GatewayError, UpstreamTimeout, UpstreamUnreachable

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


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds; ``idle`` bounds the wait for response headers and between body chunks."""

    connect: float = 10.0
    idle: float = 120.0

    def client_timeout(self) -> aiohttp.ClientTimeout:
        # No total: a long stream is healthy as long as bytes keep coming.
        return aiohttp.ClientTimeout(
            total=None, connect=self.connect, sock_connect=self.connect, sock_read=self.idle
        )


def make_session(timeouts: Timeouts) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(
        limit=0,  # no global cap: a cap would make long streams starve new requests
        limit_per_host=0,
        ttl_dns_cache=300,
        keepalive_timeout=30,
        enable_cleanup_closed=False,
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=timeouts.client_timeout(),
        # Relay bytes exactly as the upstream sent them, encoding included.
        auto_decompress=False,
        # Send only the client's own headers: no invented User-Agent / Accept-Encoding.
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
        cookie_jar=aiohttp.DummyCookieJar(),
        trust_env=False,
        raise_for_status=False,
    )


@contextmanager
def upstream_errors(channel: str) -> Iterator[None]:
    """Translate client-side exceptions into gateway errors naming the channel.

    Messages name the channel and the failure, never the URL's credentials or a key.
    """
    try:
        yield
    except GatewayError:
        raise
    except (aiohttp.ServerTimeoutError, TimeoutError) as exc:
        raise UpstreamTimeout(f"upstream channel {channel!r} timed out: {_describe(exc)}") from exc
    except aiohttp.ClientConnectorError as exc:
        raise UpstreamUnreachable(
            f"upstream channel {channel!r} is unreachable: cannot connect to "
            f"{exc.host}:{exc.port} ({exc.os_error.strerror or type(exc.os_error).__name__})"
        ) from exc
    except (aiohttp.ClientError, OSError) as exc:
        raise UpstreamUnreachable(f"upstream channel {channel!r} failed: {_describe(exc)}") from exc


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
