"""State shared by every worker and every gateway host, in Redis (``REDIS_URL``).

Without ``REDIS_URL`` none of this runs and each process keeps its own state, as before.

* :mod:`.client`: the connection (:mod:`.pubsub`: its subscriber) -- one pipeline per loop
  turn, ``REDIS_TIMEOUT_MS`` as the longest wait, the fail policy (``REDIS_FAILURE=open``:
  local state, logged once per transition and counted), reconnect with back-off.
* :mod:`.limits`: member limits (requests per minute, concurrency slots that expire when
  their process dies, daily and monthly budgets) in Lua scripts, one round trip per admission.
* :mod:`.health`: upstream state -- (key, model) cool-downs, keys disabled by 401/402/403,
  529 back-offs, breakers opening and closing, one half-open probe across the fleet.
* :mod:`.affinity`: session affinity, so a session's next request finds its channel on any host.
* :mod:`.live`: every instance's live numbers, merged for the console.
* :mod:`.config`: the channels document, versioned, replicated to every instance.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aiohttp import web

    from ..state import Gateway
    from ..store import ChannelStore


def setup(app: web.Application, gateway: Gateway, store: ChannelStore) -> None:
    """Wire the shared parts into the app when ``REDIS_URL`` is set (one line each); they
    subscribe and register their resync callbacks here, before the connection starts."""
    if gateway.shared is None:
        return
    from . import live  # here: it imports ops.metrics, which the app imports after state

    live.setup(app, gateway)
    from . import config  # here: it imports the admin API

    config.setup(app, gateway, store)
