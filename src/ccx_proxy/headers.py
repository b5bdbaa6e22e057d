"""Which headers cross the gateway, in each direction.

End-to-end headers pass unchanged (``anthropic-version``, ``anthropic-beta``,
``User-Agent``, ``X-Stainless-*``, ``X-Claude-Code-Session-Id``, ...).  Dropped:
hop-by-hop headers (RFC 9110 section 7.6.1, plus any named in ``Connection``),
``Host`` and ``Content-Length`` (recomputed), and on the way up the client's own
credentials, which are replaced by the channel's key.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

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


def upstream_request_headers(
    incoming: Mapping[str, str],
    credential: tuple[str, str],
    custom: tuple[tuple[str, str], ...],
) -> list[tuple[str, str]]:
    """Headers for the upstream request: the client's, filtered, plus the channel's."""
    drop = _REQUEST_DROP
    if "connection" in incoming:
        drop = drop | _connection_tokens(incoming)
    out = [(k, v) for k, v in incoming.items() if k.lower() not in drop]
    out.append(credential)
    if custom:
        names = {name.lower() for name, _ in custom}
        out = [(k, v) for k, v in out if k.lower() not in names]
        out.extend(custom)
    return out


def client_response_headers(upstream: Mapping[str, str]) -> CIMultiDict[str]:
    drop = _RESPONSE_DROP
    if "connection" in upstream:
        drop = drop | _connection_tokens(upstream)
    items: Iterable[tuple[str, str]] = upstream.items()
    return CIMultiDict((k, v) for k, v in items if k.lower() not in drop)


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
