"""Operating the gateway: what an operator sees and how the process lives.

::

    requestid  x-ccx-request-id on every response, in the access log and the usage record
    accesslog  one line per request (LOG_FORMAT=text|json, ACCESS_LOG=off)
    tracing    OpenTelemetry spans (GenAI conventions) over OTLP/HTTP, when configured
    metrics    Prometheus /metrics and the console's Overview numbers
    systemd    Type=notify: READY, RELOADING, STOPPING, WATCHDOG
    drain      SIGTERM: stop accepting, finish streams (DRAIN_TIMEOUT_S), /ready
    doctor     ``ccx-proxy doctor``: environment, config, channels, client settings

:func:`setup` wires the parts that need the application into it.
"""

from __future__ import annotations

from aiohttp import web

from ..state import Gateway


def setup(app: web.Application, gateway: Gateway) -> None:
    """Install the operational parts that hook into the app (one line each)."""
    from . import accesslog, drain, metrics, tracing

    accesslog.setup(app, gateway)
    tracing.setup(app, gateway)
    metrics.setup(app, gateway)
    drain.setup(app, gateway)
