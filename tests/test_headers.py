import pytest
from multidict import CIMultiDict

from ccx_proxy.headers import (
    channel_lines,
    client_key,
    client_response_headers,
    credential_header,
    forwarded_raw,
    mask_secret,
    upstream_header_block,
)

CRED = ("x-api-key", "sk-channel")


def _block(raw: list[tuple[bytes, bytes]], custom: tuple[tuple[str, str], ...] = ()) -> bytes:
    connection = next((v.decode() for k, v in raw if k.lower() == b"connection"), None)
    names = frozenset(n.lower().encode() for n, _ in custom)
    return upstream_header_block(forwarded_raw(raw, connection), channel_lines(CRED, custom), names)


def test_end_to_end_headers_pass_and_credentials_are_replaced() -> None:
    raw = [
        (b"Host", b"gw:3000"),
        (b"Content-Length", b"10"),
        (b"x-api-key", b"client-key"),
        (b"Authorization", b"Bearer client-key"),
        (b"anthropic-version", b"2023-06-01"),
        (b"anthropic-beta", b"a,b"),
        (b"anthropic-beta", b"c"),
        (b"User-Agent", b"claude-cli/2.0"),
        (b"X-Stainless-Lang", b"js"),
        (b"X-Claude-Code-Session-Id", b"s-1"),
        (b"Connection", b"keep-alive, X-Hop"),
        (b"X-Hop", b"1"),
        (b"Keep-Alive", b"timeout=5"),
        (b"Transfer-Encoding", b"chunked"),
        (b"X-Channel", b"pinned"),
    ]
    assert _block(raw) == (
        b"anthropic-version: 2023-06-01\r\n"
        b"anthropic-beta: a,b\r\n"
        b"anthropic-beta: c\r\n"
        b"User-Agent: claude-cli/2.0\r\n"
        b"X-Stainless-Lang: js\r\n"
        b"X-Claude-Code-Session-Id: s-1\r\n"
        b"x-api-key: sk-channel\r\n"
    )


def test_what_a_load_balancer_adds_about_the_client_stays_at_the_gateway() -> None:
    raw = [
        (b"X-Forwarded-For", b"10.1.2.3"),
        (b"X-Real-IP", b"10.1.2.3"),
        (b"X-Forwarded-Proto", b"https"),
        (b"X-Forwarded-Host", b"gateway.corp.example"),
        (b"Forwarded", b"for=10.1.2.3;proto=https"),
        (b"anthropic-version", b"2023-06-01"),
    ]
    assert _block(raw) == b"anthropic-version: 2023-06-01\r\nx-api-key: sk-channel\r\n"


def test_custom_headers_are_added_and_override_client_values() -> None:
    raw = [(b"X-Org", b"client"), (b"anthropic-version", b"2023-06-01")]
    assert _block(raw, (("x-org", "channel"), ("X-Extra", "1"))) == (
        b"anthropic-version: 2023-06-01\r\nx-api-key: sk-channel\r\nx-org: channel\r\nX-Extra: 1\r\n"
    )


def test_channel_lines_refuse_control_characters() -> None:
    for bad in (("x-api-key", "k\r\nx-evil: 1"), ("x-api-key", "k\x00")):
        with pytest.raises(ValueError):
            channel_lines(bad, ())
    with pytest.raises(ValueError):
        channel_lines(CRED, (("X-A", "a\nb"),))


def test_response_headers_drop_hop_by_hop_and_length() -> None:
    upstream = CIMultiDict(
        [
            ("Content-Type", "text/event-stream"),
            ("Content-Length", "5"),
            ("Transfer-Encoding", "chunked"),
            ("request-id", "req_1"),
            ("anthropic-ratelimit-requests-remaining", "9"),
            ("Connection", "close"),
        ]
    )
    assert list(client_response_headers(upstream).items()) == [
        ("Content-Type", "text/event-stream"),
        ("request-id", "req_1"),
        ("anthropic-ratelimit-requests-remaining", "9"),
    ]


def test_credential_header_modes() -> None:
    assert credential_header("auto", "k") == ("x-api-key", "k")
    assert credential_header("x-api-key", "k") == ("x-api-key", "k")
    assert credential_header("bearer", "k") == ("Authorization", "Bearer k")


def test_client_key_sources() -> None:
    assert client_key({"x-api-key": "a", "authorization": "Bearer b"}) == "a"
    assert client_key({"authorization": "Bearer b"}) == "b"
    assert client_key({"authorization": "bearer  b "}) == "b"
    assert client_key({"authorization": "Basic b"}) is None
    assert client_key({}) is None


def test_mask_secret_keeps_only_a_hint() -> None:
    assert mask_secret("sk-ant-api03-verysecretvalue-abcd") == "sk-…abcd"
    assert "secret" not in mask_secret("sk-secret")
    assert mask_secret("abc") == "…"
