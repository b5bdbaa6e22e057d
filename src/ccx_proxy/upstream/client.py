"""The gateway's one HTTP/1.1 client for upstreams, on raw asyncio and llhttp.

Why not ``aiohttp.ClientSession``: on the bench its per-request machinery cost
about as much CPU as everything else the gateway does.  This client does only what
a relay needs: keep-alive connections pooled per origin (:mod:`.pool`), one request
head (:mod:`.wire`, prebuilt at load) written with the body, the response parsed by
llhttp (:mod:`.response`), body bytes handed over as they arrive.  No headers of its
own beyond ``Host`` and ``Content-Length``; bytes exactly as sent.
"""

from __future__ import annotations

import asyncio
import ssl

from .connection import Connection
from .errors import NothingReceived
from .pool import KEEPALIVE_TIMEOUT, NEVER, Pool
from .response import Response
from .wire import Endpoint

__all__ = ["KEEPALIVE_TIMEOUT", "UpstreamClient"]


class UpstreamClient:
    def __init__(
        self, keepalive_timeout: float = KEEPALIVE_TIMEOUT, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        self.pool = Pool(keepalive_timeout, ssl_context)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The loop this client runs on, bound at first use: asyncio.get_running_loop()
        costs a getpid() system call on every call (its fork check), so the hot path asks
        once."""
        return self.pool.loop

    @property
    def closed(self) -> bool:
        return self.pool.closed

    async def request(
        self,
        endpoint: Endpoint,
        body: bytes,
        header_block: bytes,
        *,
        query: bytes = b"",
        connect_timeout: float,
        read_timeout: float,
        deadline: float = NEVER,
    ) -> Response:
        """POST ``body`` to ``endpoint`` with the given header lines (CRLF-terminated, no Host
        or Content-Length); returns once the response head is in.

        Timeouts are seconds (0: none); ``deadline`` (loop time) bounds the whole wait for
        the head, connecting included.  Raises the :mod:`.errors` tree; on any failure the
        connection is aborted."""
        if self.pool.closed:
            raise RuntimeError("the upstream client is closed")
        head = endpoint.head(query, header_block, len(body))
        loop = self.pool.loop
        origin = endpoint.origin
        conn = self.pool.take(origin, loop.time())
        if conn is not None:
            try:
                return await self._exchange(conn, head, body, loop, read_timeout, deadline)
            except NothingReceived:
                pass  # the pooled connection had gone stale: once more, on a fresh one
        left = max(0.0, deadline - loop.time())
        conn = await self.pool.connect(origin, min(connect_timeout if connect_timeout > 0 else NEVER, left))
        return await self._exchange(conn, head, body, loop, read_timeout, deadline)

    @staticmethod
    async def _exchange(
        conn: Connection,
        head: bytes,
        body: bytes,
        loop: asyncio.AbstractEventLoop,
        read_timeout: float,
        deadline: float,
    ) -> Response:
        response = Response(conn, loop, read_timeout, deadline)
        try:
            conn.send(head, body, response)
            await response.wait_head()
        except BaseException:
            response.close()
            raise
        return response

    def counts(self) -> tuple[int, int]:
        """(open connections, idle ones in the pool)."""
        return self.pool.counts()

    def close(self) -> None:
        self.pool.close()
