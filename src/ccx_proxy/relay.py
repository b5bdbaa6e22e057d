"""The Messages handlers: authenticate, route, fail over, relay the bytes back.

Upstream bytes reach the client exactly as they arrived, chunk by chunk, with no
queue and no re-framing.  Before the response headers go out, failures become
gateway errors (rendered by the error middleware) or a failover to the next
candidate; after, a failure ends the stream with an SSE ``error`` event.
"""

from __future__ import annotations

import asyncio
import contextlib

import orjson
from aiohttp import web

from .affinity import SESSION_HEADER, session_of
from .body import read_model
from .errors import (
    GatewayError,
    InvalidRequest,
    Overloaded,
    RequestTimeout,
    RequestTooLarge,
    UnsupportedEncoding,
    UpstreamKeyRejected,
)
from .failover import KEY_REJECTED, Connected, connect, exhausted, refuses_client
from .headers import client_response_headers, forwarded_raw, scrub_head
from .ops.accesslog import REQUEST_ID, REQUEST_ID_HEADER, TICKET, new_request_id
from .routing import prefer
from .state import GATEWAY, Gateway
from .stream import relay_sse
from .team.meter import UsageMeter
from .team.service import Ticket, allowed_channels, check_model
from .upstream.bodies import ERROR_BODY_LIMIT, client_error_body
from .upstream.errors import upstream_errors
from .upstream.wire import WireError, check_query

CHANNEL_HEADER = "x-ccx-channel"
_NO_WAIT: contextlib.nullcontext[None] = contextlib.nullcontext()
_SSE = "text/event-stream"


async def messages(request: web.Request) -> web.StreamResponse:
    return await _forward(request, count_tokens=False)


async def count_tokens(request: web.Request) -> web.StreamResponse:
    return await _forward(request, count_tokens=True)


async def _read_body(request: web.Request, gateway: Gateway) -> bytes:
    limit = gateway.settings.max_body_bytes
    length = request.content_length
    if length is not None and length > limit:
        raise _too_large(limit)
    # Read the payload directly rather than with request.read(): that would keep a copy
    # on the request object for as long as the response streams (a long stream must not
    # pin a 100+ KB body), and it copies the body twice on the way.
    content = request.content
    chunks: list[bytes] = []
    size = 0
    idle = gateway.settings.client_body_timeout
    if content.is_eof():
        idle = 0.0  # the whole body came with the head (the usual case): no timer at all
    try:
        async with asyncio.timeout(idle) if idle else _NO_WAIT as pause:  # one timer, moved on
            while chunk := await content.readany():
                size += len(chunk)
                if size > limit:
                    raise _too_large(limit)
                chunks.append(chunk)
                if pause is not None:
                    pause.reschedule(gateway.client.loop.time() + idle)
    except TimeoutError:
        raise RequestTimeout(
            f"the request body stopped arriving: nothing for {idle:g} s (CLIENT_BODY_TIMEOUT_MS)"
        ) from None
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _upstream_error_type(body: bytes) -> str:
    """The ``error.type`` of an upstream error body, or a placeholder."""
    try:
        kind = orjson.loads(body)["error"]["type"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return "error"
    return kind if isinstance(kind, str) and kind.isidentifier() else "error"


def _too_large(limit: int) -> RequestTooLarge:
    return RequestTooLarge(
        f"request body exceeds the gateway's limit of {limit / 1048576:g} MB (MAX_REQUEST_BODY_SIZE_MB)"
    )


async def _forward(request: web.Request, *, count_tokens: bool) -> web.StreamResponse:
    gateway = request.app[GATEWAY]
    loop = gateway.client.loop
    team = gateway.team
    member = team.authenticate(request.headers)
    encoding = request.headers.get("Content-Encoding")
    if encoding is not None and encoding.strip().lower() not in ("", "identity"):
        raise UnsupportedEncoding(
            f"request bodies must not be compressed (Content-Encoding: {encoding[:40]}); "
            "send the JSON as it is"
        )
    limit = gateway.runtime.config.routing.maxConcurrentStreams
    if limit and gateway.streams >= limit:
        raise Overloaded(
            f"the gateway is serving its limit of {limit} concurrent requests (maxConcurrentStreams); "
            "retry shortly",
            retry_after=1,
        )
    session_id = request.headers.get(SESSION_HEADER)
    ticket = Ticket(
        member,
        team.clock(),
        session_id[:256] if session_id else None,
        "count_tokens" if count_tokens else "messages",
        request.get(REQUEST_ID) or new_request_id(),
    )
    request[TICKET] = ticket  # for the access log line
    if team.tracer is not None:
        ticket.trace = []
    gateway.streams += 1
    try:
        await team.admit(ticket)
        return await _relay(request, gateway, loop, count_tokens, ticket)
    except GatewayError as exc:
        ticket.status, ticket.error_type, ticket.outcome = exc.status, exc.error_type, "error"
        raise
    except (asyncio.CancelledError, ConnectionError):
        ticket.outcome = "client_left"  # while waiting for the upstream, or mid-stream
        raise
    except Exception:
        ticket.status, ticket.error_type, ticket.outcome = 500, "api_error", "error"
        raise
    finally:
        gateway.streams -= 1
        team.finish(ticket)


async def _relay(
    request: web.Request,
    gateway: Gateway,
    loop: asyncio.AbstractEventLoop,
    count_tokens: bool,
    ticket: Ticket,
) -> web.StreamResponse:
    body = await _read_body(request, gateway)
    field = await read_model(body)
    member = ticket.member
    ticket.model, ticket.stream = field.name, field.stream
    if member.models:
        check_model(member, field.name)
    runtime = gateway.runtime  # one snapshot for the whole request
    routing = runtime.config.routing
    pinned = request.headers.get("x-channel") if routing.allowChannelHeader else None
    candidates = runtime.router.route(field.name, pinned)
    if member.channels:
        candidates = allowed_channels(member, candidates, field.name)
    session = None
    if runtime.config.affinity.enabled and pinned is None and len(candidates) > 1:
        session = session_of(request.headers, body)
        if session is not None:
            sticky = await gateway.affinity.lookup(session, gateway.health.clock())
            if sticky is not None:
                candidates = prefer(candidates, sticky)

    raw_path = request.raw_path
    query_at = raw_path.find("?")
    try:
        query = check_query(raw_path[query_at:].encode()) if query_at >= 0 else b""
    except WireError as exc:
        raise InvalidRequest(f"{exc}; percent-encode it") from None
    result = await connect(
        gateway.client,
        gateway.health,
        routing,
        candidates,
        body,
        field,
        forwarded_raw(request.raw_headers, request.headers.get("connection")),
        query,
        count_tokens,
        ticket.trace,
    )
    if session is not None and isinstance(result, Connected):
        gateway.affinity.remember(session, result.attempt.channel.name, gateway.health.clock(), body)
    del body  # no retry after this point: do not keep the request body alive while streaming
    if not isinstance(result, Connected):
        last = result.last
        if last is None:
            raise exhausted(result, field.name)
        if last.status in KEY_REJECTED and not refuses_client(last.status, last.body):
            # The upstream refused the channel's key, not the client's: no client retry helps.
            # (Its own message stays in the gateway's log: echoed here, words like "x-api-key"
            # make Claude Code print "Invalid API key", blaming the client's key.)
            raise UpstreamKeyRejected(
                f"upstream channel {last.channel!r} refused the gateway's key ({last.status} "
                f"{_upstream_error_type(last.body)}); the gateway's operator must fix the channel's "
                "apiKeys -- your own key is fine"
            )
        last.headers[CHANNEL_HEADER] = last.channel
        ticket.channel, ticket.status, ticket.outcome = last.channel, last.status, "error"
        ticket.error_type, ticket.attempts = _upstream_error_type(last.body), result.attempts
        return web.Response(status=last.status, reason=last.reason, headers=last.headers, body=last.body)

    upstream, attempt = result.response, result.attempt
    channel = attempt.channel
    ttfb = loop.time() - result.started
    attempt.succeeded(ttfb)
    ticket.channel, ticket.upstream_model, ticket.status = channel.name, attempt.model, upstream.status
    ticket.api_key, ticket.attempts, ticket.ttfb = attempt.api_key, result.attempts, ttfb
    config_prices = runtime.config.prices
    if channel.prices or config_prices:
        ticket.prices = (channel.prices, config_prices)
    # Usage is read from every answer that has any (metrics always count tokens).
    meter = ticket.meter = UsageMeter() if upstream.status < 300 else None
    headers = client_response_headers(upstream.headers)
    reason = upstream.reason
    if upstream.status >= 300:  # an upstream may echo its key: masked (the 2xx path pays nothing)
        reason = scrub_head(headers, reason, channel.secrets)
    headers[CHANNEL_HEADER] = channel.name
    headers[REQUEST_ID_HEADER] = ticket.request_id  # a stream's headers go out in the relay

    finished = False
    try:
        if upstream.content_type == _SSE and upstream.status < 300:  # an error is read whole, scrubbed
            response = await relay_sse(
                request,
                upstream,
                headers,
                channel.name,
                channel.timeouts,
                attempt,
                loop,
                gateway.settings.client_write_timeout,
                meter,
            )
        else:
            upstream.set_read_timeout(channel.timeouts.inactivity)
            try:
                with upstream_errors(channel.name):
                    if upstream.status >= 300:
                        raw = await upstream.read(ERROR_BODY_LIMIT)
                        payload = client_error_body(upstream.status, headers, raw, channel.secrets)
                    else:
                        payload = await upstream.read()
                        if meter is not None:
                            meter.feed_json(payload)
            except Exception:
                attempt.broke_off()
                raise
            if upstream.status >= 300:
                ticket.outcome, ticket.error_type = "error", _upstream_error_type(payload)
            response = web.Response(status=upstream.status, reason=reason, headers=headers, body=payload)
        finished = True
        return response
    finally:
        if finished:
            upstream.release()
        else:
            upstream.close()  # never hand a half-read connection back to the pool
