from typing import Any

import pytest

from ccx_proxy import routing
from ccx_proxy.config import parse_config
from ccx_proxy.errors import ModelNotFound
from ccx_proxy.routing import Router


def _router(*channels: dict[str, Any]) -> Router:
    listed = [{"baseUrl": "http://127.0.0.1:1", "apiKeys": ["k"], **c} for c in channels]
    return Router(parse_config({"channels": listed}, {}))


def test_hits_are_remembered_and_misses_are_not() -> None:
    router = _router({"name": "a", "supportedModels": ["claude-*"]})
    hit = router.candidates("claude-opus")
    assert [c.channel.name for c in hit] == ["a"]
    assert router.candidates("claude-opus") is hit  # from the memo
    for i in range(100):
        assert router.candidates(f"gpt-{i}") == ()
    assert list(router._memo) == ["claude-opus"]
    assert router._memo_bytes == len("claude-opus")
    with pytest.raises(ModelNotFound):
        router.route("gpt-0")
    with pytest.raises(ModelNotFound):
        router.route("gpt-0")  # a miss is looked up again, and misses again


def test_large_distinct_names_pin_no_memory() -> None:
    # The case: distinct multi-megabyte names (here 100 x 64 KB), all misses.
    router = _router({"name": "a", "supportedModels": ["claude-*"]})
    for i in range(100):
        assert router.candidates(f"{i}-" + "x" * 65536) == ()
    assert router._memo == {} and router._memo_bytes == 0
    # A channel that serves every name: hits, but too long to remember.
    catch_all = _router({"name": "any"})
    for i in range(100):
        assert len(catch_all.candidates(f"{i}-" + "x" * 65536)) == 1
    assert catch_all._memo == {} and catch_all._memo_bytes == 0


@pytest.mark.parametrize(
    "name, remembered",
    [
        pytest.param("m" * 256, True, id="256-ascii"),
        pytest.param("m" * 257, False, id="257-ascii"),
        pytest.param("\u00e9" * 128, True, id="256-bytes-utf8"),
        pytest.param("\u00e9" * 129, False, id="258-bytes-utf8"),
    ],
)
def test_only_names_up_to_256_bytes_are_remembered(name: str, remembered: bool) -> None:
    router = _router({"name": "any"})
    assert len(router.candidates(name)) == 1
    assert (name in router._memo) is remembered


def test_memo_is_bounded_in_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(routing, "_MEMO_BYTES", 1000)
    router = _router({"name": "any"})
    for i in range(200):
        name = f"{i:03d}" + "y" * 97  # 100 bytes each
        assert len(router.candidates(name)) == 1
        assert router._memo_bytes == sum(len(k.encode()) for k in router._memo) <= 1000
        assert name in router._memo
    assert len(router._memo) == 10


def test_memo_is_bounded_in_entries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(routing, "_MEMO_LIMIT", 8)
    router = _router({"name": "any"})
    for i in range(50):
        router.candidates(f"m{i}")
        assert 1 <= len(router._memo) <= 8
        assert router._memo_bytes == sum(len(k) for k in router._memo)


def test_memo_answers_match_fresh_lookups() -> None:
    router = _router(
        {"name": "b", "priority": 2, "modelMapping": {"opus": "big"}},
        {"name": "a", "priority": 1, "supportedModels": ["claude-*"]},
    )
    for _ in range(2):  # computed, then from the memo
        assert [(c.channel.name, c.model) for c in router.candidates("claude-opus-4")] == [
            ("a", "claude-opus-4"),
            ("b", "big"),
        ]
        assert [(c.channel.name, c.model) for c in router.candidates("gpt")] == [("b", "gpt")]
