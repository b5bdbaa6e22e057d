"""The gateway's own errors, and the one place they are rendered.

Every error the gateway itself produces is Anthropic-shaped JSON::

    {"type": "error", "error": {"type": "<error_type>", "message": "..."}}

The tree (status / Anthropic ``error.type``)::

    GatewayError                      500 api_error
    ├── InvalidRequest                400 invalid_request_error
    │   ├── ModelNotFound             400 invalid_request_error  ("model_not_found: ...")
    │   └── MethodNotAllowed          405 invalid_request_error
    ├── AuthenticationFailed          401 authentication_error
    ├── PermissionDenied              403 permission_error
    ├── NotFound                      404 not_found_error
    ├── RequestTimeout                408 invalid_request_error  (the body stopped arriving)
    ├── Conflict                      409 conflict_error  (stale If-Match on admin writes)
    ├── RequestTooLarge               413 request_too_large
    ├── UnsupportedEncoding           415 invalid_request_error  (a compressed request body)
    ├── HeaderTooLarge                431 invalid_request_error
    ├── RateLimited                   429 rate_limit_error
    ├── UpstreamUnreachable           502 api_error
    │   └── UpstreamKeyRejected       502 api_error  (the channel's key refused: 401/402/403)
    ├── NoChannelAvailable            503 overloaded_error
    ├── SharedStateUnavailable        503 api_error  (Redis down with REDIS_FAILURE=closed)
    ├── Overloaded                    529 overloaded_error  (maxConcurrentStreams reached)
    └── UpstreamTimeout               504 timeout_error

Errors a retry cannot fix (400 -- model_not_found included --, 401, 403, 404, 405, 409, 413,
415, 431, and a 502 for a channel key the upstream refused) carry
``x-should-retry: false``, so Claude Code and the SDKs stop at once instead of
retrying for minutes; 429 and 503 carry ``Retry-After``.

Once response headers have gone out the status can no longer change; a failure
then ends the stream with :func:`sse_error_event` instead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import orjson
from aiohttp import web

JSON_CONTENT_TYPE = "application/json"


class GatewayError(Exception):
    status: ClassVar[int] = 500
    error_type: ClassVar[str] = "api_error"
    retryable: ClassVar[bool] = True  # False: rendered with x-should-retry: false

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after  # seconds, for Retry-After

    def body(self) -> bytes:
        return error_body(self.error_type, self.message)


class InvalidRequest(GatewayError):
    status = 400
    error_type = "invalid_request_error"
    retryable = False


class MethodNotAllowed(InvalidRequest):
    status = 405


class AuthenticationFailed(GatewayError):
    status = 401
    error_type = "authentication_error"
    retryable = False


class PermissionDenied(GatewayError):
    status = 403
    error_type = "permission_error"
    retryable = False


class NotFound(GatewayError):
    status = 404
    error_type = "not_found_error"
    retryable = False


SERVED_SHOWN = 10  # how many served ids a model_not_found message names


def model_not_found_message(model: str, served: Sequence[str]) -> str:
    """``model_not_found: ...`` naming the ids this gateway serves (GET /v1/models)."""
    if not served:
        return (
            f"model_not_found: this gateway does not serve model {model!r} and lists no model; "
            "its operator must check the channels' status, modelMapping, supportedModels and models"
        )
    shown = ", ".join(served[:SERVED_SHOWN])
    more = f" and {len(served) - SERVED_SHOWN} more" if len(served) > SERVED_SHOWN else ""
    return (
        f"model_not_found: this gateway does not serve model {model!r}; "
        f"it serves {shown}{more} (GET /v1/models lists them)"
    )


class ModelNotFound(InvalidRequest):
    """No active channel serves the requested model.  A 400, not a 404: Claude Code prints a
    400's message verbatim ("API Error: 400 model_not_found: ..."), while any 404 becomes
    its own "There's an issue with the selected model" and the list of served ids is lost."""

    def __init__(self, model: str, served: Sequence[str] = ()) -> None:
        super().__init__(model_not_found_message(model, served))
        self.model = model


class RequestTimeout(GatewayError):
    """The client stopped sending its request body (CLIENT_BODY_TIMEOUT_MS)."""

    status = 408
    error_type = "invalid_request_error"


class Conflict(GatewayError):
    status = 409
    error_type = "conflict_error"
    retryable = False


class RequestTooLarge(GatewayError):
    status = 413
    error_type = "request_too_large"
    retryable = False


class UnsupportedEncoding(GatewayError):
    status = 415
    error_type = "invalid_request_error"
    retryable = False


class HeaderTooLarge(GatewayError):
    status = 431
    error_type = "invalid_request_error"
    retryable = False


class RateLimited(GatewayError):
    status = 429
    error_type = "rate_limit_error"


class BudgetExhausted(RateLimited):
    """A member's token or USD budget is used up: waiting until it resets is the only fix,
    so no client retry (x-should-retry: false), and Retry-After says when it resets."""

    retryable = False


class UpstreamUnreachable(GatewayError):
    status = 502
    error_type = "api_error"


class UpstreamKeyRejected(UpstreamUnreachable):
    """The upstream refused the channel's own key: the operator's to fix, not the client's,
    and no retry by the client helps (x-should-retry: false)."""

    retryable = False


class NoChannelAvailable(GatewayError):
    status = 503
    error_type = "overloaded_error"


class SharedStateUnavailable(GatewayError):
    """Redis is unreachable and ``REDIS_FAILURE=closed``: a member with limits is refused."""

    status = 503


class Overloaded(GatewayError):
    """The gateway itself is at its limit (maxConcurrentStreams)."""

    status = 529
    error_type = "overloaded_error"


class UpstreamTimeout(GatewayError):
    status = 504
    error_type = "timeout_error"


def error_body(error_type: str, message: str) -> bytes:
    return orjson.dumps({"type": "error", "error": {"type": error_type, "message": message}})


RETRY_AFTER_DEFAULT = 5  # seconds, for a 429/503 of the gateway's own without a better figure


def render(error: GatewayError) -> web.Response:
    response = web.Response(
        status=error.status,
        reason="Overloaded" if error.status == 529 else None,  # a status aiohttp has no phrase for
        body=error.body(),
        content_type=JSON_CONTENT_TYPE,
    )
    if not error.retryable:
        response.headers["x-should-retry"] = "false"
    if error.retry_after is not None or (error.retryable and error.status in (429, 503, 529)):
        seconds = RETRY_AFTER_DEFAULT if error.retry_after is None else error.retry_after
        response.headers["Retry-After"] = str(max(1, math.ceil(seconds)))
    return response


def sse_error_event(error_type: str, message: str) -> bytes:
    """A complete SSE ``error`` event, as Anthropic sends mid-stream."""
    return b"event: error\ndata: " + error_body(error_type, message) + b"\n\n"
