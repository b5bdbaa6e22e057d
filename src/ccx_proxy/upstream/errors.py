"""The upstream client's exceptions (tree in the package docstring) and the single
place where they become gateway errors, as httpx's ``map_httpcore_exceptions`` does."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from ..errors import GatewayError, UpstreamTimeout, UpstreamUnreachable


class UpstreamFailure(Exception):
    """Talking to an upstream failed; the message names no key."""


class ConnectFailed(UpstreamFailure):
    pass


class ProxyFailed(ConnectFailed):
    pass


class ConnectTimeout(UpstreamFailure, TimeoutError):
    pass


class BadResponse(UpstreamFailure):
    """The upstream's bytes are not a valid HTTP/1.1 response: nothing after them is used."""


class ReadTimeout(UpstreamFailure, TimeoutError):
    pass


class DeadlineReached(ReadTimeout):
    pass


class Disconnected(UpstreamFailure, ConnectionError):
    pass


class NothingReceived(Disconnected):
    """Closed before a single response byte: on a reused keep-alive connection, the
    upstream dropped it while idle, so the request may go again on a fresh one."""


def to_gateway_error(exc: BaseException, channel: str) -> GatewayError | None:
    """The gateway error for an upstream failure, or None if ``exc`` is not one."""
    if isinstance(exc, GatewayError):
        return exc
    where = f"upstream channel {channel!r}"
    if isinstance(exc, DeadlineReached):
        return UpstreamTimeout(f"{where}: failover deadline reached ({exc})")
    if isinstance(exc, (ConnectTimeout, ReadTimeout)):
        return UpstreamTimeout(f"{where} timed out: {exc}")
    if isinstance(exc, BadResponse):
        return UpstreamUnreachable(f"{where} sent an invalid HTTP response: {exc}")
    if isinstance(exc, ConnectFailed):
        return UpstreamUnreachable(f"{where} is unreachable: {exc}")
    if isinstance(exc, UpstreamFailure):
        return UpstreamUnreachable(f"{where} failed: {exc}")
    if isinstance(exc, TimeoutError):
        return UpstreamTimeout(f"{where} timed out")
    if isinstance(exc, OSError):
        reason = exc.strerror or type(exc).__name__
        return UpstreamUnreachable(f"{where} failed: {reason}")
    return None


@contextmanager
def upstream_errors(channel: str) -> Iterator[None]:
    """Re-raise upstream failures as the matching gateway error."""
    try:
        yield
    except Exception as exc:
        error = to_gateway_error(exc, channel)
        if error is None or error is exc:
            raise
        raise error from exc
