"""OpenTelemetry tracing (the optional ``otel`` extra): a span per request and one per upstream
attempt, with the GenAI semantic conventions, exported over OTLP/HTTP.

On only when ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) is
set and the extra is installed (``pip install 'ccx-proxy[otel]'``); the exporter reads the
standard ``OTEL_*`` variables (headers, timeout, ``OTEL_SERVICE_NAME``...).  Off, nothing is
imported and the request path pays one ``is None`` check.

Spans are made when a request ends, from what it recorded (its usage record and the
attempts the failover loop timed), with their real start and end times -- nothing is
created or kept open while bytes stream.  The request span is ``SERVER`` kind, named
``chat {model}`` (``gen_ai.operation.name`` = ``chat``); each attempt is a ``CLIENT`` child
named after its channel.  Attributes (GenAI conventions, development status in 2026):
``gen_ai.request.model``, ``gen_ai.response.model`` (the upstream model),
``gen_ai.usage.input_tokens`` (cache reads and writes included, as the conventions ask),
``gen_ai.usage.output_tokens``, ``gen_ai.usage.cache_read.input_tokens``,
``gen_ai.usage.cache_creation.input_tokens``, ``gen_ai.conversation.id`` (the Claude Code
session id), ``server.address`` (the upstream host, on attempts), ``error.type``, and
``ccx.*`` for the gateway's own (member, channel, request id, outcome, cost).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web

from ..redact import REDACTOR
from ..team.recorder import Record
from ..team.service import Ticket

if TYPE_CHECKING:
    from ..state import Gateway

log = logging.getLogger("ccx_proxy.tracing")

ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")


def wanted(env: dict[str, str] | os._Environ[str] = os.environ) -> bool:
    return any(env.get(name, "").strip() for name in ENDPOINT_VARIABLES)


class Tracer:
    """Turns a finished request's record (and its timed attempts) into spans."""

    def __init__(self, provider: Any) -> None:
        from opentelemetry.trace import SpanKind, Status, StatusCode

        self.provider = provider
        self._tracer = provider.get_tracer("ccx_proxy")
        self._kinds = (SpanKind.SERVER, SpanKind.CLIENT)
        self._error = (Status, StatusCode.ERROR)

    @staticmethod
    def _wall_ns(loop_time: float, loop_now: float, wall_now: float) -> int:
        """The failover loop times attempts on the event loop's clock; spans want wall ns."""
        return int((wall_now - (loop_now - loop_time)) * 1e9)

    def __call__(self, record: Record, ticket: Ticket) -> None:
        try:
            self._spans(record, ticket)
        except Exception:  # tracing never breaks a request
            log.exception("tracing: could not make the spans of request %s", record.request_id)

    def _spans(self, record: Record, ticket: Ticket) -> None:
        from opentelemetry import trace

        end_ns = int(record.ts * 1e9)
        start_ns = end_ns - int(record.duration_ms * 1e6)
        model = record.model or "unknown"
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": "chat",
            "gen_ai.request.model": model,
            "ccx.request_id": record.request_id,
            "ccx.member": record.member,
            "ccx.endpoint": record.endpoint,
            "ccx.outcome": record.outcome,
            "ccx.attempts": record.attempts,
            "http.response.status_code": record.status,
            "gen_ai.usage.input_tokens": record.input_tokens
            + record.cache_write_5m
            + record.cache_write_1h
            + record.cache_read,
            "gen_ai.usage.output_tokens": record.output_tokens,
            "gen_ai.usage.cache_read.input_tokens": record.cache_read,
            "gen_ai.usage.cache_creation.input_tokens": record.cache_write_5m + record.cache_write_1h,
        }
        if record.upstream_model:
            attributes["gen_ai.response.model"] = record.upstream_model
        if record.channel:
            attributes["ccx.channel"] = record.channel
        if record.session:  # client text: through the log redactor, as the access log does
            attributes["gen_ai.conversation.id"] = REDACTOR.redact(record.session)
        if record.cost_usd is not None:
            attributes["ccx.cost_usd"] = record.cost_usd
        if record.error_type:
            attributes["error.type"] = record.error_type
        server, client = self._kinds
        span = self._tracer.start_span(
            f"chat {model}", kind=server, start_time=start_ns, attributes=attributes
        )
        status_cls, error_code = self._error
        if record.status >= 400 or record.outcome != "complete":
            span.set_status(status_cls(error_code, record.error_type or record.outcome))
        attempts = ticket.trace or ()
        if attempts:
            loop_now = asyncio.get_running_loop().time()
            wall_now = time.time()
            context = trace.set_span_in_context(span)
            for attempt in attempts:
                child = self._tracer.start_span(
                    f"attempt {attempt.channel}",
                    kind=client,
                    context=context,
                    start_time=self._wall_ns(attempt.started, loop_now, wall_now),
                    attributes={
                        "gen_ai.operation.name": "chat",
                        "gen_ai.request.model": attempt.model,
                        "server.address": attempt.host,
                        "ccx.channel": attempt.channel,
                        **({"http.response.status_code": attempt.status} if attempt.status else {}),
                        **(
                            {"error.type": str(attempt.status) if attempt.status else "transport_error"}
                            if attempt.error
                            else {}
                        ),
                    },
                )
                if attempt.error:
                    child.set_status(status_cls(error_code, attempt.error))
                child.end(end_time=self._wall_ns(attempt.ended, loop_now, wall_now))
        span.end(end_time=end_ns)


def setup(app: web.Application, gateway: Gateway, exporter: Any = None) -> Tracer | None:
    """Install tracing on ``gateway.team`` when wanted (or when an exporter is given: tests);
    the spans still queued are sent at shutdown."""
    if exporter is None and not wanted():
        return None
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

        if exporter is None:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError:
        log.warning(
            "OTEL_EXPORTER_OTLP_ENDPOINT is set but OpenTelemetry is not installed: "
            "pip install 'ccx-proxy[otel]' (tracing stays off)"
        )
        return None
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME") or "ccx-proxy"})
    provider = TracerProvider(resource=resource)
    if exporter is None:
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        endpoint = next(os.environ[n] for n in ENDPOINT_VARIABLES if os.environ.get(n))
        log.info("tracing: spans go to %s over OTLP/HTTP", endpoint)
    else:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = Tracer(provider)
    gateway.team.tracer = tracer

    async def flush(app: web.Application) -> None:
        await asyncio.to_thread(provider.shutdown)

    if not app.frozen:  # (a test may install it on a running app, and flush itself)
        app.on_cleanup.append(flush)
    return tracer
