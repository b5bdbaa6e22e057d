"""Secrets never reach a client or a log line: upstream keys and custom-header secrets in
error answers (headers, reason, body), access keys in every log record (aiohttp's own parse
errors included), masks that show little, and ``${VAR}`` that can never name the gateway's
own keys."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import os
import signal
import string
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import orjson
import pytest
from aiohttp import web
from multidict import CIMultiDict

from ccx_proxy import redact
from ccx_proxy.app import create_app
from ccx_proxy.cli import check_config
from ccx_proxy.config import ConfigError, load_config, parse_config
from ccx_proxy.headers import mask_secret, scrub_head, scrub_text
from ccx_proxy.settings import Settings
from ccx_proxy.upstream.bodies import ERROR_BODY_LIMIT, client_error_body
from tests.conftest import (
    ACCESS_KEY,
    AUTH,
    UPSTREAM_KEY,
    GatewayFactory,
    channel,
    make_config,
    message_body,
    unused_port,
)

CUSTOM = "org-secret-value-0042"  # a customHeaders value: a secret of the channel too
SLASHED = "sk-slash/plus+key=0123abcd"  # echoed JSON-escaped (\/) and percent-encoded
EXTRA_KEY = "extra-key\\with'quote-7788"  # a backslash: aiohttp's repr of the line doubles it
ADMIN_KEY = "admin-key-for-secrets-5566"


def _forms(secret: str) -> list[bytes]:
    """The ways a secret could be spelled in what the client gets."""
    return [
        secret.encode(),
        orjson.dumps(secret)[1:-1],
        json.dumps(secret)[1:-1].replace("/", "\\/").encode(),
        quote(secret, safe="").encode(),
    ]


def _assert_clean(data: bytes, *secrets: str) -> None:
    for secret in secrets:
        for form in _forms(secret):
            assert form not in data, (secret, data[:400])


# -- masks ---------------------------------------------------------------------------------


def _shown(mask: str) -> str:
    head, _, tail = mask.partition("…")
    assert head in ("", "sk-"), mask
    return tail


@pytest.mark.parametrize("length", range(4, 65))
@pytest.mark.parametrize("prefix", ["", "sk-"])
def test_mask_shows_at_most_four_and_a_third(length: int, prefix: str) -> None:
    alphabet = string.ascii_letters + string.digits
    key = (prefix + "".join(alphabet[(i * 7 + length) % len(alphabet)] for i in range(length)))[:length]
    mask = mask_secret(key)
    tail = _shown(mask)
    material = length - (3 if key.startswith("sk-") else 0)  # "sk-" is a public marker
    assert len(tail) <= 4 and len(tail) <= material // 3 and key.endswith(tail)
    assert mask.startswith("sk-") == key.startswith("sk-")
    if material >= 12:
        assert len(tail) == 4  # still enough to tell keys apart


def test_mask_of_the_nine_character_key_shows_three() -> None:
    assert mask_secret("abcdefghi") == "…ghi"  # was "abc…fghi": 7 of 9 characters
    assert mask_secret("sk-secret") == "sk-…et"
    assert mask_secret("mock-upstream-key") == "…-key"  # no prefix but sk- is ever shown
    assert mask_secret("sk-ant-api03-" + "x" * 80 + "abcd") == "sk-…abcd"
    assert mask_secret("abcde") == "…" and mask_secret("") == "…"


# -- scrubbing helpers -----------------------------------------------------------------------


def test_scrub_head_masks_values_drops_named_headers_and_masks_the_reason() -> None:
    headers: CIMultiDict[str] = CIMultiDict(
        [
            ("Content-Type", "application/json"),
            ("x-echo-key", UPSTREAM_KEY),
            ("Location", f"https://up.example/?k={quote(SLASHED, safe='')}"),
            ("x-echo-json", json.dumps({"k": SLASHED}).replace("/", "\\/")),
            (f"X-{UPSTREAM_KEY.upper()}", "named after the key"),
            ("x-echo-key", f"again {CUSTOM}"),
        ]
    )
    reason = scrub_head(headers, f"Bad key {UPSTREAM_KEY}", (UPSTREAM_KEY, SLASHED, CUSTOM))
    assert reason == f"Bad key {mask_secret(UPSTREAM_KEY)}"
    assert headers.getall("x-echo-key") == [mask_secret(UPSTREAM_KEY), f"again {mask_secret(CUSTOM)}"]
    assert list(headers)[:2] == ["Content-Type", "x-echo-key"]  # order kept
    assert len(headers) == 5  # the header named after a key is gone
    _assert_clean(repr(list(headers.items())).encode(), UPSTREAM_KEY, SLASHED, CUSTOM)


def test_scrub_head_leaves_clean_headers_alone() -> None:
    headers: CIMultiDict[str] = CIMultiDict([("a", "1"), ("b", "2"), ("a", "3")])
    assert scrub_head(headers, "Not Found", (UPSTREAM_KEY,)) == "Not Found"
    assert list(headers.items()) == [("a", "1"), ("b", "2"), ("a", "3")]


def test_a_secret_inside_another_is_masked_after_it() -> None:
    outer = "sk-outer-" + CUSTOM + "-tail9999"
    text = scrub_text(f"{outer} {CUSTOM}", (CUSTOM, outer))
    assert text == f"{mask_secret(outer)} {mask_secret(CUSTOM)}"


def test_an_error_body_cut_at_the_limit_loses_a_partial_secret() -> None:
    body = b"a" * (ERROR_BODY_LIMIT - 10) + UPSTREAM_KEY.encode() + b'"}'
    out = client_error_body(400, CIMultiDict(), body, (UPSTREAM_KEY,))
    assert out == b"a" * (ERROR_BODY_LIMIT - 10)  # the key's first 10 characters are cut too
    compressed = gzip.compress(body)
    out = client_error_body(400, CIMultiDict({"Content-Encoding": "gzip"}), compressed, (UPSTREAM_KEY,))
    assert not out.endswith(UPSTREAM_KEY[:10].encode()) and len(out) < ERROR_BODY_LIMIT


# -- an upstream that echoes its key ---------------------------------------------------------


class EchoUpstream:
    """Answers every request with ``status``, echoing the key it got in headers, reason and body."""

    def __init__(self) -> None:
        self.status = 400
        self.content_type = "application/json"
        self.compress = False

    async def handle(self, request: web.Request) -> web.StreamResponse:
        key = request.headers.get("x-api-key", "")
        custom = request.headers.get("x-org-secret", "")
        body = orjson.dumps(
            {
                "type": "error",
                "error": {"type": "invalid_request_error", "message": f"key {key} / org {custom}"},
                "echo": {"headers": {str(k): v for k, v in request.headers.items()}},
            }
        )
        # As a server that escapes "/" in JSON strings writes it, and as a URL would carry it.
        body += b"\n" + json.dumps(key).replace("/", "\\/").encode() + b" " + quote(key, safe="").encode()
        if self.content_type == "text/event-stream":
            body = b"event: error\ndata: " + body + b"\n\n"
        headers = {
            "Content-Type": self.content_type,
            "x-echo-key": key,
            "x-echo-auth": f"Bearer {key}",
            "x-echo-org": custom,
            "Location": f"https://up.example/retry?key={quote(key, safe='')}",
            "Retry-After": "1",
        }
        if self.compress:
            body = gzip.compress(body)
            headers["Content-Encoding"] = "gzip"
        return web.Response(status=self.status, reason=f"Refused {key}", headers=headers, body=body)


@pytest.fixture
async def echo(aiohttp_server: Any) -> tuple[EchoUpstream, str]:
    upstream = EchoUpstream()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", upstream.handle)
    server = await aiohttp_server(app)
    return upstream, str(server.make_url("")).rstrip("/")


def _head_bytes(resp: Any) -> bytes:
    lines = [f"{resp.status} {resp.reason}".encode()]
    lines += [k + b": " + v for k, v in resp.raw_headers]
    return b"\r\n".join(lines)


@pytest.mark.parametrize("status", [302, 400, 401, 404, 429, 500, 529])
@pytest.mark.parametrize("variant", ["json", "sse", "gzip"])
@pytest.mark.parametrize("key", [UPSTREAM_KEY, SLASHED])
async def test_an_upstream_echoing_its_key_never_shows_it(
    start_gateway: GatewayFactory, echo: tuple[EchoUpstream, str], status: int, variant: str, key: str
) -> None:
    upstream, url = echo
    upstream.status = status
    upstream.content_type = "text/event-stream" if variant == "sse" else "application/json"
    upstream.compress = variant == "gzip"
    gateway = await start_gateway(
        channel("up", url, apiKeys=[key], customHeaders={"X-Org-Secret": CUSTOM}, authHeader="x-api-key")
    )
    for stream in (True, False):
        resp = await gateway.post(
            "/v1/messages", data=message_body(stream=stream), headers=AUTH, allow_redirects=False
        )
        body = await resp.read()
        assert resp.status == (502 if status == 401 else status)
        _assert_clean(_head_bytes(resp) + b"\r\n\r\n" + body, key, CUSTOM, ACCESS_KEY)
        if status not in (401,):
            assert resp.headers["x-echo-key"] == mask_secret(key)
            assert mask_secret(CUSTOM) in resp.headers["x-echo-org"]
            assert resp.reason == f"Refused {mask_secret(key)}"
            assert mask_secret(key).encode() in body


async def test_a_success_is_relayed_untouched(
    start_gateway: GatewayFactory, echo: tuple[EchoUpstream, str]
) -> None:
    upstream, url = echo
    upstream.status = 200  # a 2xx is never scrubbed (and pays nothing for it)
    gateway = await start_gateway(channel("up", url, authHeader="x-api-key"))
    resp = await gateway.post("/v1/messages", data=message_body(stream=False), headers=AUTH)
    assert resp.status == 200 and resp.headers["x-echo-key"] == UPSTREAM_KEY


# -- ${VAR} may not name the gateway's own secrets --------------------------------------------


ENV = {
    "PROXY_ACCESS_KEY": ACCESS_KEY,
    "EXTRA_PROXY_ACCESS_KEYS": f"other-key-000111,{EXTRA_KEY}",
    "ADMIN_ACCESS_KEY": ADMIN_KEY,
    "ALIAS_OF_THE_ACCESS_KEY": ACCESS_KEY,
    "UPSTREAM": UPSTREAM_KEY,
}


@pytest.mark.parametrize(
    ("fields", "path"),
    [
        ({"apiKeys": ["${UPSTREAM}", "${PROXY_ACCESS_KEY}"]}, "channels[0].apiKeys[1]"),
        ({"apiKeys": ["${EXTRA_PROXY_ACCESS_KEYS}"]}, "channels[0].apiKeys[0]"),
        ({"customHeaders": {"X-Admin": "Bearer ${ADMIN_ACCESS_KEY}"}}, "channels[0].customHeaders.X-Admin"),
        ({"proxyUrl": "http://u:${PROXY_ACCESS_KEY}@proxy.example:3128"}, "channels[0].proxyUrl"),
        ({"apiKeys": ["${ALIAS_OF_THE_ACCESS_KEY}"]}, "channels[0].apiKeys[0]"),
        ({"apiKeys": ["${PROXY_ACCESS_KEY}"], "status": "disabled"}, "channels[0].apiKeys[0]"),
    ],
)
def test_a_channel_may_not_name_the_gateways_own_secrets(fields: dict[str, Any], path: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"channels": [channel("up", "https://up.example", **fields)]}, ENV)
    problems = caught.value.problems
    assert len(problems) == 1 and problems[0].startswith(f"{path}: $"), problems
    assert "gateway's own" in problems[0] and "PROXY_ACCESS_KEY, EXTRA_PROXY_ACCESS_KEYS" in problems[0]
    for secret in (ACCESS_KEY, EXTRA_KEY, ADMIN_KEY):
        assert secret not in problems[0]


def test_refused_even_when_the_variable_is_unset() -> None:
    with pytest.raises(ConfigError) as caught:
        make_config(channel("up", "https://up.example", apiKeys=["${ADMIN_ACCESS_KEY}"]))
    assert caught.value.problems[0].startswith(
        "channels[0].apiKeys[0]: ${ADMIN_ACCESS_KEY} is the gateway's own"
    )


def test_check_config_refuses_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    monkeypatch.setenv("PROXY_ACCESS_KEY", ACCESS_KEY)
    path = tmp_path / "channels.json"
    path.write_text(
        json.dumps({"channels": [channel("up", "https://up.example", apiKeys=["${PROXY_ACCESS_KEY}"])]})
    )
    assert check_config(str(path)) == 1
    err = capsys.readouterr().err
    assert err.startswith("channels[0].apiKeys[0]: ${PROXY_ACCESS_KEY} is the gateway's own secret")
    assert ACCESS_KEY not in err


async def test_the_admin_api_refuses_it(
    aiohttp_client: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PROXY_ACCESS_KEY", ACCESS_KEY)
    path = tmp_path / "channels.json"
    path.write_text(json.dumps({"channels": [channel("up", "https://up.example")]}))
    settings = Settings(
        access_keys=(ACCESS_KEY,), admin_keys=(ADMIN_KEY,), channels_file=str(path), watch_interval=0
    )
    client = await aiohttp_client(create_app(settings, load_config(path, env={})))
    new = {"name": "thief", "baseUrl": "https://attacker.example", "apiKeys": ["${PROXY_ACCESS_KEY}"]}
    resp = await client.post("/api/messages/channels", json=new, headers={"x-api-key": ADMIN_KEY})
    raw = await resp.read()
    assert resp.status == 400 and ACCESS_KEY.encode() not in raw
    problem = orjson.loads(raw)["error"]["problems"][0]
    assert problem["path"] == "channels[1].apiKeys[0]" and problem["field"] == "apiKeys[0]"
    assert problem["message"].startswith("${PROXY_ACCESS_KEY} is the gateway's own secret")
    assert "thief" not in path.read_text()  # nothing written


# -- log lines --------------------------------------------------------------------------------


@pytest.fixture
def redactor() -> Iterator[redact.Redactor]:
    instance = redact.Redactor()
    instance.set_keys((ACCESS_KEY, EXTRA_KEY, ADMIN_KEY, "abc"))  # "abc": too short to redact
    redact.install(instance)
    try:
        yield instance
    finally:
        redact.uninstall()


def _log_text(caplog: pytest.LogCaptureFixture) -> str:
    """Every captured record as its handlers would write it (message, traceback, stack)."""
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    return "\n".join(formatter.format(r) for r in caplog.records)


def test_a_log_line_with_an_access_key_is_redacted(
    redactor: redact.Redactor, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    log = logging.getLogger("ccx_proxy.test")
    log.info("client sent %s and %r", ACCESS_KEY, {"admin": ADMIN_KEY})  # in the arguments
    log.warning(f"inline {EXTRA_KEY} and abc")  # in the message itself
    log.info("bad arguments %d", ACCESS_KEY)  # formatting fails: logging would print the args
    try:
        raise ValueError(f"header line b'x-api-key: {ACCESS_KEY}'")
    except ValueError:
        log.exception("failed")
    log.info("plain %s", "line")
    text = _log_text(caplog) + caplog.text
    _assert_clean(text.encode(), ACCESS_KEY, EXTRA_KEY, ADMIN_KEY)
    assert mask_secret(ACCESS_KEY) in text and mask_secret(ADMIN_KEY) in text and "and abc" in text
    assert "ValueError" in text and "Traceback" in text  # the traceback stays, redacted
    plain = caplog.records[-1]
    assert plain.msg == "plain %s" and plain.args == ("line",)  # a clean record is left alone


def test_the_redactor_follows_the_running_configuration(
    redactor: redact.Redactor, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    config = make_config(channel("up", "https://up.example", customHeaders={"X-Org-Secret": CUSTOM}))
    current = [config]
    redactor.follow(lambda: current[0])
    log = logging.getLogger("ccx_proxy.test")
    log.info("upstream key %s, header %s", UPSTREAM_KEY, CUSTOM)
    current[0] = make_config(channel("up", "https://up.example", apiKeys=[SLASHED]))  # a reload
    log.info("new key %s", SLASHED)
    _assert_clean(caplog.text.encode(), UPSTREAM_KEY, CUSTOM, SLASHED)
    assert mask_secret(SLASHED) in caplog.text


def test_installing_twice_adds_one_step(redactor: redact.Redactor) -> None:
    factory = logging.getLogRecordFactory()
    redact.install(redactor)
    assert logging.getLogRecordFactory() is factory


# -- aiohttp's own parse errors ---------------------------------------------------------------

MALFORMED = [
    f"POST /v1/messages HTTP/1.1\r\nHost: x\r\nx-api-key: {ACCESS_KEY}\x01\r\n\r\n",
    f"POST /v1/messages HTTP/1.1\r\nHost: x\r\nx-api-key : {ACCESS_KEY}\r\n\r\n",
    f"POST /v1/messages HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN_KEY}\x7f\r\n\r\n",
    f"POST /v1/messages HTTP/1.1\r\nHost: x\r\nx-api-key{EXTRA_KEY}\r\n\r\n",
    f"GET /v1/models?key={ACCESS_KEY} HTTP/1.1\x01\r\nHost: x\r\n\r\n",
]


async def _raw(port: int, request: str) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request.encode("latin-1"))
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


async def _serve(
    app: web.Application, settings: Settings, gateway_handler: bool
) -> tuple[web.AppRunner, int]:
    if gateway_handler:  # as `ccx-proxy serve` runs it
        from ccx_proxy.server import install, server_kwargs

        runner = web.AppRunner(app, **server_kwargs(settings))  # access log on: it is redacted too
        await runner.setup()
        assert runner.server is not None
        install(runner.server, settings)
    else:  # aiohttp's own handler: its log line quotes the malformed line
        runner = web.AppRunner(app)
        await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, int(runner.addresses[0][1])


@pytest.mark.parametrize("gateway_handler", [False, True])
async def test_a_malformed_header_with_a_key_reaches_no_log_line(
    redactor: redact.Redactor, caplog: pytest.LogCaptureFixture, gateway_handler: bool
) -> None:
    caplog.set_level(logging.DEBUG)
    settings = Settings(access_keys=(ACCESS_KEY, EXTRA_KEY), admin_keys=(ADMIN_KEY,), watch_interval=0)
    app = create_app(settings, make_config(channel("up", "http://127.0.0.1:1")))
    runner, port = await _serve(app, settings, gateway_handler)
    try:
        answers = [await _raw(port, request) for request in MALFORMED]
    finally:
        await runner.cleanup()
    assert all(a.startswith(b"HTTP/1.") and b" 400 " in a.split(b"\r\n")[0] for a in answers), answers
    logged = _log_text(caplog)
    assert "aiohttp" in logged or gateway_handler  # aiohttp's own line was captured, redacted
    _assert_clean(logged.encode(), ACCESS_KEY, EXTRA_KEY, ADMIN_KEY)
    if gateway_handler:  # the gateway's handler quotes nothing the client sent either
        for answer in answers:
            _assert_clean(answer, ACCESS_KEY, EXTRA_KEY, ADMIN_KEY)


def test_a_redactor_that_fails_withholds_the_record(caplog: pytest.LogCaptureFixture) -> None:
    broken = redact.Redactor()
    broken.set_keys((ACCESS_KEY,))

    def current() -> None:
        raise RuntimeError("no configuration")

    broken.follow(current)
    redact.install(broken)
    try:
        caplog.set_level(logging.INFO)
        logging.getLogger("ccx_proxy.test").info("key %s", ACCESS_KEY)  # does not raise
    finally:
        redact.uninstall()
    assert ACCESS_KEY not in caplog.text and "withheld" in caplog.text


async def test_the_served_gateway_logs_no_key(tmp_path: Path) -> None:
    """`ccx-proxy serve` as a process, LOG_LEVEL=DEBUG: malformed heads carrying each key."""
    port = unused_port()
    path = tmp_path / "channels.json"
    path.write_text(json.dumps({"channels": [channel("up", "http://127.0.0.1:1")]}))
    env = {k: v for k, v in os.environ.items() if not k.endswith("ACCESS_KEY") and k != "CHANNELS_FILE"}
    env.update(PROXY_ACCESS_KEY=ACCESS_KEY, EXTRA_PROXY_ACCESS_KEYS=EXTRA_KEY, ADMIN_ACCESS_KEY=ADMIN_KEY)
    env.update(LOG_LEVEL="DEBUG")
    command = [sys.executable, "-m", "ccx_proxy", "serve", "--port", str(port), "--config", str(path)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        assert "listening" in await asyncio.to_thread(proc.stdout.readline)
        answers = [await _raw(port, request) for request in MALFORMED]
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert all(b" 400 " in a.split(b"\r\n")[0] for a in answers), answers
    _assert_clean(err.encode(), ACCESS_KEY, EXTRA_KEY, ADMIN_KEY)
