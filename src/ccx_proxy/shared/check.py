"""``ccx-proxy doctor``'s Redis check: reachable, fast enough, protected, a version we support."""

from __future__ import annotations

import asyncio
import time
from typing import Literal
from urllib.parse import urlsplit

from ..settings import RedisSettings
from .client import PING_TIMEOUT, masked_url

MIN_VERSION = (6, 2)  # Lua with TIME before writes, ZADD XX, GETEX-era commands


async def check(settings: RedisSettings) -> tuple[Literal["OK", "WARN", "FAIL"], str, str]:
    """(level, message, fix) for the doctor's report."""
    try:
        import redis.asyncio as aioredis
    except ImportError:
        return "FAIL", "REDIS_URL is set but the redis extra is missing", "pip install 'ccx-proxy[redis]'"
    where = masked_url(settings.url)
    client = aioredis.Redis.from_url(settings.url, socket_connect_timeout=PING_TIMEOUT)
    try:
        async with asyncio.timeout(PING_TIMEOUT * 2):
            started = time.perf_counter()
            await client.ping()
            rtt = time.perf_counter() - started
            info = await client.info("server")
    except Exception as exc:
        return (
            "FAIL",
            f"{where} does not answer ({type(exc).__name__}: {exc})",
            "start Redis or fix REDIS_URL; meanwhile the gateway runs on local state (REDIS_FAILURE=open)",
        )
    finally:
        await client.aclose()
    version = str(info.get("redis_version", "0"))
    parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    if parts < MIN_VERSION:
        return "FAIL", f"{where} is Redis {version}", "ccx-proxy needs Redis 6.2 or newer"
    if rtt > settings.timeout / 2:
        return (
            "WARN",
            f"{where} answers a PING in {rtt * 1000:.1f} ms, over half of REDIS_TIMEOUT_MS "
            f"({settings.timeout * 1000:g} ms)",
            "put Redis closer (same network) or raise REDIS_TIMEOUT_MS",
        )
    if urlsplit(settings.url).password is None and settings.url.startswith("redis://"):
        return (
            "WARN",
            f"{where} (Redis {version}, {rtt * 1000:.1f} ms) is used without a password",
            "the channels document (apiKeys) is stored there: set requirepass or an ACL user, "
            "and put the password in REDIS_URL",
        )
    return "OK", f"{where} (Redis {version}) answers in {rtt * 1000:.1f} ms", ""
