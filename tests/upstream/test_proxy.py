"""Egress proxies: CONNECT tunnels for https upstreams, absolute-form requests for plain-HTTP
ones, proxy credentials (sent, never shown), https:// proxies (TLS inside TLS), the
environment's HTTPS_PROXY / HTTP_PROXY / NO_PROXY, proxyUrl validation, and
insecureSkipVerify.

The proxy is a small asyncio one written here; upstream certificates come from ``trustme``.
The gateway's upstream client is swapped at startup for one that trusts the test CA (an
extra ``cleanup_ctx`` after the app's own: see ``start_trusting``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
import trustme
import uvloop
from aiohttp import web
from yarl import URL

from ccx_proxy.app import create_app
from ccx_proxy.config import ConfigError, parse_config
from ccx_proxy.state import GATEWAY
from ccx_proxy.upstream.client import UpstreamClient
from ccx_proxy.upstream.errors import ProxyFailed
from ccx_proxy.upstream.wire import (
    WireError,
    bypassed,
    endpoints,
    environment_proxy,
    mask_proxy_url,
    parse_proxy,
)
from tests.conftest import (
    AUTH,
    SSE_BODY,
    assert_anthropic_error,
    channel,
    make_config,
    make_settings,
    message_body,
    unused_port,
)

pytestmark = pytest.mark.timeout(20)

WAIT = 5.0
USER = "proxy-user"
PASSWORD = "s3cret p@ss/word"  # percent-encoded in the URL; sent decoded
PASSWORD_IN_URL = "s3cret%20p%40ss%2Fword"
TOKEN = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
FAST = {"connectTimeoutMs": 2000, "responseHeaderTimeoutMs": 2000}
GOOD_SSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: %d\r\n\r\n" % len(SSE_BODY)
    + SSE_BODY
)


# -- TLS -------------------------------------------------------------------------------


@dataclass
class TLS:
    ca: trustme.CA
    server: ssl.SSLContext  # a certificate for 127.0.0.1, issued by ``ca``
    client: ssl.SSLContext  # trusts ``ca`` (and the system's store)


@pytest.fixture(scope="module")
def tls() -> TLS:
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return TLS(ca, server, client)


# -- servers ----------------------------------------------------------------------------


@dataclass
class Seen:
    line: bytes  # the request line
    headers: dict[str, str]  # lower-case names

    @classmethod
    def parse(cls, head: bytes) -> Seen:
        line, *lines = head[:-4].split(b"\r\n")
        headers = {}
        for raw in lines:
            name, _, value = raw.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        return cls(line, headers)


class Tracked:
    """An asyncio server on 127.0.0.1 that closes every connection and handler it started."""

    def __init__(self, context: ssl.SSLContext | None = None) -> None:
        self.context = context
        self.server: asyncio.Server | None = None
        self.connections = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._writers: list[asyncio.StreamWriter] = []

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def start(self) -> Tracked:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.context)
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.append(writer)
        self.connections += 1
        try:
            await self.handle(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        except asyncio.CancelledError:
            pass  # teardown: end normally (Python 3.11's start_server logs a cancelled handler)
        finally:
            writer.close()
            self._tasks.discard(task)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    def track(self, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for writer in self._writers:
            writer.close()
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                await writer.wait_closed()
        if self.server is not None:
            await self.server.wait_closed()


class Upstream(Tracked):
    """Answers every request with a complete SSE response, keeping the connection."""

    def __init__(self, context: ssl.SSLContext | None = None) -> None:
        super().__init__(context)
        self.requests: list[Seen] = []

    @property
    def url(self) -> str:
        return f"{'https' if self.context else 'http'}://127.0.0.1:{self.port}"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                return
            seen = Seen.parse(head)
            await reader.readexactly(int(seen.headers.get("content-length", "0")))
            self.requests.append(seen)
            writer.write(GOOD_SSE)
            await writer.drain()


class ForwardProxy(Tracked):
    """CONNECT host:port (a tunnel), or an absolute-form request (forwarded in origin form,
    without Proxy-Authorization); with ``credentials``, a 407 unless they are sent."""

    def __init__(self, context: ssl.SSLContext | None = None, credentials: str | None = None) -> None:
        super().__init__(context)
        self.expected = (
            f"Basic {base64.b64encode(credentials.encode()).decode()}" if credentials is not None else None
        )
        self.seen: list[Seen] = []

    def url(self, userinfo: str = "") -> str:
        at = f"{userinfo}@" if userinfo else ""
        return f"{'https' if self.context else 'http'}://{at}127.0.0.1:{self.port}"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        seen = Seen.parse(head)
        self.seen.append(seen)
        if self.expected is not None and seen.headers.get("proxy-authorization") != self.expected:
            writer.write(
                b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                b'Proxy-Authenticate: Basic realm="test"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n'
            )
            await writer.drain()
            return
        method, target, version = seen.line.split(b" ")
        if method == b"CONNECT":
            host, _, port = target.decode().rpartition(":")
            up_reader, up_writer = await asyncio.open_connection(host.strip("[]"), int(port))
            self.track(up_writer)
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        else:
            url = URL(target.decode())
            assert url.is_absolute(), target
            up_reader, up_writer = await asyncio.open_connection(url.host, url.port)
            self.track(up_writer)
            lines = [
                raw
                for raw in head[:-4].split(b"\r\n")[1:]
                if not raw.lower().startswith(b"proxy-authorization:")
            ]
            up_writer.write(b"%s %s %s\r\n" % (method, url.raw_path_qs.encode(), version))
            up_writer.write(b"".join(raw + b"\r\n" for raw in lines) + b"\r\n")
        pumps = [
            asyncio.create_task(_pump(reader, up_writer)),
            asyncio.create_task(_pump(up_reader, writer)),
        ]
        try:
            await asyncio.gather(*pumps)
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)


async def _pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    try:
        while data := await source.read(65536):
            sink.write(data)
            await sink.drain()
    except (ConnectionError, ssl.SSLError):
        pass
    finally:
        sink.close()


@pytest.fixture
async def servers() -> AsyncIterator[Callable[[Tracked], Awaitable[Any]]]:
    started: list[Tracked] = []

    async def start(server: Tracked) -> Any:
        started.append(server)
        return await server.start()

    yield start
    for server in reversed(started):  # proxies first: they hold connections to upstreams
        await server.close()


@pytest.fixture
def start_trusting(aiohttp_client: Any, tls: TLS) -> Callable[..., Awaitable[Any]]:
    """A gateway whose upstream client trusts the test CA.

    ``create_app`` opens its own client in a ``cleanup_ctx``; one more context appended
    after it swaps in a client made with ``ssl_context`` (the gateway's only way to take a
    trust store), and closes it and puts the original back before the app's own cleanup."""

    async def start(*channels: dict[str, Any], env: dict[str, str] | None = None, **top: Any) -> Any:
        app = create_app(make_settings(), make_config(*channels, env=env, **top))

        async def trusting(app: web.Application) -> AsyncIterator[None]:
            gateway = app[GATEWAY]
            original = gateway.client
            client = UpstreamClient(ssl_context=tls.client)
            gateway.open_client(client)
            yield
            client.close()
            gateway.open_client(original)

        app.cleanup_ctx.append(trusting)
        return await aiohttp_client(app, server_kwargs={"handler_cancellation": True})

    return start


async def _post(client: Any) -> tuple[Any, bytes]:
    resp = await client.post("/v1/messages", data=message_body(), headers=AUTH)
    return resp, await resp.read()


# -- through the proxy --------------------------------------------------------------------


async def test_an_https_upstream_through_a_connect_tunnel(servers, start_trusting, tls) -> None:
    upstream = await servers(Upstream(tls.server))
    proxy = await servers(ForwardProxy())
    client = await start_trusting(channel("tunnelled", upstream.url, proxyUrl=proxy.url(), **FAST))
    for _ in range(2):
        resp, body = await _post(client)
        assert resp.status == 200, body
        assert body == SSE_BODY
    authority = f"127.0.0.1:{upstream.port}"
    # One CONNECT, kept open for the second request: the tunnel is pooled like any connection.
    assert [s.line for s in proxy.seen] == [f"CONNECT {authority} HTTP/1.1".encode()]
    assert proxy.seen[0].headers["host"] == authority
    assert "proxy-authorization" not in proxy.seen[0].headers  # no credentials in the URL: none sent
    # Inside the tunnel, TLS to the upstream itself and an origin-form request.
    assert [r.line for r in upstream.requests] == [b"POST /v1/messages HTTP/1.1"] * 2
    assert upstream.requests[0].headers["host"] == authority
    assert upstream.connections == 1


@pytest.mark.parametrize(
    "proxy_tls", [pytest.param(False, id="http-proxy"), pytest.param(True, id="https-proxy")]
)
async def test_a_plain_http_upstream_through_the_proxy_in_absolute_form(
    servers, start_trusting, tls, proxy_tls: bool
) -> None:
    upstream = await servers(Upstream())
    proxy = await servers(ForwardProxy(tls.server if proxy_tls else None))
    client = await start_trusting(channel("forwarded", upstream.url + "/api", proxyUrl=proxy.url(), **FAST))
    resp = await client.post("/v1/messages?beta=true", data=message_body(), headers=AUTH)
    body = await resp.read()
    assert resp.status == 200, body
    assert body == SSE_BODY
    authority = f"127.0.0.1:{upstream.port}"
    assert [s.line for s in proxy.seen] == [
        f"POST http://{authority}/api/v1/messages?beta=true HTTP/1.1".encode()
    ]
    assert proxy.seen[0].headers["host"] == authority
    assert [r.line for r in upstream.requests] == [b"POST /api/v1/messages?beta=true HTTP/1.1"]


@pytest.mark.parametrize("scheme", [pytest.param("https", id="connect"), pytest.param("http", id="absolute")])
async def test_credentials_in_the_proxy_url_go_as_proxy_authorization(
    servers, start_trusting, tls, scheme: str
) -> None:
    upstream = await servers(Upstream(tls.server if scheme == "https" else None))
    proxy = await servers(ForwardProxy(credentials=f"{USER}:{PASSWORD}"))
    proxy_url = proxy.url(f"{USER}:{PASSWORD_IN_URL}")
    client = await start_trusting(channel("authed", upstream.url, proxyUrl=proxy_url, **FAST))
    resp, body = await _post(client)
    assert resp.status == 200, body
    assert body == SSE_BODY
    assert [s.headers.get("proxy-authorization") for s in proxy.seen] == [f"Basic {TOKEN}"]
    assert "proxy-authorization" not in upstream.requests[0].headers  # only the proxy got them


async def test_a_proxy_refusing_the_credentials_is_a_502_that_shows_none_of_them(
    servers, start_trusting, tls, caplog
) -> None:
    upstream = await servers(Upstream(tls.server))
    proxy = await servers(ForwardProxy(credentials=f"{USER}:another-password"))
    proxy_url = proxy.url(f"{USER}:{PASSWORD_IN_URL}")
    config = make_config(channel("refused", upstream.url, proxyUrl=proxy_url))
    caplog.set_level(logging.DEBUG)
    client = await start_trusting(channel("refused", upstream.url, proxyUrl=proxy_url, **FAST))
    resp, body = await _post(client)
    assert resp.status == 502
    message = assert_anthropic_error(resp.status, body, "api_error")
    assert message == (
        f"upstream channel 'refused' is unreachable: proxy http://{USER}:***@127.0.0.1:{proxy.port}: "
        f"CONNECT to 127.0.0.1:{upstream.port} failed: the proxy requires credentials; "
        "retry shortly; if it persists, the gateway's operator should check that channel"
    )
    assert [s.headers.get("proxy-authorization") for s in proxy.seen] == [f"Basic {TOKEN}"]
    assert upstream.requests == []
    summary = config.channels[0].summary()
    assert f"proxy=http://{USER}:***@127.0.0.1:{proxy.port}" in summary
    assert "refused" in caplog.text and "requires credentials" in caplog.text  # it was logged...
    shown = [body.decode(), *resp.headers.values(), summary, repr(config.channels[0]), caplog.text]
    for secret in (PASSWORD, PASSWORD_IN_URL, TOKEN, "s3cret"):
        assert all(secret not in text for text in shown), secret  # ...but no credential anywhere


async def test_a_forward_proxy_refusing_a_plain_http_request_is_a_502(servers, start_trusting) -> None:
    upstream = await servers(Upstream())
    proxy = await servers(ForwardProxy(credentials=f"{USER}:another-password"))
    proxy_url = proxy.url(f"{USER}:{PASSWORD_IN_URL}")
    client = await start_trusting(channel("refused", upstream.url, proxyUrl=proxy_url, **FAST))
    resp, body = await _post(client)
    assert upstream.requests == []
    assert resp.status == 502, (resp.status, body)
    message = assert_anthropic_error(resp.status, body, "api_error")
    assert "answered 407: its credentials are missing or wrong" in message
    assert PASSWORD_IN_URL not in message and PASSWORD not in message


async def test_through_an_https_proxy_tls_inside_tls(servers, start_trusting, tls) -> None:
    upstream = await servers(Upstream(tls.server))
    proxy = await servers(ForwardProxy(tls.server))
    client = await start_trusting(channel("double", upstream.url, proxyUrl=proxy.url(), **FAST))
    resp, body = await _post(client)
    assert resp.status == 200, body
    assert body == SSE_BODY
    assert [s.line for s in proxy.seen] == [f"CONNECT 127.0.0.1:{upstream.port} HTTP/1.1".encode()]
    assert len(upstream.requests) == 1


def test_tls_inside_tls_on_uvloop(tls) -> None:
    """The gateway serves on uvloop (``ccx_proxy.cli``): start_tls over a TLS transport there."""

    async def main() -> tuple[int, bytes]:
        upstream = await Upstream(tls.server).start()
        proxy = await ForwardProxy(tls.server).start()
        client = UpstreamClient(ssl_context=tls.client)
        try:
            endpoint = endpoints(upstream.url, parse_proxy(proxy.url())).messages
            response = await client.request(
                endpoint, b"{}", b"x-api-key: k\r\n", connect_timeout=WAIT, read_timeout=WAIT
            )
            result = response.status, await response.read()
            response.release()
            return result
        finally:
            client.close()
            await proxy.close()
            await upstream.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        assert isinstance(runner.get_loop(), uvloop.Loop)
        assert runner.run(asyncio.wait_for(main(), WAIT * 2)) == (200, SSE_BODY)


async def test_a_proxy_that_drops_the_tunnel_is_a_proxy_failure(servers, tls) -> None:
    class Dropping(Tracked):
        async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await writer.drain()  # ...and close before any TLS byte is answered

    proxy = await servers(Dropping())
    client = UpstreamClient(ssl_context=tls.client)
    try:
        endpoint = endpoints(
            f"https://127.0.0.1:{unused_port()}", parse_proxy(f"http://127.0.0.1:{proxy.port}")
        ).messages
        with pytest.raises(ProxyFailed, match=rf"proxy http://127\.0\.0\.1:{proxy.port}"):
            await client.request(endpoint, b"{}", b"", connect_timeout=WAIT, read_timeout=WAIT)
        assert client.counts() == (0, 0)
    finally:
        client.close()


# -- the environment ----------------------------------------------------------------------


async def test_the_environments_https_proxy_is_used_without_proxy_url(servers, start_trusting, tls) -> None:
    upstream = await servers(Upstream(tls.server))
    proxy = await servers(ForwardProxy())
    env = {"HTTPS_PROXY": proxy.url(), "HTTP_PROXY": "http://127.0.0.1:1"}
    client = await start_trusting(channel("from-env", upstream.url, **FAST), env=env)
    resp, body = await _post(client)
    assert resp.status == 200, body
    assert body == SSE_BODY
    assert [s.line for s in proxy.seen] == [f"CONNECT 127.0.0.1:{upstream.port} HTTP/1.1".encode()]


async def test_no_proxy_exempts_an_upstream_from_the_environments_proxy(servers, start_trusting, tls) -> None:
    upstream = await servers(Upstream(tls.server))
    proxy = await servers(ForwardProxy())
    env = {"HTTPS_PROXY": proxy.url(), "NO_PROXY": "example.com, 127.0.0.0/8"}
    client = await start_trusting(channel("direct", upstream.url, **FAST), env=env)
    resp, body = await _post(client)
    assert resp.status == 200, body
    assert proxy.seen == [] and proxy.connections == 0
    assert len(upstream.requests) == 1


def _proxy_of(base_url: str, env: dict[str, str], **fields: Any) -> str | None:
    config = parse_config({"channels": [channel("c", base_url, **fields)]}, env)
    (proxy,) = config.channels[0].proxies
    return None if proxy is None else proxy.display


@pytest.mark.parametrize(
    "base_url, env, fields, expected",
    [
        pytest.param("https://api.example.com", {}, {}, None, id="no-proxy-anywhere"),
        pytest.param(
            "https://api.example.com",
            {"HTTPS_PROXY": "http://p:3128"},
            {},
            "http://p:3128",
            id="HTTPS_PROXY",
        ),
        pytest.param(
            "https://api.example.com",
            {"https_proxy": "http://lower:1", "HTTPS_PROXY": "http://upper:2"},
            {},
            "http://lower:1",
            id="lower-case-first",
        ),
        pytest.param(
            "https://api.example.com",
            {"https_proxy": "  ", "HTTPS_PROXY": "http://upper:2"},
            {},
            "http://upper:2",
            id="blank-lower-case-ignored",
        ),
        pytest.param(
            "http://api.example.com",
            {"HTTPS_PROXY": "http://tls-only:1"},
            {},
            None,
            id="http-upstream-ignores-HTTPS_PROXY",
        ),
        pytest.param(
            "http://api.example.com",
            {"HTTP_PROXY": "http://plain:1", "HTTPS_PROXY": "http://tls-only:1"},
            {},
            "http://plain:1",
            id="http-upstream-uses-HTTP_PROXY",
        ),
        pytest.param(
            "https://api.example.com",
            {"HTTPS_PROXY": "http://env:1"},
            {"proxyUrl": "https://own:8443"},
            "https://own:8443",
            id="proxyUrl-wins",
        ),
        pytest.param(
            "https://api.example.com",
            {"HTTPS_PROXY": "http://env:1", "NO_PROXY": "*"},
            {"proxyUrl": "http://own:2"},
            "http://own:2",
            id="NO_PROXY-does-not-cancel-proxyUrl",
        ),
        pytest.param(
            "https://api.example.com",
            {"HTTPS_PROXY": "http://env:1", "no_proxy": ".example.com"},
            {},
            None,
            id="no_proxy-lower-case",
        ),
        pytest.param(
            "https://api.example.com",
            {"HTTPS_PROXY": "http://u:pw@env:1"},
            {},
            "http://u:***@env:1",
            id="masked",
        ),
    ],
)
def test_which_proxy_a_channel_uses(
    base_url: str, env: dict[str, str], fields: dict[str, Any], expected: str | None
) -> None:
    assert _proxy_of(base_url, env, **fields) == expected


def test_each_base_url_gets_its_own_environment_proxy() -> None:
    data = {
        "channels": [
            channel(
                "c", "https://llm.corp.internal", baseUrls=["https://api.example.com", "http://plain.example"]
            )
        ]
    }
    env = {"HTTPS_PROXY": "http://egress:3128", "NO_PROXY": ".corp.internal"}
    (c,) = parse_config(data, env).channels
    assert [p and p.display for p in c.proxies] == [None, "http://egress:3128", None]
    assert [u.messages.origin.proxy for u in c.all_urls] == list(c.proxies)


@pytest.mark.parametrize(
    "host, port, no_proxy, expected",
    [
        pytest.param("api.example.com", 443, "*", True, id="star"),
        pytest.param("api.example.com", 443, "other.org, *", True, id="star-in-a-list"),
        pytest.param("api.example.com", 443, "api.example.com", True, id="exact-host"),
        pytest.param("API.Example.COM", 443, "api.example.COM", True, id="case-insensitive"),
        pytest.param("api.example.com", 443, "example.com", True, id="domain-suffix"),
        pytest.param("api.example.com", 443, ".example.com", True, id="leading-dot"),
        pytest.param("example.com", 443, ".example.com", True, id="leading-dot-covers-the-domain"),
        pytest.param("badexample.com", 443, "example.com", False, id="suffix-only-at-a-dot"),
        pytest.param("example.com.evil", 443, "example.com", False, id="not-a-prefix"),
        pytest.param("api.example.com", 443, "api.example.com:443", True, id="host-port"),
        pytest.param("api.example.com", 8443, "api.example.com:443", False, id="host-other-port"),
        pytest.param(
            "api.example.com", 443, " , ,other.org ,  api.example.com ", True, id="spaces-and-blanks"
        ),
        pytest.param("api.example.com", 443, "", False, id="empty"),
        pytest.param("10.1.2.3", 443, "10.1.2.3", True, id="ip"),
        pytest.param("10.1.2.3", 443, "10.1.2.4", False, id="other-ip"),
        pytest.param("10.1.2.3", 443, "10.0.0.0/8", True, id="cidr"),
        pytest.param("11.1.2.3", 443, "10.0.0.0/8", False, id="outside-cidr"),
        pytest.param("10.1.2.3", 8080, "10.1.2.3:8080", True, id="ip-port"),
        pytest.param("10.1.2.3", 443, "10.1.2.3:8080", False, id="ip-other-port"),
        pytest.param("10.1.2.3", 443, "1.2.3", False, id="ip-is-no-domain-suffix"),
        pytest.param("::1", 443, "::1", True, id="ipv6"),
        pytest.param("[::1]", 443, "::1", True, id="ipv6-bracketed-host"),
        pytest.param("fd00::5", 443, "fd00::/8", True, id="ipv6-cidr"),
        pytest.param("::1", 8080, "[::1]:8080", True, id="ipv6-port"),
        pytest.param("::1", 443, "[::1]:8080", False, id="ipv6-other-port"),
        pytest.param("::1", 443, "[::1]", True, id="ipv6-bracketed-entry"),
    ],
)
def test_no_proxy_matching(host: str, port: int, no_proxy: str, expected: bool) -> None:
    assert bypassed(host, port, no_proxy) is expected


@pytest.mark.parametrize(
    "base_url, no_proxy, expected",
    [
        pytest.param("https://api.example.com/anthropic", "example.com", None, id="suffix"),
        pytest.param("https://api.example.com", "api.example.com:443", None, id="default-port-counts"),
        pytest.param("https://api.example.com:8443", "api.example.com:443", "http://p:1", id="other-port"),
        pytest.param("https://127.0.0.1:9/v1#", "127.0.0.1", None, id="ip-and-verbatim-base"),
        pytest.param("https://[::1]:9", "::1", None, id="ipv6-base"),
        pytest.param("https://api.example.com", "other.org", "http://p:1", id="not-listed"),
    ],
)
def test_environment_proxy(base_url: str, no_proxy: str, expected: str | None) -> None:
    env = {"HTTPS_PROXY": " http://p:1 ", "NO_PROXY": no_proxy}
    assert environment_proxy(base_url, env) == expected


# -- proxyUrl ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "proxy_url, env, problem",
    [
        pytest.param("socks5://127.0.0.1:1080", {}, "must be an http:// or https:// proxy URL", id="socks5"),
        pytest.param("127.0.0.1:3128", {}, "must be an http:// or https:// proxy URL", id="no-scheme"),
        pytest.param("http://proxy:3128/path", {}, "has no path, query or fragment", id="path"),
        pytest.param("http://proxy:3128?x=1", {}, "has no path, query or fragment", id="query"),
        pytest.param("${EGRESS_PROXY}", {}, "environment variable EGRESS_PROXY is not set", id="unset-var"),
        pytest.param("${EGRESS_PROXY}", {"EGRESS_PROXY": ""}, "EGRESS_PROXY is not set", id="empty-var"),
        pytest.param("http://proxy:99999", {}, "not a valid proxy URL", id="port-out-of-range"),
        pytest.param("http://proxy:0", {}, "port", id="port-0"),
        pytest.param("http://pro xy:3128", {}, "host", id="space-in-host"),
        pytest.param(42, {}, "must be a string", id="not-a-string"),
    ],
)
def test_proxy_url_problems_name_the_field(proxy_url: Any, env: dict[str, str], problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"channels": [channel("a"), channel("b", proxyUrl=proxy_url)]}, env)
    (line,) = caught.value.problems
    assert line.startswith("channels[1].proxyUrl: "), line
    assert problem in line, line


def test_a_proxy_url_from_a_variable_and_its_credentials() -> None:
    env = {"EGRESS_PROXY": f"https://{USER}:{PASSWORD_IN_URL}@[::1]:8443"}
    config = parse_config(
        {"channels": [channel("a", "https://api.example.com", proxyUrl="${EGRESS_PROXY}")]}, env
    )
    (proxy,) = config.channels[0].proxies
    assert proxy is not None
    assert (proxy.scheme, proxy.host, proxy.port) == ("https", "::1", 8443)
    assert proxy.authorization == f"Proxy-Authorization: Basic {TOKEN}\r\n".encode()
    assert proxy.display == f"https://{USER}:***@[::1]:8443"
    assert repr(proxy) == f"Proxy(https://{USER}:***@[::1]:8443)"
    assert config.channels[0].proxy_url == "${EGRESS_PROXY}"  # as written: a reference, no secret


@pytest.mark.parametrize(
    "value, shown",
    [
        pytest.param("http://u:pw@proxy:3128", "http://u:***@proxy:3128", id="password"),
        pytest.param("http://proxy:3128", "http://proxy:3128", id="none"),
        pytest.param("http://u:pw@proxy:99999", "<invalid proxy URL>", id="invalid"),
    ],
)
def test_mask_proxy_url(value: str, shown: str) -> None:
    assert mask_proxy_url(value) == shown


def test_port_zero_is_refused_not_taken_for_the_default() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"channels": [channel("a", "http://127.0.0.1:0")]}, {})
    assert caught.value.problems == [
        "channels[0].baseUrl: not usable as an upstream URL: port 0 in 'http://127.0.0.1:0'"
    ]
    with pytest.raises(WireError, match="port 0"):
        parse_proxy("https://proxy:0")


def test_an_ipv6_origin_and_proxy_are_shown_bracketed() -> None:
    origin = endpoints("https://[::1]:9", parse_proxy("http://u:pw@[::2]:3128")).messages.origin
    assert origin.describe() == "https://[::1]:9 via http://u:***@[::2]:3128"


def test_parse_proxy_refuses_what_it_cannot_use() -> None:
    for value in ("ftp://proxy:21", "http://:3128", "http://pro\x00xy:1", "http://proxy:0"):
        with pytest.raises(WireError):
            parse_proxy(value)


# -- insecureSkipVerify -------------------------------------------------------------------


def test_insecure_skip_verify_warns_at_every_load() -> None:
    data = {"channels": [channel("lax", "https://self-signed.example", insecureSkipVerify=True)]}
    for _ in range(2):
        config = parse_config(data, {})
        assert [w for w in config.warnings if "insecureSkipVerify" in w] == [
            "channels[0].insecureSkipVerify: TLS certificates of channel 'lax' are NOT verified; "
            "anyone on the path can read its keys and traffic"
        ]
        assert config.channels[0].summary().endswith(" TLS-UNVERIFIED")
    assert not parse_config({"channels": [channel("strict", "https://x.example")]}, {}).warnings


@pytest.mark.parametrize(
    "insecure", [pytest.param(True, id="insecureSkipVerify"), pytest.param(False, id="verified")]
)
async def test_insecure_skip_verify_reaches_a_self_signed_upstream(
    servers, start_gateway, tls, insecure: bool
) -> None:
    upstream = await servers(Upstream(tls.server))  # a CA the gateway's default store does not know
    client = await start_gateway(channel("lax", upstream.url, insecureSkipVerify=insecure, **FAST))
    resp, body = await _post(client)
    if insecure:
        assert resp.status == 200, body
        assert body == SSE_BODY
    else:
        assert resp.status == 502
        message = assert_anthropic_error(resp.status, body, "api_error")
        assert message.startswith("upstream channel 'lax' is unreachable: cannot connect to 127.0.0.1:")
        assert "certificate verify failed" in message.lower()
        assert upstream.requests == []


@pytest.mark.parametrize(
    "insecure", [pytest.param(True, id="insecureSkipVerify"), pytest.param(False, id="verified")]
)
async def test_insecure_skip_verify_through_a_tunnel(servers, start_gateway, tls, insecure: bool) -> None:
    upstream = await servers(Upstream(tls.server))
    proxy = await servers(ForwardProxy())
    client = await start_gateway(
        channel("lax", upstream.url, insecureSkipVerify=insecure, proxyUrl=proxy.url(), **FAST)
    )
    resp, body = await _post(client)
    assert len(proxy.seen) == 1
    if insecure:
        assert resp.status == 200, body
        assert body == SSE_BODY
    else:
        assert resp.status == 502
        message = assert_anthropic_error(resp.status, body, "api_error")
        assert message.startswith(
            f"upstream channel 'lax' is unreachable: TLS to 127.0.0.1:{upstream.port} "
            f"through proxy http://127.0.0.1:{proxy.port} failed: "
        ), message
        assert "certificate verify failed" in message.lower()
        assert upstream.requests == []


def test_an_unusable_environment_proxy_is_a_warning_not_a_failed_start() -> None:
    env = {"HTTPS_PROXY": "socks5://127.0.0.1:1080"}
    config = parse_config({"channels": [channel("a", "https://api.example.com")]}, env)
    assert config.channels[0].proxies == (None,)
    assert any("ignoring the environment's proxy" in w and "socks" in w for w in config.warnings)
