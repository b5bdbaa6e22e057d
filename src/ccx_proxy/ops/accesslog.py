"""The request id and the access log: one line per request, whatever became of it.

Every request gets an id (``x-ccx-request-id`` on its response, in its log line and its
usage record); a wrong key, a wrong path and a refused model leave a line too.  The line is
written once, when the response is done (for a stream: after its last byte), never from
the chunk loop.  Refusals before a member is known (a wrong key or path: anyone can send
them) are logged at most 20 per 10 s, then one line counts the rest.  Fields: time,
request id, client address, member, session id, method, path, status, channel, requested
-> upstream model, attempts, TTFB, duration, tokens and the error type.  Never a key,
never a body; the path is cut at 256 characters and the query string is left out (a
client may put anything there).  Behind a load balancer named in ``FORWARDED_ALLOW_IPS``
the client address is the one its ``X-Forwarded-For`` gives (:mod:`ccx_proxy.forwarded`),
and ``proxy`` holds the balancer's.

``LOG_FORMAT=json`` makes this line (and every other log line: :class:`JsonFormatter`)
one JSON object; ``ACCESS_LOG=off`` turns the line off.  Logger: ``ccx_proxy.access``.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from ..forwarded import TrustedProxies
from ..redact import REDACTOR
from ..team.service import CLIENT_CLOSED, Ticket

if TYPE_CHECKING:
    from ..state import Gateway

log = logging.getLogger("ccx_proxy.access")

REQUEST_ID_HEADER = "x-ccx-request-id"
REQUEST_ID: web.RequestKey[str] = web.RequestKey("ccx_request_id", str)
TICKET: web.RequestKey[Ticket] = web.RequestKey("ccx_ticket", Ticket)  # set by the relay
ENABLED: web.AppKey[bool] = web.AppKey("ccx_access_log", bool)
TRUSTED: web.AppKey[TrustedProxies] = web.AppKey("ccx_forwarded_allow_ips", TrustedProxies)
_PATH_LONGEST = 256
_ROUTES = frozenset({"/v1/messages", "/v1/messages/count_tokens", "/v1/models", "/health", "/"})

# Request ids: 8 random hex digits per process, then a counter -- unique across workers and
# restarts without a system call per request.
_PREFIX = os.urandom(4).hex()
_ids = itertools.count(1)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def new_request_id() -> str:
    return f"{_PREFIX}{next(_ids):08x}"


def setup(app: web.Application, gateway: Gateway) -> None:
    app[ENABLED] = gateway.settings.access_log
    app[TRUSTED] = gateway.settings.forwarded_allow_ips


@web.middleware
async def access_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The outermost middleware: the id first, the line last."""
    rid = new_request_id()
    request[REQUEST_ID] = rid
    started = time.monotonic()
    status = CLIENT_CLOSED
    try:
        response = await handler(request)
        status = response.status
        if not response.prepared:  # a stream took its id with its headers (relay)
            response.headers[REQUEST_ID_HEADER] = rid
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        if request.app.get(ENABLED, False) and log.isEnabledFor(logging.INFO):
            now = time.monotonic()
            if request.get(TICKET) is not None or status < 400 or _REFUSED.allow(now):
                _emit(request, rid, status, now - started)


class _Budget:
    """Refusals before a member is known (a wrong key, a wrong path: anyone can send them)
    are logged at most ``burst`` per ``window`` seconds, then one line says how many were
    not: a flood must not flood the log.  Requests of a known member are always logged."""

    __slots__ = ("burst", "window", "_start", "_count", "_dropped")

    def __init__(self, burst: int = 20, window: float = 10.0) -> None:
        self.burst, self.window = burst, window
        self._start, self._count, self._dropped = 0.0, 0, 0

    def allow(self, now: float) -> bool:
        if now - self._start >= self.window:
            if self._dropped:
                log.info(
                    "... and %d more refused requests without a member in the last %g s (not logged)",
                    self._dropped,
                    self.window,
                )
            self._start, self._count, self._dropped = now, 0, 0
        self._count += 1
        if self._count <= self.burst:
            return True
        self._dropped += 1
        return False


_REFUSED = _Budget()


def _emit(request: web.Request, rid: str, status: int, duration: float) -> None:
    path = request.path
    peer = request.remote
    trusted = request.app.get(TRUSTED)
    client = trusted.client(peer, request.headers.getall("X-Forwarded-For", ())) if trusted else peer
    fields: dict[str, Any] = {
        "request_id": rid,
        "client": client,
        "method": request.method,
        "path": path if path in _ROUTES else REDACTOR.redact(path[:_PATH_LONGEST]),
        "status": status,
        "duration_ms": round(duration * 1000, 1),
    }
    if client != peer:
        fields["proxy"] = peer  # the load balancer that said so (FORWARDED_ALLOW_IPS)
    ticket = request.get(TICKET)
    if ticket is not None:
        fields["member"] = ticket.member.name
        if ticket.session:
            fields["session"] = REDACTOR.redact(ticket.session)  # client text: no secret in it
        fields["channel"] = ticket.channel
        fields["model"] = ticket.model
        fields["upstream_model"] = ticket.upstream_model
        fields["attempts"] = ticket.attempts
        if ticket.ttfb is not None:
            fields["ttfb_ms"] = round(ticket.ttfb * 1000, 1)
        if ticket.meter is not None:
            usage = ticket.meter.usage
            fields["tokens"] = {
                "input": usage.input_tokens,
                "output": usage.output_tokens,
                "cache_write_5m": usage.cache_write_5m,
                "cache_write_1h": usage.cache_write_1h,
                "cache_read": usage.cache_read,
            }
        outcome = ticket.final_outcome
        if outcome != "complete":
            fields["outcome"] = outcome
        if ticket.error_type:
            fields["error_type"] = ticket.error_type
    log.info("%s", _Line(fields), extra={"access": fields})


class _Line:
    """The text form, built once (the redactor and the handler both format the record)."""

    __slots__ = ("fields", "_text")

    def __init__(self, fields: dict[str, Any]) -> None:
        self.fields = fields
        self._text: str | None = None

    def __str__(self) -> str:
        if self._text is None:
            self._text = self._build()
        return self._text

    def _build(self) -> str:
        f = self.fields
        parts = [f'{f["client"]} {f["request_id"]} "{f["method"]} {_printable(f["path"])}" {f["status"]}']
        if "member" in f:
            parts.append(f"member={f['member']}")
        if "channel" in f:
            model = f["model"] or "-"
            if f.get("upstream_model") and f["upstream_model"] != model:
                model = f"{model}->{f['upstream_model']}"
            parts.append(f"channel={f['channel'] or '-'} model={model} attempts={f['attempts']}")
        if "ttfb_ms" in f:
            parts.append(f"ttfb={f['ttfb_ms']}ms")
        parts.append(f"duration={f['duration_ms']}ms")
        tokens = f.get("tokens")
        if tokens:
            parts.append(
                "tokens=in:{input},out:{output},cw5m:{cache_write_5m},cw1h:{cache_write_1h},cr:{cache_read}".format(
                    **tokens
                )
            )
        if "outcome" in f:
            parts.append(f"outcome={f['outcome']}")
        if "error_type" in f:
            parts.append(f"error={f['error_type']}")
        if "session" in f:
            parts.append(f"session={_printable(f['session'])}")
        return " ".join(parts)


def _printable(text: str) -> str:
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


class JsonFormatter(logging.Formatter):
    """One JSON object per line (journald, Loki): time, level, logger, message, and an
    access line's fields at the top level."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
        }
        access = getattr(record, "access", None)
        if isinstance(access, dict):
            doc.update(access)
        else:
            doc["message"] = record.getMessage()
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(doc).decode()
