"""``ccx-proxy members ...`` and ``ccx-proxy usage``, run in-process on a tmp data dir."""

from __future__ import annotations

import re
import sqlite3
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from ccx_proxy import cli
from ccx_proxy.team import members
from ccx_proxy.team.db import FILENAME, connect
from ccx_proxy.team.recorder import Record, write_batch

KEY_LINE = re.compile(r"^ccx-[A-Za-z0-9_-]{43}$")


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def run(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> Any:
    """``ccx-proxy ARGS --data-dir <tmp>``: (exit code, stdout, stderr)."""

    def run(*args: str) -> tuple[int, str, str]:
        code = cli.main([*args, "--data-dir", str(data_dir)])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def _member(data_dir: Path, name: str) -> members.Member:
    conn = connect(data_dir / FILENAME, create=False)
    try:
        return members.get(conn, name)
    finally:
        conn.close()


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ccx-proxy: "), err
    assert "Traceback" not in err
    return lines[0]


# -- members --------------------------------------------------------------------------------


def test_add_prints_the_key_once(run: Any, data_dir: Path) -> None:
    code, out, err = run(
        "members",
        "add",
        "alice",
        "--rpm",
        "60",
        "--max-concurrent",
        "2",
        "--daily-tokens",
        "100000",
        "--monthly-tokens",
        "2000000",
        "--daily-usd",
        "5",
        "--monthly-usd",
        "50.5",
        "--models",
        "claude-sonnet-*, *haiku*",
        "--channels",
        "up,spare",
    )
    assert code == 0 and err == ""
    lines = out.splitlines()
    key = lines[-1]
    assert KEY_LINE.match(key)
    assert "store it now: it is not shown again" in lines[-2]
    assert out.count(key) == 1
    member = _member(data_dir, "alice")
    assert member.limits == members.Limits(60, 2, 100000, 2000000, 5.0, 50.5)
    assert member.models == ("claude-sonnet-*", "*haiku*") and member.channels == ("up", "spare")
    assert member.key_prefix == key[:8] + "…"
    stored = b"".join(p.read_bytes() for p in data_dir.iterdir())
    assert key.encode() not in stored and members.key_hash(key).encode() in stored

    # Never again: list, show, JSON.
    for args in (("members", "list"), ("members", "list", "--json"), ("members", "show", "alice")):
        code, out, _ = run(*args)
        assert code == 0 and key not in out and key[:8] in out


def test_add_creates_the_data_dir(run: Any, data_dir: Path) -> None:
    assert not data_dir.exists()
    code, _, _ = run("members", "add", "bob")
    assert code == 0 and (data_dir / FILENAME).exists()


def test_list(run: Any) -> None:
    code, out, _ = run("members", "list")
    assert code == 1  # no database yet: the data dir is probably wrong
    run("members", "add", "bob", "--rpm", "5")
    run("members", "add", "alice", "--models", "claude-*")
    code, out, _ = run("members", "list")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["NAME", "STATUS", "KEY"]
    assert [line.split()[0] for line in lines[1:]] == ["alice", "bob"]
    assert "rpm 5" in lines[2] and "claude-*" in lines[1]
    code, out, _ = run("members", "list", "--json")
    views = orjson.loads(out)["members"]
    assert [v["name"] for v in views] == ["alice", "bob"]
    assert views[1]["limits"] == {"rpm": 5} and views[0]["today"] == {"tokens": 0, "usd": 0.0}
    assert all("key" not in v for v in views)


def test_list_empty(run: Any) -> None:
    run("members", "add", "alice")
    run("members", "delete", "alice")
    code, out, _ = run("members", "list")
    assert code == 0 and "no members" in out
    code, out, _ = run("members", "list", "--json")
    assert orjson.loads(out) == {"members": []}


def test_show(run: Any, data_dir: Path) -> None:
    run("members", "add", "alice", "--daily-usd", "2.5")
    _write_usage(data_dir, [("alice", "up", "m1", 100, 20, 0.5)])
    code, out, _ = run("members", "show", "alice")
    assert code == 0
    assert "daily-usd $2.50" in out and "120 tokens, $0.5000" in out
    assert re.search(r"last used:\s+\d{4}-", out)


def test_set_merges_and_clears(run: Any, data_dir: Path) -> None:
    run("members", "add", "alice", "--rpm", "5", "--daily-tokens", "1000", "--models", "claude-*")
    code, out, err = run("members", "set", "alice", "--max-concurrent", "3", "--channels", "up")
    assert code == 0 and err == ""
    member = _member(data_dir, "alice")
    assert member.limits == members.Limits(rpm=5, maxConcurrent=3, dailyTokens=1000)
    assert member.models == ("claude-*",) and member.channels == ("up",)
    code, _, _ = run("members", "set", "alice", "--clear", "rpm", "dailyTokens", "--daily-usd", "1.5")
    assert code == 0
    member = _member(data_dir, "alice")
    assert member.limits == members.Limits(maxConcurrent=3, dailyUsd=1.5)
    code, _, _ = run("members", "set", "alice", "--clear", "models", "channels", "max-concurrent")
    assert code == 0
    member = _member(data_dir, "alice")
    assert member.models == () and member.channels == () and member.limits == members.Limits(dailyUsd=1.5)
    code, _, _ = run("members", "set", "alice", "--models", "")
    assert code == 0 and _member(data_dir, "alice").models == ()


@pytest.mark.parametrize(
    "args, code, words",
    [
        pytest.param((), 2, "nothing to change", id="nothing"),
        pytest.param(("--rpm", "5", "--clear", "rpm"), 2, "contradict", id="contradiction"),
        pytest.param(("--rpm", "-5"), 1, "limits.rpm", id="negative"),
        pytest.param(("--models", "a**b"), 1, "models", id="bad-pattern"),
    ],
)
def test_set_rejects(run: Any, data_dir: Path, args: tuple[str, ...], code: int, words: str) -> None:
    run("members", "add", "alice", "--rpm", "7")
    got, out, err = run("members", "set", "alice", *args)
    assert got == code and out == ""
    assert words in _one_error_line(err)
    assert _member(data_dir, "alice").limits == members.Limits(rpm=7)


def test_rotate(run: Any, data_dir: Path) -> None:
    code, out, _ = run("members", "add", "alice")
    old = out.splitlines()[-1]
    code, out, err = run("members", "rotate", "alice")
    assert code == 0 and err == ""
    new = out.splitlines()[-1]
    assert KEY_LINE.match(new) and new != old
    assert "store it now: it is not shown again" in out
    conn = connect(data_dir / FILENAME)
    try:
        index = members.MemberIndex(*members.load_all(conn))
    finally:
        conn.close()
    assert index.lookup(old) is None
    found = index.lookup(new)
    assert found is not None and found.name == "alice"


def test_revoke_activate_delete(run: Any, data_dir: Path) -> None:
    run("members", "add", "alice")
    code, out, _ = run("members", "revoke", "alice")
    assert code == 0 and "revoked" in out and _member(data_dir, "alice").status == "revoked"
    code, out, _ = run("members", "activate", "alice")
    assert code == 0 and "active" in out and _member(data_dir, "alice").status == "active"
    code, out, _ = run("members", "delete", "alice")
    assert code == 0 and "deleted" in out
    with pytest.raises(members.MemberError):
        _member(data_dir, "alice")


@pytest.mark.parametrize(
    "args, words",
    [
        pytest.param(("members", "show", "nobody"), "no member named 'nobody'", id="show"),
        pytest.param(("members", "set", "nobody", "--rpm", "1"), "no member", id="set"),
        pytest.param(("members", "rotate", "nobody"), "no member", id="rotate"),
        pytest.param(("members", "revoke", "nobody"), "no member", id="revoke"),
        pytest.param(("members", "activate", "nobody"), "no member", id="activate"),
        pytest.param(("members", "delete", "nobody"), "no member", id="delete"),
        pytest.param(("members", "add", "alice"), "exists already", id="taken"),
        pytest.param(("members", "add", "shared"), "reserved", id="reserved"),
        pytest.param(("members", "add", "bad name"), "name:", id="bad-name"),
        pytest.param(("members", "add", "x", "--daily-usd", "-1"), "limits.dailyUsd", id="negative-usd"),
        pytest.param(("members", "add", "x", "--models", "a**b"), "models", id="bad-pattern"),
    ],
)
def test_errors_are_one_line_exit_1(run: Any, args: tuple[str, ...], words: str) -> None:
    run("members", "add", "alice")
    code, out, err = run(*args)
    assert code == 1 and out == ""
    assert words in _one_error_line(err)


def test_no_database_is_exit_1(run: Any, data_dir: Path) -> None:
    for args in (("members", "show", "x"), ("members", "list"), ("usage",)):
        code, _, err = run(*args)
        assert code == 1
        assert "DATA_DIR" in _one_error_line(err)
    assert not data_dir.exists()


def test_data_dir_in_the_way_is_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert cli.main(["members", "add", "alice", "--data-dir", str(blocker)]) == 1
    assert "cannot create the data directory" in _one_error_line(capsys.readouterr().err)


def test_data_dir_from_the_environment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "env-data"))
    assert cli.main(["members", "add", "alice"]) == 0
    assert (tmp_path / "env-data" / FILENAME).exists()
    capsys.readouterr()
    assert cli.main(["members", "list"]) == 0
    assert "alice" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(("members",), id="no-action"),
        pytest.param(("members", "bogus"), id="unknown-action"),
        pytest.param(("members", "add"), id="no-name"),
        pytest.param(("members", "add", "x", "--rpm", "ten"), id="rpm-not-a-number"),
        pytest.param(("members", "add", "x", "--daily-usd", "five"), id="usd-not-a-number"),
        pytest.param(("members", "add", "x", "--daily-usd", "inf"), id="usd-infinite"),
        pytest.param(("members", "add", "x", "--rpm", str(2**64)), id="rpm-beyond-64-bits"),
        pytest.param(("members", "set", "x", "--clear", "burst"), id="unknown-clear"),
        pytest.param(("usage", "--since", "7d", "--from", "2024-01-01"), id="since-and-from"),
    ],
)
def test_usage_errors_exit_2(args: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(list(args))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error:" in err.splitlines()[-1]


def test_every_option_states_its_default() -> None:
    parser = cli._parser()
    for name in ("members", "usage"):
        sub = parser._subparsers._group_actions[0].choices[name]  # type: ignore[union-attr]
        parsers = [sub]
        if name == "members":
            parsers = list(sub._subparsers._group_actions[0].choices.values())  # type: ignore[union-attr]
        for p in parsers:
            for action in p._actions:
                if action.option_strings and action.dest != "help":
                    assert "default" in (action.help or ""), (p.prog, action.dest)
                    assert "\n" not in (action.help or "")
            data_dir = next(a for a in p._actions if a.dest == "data_dir")
            assert "env DATA_DIR" in (data_dir.help or "")


# -- usage ----------------------------------------------------------------------------------


def _write_usage(data_dir: Path, rows: list[tuple[str, str, str, int, int, float | None]]) -> None:
    """(member, channel, upstream model, input, output, cost) per request, as the gateway
    records them."""
    now = time.time()
    records = [
        Record(
            ts=now,
            request_id=f"r{i}",
            member=member,
            session=None,
            endpoint="messages",
            channel=channel,
            key_id=None,
            model="claude-sonnet-4-5",
            upstream_model=model,
            stream=1,
            status=200,
            error_type=None,
            outcome="complete",
            attempts=1,
            ttfb_ms=5.0,
            duration_ms=10.0,
            input_tokens=tokens_in,
            output_tokens=tokens_out,
            cost_usd=cost,
        )
        for i, (member, channel, model, tokens_in, tokens_out, cost) in enumerate(rows)
    ]
    conn = connect(data_dir / FILENAME)
    try:
        write_batch(conn, records)
    finally:
        conn.close()


TRAFFIC = [
    ("alice", "up", "m1", 100, 20, 0.25),
    ("alice", "up", "m1", 100, 20, 0.25),
    ("alice", "spare", "m2", 10, 2, None),
    ("bob", "up", "m1", 1000, 200, 2.5),
]


def test_usage_table_with_totals(run: Any, data_dir: Path) -> None:
    _write_usage(data_dir, TRAFFIC)
    code, out, err = run("usage")
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].startswith("usage from ") and "by member" in lines[0]
    assert lines[1].split()[:3] == ["MEMBER", "REQUESTS", "ERRORS"]
    alice, bob, total = lines[2].split(), lines[3].split(), lines[4].split()
    assert alice[:5] == ["alice", "3", "0", "210", "42"] and "$0.5000" in lines[2]
    assert "(+1 unpriced)" in lines[2]
    assert bob[:5] == ["bob", "1", "0", "1,000", "200"] and "$2.50" in lines[3]
    assert total[:5] == ["TOTAL", "4", "0", "1,210", "242"] and "$3.00" in lines[4]


def test_usage_grouped_and_filtered(run: Any, data_dir: Path) -> None:
    _write_usage(data_dir, TRAFFIC)
    code, out, _ = run("usage", "--by", "model,channel", "--member", "alice", "--since", "7d")
    assert code == 0
    rows = [line.split()[:3] for line in out.splitlines()[2:]]
    assert rows == [["m1", "up", "2"], ["m2", "spare", "1"], ["TOTAL", "3", "0"]]
    code, out, _ = run("usage", "--by", "day")
    today = time.strftime("%Y-%m-%d", time.gmtime())
    assert out.splitlines()[2].split()[:2] == [today, "4"]
    code, out, _ = run("usage", "--from", "2000-01-01", "--to", "2000-01-31")
    assert code == 0 and out.strip() == "no usage from 2000-01-01 to 2000-01-31"


def test_usage_csv(run: Any, data_dir: Path) -> None:
    _write_usage(data_dir, TRAFFIC)
    code, out, _ = run("usage", "--csv", "--by", "channel")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == (
        "channel,requests,errors,input_tokens,output_tokens,cache_write_5m,cache_write_1h,"
        "cache_read,cost_usd,unpriced"
    )
    assert lines[1:] == ["spare,1,0,10,2,0,0,0,0.0,1", "up,3,0,1200,240,0,0,0,3.0,0"]


@pytest.mark.parametrize(
    "args, words",
    [
        pytest.param(("--since", "week"), "since", id="bad-since"),
        pytest.param(("--from", "2024-02-30"), "not a date", id="no-such-day"),
        pytest.param(("--from", "2024-03-01", "--to", "2024-02-01"), "after", id="reversed"),
        pytest.param(("--by", "team"), "groupBy", id="bad-group"),
    ],
)
def test_usage_bad_query_exit_2(run: Any, data_dir: Path, args: tuple[str, ...], words: str) -> None:
    _write_usage(data_dir, TRAFFIC)
    code, out, err = run("usage", *args)
    assert code == 2 and out == ""
    assert words in _one_error_line(err)


def test_cli_works_while_another_connection_holds_the_database(run: Any, data_dir: Path) -> None:
    """The gateway keeps its own connection open (WAL): the CLI reads and writes beside it."""
    run("members", "add", "alice")
    gateway_conn = sqlite3.connect(data_dir / FILENAME)
    try:
        gateway_conn.execute("SELECT count(*) FROM members").fetchone()
        code, out, _ = run("members", "add", "bob")
        assert code == 0
        assert gateway_conn.execute("SELECT count(*) FROM members").fetchone()[0] == 2
    finally:
        gateway_conn.close()
