"""Which headers cross the gateway, in each direction.

End-to-end headers pass unchanged (``anthropic-version``, ``anthropic-beta``,
``User-Agent``, ``X-Stainless-*``, ``X-Claude-Code-Session-Id``, ...).  Dropped:
hop-by-hop headers (RFC 9110 section 7.6.1, plus any named in ``Connection``),
``Host`` and ``Content-Length`` (recomputed), and on the way up the client's own
credentials, which are replaced by the channel's key.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping, Sequence
from functools import lru_cache
from urllib.parse import quote, quote_plus

import orjson
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
# What a load balancer in front adds about the client (deploy/): the team's addresses and
# host names are not the upstream provider's business.
CLIENT_ORIGIN = frozenset(
    {"forwarded", "x-forwarded-for", "x-forwarded-host", "x-forwarded-proto", "x-real-ip"}
)
_REQUEST_DROP = HOP_BY_HOP | CLIENT_CREDENTIALS | GATEWAY_ONLY | CLIENT_ORIGIN | {"host", "content-length"}
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


# The format marker in front of Anthropic-, OpenAI- and DeepSeek-style keys: the same in every
# key of that form, so it is not secret material and a mask may keep it (see mask_secret).
PUBLIC_PREFIX = "sk-"


def mask_secret(secret: str) -> str:
    """``sk-…abcd``: enough to tell keys apart, never enough to use one.

    Shows at most the last 4 characters of the secret material and never more than a third
    of it: 12 characters or more show 4, a 9-character key 3 (``…xyz``), 6 to 8 show 2, and
    a key under 6 characters nothing (``…``).  A leading ``sk-`` is kept and not counted: it
    is a public format marker, the same in every key of that form (the rule applies to what
    follows it, so ``sk-`` plus 12 characters shows 4).  No other prefix is ever shown: it
    would be part of the secret.
    """
    head = PUBLIC_PREFIX if secret.startswith(PUBLIC_PREFIX) else ""
    size = len(secret) - len(head)
    shown = min(4, size // 3) if size >= 6 else 0
    return f"{head}…{secret[len(secret) - shown :]}" if shown else f"{head}…"


@lru_cache(maxsize=256)
@functools.lru_cache(maxsize=64)  # per channel's secrets (and the log's): computed once, not per call
def secret_forms(secrets: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """Every form in which ``secrets`` may be echoed, each with the mask that replaces it,
    longest first (a secret inside another is replaced after the longer one).

    Besides each secret as it is: JSON-escaped (``\\/`` and ``\\uXXXX`` too), percent-encoded
    (a URL in a ``Location`` header) and as Python's ``repr`` of its bytes shows it (aiohttp's
    parse errors).  Empty secrets are skipped (an empty string is in every text)."""
    forms: dict[str, str] = {}
    for secret in secrets:
        if not secret:
            continue
        mask = mask_secret(secret)
        for form in (
            secret,
            orjson.dumps(secret).decode()[1:-1],
            json.dumps(secret)[1:-1],
            json.dumps(secret)[1:-1].replace("/", "\\/"),
            quote(secret, safe=""),
            quote_plus(secret, safe=""),
            repr(secret.encode("utf-8", "surrogateescape"))[2:-1],
        ):
            forms.setdefault(form, mask)
    return tuple(sorted(forms.items(), key=lambda item: len(item[0]), reverse=True))


def scrub_text(text: str, secrets: Sequence[str]) -> str:
    """``text`` with every form of every secret replaced by its mask."""
    for form, mask in secret_forms(tuple(secrets)):
        if form in text:
            text = text.replace(form, mask)
    return text


def scrub_head(headers: CIMultiDict[str], reason: str, secrets: Sequence[str]) -> str:
    """Masks every channel secret in the client's copy of a non-2xx response's headers (in
    place, order kept) and returns the reason phrase, masked too.

    For error answers only: an upstream that echoes its key (``x-echo-key: sk-...``) must not
    hand it to the client.  A header whose *name* holds a secret is dropped (a mask is no
    valid header name).  The 2xx path never calls this."""
    forms = [form.lower() for form, _ in secret_forms(tuple(secrets))]
    items = list(headers.items())
    scrubbed = [
        (name, scrub_text(value, secrets))
        for name, value in items
        if not any(form in name.lower() for form in forms)  # names are case-insensitive
    ]
    if scrubbed != items:
        headers.clear()
        headers.extend(scrubbed)
    return scrub_text(reason, secrets)
