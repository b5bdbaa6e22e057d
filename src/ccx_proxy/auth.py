"""Client authentication against the gateway's access keys, in constant time."""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Mapping

from .errors import AuthenticationFailed
from .headers import client_key


class AccessKeys:
    __slots__ = ("_keys", "missing_message", "wrong_message")

    def __init__(self, keys: Iterable[str], variable: str = "PROXY_ACCESS_KEY") -> None:
        self._keys = tuple(k.encode() for k in keys)
        if not self._keys:
            raise ValueError("at least one access key is required")
        hint = " (ANTHROPIC_API_KEY)" if variable == "PROXY_ACCESS_KEY" else ""
        # Messages, not exception objects: an exception raised again and again would grow
        # one traceback forever (every raise appends its frames).
        self.missing_message = (
            f"missing access key: send the gateway's {variable} as x-api-key{hint} "
            "or as Authorization: Bearer"
        )
        self.wrong_message = (
            f"invalid access key: it does not match the gateway's {variable}; "
            f"send the key the gateway's operator gave you{hint}"
        )

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
            raise AuthenticationFailed(self.missing_message)
        if not self.matches(candidate):
            raise AuthenticationFailed(self.wrong_message)
