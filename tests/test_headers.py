from multidict import CIMultiDict

from ccx_proxy.headers import (
    client_key,
    client_response_headers,
    credential_header,
    mask_secret,
    upstream_request_headers,
)

CRED = ("x-api-key", "sk-channel")


def test_end_to_end_headers_pass_and_credentials_are_replaced() -> None:
    incoming = CIMultiDict(
        [
            ("Host", "gw:3000"),
            ("Content-Length", "10"),
            ("x-api-key", "client-key"),
            ("Authorization", "Bearer client-key"),
            ("anthropic-version", "2023-06-01"),
            ("anthropic-beta", "a,b"),
            ("anthropic-beta", "c"),
            ("User-Agent", "claude-cli/2.0"),
            ("X-Stainless-Lang", "js"),
            ("X-Claude-Code-Session-Id", "s-1"),
            ("Connection", "keep-alive, X-Hop"),
            ("X-Hop", "1"),
            ("Keep-Alive", "timeout=5"),
            ("Transfer-Encoding", "chunked"),
            ("X-Channel", "pinned"),
        ]
    )
    out = upstream_request_headers(incoming, CRED, ())
    assert out == [
        ("anthropic-version", "2023-06-01"),
        ("anthropic-beta", "a,b"),
        ("anthropic-beta", "c"),
        ("User-Agent", "claude-cli/2.0"),
        ("X-Stainless-Lang", "js"),
        ("X-Claude-Code-Session-Id", "s-1"),
        CRED,
    ]


def test_custom_headers_are_added_and_override_client_values() -> None:
    incoming = CIMultiDict([("X-Org", "client"), ("anthropic-version", "2023-06-01")])
    out = upstream_request_headers(incoming, CRED, (("x-org", "channel"), ("X-Extra", "1")))
    assert out == [("anthropic-version", "2023-06-01"), CRED, ("x-org", "channel"), ("X-Extra", "1")]


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
