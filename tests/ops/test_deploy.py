"""The reference deployment in ``deploy/``, run for real on 127.0.0.1.

The shipped nginx site and HAProxy config, rendered with only their addresses changed (the
upstream host list becomes one local gateway, the listen ports free ports, the certificate a
test CA's), run as foreground processes of the test in front of ``ccx-proxy serve
--with-mock-upstream``.  Through each: a slow mock stream reaches the client event by event,
the first event long before the upstream has finished (nothing buffers it), with the same bytes
as straight from the gateway; an oversized body gets the gateway's own JSON 413; plain HTTP
gets a redirect.  Also: ``systemd-analyze verify`` on the drop-ins, and the env file example
through the gateway's own settings parser.

A missing nginx, HAProxy or systemd-analyze skips its tests, except with
``CCX_REQUIRE_SERVICES=1`` (CI), where it fails them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import orjson
import pytest
import trustme

from ccx_proxy.ops.drain import drain_timeout
from ccx_proxy.settings import Settings
from ccx_proxy.workers import worker_count

from ..conftest import unused_port

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux services")

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
REQUIRE = os.environ.get("CCX_REQUIRE_SERVICES") == "1"
KEY = "deploy-test-access-key-0123456789"
DELTAS, DELAY = 3, 0.8  # the mock pauses DELAY s before each delta: the stream lasts >= 2.4 s
CLIENT_ADDRESS = "127.0.0.2"  # the test client's source address through a load balancer
STREAM_HEADERS = {
    "x-api-key": KEY,
    "content-type": "application/json",
    "anthropic-version": "2023-06-01",
    "accept-encoding": "gzip",  # nothing may compress the stream (or hold it back to do so)
    "x-mock-deltas": str(DELTAS),
    "x-mock-delay-ms": str(int(DELAY * 1000)),
    "x-forwarded-for": "203.0.113.7",  # as a client behind a proxy of its own would send
}
STREAM_BODY = orjson.dumps(
    {
        "model": "claude-sonnet-4-5",
        "max_tokens": 64,
        "stream": True,
        "messages": [{"role": "user", "content": "through the load balancer"}],
    }
)
MESSAGE_ID = re.compile(rb"msg_mock_\d+")  # the mock numbers its messages: the one difference
TOO_LARGE = 50 * 1024 * 1024 + 1  # one byte over MAX_REQUEST_BODY_SIZE_MB's default


def program(name: str) -> str:
    """The program's path; skip (fail with CCX_REQUIRE_SERVICES=1) when it is not installed."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if found is None:
        message = f"{name} is not installed (apt-get install {name})"
        if REQUIRE:
            pytest.fail(f"{message}, and CCX_REQUIRE_SERVICES=1 requires it")
        pytest.skip(f"{message}; CCX_REQUIRE_SERVICES=1 makes this a failure")
    return found


def replace(text: str, pattern: str, new: str, count: int) -> str:
    """``text`` with ``pattern`` (a regex, multiline) replaced; exactly ``count`` matches, or the
    shipped file changed in a way this rendering does not know."""
    result, n = re.subn(pattern, new, text, flags=re.MULTILINE)
    assert n == count, f"expected {count} match(es) of {pattern!r} in the shipped config, found {n}"
    return result


def wait_http(url: str, context: ssl.SSLContext | None = None, timeout: float = 15) -> None:
    """Until ``url`` answers 200 (a process starting, a health check bringing a server up)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1, context=context) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{url} did not answer 200 within {timeout} s")
        time.sleep(0.05)


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- the gateway, and TLS ------------------------------------------------------------------


@dataclass(frozen=True)
class Gateway:
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """``ccx-proxy serve --with-mock-upstream`` (the demo channels file), one for the module."""
    tmp = tmp_path_factory.mktemp("gateway")
    (tmp / "channels.json").write_bytes((REPO / "channels.json").read_bytes())
    drop = ("PROXY_", "ADMIN_", "OTEL_", "REDIS_", "DATABASE_", "NOTIFY_SOCKET", "WATCHDOG_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(PROXY_ACCESS_KEY=KEY, DATA_DIR=str(tmp / "data"), WORKERS="", PORT="", LOG_LEVEL="INFO")
    # The load balancers here run on loopback: their X-Forwarded-For is believed.
    env.update(FORWARDED_ALLOW_IPS="127.0.0.1", LOG_FORMAT="json")
    port, mock_port = unused_port(), unused_port()
    log = tmp / "gateway.log"
    with log.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ccx_proxy", "serve", "--with-mock-upstream", "--config", "channels.json"]
            + ["--port", str(port), "--mock-port", str(mock_port)],
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=env,
            cwd=tmp,
        )
    try:
        try:
            wait_http(f"http://127.0.0.1:{port}/ready")  # what the load balancers check
        except AssertionError:
            raise AssertionError(log.read_text()[-2000:]) from None
        yield Gateway(port, log)
    finally:
        stop(proc)


@dataclass(frozen=True)
class Tls:
    cert: Path  # the certificate chain
    key: Path
    both: Path  # chain + key in one file (HAProxy's crt)
    client: ssl.SSLContext


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    tmp = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1", "localhost")
    cert, key, both = tmp / "fullchain.pem", tmp / "privkey.pem", tmp / "both.pem"
    cert.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    key.write_bytes(issued.private_key_pem.bytes())
    both.write_bytes(cert.read_bytes() + key.read_bytes())
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return Tls(cert, key, both, client)


# -- what goes through a load balancer -------------------------------------------------------


@dataclass(frozen=True)
class Streamed:
    status: int
    headers: dict[str, str]
    body: bytes
    first_event: float  # seconds from the request to the first complete SSE event
    done: float  # seconds from the request to the end of the body
    reads: int  # separate reads that brought bytes


async def stream(url: str, context: ssl.SSLContext | None = None, source: str | None = None) -> Streamed:
    loop = asyncio.get_running_loop()
    connector = aiohttp.TCPConnector(
        ssl=context if context is not None else False, local_addr=(source, 0) if source else None
    )
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
        started = loop.time()
        async with session.post(url + "/v1/messages", data=STREAM_BODY, headers=STREAM_HEADERS) as response:
            body, first, reads = b"", None, 0
            async for chunk in response.content.iter_any():
                body += chunk
                reads += 1
                if first is None and b"\n\n" in body:
                    first = loop.time() - started
            done = loop.time() - started
            assert first is not None, body
            return Streamed(response.status, dict(response.headers), body, first, done, reads)


async def assert_streams_like_the_gateway(front: str, gateway: Gateway, context: ssl.SSLContext) -> None:
    direct = await stream(gateway.url)
    through = await stream(front, context, source=CLIENT_ADDRESS)
    assert direct.status == through.status == 200, through.body[:500]
    assert through.headers["Content-Type"].startswith("text/event-stream")
    assert "Content-Encoding" not in through.headers  # the client asked for gzip: still none
    assert through.headers.get("x-ccx-request-id")  # the gateway's headers come through
    assert through.body.endswith(b'event: message_stop\ndata: {"type":"message_stop"}\n\n')
    # The same bytes, the message id aside (the mock numbers its messages).
    assert MESSAGE_ID.sub(b"msg_mock_N", through.body) == MESSAGE_ID.sub(b"msg_mock_N", direct.body)
    # Unbuffered: the first event (message_start, written at once) reaches the client while
    # the upstream still has DELTAS pauses of DELAY s ahead of it; a buffering proxy would
    # hand it over with the rest, at the end.  The deltas then come one by one.
    assert through.done >= DELTAS * DELAY - 0.1, through
    assert through.first_event < DELAY, through
    assert through.done - through.first_event >= (DELTAS - 1) * DELAY, through
    assert through.reads >= DELTAS + 1, through
    # The load balancer added the address it saw (the client connected from CLIENT_ADDRESS) to
    # X-Forwarded-For, and the gateway (FORWARDED_ALLOW_IPS=127.0.0.1) logs that one, not the
    # 203.0.113.7 the client wrote itself.
    rid = through.headers["x-ccx-request-id"]
    deadline = asyncio.get_running_loop().time() + 5
    while not (lines := [doc for doc in _json_lines(gateway.log) if doc.get("request_id") == rid]):
        assert asyncio.get_running_loop().time() < deadline, f"no access line for {rid}"
        await asyncio.sleep(0.05)
    assert (lines[0]["client"], lines[0]["proxy"], lines[0]["status"]) == (CLIENT_ADDRESS, "127.0.0.1", 200)


def _json_lines(log: Path) -> list[dict[str, object]]:
    docs = []
    for line in log.read_text().splitlines():
        with contextlib.suppress(ValueError):
            doc = orjson.loads(line)
            if isinstance(doc, dict):
                docs.append(doc)
    return docs


async def request_raw(port: int, head: bytes, context: ssl.SSLContext | None) -> tuple[int, bytes]:
    """One request written as bytes (a Content-Length without its body, say); the status and
    everything the server sent until it closed or 5 s passed."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=context, server_hostname="127.0.0.1" if context else None
    )
    try:
        writer.write(head)
        data = b""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                while chunk := await reader.read(65536):
                    data += chunk
                    if b"\r\n\r\n" in data and data.rstrip().endswith(b"}"):
                        break  # a complete JSON error body: enough
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()
    return int(data.split(b" ", 2)[1]), data


def too_large_head() -> bytes:
    return (
        b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nx-api-key: %s\r\n"
        b"content-type: application/json\r\ncontent-length: %d\r\n\r\n" % (KEY.encode(), TOO_LARGE)
    )


def assert_gateway_413(data: bytes) -> None:
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"\r\nx-should-retry: false" in head.lower(), head
    assert orjson.loads(body)["error"]["type"] == "request_too_large", body


class Vanishing:
    """A gateway host that takes a request and dies before answering: it reads a POST's head
    and closes the connection (``GET /ready`` it answers 200, so a health check keeps it in).
    A load balancer that sent the POST on to another host would spend a second upstream call."""

    def __init__(self) -> None:
        self.posts = 0
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> int:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            if head.startswith(b"POST "):
                self.posts += 1
            else:
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def assert_posts_are_not_replayed(front: Front, vanishing: Vanishing, context: ssl.SSLContext) -> None:
    """POSTs until one has gone to the vanishing host: that one fails (502 from nginx, the
    connection closed by HAProxy) instead of being sent again to the live gateway, which would
    answer 200; the ones before it get 200."""
    connector = aiohttp.TCPConnector(ssl=context)
    statuses: list[str] = []
    async with aiohttp.ClientSession(connector=connector) as session:
        headers = {k: v for k, v in STREAM_HEADERS.items() if not k.startswith("x-mock")}
        body = STREAM_BODY.replace(b'"stream":true', b'"stream":false')
        while not vanishing.posts and len(statuses) < 6:
            try:
                async with session.post(front.url + "/v1/messages", data=body, headers=headers) as response:
                    await response.read()
                    statuses.append(str(response.status))
            except aiohttp.ServerDisconnectedError:  # HAProxy's answer to an empty response
                statuses.append("closed")
    assert vanishing.posts == 1, statuses
    assert statuses[:-1] == ["200"] * (len(statuses) - 1) and statuses[-1] in ("502", "closed"), statuses


# -- nginx -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Front:
    https: int
    http: int
    conf: Path
    log: Path

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.https}"


def render_nginx(tmp: Path, gateway_port: int, tls: Tls, *more: int) -> Front:
    """The shipped site, its addresses changed, inside a main config whose every path (pid,
    logs, temp files) is in ``tmp``."""
    site = (DEPLOY / "nginx" / "ccx-proxy.conf").read_text()
    # The first host's line, its parameters kept, once per local port; the other two out.
    ours = "".join(f"    server 127.0.0.1:{port} \\1;\n" for port in (*more, gateway_port))
    site = replace(site, r"^    server 10\.0\.0\.11:3000 (.*);\n", ours, 1)
    site = replace(site, r"^    server 10\.0\.0\.1[23]:3000 .*;\n", "", 2)
    site = replace(site, r"^    listen \[::\]:(80|443 ssl);\n", "", 2)
    https, http = unused_port(), unused_port()
    site = replace(site, r"^    listen 443 ssl;$", f"    listen 127.0.0.1:{https} ssl;", 1)
    site = replace(site, r"^    listen 80;$", f"    listen 127.0.0.1:{http};", 1)
    site = replace(site, r"/etc/ssl/ccx-proxy/fullchain\.pem", str(tls.cert), 1)
    site = replace(site, r"/etc/ssl/ccx-proxy/privkey\.pem", str(tls.key), 1)
    (tmp / "ccx-proxy.conf").write_text(site)
    temp = " ".join(
        f"{kind}_temp_path {tmp / kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    conf = tmp / "nginx.conf"
    conf.write_text(
        f"worker_processes 1;\npid {tmp / 'nginx.pid'};\nerror_log {tmp / 'error.log'} warn;\n"
        f"events {{ worker_connections 256; }}\n"
        f"http {{ access_log {tmp / 'access.log'}; {temp} include {tmp / 'ccx-proxy.conf'}; }}\n"
    )
    return Front(https, http, conf, tmp / "error.log")


def nginx_argv(nginx: str, front: Front, *extra: str) -> list[str]:
    tmp = str(front.conf.parent)
    return [nginx, "-p", tmp + "/", "-e", str(front.log), "-c", str(front.conf), "-g", "daemon off;", *extra]


def nginx_test(nginx: str, front: Front) -> None:
    result = subprocess.run(nginx_argv(nginx, front, "-t"), capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and "test is successful" in result.stderr, result.stderr


@contextlib.asynccontextmanager
async def running(argv: list[str], log: Path, url: str, context: ssl.SSLContext) -> AsyncIterator[None]:
    """A load balancer as a foreground process of the test, until ``url`` answers 200 through it."""
    with (log.parent / "stderr.log").open("wb") as err:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err)
    try:
        try:
            await asyncio.to_thread(wait_http, url, context)
        except AssertionError:
            logs = [p.read_text()[-2000:] for p in (log, log.parent / "stderr.log") if p.exists()]
            raise AssertionError("\n".join(logs)) from None
        yield
    finally:
        stop(proc, signal.SIGQUIT if "nginx" in argv[0] else signal.SIGUSR1)  # graceful, as the drop-ins


@pytest.fixture
def nginx() -> str:
    return program("nginx")


def test_nginx_accepts_the_shipped_site(nginx: str, tls: Tls, tmp_path: Path) -> None:
    nginx_test(nginx, render_nginx(tmp_path, unused_port(), tls))


@pytest.mark.timeout(60)
async def test_nginx_streams_sse_unbuffered_and_byte_exact(
    nginx: str, gateway: Gateway, tls: Tls, tmp_path: Path
) -> None:
    front = render_nginx(tmp_path, gateway.port, tls)
    nginx_test(nginx, front)
    async with running(nginx_argv(nginx, front), front.log, front.url + "/ready", tls.client):
        await assert_streams_like_the_gateway(front.url, gateway, tls.client)

        status, data = await request_raw(front.https, too_large_head(), tls.client)
        assert status == 413
        assert_gateway_413(data)

        status, data = await request_raw(front.http, b"GET /v1/models HTTP/1.1\r\nHost: ccx\r\n\r\n", None)
        assert status == 308 and b"\r\nLocation: https://ccx/v1/models\r\n" in data


async def test_nginx_never_sends_a_post_again_once_it_went_out(
    nginx: str, gateway: Gateway, tls: Tls, tmp_path: Path
) -> None:
    vanishing = Vanishing()
    async with vanishing as port:
        front = render_nginx(tmp_path, gateway.port, tls, port)
        async with running(nginx_argv(nginx, front), front.log, front.url + "/ready", tls.client):
            await assert_posts_are_not_replayed(front, vanishing, tls.client)


# -- HAProxy -----------------------------------------------------------------------------------


def render_haproxy(tmp: Path, gateway_port: int, tls: Tls, *more: int) -> Front:
    """The shipped config, its addresses changed; nothing outside ``tmp`` (no chroot, no
    admin socket, no user switch, logs to stderr)."""
    cfg = (DEPLOY / "haproxy" / "haproxy.cfg").read_text()
    cfg = replace(cfg, r"^    log /dev/log local0$", "    log stderr format raw local0", 1)
    cfg = replace(cfg, r"^    (chroot|stats socket|user|group) .*\n", "", 4)
    cfg = replace(cfg, r"^    maxconn 50000$", "    maxconn 1000", 1)  # a test's file limit
    cfg = replace(cfg, r"^    bind :::(80|443) .*\n", "", 2)
    https, http = unused_port(), unused_port()
    cfg = replace(cfg, r"^    bind :80$", f"    bind 127.0.0.1:{http}", 1)
    cfg = replace(
        cfg,
        r"^    bind :443 ssl crt /etc/haproxy/certs/ccx-proxy\.pem ",
        f"    bind 127.0.0.1:{https} ssl crt {tls.both} ",
        1,
    )
    cfg = replace(cfg, r"^    server gw[123] 10\.0\.0\.1[123]:3000\n", "", 3)
    cfg += "".join(f"    server gw{i} 127.0.0.1:{port}\n" for i, port in enumerate((*more, gateway_port), 1))
    conf = tmp / "haproxy.cfg"
    conf.write_text(cfg)
    return Front(https, http, conf, tmp / "stderr.log")


def haproxy_check(haproxy: str, front: Front) -> None:
    argv = [haproxy, "-c", "-f", str(front.conf)]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    said = result.stdout + result.stderr
    assert result.returncode == 0 and "Configuration file is valid" in said, said
    assert "[WARNING]" not in said, said


@pytest.fixture
def haproxy() -> str:
    return program("haproxy")


def test_haproxy_accepts_the_shipped_config(haproxy: str, tls: Tls, tmp_path: Path) -> None:
    haproxy_check(haproxy, render_haproxy(tmp_path, unused_port(), tls))


@pytest.mark.timeout(60)
async def test_haproxy_streams_sse_unbuffered_and_byte_exact(
    haproxy: str, gateway: Gateway, tls: Tls, tmp_path: Path
) -> None:
    front = render_haproxy(tmp_path, gateway.port, tls)
    haproxy_check(haproxy, front)
    # /ready through it answers 200 once the health check (GET /ready) has the server up.
    async with running([haproxy, "-db", "-f", str(front.conf)], front.log, front.url + "/ready", tls.client):
        await assert_streams_like_the_gateway(front.url, gateway, tls.client)

        status, data = await request_raw(front.https, too_large_head(), tls.client)
        assert status == 413
        assert_gateway_413(data)

        status, data = await request_raw(front.http, b"GET /v1/models HTTP/1.1\r\nHost: ccx\r\n\r\n", None)
        assert status == 308 and b"\r\nlocation: https://ccx/v1/models\r\n" in data.lower()


async def test_haproxy_never_sends_a_post_again_once_it_went_out(
    haproxy: str, gateway: Gateway, tls: Tls, tmp_path: Path
) -> None:
    vanishing = Vanishing()
    async with vanishing as port:
        front = render_haproxy(tmp_path, gateway.port, tls, port)
        argv = [haproxy, "-db", "-f", str(front.conf)]
        async with running(argv, front.log, front.url + "/ready", tls.client):
            await assert_posts_are_not_replayed(front, vanishing, tls.client)


# -- systemd, the env file ---------------------------------------------------------------------


def test_systemd_dropins_verify(tmp_path: Path) -> None:
    """Every drop-in in deploy/systemd/, loaded onto its unit (ccx-proxy.service: the shipped
    one, ExecStart pointed at this checkout's program, as .ci/run does): no complaint."""
    analyze = program("systemd-analyze")
    unit = (DEPLOY / "ccx-proxy.service").read_text()
    executable = Path(sys.executable).parent / "ccx-proxy"
    assert executable.exists(), executable
    unit = replace(unit, r"^ExecStart=/opt/ccx-proxy/\.venv/bin/ccx-proxy ", f"ExecStart={executable} ", 1)
    (tmp_path / "ccx-proxy.service").write_text(unit)
    units = []
    for dropins in sorted((DEPLOY / "systemd").glob("*.service.d")):
        shutil.copytree(dropins, tmp_path / dropins.name)
        units.append(dropins.name.removesuffix(".d"))
    assert units == ["ccx-proxy.service", "haproxy.service", "nginx.service"]
    for name in units[1:]:  # the distribution's own unit, from the nginx / haproxy package
        if not any(Path(d, name).exists() for d in ("/lib/systemd/system", "/usr/lib/systemd/system")):
            program(name.removesuffix(".service"))  # skips or fails with the package's name
            pytest.skip(f"{name} is not installed (its package has no systemd unit here)")
    env = {**os.environ, "SYSTEMD_UNIT_PATH": f"{tmp_path}:"}  # ours first, then the system's
    result = subprocess.run([analyze, "verify", *units], capture_output=True, text=True, env=env, timeout=60)
    said = (result.stdout + result.stderr).strip()
    assert result.returncode == 0 and not said, said


def test_env_example_is_accepted_by_the_gateway() -> None:
    """deploy/ccx-proxy.env.example, read as systemd reads an EnvironmentFile, passes the
    gateway's own checks, and names what a multi-host deployment sets."""
    env = {}
    for line in (DEPLOY / "ccx-proxy.env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, sep, value = line.partition("=")
            assert sep and name == name.strip() and name.isidentifier(), line
            env[name] = value
    for name in ("PROXY_ACCESS_KEY", "BIND_HOST", "WORKERS", "DATA_DIR", "DATABASE_URL"):
        assert env.get(name), name
    for name in ("REDIS_URL", "REDIS_FAILURE", "REDIS_TIMEOUT_MS"):
        assert env.get(name), name
    assert env["DATABASE_URL"].startswith("postgresql://")
    settings = Settings.from_env(env)
    assert settings.host == "0.0.0.0" and settings.port == 3000 and settings.data_dir == "/var/lib/ccx-proxy"
    assert worker_count(None, env) >= 1
    assert settings.forwarded_allow_ips.client("10.0.0.5", ["203.0.113.7"]) == "203.0.113.7"
    assert drain_timeout(env) < 150  # below the unit's TimeoutStopSec
