"""Getting response headers from some upstream: the failover loop.

Candidates are tried in order, and within a channel each base URL with each
usable key.  Failover happens only here, before anything reaches the client:

* connection errors, connect / first-byte timeouts, 500/502/503/504: next URL
  (keys would not help), the channel's breaker records a failure;
* 529: the channel backs off briefly, next channel;
* 429: the key cools down (``Retry-After`` / ``anthropic-ratelimit-*-reset``,
  capped), next key; the gateway never sleeps on it;
* 401/402/403: the key is out of rotation until the config is reloaded;
* any other status: the client gets it as it is.

Attempts are bounded by ``maxAttempts`` and share ``failoverDeadlineMs``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

from yarl import URL

from .body import ModelField, replace_model
from .client import UpstreamClient
from .config import Channel
from .errors import GatewayError, NoChannelAvailable, UpstreamTimeout
from .exchange import UpstreamResponse
from .h1 import UpstreamClientError
from .headers import mask_secret, upstream_header_block
from .health import ChannelHealth, HealthRegistry, KeyHealth, retry_after_seconds
from .policy import RoutingPolicy
from .routing import Candidate
from .upstream import gateway_error

log = logging.getLogger("ccx_proxy.failover")

FAILOVER_SERVER = frozenset({500, 502, 503, 504})
KEY_REJECTED = frozenset({401, 402, 403})
RATE_LIMITED = 429
OVERLOADED = 529
_ERROR_BODY_LIMIT = 1 << 20


@dataclass(slots=True)
class Connected:
    """An upstream answered with a status the client gets."""

    response: UpstreamResponse
    channel: Channel
    health: ChannelHealth
    key: KeyHealth


@dataclass(slots=True)
class UpstreamError:
    """The last failover-worthy answer, kept whole in case nothing better comes."""

    status: int
    reason: str | None
    headers: Mapping[str, str]
    body: bytes
    channel: str


@dataclass(slots=True)
class Outcome:
    tried: list[str] = field(default_factory=list)
    last: UpstreamError | None = None
    transport_errors: list[GatewayError] = field(default_factory=list)


async def connect(
    client: UpstreamClient,
    registry: HealthRegistry,
    policy: RoutingPolicy,
    candidates: tuple[Candidate, ...],
    body: bytes,
    model: ModelField,
    client_headers: list[tuple[bytes, bytes]],
    path_suffix: str,
    count_tokens: bool,
) -> Connected | Outcome:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + policy.failoverDeadlineMs / 1000
    budget = policy.maxAttempts or 1 << 30
    outcome = Outcome()
    for candidate in candidates:
        channel = candidate.channel
        health = registry.channel(channel.name, channel.breaker)
        now = registry.clock()
        if not health.available(now):
            outcome.tried.append(f"{channel.name}: {_unavailable(health, now)}")
            continue
        payload = body if candidate.model == model.name else replace_model(body, model, candidate.model)
        next_channel = False
        for urls in channel.all_urls:
            url = URL((urls.count_tokens if count_tokens else urls.messages) + path_suffix, encoded=True)
            for api_key, own_lines in zip(channel.api_keys, channel.header_lines, strict=True):
                key = health.key(api_key, channel.breaker)
                now = registry.clock()
                if not key.available(now):
                    outcome.tried.append(
                        f"{channel.name} key {mask_secret(api_key)}: {_key_unavailable(key, now)}"
                    )
                    continue
                if budget <= 0 or loop.time() >= deadline:
                    outcome.tried.append("attempt limit or failover deadline reached")
                    return outcome
                headers = upstream_header_block(client_headers, own_lines, channel.custom_names)
                if not health.breaker.acquire(now):
                    outcome.tried.append(f"{channel.name}: {_unavailable(health, now)}")
                    next_channel = True
                    break
                key.breaker.acquire(now)
                budget -= 1
                health.requests += 1
                verdict = await _attempt(
                    client,
                    loop,
                    deadline,
                    channel,
                    health,
                    key,
                    url,
                    payload,
                    headers,
                    api_key,
                    policy,
                    registry,
                    outcome,
                )
                if isinstance(verdict, Connected):
                    return verdict
                if verdict == "next-channel":
                    next_channel = True
                    break
                if verdict == "next-url":
                    break
            if next_channel:
                break
    return outcome


async def _attempt(
    client: UpstreamClient,
    loop: asyncio.AbstractEventLoop,
    deadline: float,
    channel: Channel,
    health: ChannelHealth,
    key: KeyHealth,
    url: URL,
    payload: bytes,
    headers: bytes,
    api_key: str,
    policy: RoutingPolicy,
    registry: HealthRegistry,
    outcome: Outcome,
) -> Connected | str:
    """One request; returns Connected, or where to go next: next-key/url/channel."""
    try:
        try:
            timeouts = channel.timeouts
            response = await client.request(
                url,
                payload,
                headers,
                connect_timeout=timeouts.connectTimeoutMs / 1000,
                read_timeout=timeouts.responseHeaderTimeoutMs / 1000,
                deadline=deadline,  # enforced by the client's own timer: no asyncio.timeout per request
            )
        except TimeoutError as exc:
            if loop.time() >= deadline:
                raise UpstreamTimeout(
                    f"upstream channel {channel.name!r}: failover deadline reached"
                ) from exc
            raise
    except asyncio.CancelledError:
        health.breaker.release()
        key.breaker.release()
        raise
    except Exception as exc:
        error = gateway_error(exc, channel.name)
        if error is None:
            health.breaker.release()
            key.breaker.release()
            raise
        now = registry.clock()
        health.breaker.failure(now)
        key.breaker.failure(now)
        health.last_error = error.message
        outcome.transport_errors.append(error)
        outcome.tried.append(f"{channel.name} ({url.host}): {error.message}")
        log.warning(
            "channel %r (%s, key %s): %s", channel.name, url.host, mask_secret(api_key), error.message
        )
        return "next-url"

    status = response.status
    if status < 400 or not (
        status in FAILOVER_SERVER or status in KEY_REJECTED or status in (RATE_LIMITED, OVERLOADED)
    ):
        return Connected(response, channel, health, key)

    try:
        async with asyncio.timeout_at(deadline):
            error_body = await response.read(_ERROR_BODY_LIMIT)
    except (UpstreamClientError, TimeoutError, OSError):
        error_body = b""
    except asyncio.CancelledError:  # the client left while the error body was coming
        health.breaker.release()
        key.breaker.release()
        raise
    finally:
        response.close()
    # A provider may echo the key it rejected: the client never sees it unmasked.
    for secret in channel.api_keys:
        error_body = error_body.replace(secret.encode(), mask_secret(secret).encode())
    outcome.last = UpstreamError(status, response.reason, response.headers, error_body, channel.name)
    now = registry.clock()
    masked = mask_secret(api_key)  # only on the failure path: it costs a little on every request
    summary = f"{channel.name} key {masked}: upstream {status}"
    outcome.tried.append(summary)
    health.last_error = f"upstream {status}"
    log.warning(
        "channel %r (%s, key %s): upstream answered %d, failing over", channel.name, url.host, masked, status
    )
    if status == RATE_LIMITED:
        wait = retry_after_seconds(response.headers)
        wait = policy.rateLimitCooldownMs / 1000 if wait is None else wait
        key.cooldown_until = now + min(wait, policy.rateLimitCooldownCapMs / 1000)
        key.last_error = f"rate limited (429), cooling down {wait:.0f}s"
        health.breaker.release()
        key.breaker.release()
        return "next-key"
    if status in KEY_REJECTED:
        key.disabled = True
        key.last_error = f"rejected ({status}): disabled until config reload"
        health.breaker.release()
        key.breaker.release()
        return "next-key"
    health.breaker.failure(now)
    key.breaker.failure(now)
    if status == OVERLOADED:
        health.backoff_until = now + policy.overloadBackoffMs / 1000
        return "next-channel"
    return "next-url"


def exhausted(outcome: Outcome, model: str) -> GatewayError:
    """The error for a request no upstream answered: the one transport error as it is
    when there was a single attempt, else a 503 listing what was tried."""
    if len(outcome.transport_errors) == 1 and len(outcome.tried) == 1:
        return outcome.transport_errors[0]
    tried = "; ".join(outcome.tried) or "no candidate"
    return NoChannelAvailable(f"no upstream could serve model {model!r}: {tried}")


def _unavailable(health: ChannelHealth, now: float) -> str:
    if now < health.backoff_until:
        return f"overloaded (529), backing off {health.backoff_until - now:.1f}s"
    breaker = health.breaker
    if breaker.state.value == "half-open":
        return "circuit half-open, a probe is in flight"
    return f"circuit {breaker.state.value}, retry in {max(0.0, breaker.open_until - now):.1f}s"


def _key_unavailable(key: KeyHealth, now: float) -> str:
    if key.disabled:
        return key.last_error or "disabled"
    if now < key.cooldown_until:
        return f"cooling down {key.cooldown_until - now:.1f}s"
    return f"circuit {key.breaker.state.value}"
