"""Upstream error bodies as the client may see them: decompressed (bounded) when they
still arrive compressed, with every secret of the channel masked."""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping, MutableMapping

from ..errors import error_body
from ..headers import mask_secret

ERROR_BODY_LIMIT = 1 << 20  # bytes of an error body kept, compressed or decoded

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}


def decode_error_body(headers: Mapping[str, str], body: bytes) -> bytes | None:
    """The body as plain bytes (at most ERROR_BODY_LIMIT of them), or None when its
    ``Content-Encoding`` cannot be read here (e.g. br, zstd) or the data is corrupt."""
    encoding = headers.get("Content-Encoding", "").strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding in ("gzip", "x-gzip"):
        wbits = 16 + zlib.MAX_WBITS
    elif encoding == "deflate":  # zlib-wrapped as the RFC says; raw deflate as some servers send
        wbits = zlib.MAX_WBITS if body[:1] == b"\x78" else -zlib.MAX_WBITS
    else:
        return None
    try:
        return zlib.decompressobj(wbits).decompress(body, ERROR_BODY_LIMIT)
    except zlib.error:
        return None


def scrub(body: bytes, secrets: Iterable[str]) -> bytes:
    """``body`` with every secret replaced by its mask (``sk-…abcd``)."""
    for secret in secrets:
        raw = secret.encode()
        if raw in body:
            body = body.replace(raw, mask_secret(secret).encode())
    return body


def client_error_body(
    status: int, headers: MutableMapping[str, str], body: bytes, secrets: Iterable[str]
) -> bytes:
    """An upstream error body made safe to relay; ``headers`` (the client's copy) lose
    their ``Content-Encoding`` when the body was decoded or replaced."""
    encoding = headers.get("Content-Encoding")
    plain = decode_error_body(headers, body)
    if encoding is not None:
        headers.pop("Content-Encoding", None)
    if plain is None:
        headers["Content-Type"] = "application/json"
        message = f"upstream answered {status} with a {encoding} body the gateway cannot read"
        return error_body(_ERROR_TYPES.get(status, "api_error"), message)
    return scrub(plain, secrets)
