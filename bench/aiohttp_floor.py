"""The floor under any aiohttp-server design: an aiohttp handler that reads the request
and answers with the fast upstream's pre-encoded SSE bytes, with no upstream at all.
Measured in the same run as the gateway, it shows how much of the gateway's time is
aiohttp's own server machinery (parsing, request objects, a task per request, response
headers) rather than the relay.

    python bench/aiohttp_floor.py PORT
"""

from __future__ import annotations

import sys

import uvloop
from aiohttp import web
from fast_upstream import SSE_BYTES


async def handle(request: web.Request) -> web.StreamResponse:
    await request.read()
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
    await response.prepare(request)
    await response.write_eof(SSE_BYTES)
    return response


def main() -> None:
    app = web.Application()
    app.router.add_post("/v1/messages", handle)
    web.run_app(
        app,
        host="127.0.0.1",
        port=int(sys.argv[1]),
        access_log=None,
        print=None,
        handler_cancellation=True,
        loop=uvloop.new_event_loop(),
    )


if __name__ == "__main__":
    main()
