"""Upstream error bodies as the client may see them: decompressed (bounded) when they
still arrive compressed, with every secret of the channel masked."""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping, MutableMapping

from multidict import CIMultiDict, CIMultiDictProxy

from ..errors import error_body
from ..headers import secret_forms

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
    ``Content-Encoding`` cannot be read here (br, zstd, several codings) or the data is
    corrupt."""
    lines = (
        headers.getall("Content-Encoding", ())
        if isinstance(headers, CIMultiDictProxy | CIMultiDict)
        else ([headers["Content-Encoding"]] if "Content-Encoding" in headers else [])
    )
    codings = [c.strip().lower() for line in lines for c in line.split(",") if c.strip()]
    codings = [c for c in codings if c != "identity"]
    if not codings:
        return body[:ERROR_BODY_LIMIT]
    if len(codings) > 1:
        return None
    attempts: tuple[int, ...]
    if codings[0] in ("gzip", "x-gzip"):
        attempts = (16 + zlib.MAX_WBITS,)
    elif codings[0] == "deflate":  # zlib-wrapped as the RFC says, else raw as some servers send
        attempts = (zlib.MAX_WBITS, -zlib.MAX_WBITS)
    else:
        return None
    for wbits in attempts:
        try:
            return zlib.decompressobj(wbits).decompress(body, ERROR_BODY_LIMIT)
        except zlib.error:
            continue
    return None


def scrub(body: bytes, secrets: Iterable[str]) -> bytes:
    """``body`` with every secret replaced by its mask (``sk-…abcd``): as it is, and in the
    escaped and encoded forms an upstream may echo it in (:func:`~..headers.secret_forms`)."""
    for form, mask in secret_forms(tuple(secrets)):
        raw = form.encode("utf-8", "surrogateescape")
        if raw in body:
            body = body.replace(raw, mask.encode())
    return body


def trim_partial(body: bytes, secrets: Iterable[str]) -> bytes:
    """A truncated ``body`` without a trailing beginning of a secret: cut short, a secret
    is no longer matched whole, and its first characters must not reach the client."""
    cut = 0
    for form, _ in secret_forms(tuple(secrets)):
        raw = form.encode("utf-8", "surrogateescape")
        for size in range(min(len(raw) - 1, len(body)), cut, -1):
            if body.endswith(raw[:size]):
                cut = size
                break
    return body[: len(body) - cut]


def client_error_body(
    status: int, headers: MutableMapping[str, str], body: bytes, secrets: Iterable[str]
) -> bytes:
    """An upstream error body made safe to relay; ``headers`` (the client's copy) lose
    their ``Content-Encoding`` when the body was decoded or replaced."""
    encoding = headers.get("Content-Encoding")
    plain = decode_error_body(headers, body)
    while "Content-Encoding" in headers:  # every line of it
        del headers["Content-Encoding"]
    if plain is None:
        headers["Content-Type"] = "application/json"
        message = f"upstream answered {status} with a {encoding} body the gateway cannot read"
        return error_body(_ERROR_TYPES.get(status, "api_error"), message)
    secrets = tuple(secrets)
    if len(body) >= ERROR_BODY_LIMIT or len(plain) >= ERROR_BODY_LIMIT:  # cut short: maybe mid-secret
        plain = trim_partial(plain, secrets)
    return scrub(plain, secrets)
