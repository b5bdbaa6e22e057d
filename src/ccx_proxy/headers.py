"""Which headers cross the gateway, in each direction.

End-to-end headers pass unchanged (``anthropic-version``, ``anthropic-beta``,
``User-Agent``, ``X-Stainless-*``, ``X-Claude-Code-Session-Id``, ...).  Dropped:
hop-by-hop headers (RFC 9110 section 7.6.1, plus any named in ``Connection``),
``Host`` and ``Content-Length`` (recomputed), and on the way up the client's own
credentials, which are replaced by the channel's key.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from multidict import CIMultiDict

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
CLIENT_CREDENTIALS = frozenset({"x-api-key", "authorization"})
# Headers the gateway consumes itself and never forwards.
GATEWAY_ONLY = frozenset({"x-channel"})
_REQUEST_DROP = HOP_BY_HOP | CLIENT_CREDENTIALS | GATEWAY_ONLY | {"host", "content-length"}
_RESPONSE_DROP = HOP_BY_HOP | {"content-length"}
# customHeaders may not override what the gateway owns.
RESERVED_CUSTOM = _REQUEST_DROP


def _connection_tokens(headers: Mapping[str, str]) -> frozenset[str]:
    value = headers.get("connection")
    if not value:
        return frozenset()
    return frozenset(t.strip().lower() for t in value.split(","))


RawHeaders = Sequence[tuple[bytes, bytes]]
_REQUEST_DROP_RAW = frozenset(name.encode() for name in _REQUEST_DROP)
# A header line may not carry a control character other than HTAB (no smuggled CR/LF).
_CTL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def forwarded_raw(raw: RawHeaders, connection: str | None = None) -> list[tuple[bytes, bytes]]:
    """The client's headers that go upstream, as the bytes it sent them.

    Works on the raw pairs the server parsed: once per request, with no decoding
    and re-encoding of every header (tests hold it to a plain reference rule).
    ``connection`` is the (first) Connection header's value, looked up by the
    caller in its parsed headers.
    """
    drop = _REQUEST_DROP_RAW
    if connection:
        drop = drop | {t.strip().lower().encode("latin-1") for t in connection.split(",")}
    return [(k, v) for k, v in raw if k.lower() not in drop]


def upstream_header_block(
    forwarded: list[tuple[bytes, bytes]], channel_block: bytes, custom_names: frozenset[bytes]
) -> bytes:
    """``name: value`` CRLF lines for the upstream request: the client's, then the channel's
    (``channel_block``, built once at load by :func:`channel_lines`)."""
    if custom_names:
        forwarded = [(k, v) for k, v in forwarded if k.lower() not in custom_names]
    lines = [b": ".join(pair) for pair in forwarded]
    lines.append(channel_block)
    return b"\r\n".join(lines)


def channel_lines(credential: tuple[str, str], custom: tuple[tuple[str, str], ...]) -> bytes:
    """A channel's own header lines (one key, the customHeaders), CRLF-terminated.

    Built at load; config validation already refuses control characters, this
    refuses them again so no caller can smuggle a CR/LF into a request head."""
    own = [f"{name}: {value}" for name, value in (credential, *custom)]
    if _CTL.search("\t".join(own)):
        raise ValueError("control character in a channel's key or custom header")
    return "".join(line + "\r\n" for line in own).encode("utf-8", "surrogateescape")


def client_response_headers(upstream: Mapping[str, str]) -> CIMultiDict[str]:
    drop = _RESPONSE_DROP
    if "connection" in upstream:
        drop = drop | _connection_tokens(upstream)
    out: CIMultiDict[str] = CIMultiDict(upstream)  # a copy in C, then a few deletions in C
    for name in drop:
        if name in out:
            del out[name]
    return out


def credential_header(mode: str, key: str) -> tuple[str, str]:
    """The header that carries a channel key: ``x-api-key`` (also for ``auto``) or bearer."""
    if mode == "bearer":
        return ("Authorization", f"Bearer {key}")
    return ("x-api-key", key)


def client_key(headers: Mapping[str, str]) -> str | None:
    """The client's access key: ``x-api-key``, else ``Authorization: Bearer``."""
    key = headers.get("x-api-key")
    if key:
        return key
    auth = headers.get("authorization")
    if auth and auth[:7].lower() == "bearer ":
        return auth[7:].strip() or None
    return None


def mask_secret(secret: str) -> str:
    """``sk-…abcd``: enough to tell keys apart, never enough to use one."""
    if len(secret) <= 8:
        return "…" + secret[-2:] if len(secret) > 4 else "…"
    head = secret[:3] if secret[:3].isascii() else ""
    return f"{head}…{secret[-4:]}"
