"""Getting response headers from some upstream: the failover loop.

Candidates are tried in order, and within a channel each base URL with each
usable key.  Failover happens only here, before anything reaches the client
(what each failure does is :class:`~.upstream.attempt.Attempt`'s):

* connection errors, timeouts, invalid responses, 500/502/503/504: next URL (keys
  would not help), the channel's breaker records a failure;
* 529: the channel backs off briefly, next channel;
* 429: the (key, model) pair cools down (``Retry-After`` /
  ``anthropic-ratelimit-*-reset``, capped), next key; the gateway never sleeps on it;
* 401/402/403: the key is out of rotation until the config is reloaded;
* any other status: the client gets it as it is.

Never less available than going direct: when soft state (a cool-down, a back-off,
an open breaker) holds back every candidate -- or every other one failed without an
answer (unreachable, timed out) -- the request goes anyway to the held-back one that
frees up soonest ("panic routing"), and the client gets what the upstream says.
The gateway answers with its own error only when nothing at all could be tried.
Attempts are bounded by ``maxAttempts`` and share ``failoverDeadlineMs``.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import orjson
from multidict import CIMultiDict

from .body import ModelField, replace_model
from .errors import GatewayError, NoChannelAvailable, UpstreamKeyRejected, error_body
from .headers import client_response_headers, mask_secret, scrub_head, upstream_header_block
from .health import BreakerState, ChannelHealth, HealthRegistry, KeyHealth, retry_after_seconds
from .policy import RoutingPolicy
from .routing import Candidate
from .thinking import rewrite
from .upstream.attempt import Attempt, Next
from .upstream.bodies import ERROR_BODY_LIMIT, client_error_body, scrub
from .upstream.client import UpstreamClient
from .upstream.errors import ProxyFailed, UpstreamFailure, to_gateway_error
from .upstream.response import Response
from .upstream.wire import Endpoints

if TYPE_CHECKING:
    from .shared.health import HealthSync

log = logging.getLogger("ccx_proxy.failover")

FAILOVER_SERVER = frozenset({500, 502, 503, 504})
KEY_REJECTED = frozenset({401, 402, 403})
# What a client reads after a lone upstream failure (unreachable, timed out, invalid answer).
UPSTREAM_ADVICE = "retry shortly; if it persists, the gateway's operator should check that channel"
THROTTLED = frozenset({429, 503, 529})  # a relayed one always carries Retry-After
# A 403 that refuses the client, not the key: Kimi For Coding answers
# {"error": {"message": "Kimi For Coding is currently only available for Coding Agents such as
# Kimi CLI, Claude Code, Roo Code, Kilo Code, etc.", "type": "access_terminated_error"}} to
# clients whose User-Agent is not a coding agent's (MoonshotAI/kimi-cli #1947, #2322).
_CLIENT_REFUSALS = (b"only available for Coding Agents",)


def refuses_client(status: int, body: bytes) -> bool:
    """Whether an upstream 403 turns away this client (its User-Agent) rather than the key:
    the key stays in rotation, other channels are tried, and the client gets the upstream's
    own answer if none serves it."""
    return status == 403 and any(text in body for text in _CLIENT_REFUSALS)


RATE_LIMITED = 429
OVERLOADED = 529
PROXY_AUTH = 407
SSE = "text/event-stream"
_BURST_CODES = frozenset({"1302", "1303"})  # GLM: burst / concurrency limits, sent as 200 + error event
FAILOVER_STATUSES = FAILOVER_SERVER | KEY_REJECTED | {RATE_LIMITED, OVERLOADED}


@dataclass(slots=True)
class Connected:
    """An upstream answered with a status the client gets."""

    response: Response
    attempt: Attempt
    started: float  # loop time the request started: for the time to first byte
    attempts: int = 1  # upstream attempts made, this one included


@dataclass(slots=True)
class ErrorAnswer:
    """The last failover-worthy answer, kept (made safe to relay) in case nothing better comes."""

    status: int
    reason: str
    headers: CIMultiDict[str]  # as the client gets them
    body: bytes
    channel: str


@dataclass(slots=True)
class Outcome:
    tried: list[str] = field(default_factory=list)
    last: ErrorAnswer | None = None
    transport_errors: list[GatewayError] = field(default_factory=list)
    attempts: int = 0
    retry_after: float | None = None  # when something held back frees up
    rejected_keys: list[str] = field(default_factory=list)  # skipped: disabled after 401/402/403


@dataclass(slots=True)
class _Held:
    """A target that soft state held back, and when it frees up."""

    at: float
    candidate: Candidate
    urls: Endpoints
    index: int


class _Request:
    """What every attempt of one request shares."""

    __slots__ = (
        "client",
        "registry",
        "policy",
        "body",
        "model",
        "client_headers",
        "query",
        "count_tokens",
        "loop",
        "started",
        "deadline",
        "budget",
        "attempts",
        "trace",
        "_outcome",
    )

    def __init__(
        self,
        client: UpstreamClient,
        registry: HealthRegistry,
        policy: RoutingPolicy,
        body: bytes,
        model: ModelField,
        client_headers: list[tuple[bytes, bytes]],
        query: bytes,
        count_tokens: bool,
        trace: list[AttemptTrace] | None = None,
    ) -> None:
        self.client = client
        self.registry = registry
        self.policy = policy
        self.body = body
        self.model = model
        self.client_headers = client_headers
        self.query = query
        self.count_tokens = count_tokens
        self.loop = client.loop
        self.started = self.loop.time()
        self.deadline = self.started + policy.failoverDeadlineMs / 1000
        self.budget = policy.maxAttempts or 1 << 30
        self.attempts = 0
        self.trace = trace  # one AttemptTrace per attempt when tracing is on (ccx_proxy.ops.tracing)
        self._outcome: Outcome | None = None  # made on the first failure: none on the happy path

    @property
    def outcome(self) -> Outcome:
        outcome = self._outcome
        if outcome is None:
            outcome = self._outcome = Outcome()
        return outcome

    def spent(self) -> bool:
        if self.budget <= 0 or self.loop.time() >= self.deadline:
            self.outcome.tried.append("attempt limit or failover deadline reached")
            return True
        return False


async def connect(
    client: UpstreamClient,
    registry: HealthRegistry,
    policy: RoutingPolicy,
    candidates: tuple[Candidate, ...],
    body: bytes,
    model: ModelField,
    client_headers: list[tuple[bytes, bytes]],
    query: bytes,
    count_tokens: bool,
    trace: list[AttemptTrace] | None = None,
) -> Connected | Outcome:
    req = _Request(client, registry, policy, body, model, client_headers, query, count_tokens, trace)
    held: list[_Held] = []
    for candidate in candidates:
        channel = candidate.channel
        health = registry.channel(channel.name, channel.breaker)
        now = registry.clock()
        if not health.available(now):
            req.outcome.tried.append(f"{channel.name}: {_unavailable(health, now)}")
            _hold_channel(held, candidate, health, now)
            continue
        next_channel = False
        for urls in channel.all_urls:
            for index, api_key in enumerate(channel.api_keys):
                key = health.key(api_key, channel.breaker)
                now = registry.clock()
                if key.disabled or not key.available(now, candidate.model):
                    req.outcome.tried.append(
                        f"{channel.name} key {mask_secret(api_key)}: {_key_state(key, now, candidate.model)}"
                    )
                    if key.disabled:
                        req.outcome.rejected_keys.append(f"{channel.name} key {mask_secret(api_key)}")
                    else:
                        held.append(_Held(key.usable_at(now, candidate.model), candidate, urls, index))
                    continue
                if req.spent():
                    return req.outcome
                attempt = Attempt(registry, channel, health, key, api_key, candidate.model)
                if not attempt.acquire(now) or (
                    registry.sync is not None and attempt.probing and not await _claim(registry.sync, attempt)
                ):
                    req.outcome.tried.append(f"{channel.name}: {_unavailable(health, now)}")
                    held.append(_Held(health.usable_at(now), candidate, urls, index))
                    next_channel = True
                    break
                result = await _traced(req, candidate, urls, index, attempt)
                if isinstance(result, Connected):
                    return result
                if result is Next.CHANNEL:
                    next_channel = True
                    break
                if result is Next.URL:
                    break
            if next_channel:
                break
    outcome = req.outcome
    if held:
        now = registry.clock()
        soonest = min(held, key=lambda h: h.at)
        if outcome.last is None and not req.spent():
            # No upstream answered (everything was held back by soft state, or what was
            # tried failed without an answer): going direct to a held-back candidate would
            # still have been served (or told to wait by the upstream itself), so send it
            # anyway rather than answer with a gateway error.
            channel = soonest.candidate.channel
            health = registry.channel(channel.name, channel.breaker)
            api_key = channel.api_keys[soonest.index]
            attempt = Attempt(
                registry,
                channel,
                health,
                health.key(api_key, channel.breaker),
                api_key,
                soonest.candidate.model,
            )
            attempt.acquire(now, panic=True)
            log.info("nothing answered for %r and the rest is held back: trying %r", model.name, channel.name)
            outcome.tried.append(f"held back: tried {channel.name} anyway")
            result = await _traced(req, soonest.candidate, soonest.urls, soonest.index, attempt)
            if isinstance(result, Connected):
                return result
        # When the soonest held-back candidate frees up, as it stands now (a failed panic
        # attempt may just have reopened a breaker for longer).
        now = registry.clock()
        outcome.retry_after = min(_frees_at(registry, h, now) for h in held) - now
    outcome.attempts = req.attempts
    last = outcome.last
    if last is not None and last.status in THROTTLED and "retry-after" not in last.headers:
        # The upstream's own 429/503/529 said nothing about when: say when the gateway will
        # send this model anywhere again (its cool-downs and back-offs), so that a client's
        # retry does not land on candidates that are all still held back.
        now = registry.clock()
        last.headers["Retry-After"] = str(max(1, math.ceil(_soonest(registry, candidates, now) - now)))
    return outcome


async def _claim(sync: HealthSync, attempt: Attempt) -> bool:
    """A half-open probe goes out only if no other instance has one out (REDIS_URL)."""
    channel = attempt.channel
    on_key = attempt.key.breaker.state is BreakerState.HALF_OPEN
    ttl = channel.timeouts.connect + channel.timeouts.first_byte(True)
    claim = await sync.claim_probe(channel.name, attempt.api_key if on_key else None, ttl)
    if claim is not None:
        attempt.claim = claim
        return True
    attempt.release()
    return False


def _soonest(registry: HealthRegistry, candidates: tuple[Candidate, ...], now: float) -> float:
    """When the first of ``candidates`` could take the request again (soft state only)."""
    soonest = math.inf
    for candidate in candidates:
        channel = candidate.channel
        health = registry.channel(channel.name, channel.breaker)
        for api_key in channel.api_keys:
            key = health.key(api_key, channel.breaker)
            if not key.disabled:
                soonest = min(soonest, max(health.usable_at(now), key.usable_at(now, candidate.model)))
    return now if soonest == math.inf else soonest


def _frees_at(registry: HealthRegistry, held: _Held, now: float) -> float:
    channel = held.candidate.channel
    health = registry.channel(channel.name, channel.breaker)
    key = health.key(channel.api_keys[held.index], channel.breaker)
    return max(health.usable_at(now), key.usable_at(now, held.candidate.model))


def _hold_channel(held: list[_Held], candidate: Candidate, health: ChannelHealth, now: float) -> None:
    """Remember a soft-excluded channel with its soonest usable key, on its first URL."""
    channel = candidate.channel
    best: tuple[float, int] | None = None
    for index, api_key in enumerate(channel.api_keys):
        key = health.key(api_key, channel.breaker)
        if key.disabled:
            continue
        at = max(health.usable_at(now), key.usable_at(now, candidate.model))
        if best is None or at < best[0]:
            best = (at, index)
    if best is not None:
        held.append(_Held(best[0], candidate, channel.all_urls[0], best[1]))


class AttemptTrace(NamedTuple):
    """One upstream attempt, for a tracing span: times on the loop's clock."""

    channel: str
    host: str
    model: str
    started: float
    ended: float
    status: int  # 0: no HTTP answer
    error: str | None  # what went wrong (keys masked), None for a success


async def _traced(
    req: _Request, candidate: Candidate, urls: Endpoints, index: int, attempt: Attempt
) -> Connected | Next:
    if req.trace is None:  # tracing off: one attribute check
        return await _attempt(req, candidate, urls, index, attempt)
    started = req.loop.time()
    tried = len(req.outcome.tried)
    result = await _attempt(req, candidate, urls, index, attempt)
    endpoint = urls.count_tokens if req.count_tokens else urls.messages
    if isinstance(result, Connected):
        status, error = result.response.status, None
    else:
        outcome = req.outcome
        error = outcome.tried[-1] if len(outcome.tried) > tried else result.value
        status = outcome.last.status if outcome.last is not None and "upstream " in error else 0
    req.trace.append(
        AttemptTrace(
            candidate.channel.name,
            endpoint.origin.host,
            candidate.model,
            started,
            req.loop.time(),
            status,
            error,
        )
    )
    return result


async def _attempt(
    req: _Request, candidate: Candidate, urls: Endpoints, index: int, attempt: Attempt
) -> Connected | Next:
    """One request to one (channel, URL, key): Connected, or where failover goes next."""
    channel = candidate.channel
    model = req.model
    payload = req.body if candidate.model == model.name else replace_model(req.body, model, candidate.model)
    if channel.thinking.enabled:  # per channel, off unless set: the byte-exact path stays untouched
        payload = rewrite(payload, channel.thinking)
    endpoint = urls.count_tokens if req.count_tokens else urls.messages
    timeouts = channel.timeouts
    req.budget -= 1
    req.attempts += 1
    try:
        response = await req.client.request(
            endpoint,
            payload,
            upstream_header_block(req.client_headers, channel.header_lines[index], channel.custom_names),
            query=req.query,
            connect_timeout=timeouts.connect,
            read_timeout=timeouts.first_byte(model.stream and not req.count_tokens),
            deadline=req.deadline,  # enforced by the response's own timer
        )
    except asyncio.CancelledError:
        attempt.release()
        raise
    except Exception as exc:
        error = to_gateway_error(exc, channel.name)
        if error is None:
            attempt.release()
            raise
        return _failed(req, attempt, endpoint.origin.host, error)

    status = response.status
    proxy = endpoint.origin.proxy
    if status == PROXY_AUTH and proxy is not None and not endpoint.origin.tunnel:
        # A forward proxy's own refusal, not the upstream's answer: never relayed.
        response.close()
        refused = ProxyFailed(f"proxy {proxy.display} answered 407: its credentials are missing or wrong")
        return _failed(req, attempt, endpoint.origin.host, to_gateway_error(refused, channel.name))
    if status not in FAILOVER_STATUSES:
        if status == 200 and response.content_type == SSE:
            verdict = await _error_first(req, candidate, endpoint.origin.host, attempt, response)
            if verdict is not None:
                return verdict
        return Connected(response, attempt, req.started, req.attempts)
    try:
        async with asyncio.timeout_at(req.deadline):
            raw = await response.read(ERROR_BODY_LIMIT)
    except (UpstreamFailure, TimeoutError, OSError):
        raw = b""
    except asyncio.CancelledError:  # the client left while the error body was coming
        attempt.release()
        raise
    finally:
        response.close()
    headers = client_response_headers(response.headers)
    reason = scrub_head(headers, response.reason, channel.secrets)  # an upstream may echo its key
    body = client_error_body(status, headers, raw, channel.secrets)
    req.outcome.last = ErrorAnswer(status, reason, headers, body, channel.name)
    return _judge(req, candidate, endpoint.origin.host, attempt, status, body, response.headers)


def _judge(
    req: _Request,
    candidate: Candidate,
    host: str,
    attempt: Attempt,
    status: int,
    body: bytes,
    upstream_headers: Mapping[str, str],
) -> Next:
    """What an upstream's failover-worthy answer does to the attempt, and where to go next."""
    channel = candidate.channel
    masked = mask_secret(attempt.api_key)  # only on the failure path: it costs a little on every request
    req.outcome.tried.append(f"{channel.name} key {masked}: upstream {status}")
    log.warning(
        "channel %r (%s, key %s): upstream answered %d, failing over: %r",
        channel.name,
        host,
        masked,
        status,
        body[:300].decode("utf-8", "replace"),  # keys already masked
    )
    policy = req.policy
    if status == RATE_LIMITED:
        wait = retry_after_seconds(upstream_headers)
        wait = policy.rateLimitCooldownMs / 1000 if wait is None else wait
        wait = min(wait, policy.rateLimitCooldownCapMs / 1000)
        attempt.rate_limited(wait, f"rate limited (429) on {candidate.model}, cooling down {wait:.0f}s")
        return Next.KEY
    if status in KEY_REJECTED:
        if refuses_client(status, body):
            attempt.release()  # the key is fine; this channel's other keys would be refused too
            return Next.CHANNEL
        attempt.rejected(f"rejected ({status}): disabled until config reload")
        return Next.KEY
    if status == OVERLOADED:
        attempt.overloaded(policy.overloadBackoffMs / 1000, "upstream 529 (overloaded)")
        return Next.CHANNEL
    attempt.failed(f"upstream {status}")
    return Next.URL


async def _error_first(
    req: _Request, candidate: Candidate, host: str, attempt: Attempt, response: Response
) -> Next | None:
    """A 200 stream whose first event is an error (GLM's burst limits 1302/1303, an
    overloaded upstream) is a failed attempt like a 529 or 429, and the client never sees
    it: the first event is awaited (within the first-byte timeout) before anything is sent.
    None: the stream is good (its bytes stay unread for the relay)."""
    channel = candidate.channel
    try:
        first = await response.first_event()
    except asyncio.CancelledError:
        response.close()
        attempt.release()
        raise
    except Exception as exc:
        response.close()
        error = to_gateway_error(exc, channel.name)
        if error is None:
            attempt.release()
            raise
        return _failed(req, attempt, host, error)
    found = stream_error(first)
    if found is None:
        return None
    status, body = found
    response.close()
    headers: CIMultiDict[str] = CIMultiDict({"Content-Type": "application/json"})
    body = scrub(body, channel.secrets)
    req.outcome.last = ErrorAnswer(status, "", headers, body, channel.name)
    return _judge(req, candidate, host, attempt, status, body, headers)


def stream_error(first: bytes) -> tuple[int, bytes] | None:
    """(the status it stands for, an Anthropic error body) when a stream's first event is an
    error that another upstream could do better on; None for anything else -- including
    an error about the request itself, which the client gets as the upstream sent it."""
    head = first.lstrip(b"\r\n")
    if not (head.startswith(b"event: error") or head.startswith(b"event:error")):
        return None
    end = min((i for i in (head.find(b"\n\n"), head.find(b"\r\n\r\n")) if i >= 0), default=len(head))
    data = b"".join(
        line[5:].strip()
        for line in head[:end].replace(b"\r\n", b"\n").split(b"\n")
        if line.startswith(b"data:")
    )
    try:
        payload = orjson.loads(data)
    except orjson.JSONDecodeError:
        payload = None
    error = payload.get("error") if isinstance(payload, dict) else None
    error = error if isinstance(error, dict) else {}
    kind = error.get("type") if isinstance(error.get("type"), str) else "api_error"
    code = str(error.get("code", ""))
    if code in _BURST_CODES or kind == "rate_limit_error":
        status, kind = RATE_LIMITED, "rate_limit_error"
    elif kind == "overloaded_error":
        status = OVERLOADED
    elif kind == "api_error":
        status = 500
    else:
        return None  # invalid_request_error and the like: the request's own fault
    message = error.get("message") if isinstance(error.get("message"), str) else "error event"
    return status, error_body(kind, f"upstream stream began with an error: {message}"[:1000])


def _failed(req: _Request, attempt: Attempt, host: str, error: GatewayError | None) -> Next:
    """An attempt that got no usable answer (connection, timeout, invalid response, proxy)."""
    assert error is not None
    attempt.failed(error.message)
    req.outcome.transport_errors.append(error)
    req.outcome.tried.append(f"{attempt.channel.name} ({host}): {error.message}")
    log.warning(
        "channel %r (%s, key %s): %s", attempt.channel.name, host, mask_secret(attempt.api_key), error.message
    )
    return Next.URL


def exhausted(outcome: Outcome, model: str) -> GatewayError:
    """The error for a request no upstream answered: the one transport error as it is
    when there was a single attempt; a 502 the client cannot fix when the only obstacle
    was keys the upstream refused; else a 503 listing what was tried."""
    if len(outcome.transport_errors) == 1 and len(outcome.tried) == 1:
        error = outcome.transport_errors[0]
        return type(error)(f"{error.message}; {UPSTREAM_ADVICE}", retry_after=error.retry_after)
    if outcome.rejected_keys and not outcome.transport_errors and outcome.retry_after is None:
        return UpstreamKeyRejected(
            f"the upstream refused every key that could serve model {model!r} "
            f"({', '.join(outcome.rejected_keys)}); the gateway's operator must fix the channel's "
            "apiKeys and reload -- your own key is fine"
        )
    tried = "; ".join(outcome.tried) or "no candidate"
    return NoChannelAvailable(
        f"no upstream could serve model {model!r}: {tried}", retry_after=outcome.retry_after
    )


def _unavailable(health: ChannelHealth, now: float) -> str:
    if now < health.backoff_until:
        return f"overloaded (529), backing off {health.backoff_until - now:.1f}s"
    breaker = health.breaker
    if breaker.state.value == "half-open":
        return "circuit half-open, a probe is in flight"
    return f"circuit {breaker.state.value}, retry in {max(0.0, breaker.open_until - now):.1f}s"


def _key_state(key: KeyHealth, now: float, model: str) -> str:
    if key.disabled:
        return key.last_error or "disabled"
    cooling = key.cooling(model, now)
    if cooling:
        return f"{model} cooling down {cooling:.1f}s"
    return f"circuit {key.breaker.state.value}"
