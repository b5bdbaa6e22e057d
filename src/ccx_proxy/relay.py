"""The Messages handlers: authenticate, route, forward, relay the bytes back.

Upstream bytes reach the client exactly as they arrived, chunk by chunk, with no
queue and no re-framing.  Before the response headers go out, failures become
gateway errors (rendered by the error middleware); after, a failure ends the
stream with an SSE ``error`` event.
"""

from __future__ import annotations

import asyncio
import logging

import aiohttp
from aiohttp import web
from yarl import URL

from .body import find_model, replace_model
from .errors import ModelNotFound, RequestTooLarge, sse_error_event
from .headers import client_response_headers, upstream_request_headers
from .state import GATEWAY, Gateway
from .upstream import upstream_errors

log = logging.getLogger("ccx_proxy.relay")

_SSE = "text/event-stream"
# Failures of the upstream while its body is being read.
_UPSTREAM_READ_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError, OSError)


async def messages(request: web.Request) -> web.StreamResponse:
    return await _forward(request, count_tokens=False)


async def count_tokens(request: web.Request) -> web.StreamResponse:
    return await _forward(request, count_tokens=True)


async def _read_body(request: web.Request, gateway: Gateway) -> bytes:
    limit = gateway.settings.max_body_bytes
    length = request.content_length
    if length is not None and length > limit:
        raise _too_large(limit)
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise _too_large(limit) from None


def _too_large(limit: int) -> RequestTooLarge:
    return RequestTooLarge(
        f"request body exceeds the gateway's limit of {limit / 1048576:g} MB (MAX_REQUEST_BODY_SIZE_MB)"
    )


async def _forward(request: web.Request, *, count_tokens: bool) -> web.StreamResponse:
    gateway = request.app[GATEWAY]
    gateway.access_keys.check(request.headers)
    body = await _read_body(request, gateway)
    field = find_model(body)
    runtime = gateway.runtime  # one snapshot for the whole request
    candidates = runtime.router.candidates(field.name)
    if not candidates:
        raise ModelNotFound(field.name)
    channel, upstream_model = candidates[0]
    if upstream_model != field.name:
        body = replace_model(body, field, upstream_model)

    url = channel.urls.count_tokens if count_tokens else channel.urls.messages
    raw_path = request.raw_path
    query_at = raw_path.find("?")
    if query_at >= 0:
        url += raw_path[query_at:]
    headers = upstream_request_headers(request.headers, channel.credentials[0], channel.custom_headers)
    with upstream_errors(channel.name):
        upstream = await gateway.session.post(URL(url, encoded=True), data=body, headers=headers)
    finished = False
    try:
        if upstream.content_type == _SSE:
            response = await _relay_stream(request, upstream, channel.name)
        else:
            with upstream_errors(channel.name):
                payload = await upstream.read()
            response = web.Response(
                status=upstream.status,
                reason=upstream.reason,
                headers=client_response_headers(upstream.headers),
                body=payload,
            )
        finished = True
        return response
    finally:
        if finished:
            upstream.release()
        else:
            upstream.close()  # never hand a half-read connection back to the pool


async def _relay_stream(
    request: web.Request, upstream: aiohttp.ClientResponse, channel: str
) -> web.StreamResponse:
    headers = client_response_headers(upstream.headers)
    headers["X-Accel-Buffering"] = "no"
    response = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=headers)
    await response.prepare(request)
    content = upstream.content
    write = response.write
    while True:
        try:
            chunk = await content.readany()
        except _UPSTREAM_READ_ERRORS as exc:
            log.warning("channel %r: stream failed mid-way: %s", channel, type(exc).__name__)
            upstream.close()
            reason = "stalled" if isinstance(exc, asyncio.TimeoutError) else "broke off"
            await write(
                sse_error_event(
                    "api_error",
                    f"upstream channel {channel!r} {reason} mid-stream ({type(exc).__name__}); "
                    "the response is incomplete",
                )
            )
            break
        if not chunk:
            break
        await write(chunk)  # a client that went away raises here, ending the handler
    await response.write_eof()
    return response
