"""Upstream error bodies on their way to the client: bounded decoding of what still
arrives compressed, secrets masked, and an Anthropic-shaped error in place of a body
the gateway cannot read."""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Iterator

import orjson
import pytest
from multidict import CIMultiDict

from ccx_proxy.headers import mask_secret
from ccx_proxy.upstream.bodies import ERROR_BODY_LIMIT, client_error_body, decode_error_body, scrub
from tests.conftest import assert_anthropic_error

KEY = "sk-ant-api03-Zx9QwErTyUiOp-0123456789-abcd"
OTHER = "custom-header-secret-wxyz"
JSON = orjson.dumps(
    {"type": "error", "error": {"type": "invalid_request_error", "message": "h\u00e9llo \u20ac"}}
)


def deflate_raw(data: bytes) -> bytes:
    compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


def zeros(total: int, piece: int = 1 << 20) -> Iterator[bytes]:
    for start in range(0, total, piece):
        yield bytes(min(piece, total - start))


def bomb(wbits: int, total: int = 50 << 20) -> bytes:
    """``total`` zero bytes, compressed without ever holding them all."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, wbits)
    return b"".join(compressor.compress(chunk) for chunk in zeros(total)) + compressor.flush()


def headers(*pairs: tuple[str, str]) -> CIMultiDict[str]:
    return CIMultiDict(pairs)


# -- decoding -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "encoding, body",
    [
        pytest.param("gzip", gzip.compress(JSON), id="gzip"),
        pytest.param("x-gzip", gzip.compress(JSON), id="x-gzip"),
        pytest.param(" GZip ", gzip.compress(JSON), id="gzip-case-and-spaces"),
        pytest.param("deflate", zlib.compress(JSON), id="deflate-zlib-wrapped"),
        pytest.param("deflate", deflate_raw(JSON), id="deflate-raw"),
        pytest.param("identity", JSON, id="identity"),
        pytest.param(None, JSON, id="no-content-encoding"),
    ],
)
def test_readable_encodings_decode_to_the_plain_body(encoding: str | None, body: bytes) -> None:
    given = headers() if encoding is None else headers(("content-encoding", encoding))
    assert decode_error_body(given, body) == JSON


@pytest.mark.parametrize(
    "encoding, body",
    [
        pytest.param("br", b"\x1b\x0f\x00\xf8\xa5@\xc2\xaa\x10I\xea\x16\x85\x9c2\x00", id="br"),
        pytest.param("zstd", b"(\xb5/\xfd\x00X\x11\x00\x00hello", id="zstd"),
        pytest.param("compress", b"\x1f\x9d\x90h", id="compress"),
        pytest.param("gzip, br", gzip.compress(JSON), id="stacked-in-one-line"),
        pytest.param("gzip", b"\x1f\x8b\x08\x00garbage that is no deflate stream", id="corrupt-gzip"),
        pytest.param("gzip", JSON, id="gzip-label-plain-body"),
        pytest.param("deflate", b"\x78\x9cnot really zlib", id="corrupt-zlib"),
        pytest.param("deflate", b"\xff\xff\xff\xff", id="corrupt-raw-deflate"),
    ],
)
def test_unreadable_or_corrupt_bodies_decode_to_none(encoding: str, body: bytes) -> None:
    assert decode_error_body(headers(("Content-Encoding", encoding)), body) is None


@pytest.mark.parametrize(
    "encoding, wbits",
    [
        pytest.param("gzip", 16 + zlib.MAX_WBITS, id="gzip"),
        pytest.param("deflate", zlib.MAX_WBITS, id="deflate-zlib"),
        pytest.param("deflate", -zlib.MAX_WBITS, id="deflate-raw"),
    ],
)
def test_a_compression_bomb_decodes_to_at_most_the_limit(encoding: str, wbits: int) -> None:
    body = bomb(wbits)
    assert len(body) < 200_000  # 50 MB of zeros, compressed
    decoded = decode_error_body(headers(("Content-Encoding", encoding)), body)
    assert decoded is not None
    assert len(decoded) == ERROR_BODY_LIMIT
    assert decoded == bytes(ERROR_BODY_LIMIT)


@pytest.mark.parametrize(
    "size, kept",
    [
        pytest.param(ERROR_BODY_LIMIT - 1, ERROR_BODY_LIMIT - 1, id="under"),
        pytest.param(ERROR_BODY_LIMIT, ERROR_BODY_LIMIT, id="exactly"),
        pytest.param(ERROR_BODY_LIMIT + 1, ERROR_BODY_LIMIT, id="one-over"),
    ],
)
def test_the_decoding_limit_is_exact(size: int, kept: int) -> None:
    plain = bytes(range(256)) * (size // 256) + bytes(size % 256)
    decoded = decode_error_body(headers(("Content-Encoding", "gzip")), gzip.compress(plain))
    assert decoded == plain[:kept]


# -- scrubbing ------------------------------------------------------------------------------


def test_scrub_masks_every_occurrence_of_every_secret() -> None:
    template = '{"error":"bad key %s","echo":"%s","hdr":"%s"}'
    scrubbed = scrub((template % (KEY, KEY, OTHER)).encode(), (KEY, OTHER))
    assert scrubbed == (template % (mask_secret(KEY), mask_secret(KEY), mask_secret(OTHER))).encode()
    assert KEY.encode() not in scrubbed and OTHER.encode() not in scrubbed
    assert mask_secret(KEY) == "sk-\u2026abcd"


@pytest.mark.parametrize(
    "secrets",
    [
        pytest.param((), id="no-secrets"),
        pytest.param((KEY,), id="secret-absent"),
    ],
)
def test_scrub_leaves_other_bodies_untouched(secrets: tuple[str, ...]) -> None:
    assert scrub(JSON, secrets) == JSON


# -- the body the client gets -----------------------------------------------------------------


def test_a_compressed_error_body_is_decoded_scrubbed_and_relabelled() -> None:
    plain = orjson.dumps(
        {"type": "error", "error": {"type": "authentication_error", "message": f"key {KEY}"}}
    )
    given = headers(("Content-Type", "application/json"), ("Content-Encoding", "gzip"))
    body = client_error_body(401, given, gzip.compress(plain), (KEY,))
    assert body == plain.replace(KEY.encode(), mask_secret(KEY).encode())
    assert list(given.items()) == [("Content-Type", "application/json")]


@pytest.mark.parametrize(
    "pairs, kept",
    [
        pytest.param(
            [("Content-Type", "application/json")], [("Content-Type", "application/json")], id="none"
        ),
        pytest.param(
            [("Content-Type", "application/json"), ("content-encoding", "identity")],
            [("Content-Type", "application/json")],
            id="identity",
        ),
    ],
)
def test_a_plain_error_body_is_scrubbed(pairs: list[tuple[str, str]], kept: list[tuple[str, str]]) -> None:
    given = headers(*pairs)
    body = client_error_body(400, given, f'{{"message":"{KEY}"}}'.encode(), (KEY,))
    assert body == f'{{"message":"{mask_secret(KEY)}"}}'.encode()
    assert list(given.items()) == kept


@pytest.mark.parametrize(
    "status, error_type",
    [
        pytest.param(400, "invalid_request_error", id="400"),
        pytest.param(401, "authentication_error", id="401"),
        pytest.param(403, "permission_error", id="403"),
        pytest.param(429, "rate_limit_error", id="429"),
        pytest.param(500, "api_error", id="500"),
        pytest.param(503, "api_error", id="503"),
        pytest.param(529, "overloaded_error", id="529"),
    ],
)
@pytest.mark.parametrize(
    "encoding, body",
    [
        pytest.param("br", b"\x1b\x0f\x00\xf8" + KEY.encode(), id="br"),
        pytest.param("gzip", b"\x1f\x8b\x08\x00corrupt " + KEY.encode(), id="corrupt-gzip"),
    ],
)
def test_an_unreadable_error_body_becomes_an_anthropic_error(
    status: int, error_type: str, encoding: str, body: bytes
) -> None:
    given = headers(("Content-Type", "text/plain"), ("Content-Encoding", encoding), ("X-Request-Id", "r1"))
    out = client_error_body(status, given, body, (KEY,))
    message = assert_anthropic_error(status, out, error_type)
    assert message == f"upstream answered {status} with a {encoding} body the gateway cannot read"
    assert KEY.encode() not in out
    assert list(given.items()) == [("Content-Type", "application/json"), ("X-Request-Id", "r1")]


def test_a_bomb_becomes_a_bounded_client_body() -> None:
    given = headers(("Content-Encoding", "gzip"))
    out = client_error_body(500, given, bomb(16 + zlib.MAX_WBITS), (KEY,))
    assert out == bytes(ERROR_BODY_LIMIT)
    assert "Content-Encoding" not in given


def test_two_content_encoding_lines_leave_no_label_on_a_replaced_body() -> None:
    body = zlib.compress(gzip.compress(JSON))  # gzip, then deflate: listed in that order
    given = headers(("Content-Encoding", "gzip"), ("Content-Encoding", "deflate"))
    client_error_body(502, given, body, ())
    assert "Content-Encoding" not in given
