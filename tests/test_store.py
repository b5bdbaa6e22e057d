"""The channels file store: canonical output, atomic replacement under SIGKILL."""

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import orjson
import pytest

from ccx_proxy.config import ConfigError
from ccx_proxy.store import ChannelStore, atomic_write, canonical


def test_canonical_orders_fields_and_keeps_unknown_ones() -> None:
    doc = {
        "keepaliveMs": 0,
        "channels": [
            {"status": "active", "zzz": 1, "apiKeys": ["${K}"], "name": "a", "baseUrl": "https://a"}
        ],
    }
    out = canonical(doc)
    assert out.endswith(b"\n")
    parsed = orjson.loads(out)
    assert list(parsed) == ["channels", "keepaliveMs"]
    assert list(parsed["channels"][0]) == ["name", "baseUrl", "apiKeys", "status", "zzz"]
    assert canonical(parsed) == out  # stable


async def test_invalid_edit_leaves_the_file_untouched(tmp_path: Path) -> None:
    path = tmp_path / "channels.json"
    path.write_text(json.dumps({"channels": [{"name": "a", "baseUrl": "https://a", "apiKeys": ["k"]}]}))
    before = path.read_bytes()
    store = ChannelStore(path, env={})
    with pytest.raises(ConfigError):
        await store.update(lambda doc: doc["channels"][0].update(baseUrl="nope"), None)
    assert path.read_bytes() == before
    assert not (tmp_path / "backups").exists()
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".tmp"]  # no temp file left


_WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from ccx_proxy.store import atomic_write
    path = Path(sys.argv[1])
    versions = [Path(sys.argv[2]).read_bytes(), Path(sys.argv[3]).read_bytes()]
    print("ready", flush=True)
    i = 0
    while True:
        atomic_write(path, versions[i % 2])
        i += 1
    """
)


def test_a_writer_killed_at_any_moment_leaves_the_old_or_the_new_file(tmp_path: Path) -> None:
    # Two large, different valid documents: a torn write would show up as neither.
    versions = []
    for tag in ("old", "new"):
        channels = [
            {"name": f"{tag}-{i}", "baseUrl": "https://x", "apiKeys": ["k" * 200]} for i in range(3000)
        ]
        data = canonical({"channels": channels})
        (tmp_path / f"{tag}.json").write_bytes(data)
        versions.append(data)
    target = tmp_path / "channels.json"
    atomic_write(target, versions[0])
    rng = random.Random(7)
    kills = 25
    for _ in range(kills):
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                _WRITER,
                str(target),
                str(tmp_path / "old.json"),
                str(tmp_path / "new.json"),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.05))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        proc.stdout.close()
        assert proc.returncode == -signal.SIGKILL
        assert target.read_bytes() in versions
        orjson.loads(target.read_bytes())
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".channels.json.")]
    # Kills landed mid-write (each left its temp file behind), yet the real file was never torn.
    assert 1 <= len(leftovers) <= kills
    assert os.stat(target).st_size in (len(versions[0]), len(versions[1]))


async def test_backups_are_no_more_readable_than_the_file(tmp_path: Path) -> None:
    path = tmp_path / "channels.json"
    path.write_text(
        json.dumps({"channels": [{"name": "a", "baseUrl": "https://a", "apiKeys": ["sk-secret"]}]})
    )
    path.chmod(0o600)
    store = ChannelStore(path, env={})
    await store.update(lambda doc: doc["channels"][0].update(status="disabled"), None)
    (backup,) = (tmp_path / "backups").iterdir()
    assert backup.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "backups").stat().st_mode & 0o777 == 0o700
    assert path.stat().st_mode & 0o777 == 0o600


async def test_if_match_lists_and_stale_temp_files(tmp_path: Path) -> None:
    path = tmp_path / "channels.json"
    path.write_text(json.dumps({"channels": [{"name": "a", "baseUrl": "https://a", "apiKeys": ["k"]}]}))
    old_tmp = tmp_path / ".channels.json.abc123.tmp"  # what a writer killed long ago left
    old_tmp.write_text("{half")
    os.utime(old_tmp, (time.time() - 3600, time.time() - 3600))
    fresh_tmp = tmp_path / ".channels.json.def456.tmp"  # another process, mid-write right now
    fresh_tmp.write_text("{half")
    store = ChannelStore(path, env={}, backups=0)
    _, version = store.read()
    await store.update(lambda doc: doc["channels"][0].update(priority=3), ("nope", version))
    assert not old_tmp.exists() and fresh_tmp.exists()
    from ccx_proxy.errors import Conflict

    with pytest.raises(Conflict):
        await store.update(lambda doc: None, ("nope", version))  # the version moved on
