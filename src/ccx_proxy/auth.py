"""Client authentication against the gateway's access keys, in constant time."""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Mapping

from .errors import AuthenticationFailed
from .headers import client_key

_MISSING = AuthenticationFailed(
    "missing access key: send the gateway's PROXY_ACCESS_KEY as x-api-key "
    "(ANTHROPIC_API_KEY) or as Authorization: Bearer (ANTHROPIC_AUTH_TOKEN)"
)
_WRONG = AuthenticationFailed("invalid access key: it does not match the gateway's PROXY_ACCESS_KEY")


class AccessKeys:
    __slots__ = ("_keys",)

    def __init__(self, keys: Iterable[str]) -> None:
        self._keys = tuple(k.encode() for k in keys)
        if not self._keys:
            raise ValueError("at least one access key is required")

    def matches(self, candidate: str) -> bool:
        given = candidate.encode("utf-8", "surrogateescape")
        ok = False
        # Compare against every key, so timing reveals neither which key nor how many.
        for key in self._keys:
            ok |= hmac.compare_digest(key, given)
        return ok

    def check(self, headers: Mapping[str, str]) -> None:
        candidate = client_key(headers)
        if candidate is None:
            raise _MISSING
        if not self.matches(candidate):
            raise _WRONG
