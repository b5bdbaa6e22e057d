"""The pub/sub side of the Redis connection: one subscriber connection per process.

Health events and configuration versions arrive here (:meth:`Subscriber.run`).  The
connection reconnects by itself with a growing back-off (0.1 s to 5 s); after every
(re)subscription it calls ``resync``, so what was published while it was away (or before it
first subscribed) is read from the state Redis keeps.  A handler that raises is logged and
the others go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from types import ModuleType

log = logging.getLogger("ccx_proxy.shared")

BACKOFF_MIN, BACKOFF_MAX = 0.1, 5.0
CONNECT_TIMEOUT = 1.0
HEALTH_CHECK_S = 5  # a PING on an idle subscription this often: a dead server is noticed


class Subscriber:
    def __init__(self, url: str) -> None:
        self.url = url
        self.handlers: dict[str, Callable[[bytes], None]] = {}  # full channel name -> handler
        self.subscribed = asyncio.Event()  # set while the connection listens

    async def run(self, aioredis: ModuleType, resync: Callable[[], Awaitable[None]]) -> None:
        delay = BACKOFF_MIN
        while True:
            client = aioredis.Redis.from_url(
                self.url, socket_connect_timeout=CONNECT_TIMEOUT, health_check_interval=HEALTH_CHECK_S
            )
            try:
                async with client.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(*self.handlers)
                    await resync()  # what happened before this subscription (or while away)
                    self.subscribed.set()
                    delay = BACKOFF_MIN
                    while True:
                        message = await pubsub.get_message(timeout=1.0)
                        if message is not None and message.get("type") == "message":
                            self._deliver(message["channel"], message["data"])
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("Redis subscription lost: %s", type(exc).__name__)
            finally:
                self.subscribed.clear()
                with contextlib.suppress(Exception):
                    await client.aclose()
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX)

    def _deliver(self, channel: bytes, data: bytes) -> None:
        handler = self.handlers.get(channel.decode())
        if handler is not None:
            try:
                handler(data)
            except Exception:
                log.exception("handling a shared-state message failed")
