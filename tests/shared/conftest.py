from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest

from tests.redis_server import RedisServer


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    yield server
    server.close()


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A server of the test's own, to stop and start."""
    server = RedisServer()
    server.start()
    yield server
    server.close()


@pytest.fixture
def prefix() -> str:
    """Keys of one test only."""
    return f"t{secrets.token_hex(4)}:"
