"""``ccx-proxy doctor`` on REDIS_URL: what it says of a good, an open and a missing Redis."""

from __future__ import annotations

import argparse
import io

import redis

from ccx_proxy.ops import doctor
from ccx_proxy.settings import RedisSettings
from ccx_proxy.shared.check import check
from tests.redis_server import RedisServer, free_port


async def test_a_redis_without_password_is_a_warning(redis_server: RedisServer) -> None:
    level, message, fix = await check(RedisSettings(redis_server.url))
    assert level == "WARN" and "without a password" in message and "requirepass" in fix


async def test_a_protected_redis_is_ok_and_the_password_is_never_shown(own_redis: RedisServer) -> None:
    redis.Redis.from_url(own_redis.url).config_set("requirepass", "s3cret-redis-pass")
    url = f"redis://:s3cret-redis-pass@127.0.0.1:{own_redis.port}/0"
    level, message, fix = await check(RedisSettings(url))
    assert level == "OK", message
    assert "answers in" in message and "s3cret" not in message + fix and ":***@" in message
    level, message, _ = await check(RedisSettings(f"redis://:wrong-pass@127.0.0.1:{own_redis.port}/0"))
    assert level == "FAIL" and "wrong-pass" not in message


async def test_an_unreachable_redis_fails_with_what_to_do() -> None:
    level, message, fix = await check(RedisSettings(f"redis://127.0.0.1:{free_port()}/0"))
    assert level == "FAIL" and "does not answer" in message and "REDIS_FAILURE=open" in fix


def test_doctor_reports_the_redis_line(redis_server: RedisServer, tmp_path: object) -> None:
    out = io.StringIO()
    args = argparse.Namespace(
        config=str(tmp_path / "none.json"), data_dir=str(tmp_path), port=None, timeout=2.0
    )  # type: ignore[operator]
    env = {"PROXY_ACCESS_KEY": "a-strong-key-for-the-doctor-0123456789", "REDIS_URL": redis_server.url}
    doctor.main(args, env, out)
    line = next(x for x in out.getvalue().splitlines() if "127.0.0.1:" + str(redis_server.port) in x)
    assert line.startswith("WARN") and "without a password" in line


def test_serve_says_which_extra_redis_url_needs(monkeypatch: object) -> None:
    import importlib.util

    from ccx_proxy import cli

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "hiredis" else real(name, *a)
    )  # type: ignore[attr-defined]
    monkeypatch.setenv("PROXY_ACCESS_KEY", "a-strong-key-for-serve-0123456789")  # type: ignore[attr-defined]
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")  # type: ignore[attr-defined]
    err = io.StringIO()
    monkeypatch.setattr("sys.stderr", err)  # type: ignore[attr-defined]
    assert cli.main(["serve", "--config", "/nonexistent.json"]) == 2
    assert "REDIS_URL needs the redis extra: pip install 'ccx-proxy[redis]'" in err.getvalue()
