import pytest
from hypothesis import given
from hypothesis import strategies as st

from ccx_proxy.mapping import Allowlist, ModelTable, pattern_problem

TABLE = ModelTable(
    {
        "opus": "big",
        "sonnet": "mid",
        "haiku": "small",
        "claude-sonnet-4": "mid-4",
        "sonnet-4-5": "mid-45",
        "claude-3-5-haiku": "tiny",
    }
)


@pytest.mark.parametrize(
    "requested, expected",
    [
        pytest.param("opus", "big", id="exact"),
        pytest.param("claude-opus-4-1-20250805", "big", id="substring"),
        pytest.param("claude-sonnet-4-5-20250929", "mid-4", id="longest-key-wins"),
        pytest.param("claude-3-5-haiku-latest", "tiny", id="longer-than-haiku"),
        pytest.param("Opus", "Opus", id="case-sensitive"),
        pytest.param("gpt-4o", "gpt-4o", id="no-match-unchanged"),
    ],
)
def test_lookup(requested: str, expected: str) -> None:
    assert TABLE.lookup(requested) == expected
    assert TABLE.lookup(requested) == expected  # memoised answer is the same


def test_equal_length_keys_break_ties_lexicographically() -> None:
    table = ModelTable({"bb": "second", "aa": "first"})
    assert table.lookup("xxaabbxx") == "first"
    assert table.lookup("xxbbaaxx") == "first"


def test_exact_match_beats_a_longer_substring_key() -> None:
    table = ModelTable({"m": "exact", "mm-long": "long"})
    assert table.lookup("m") == "exact"


def _brute_force(mapping: dict[str, str], model: str) -> str:
    if model in mapping:
        return mapping[model]
    hits = [k for k in mapping if k in model]
    if not hits:
        return model
    best = min(hits, key=lambda k: (-len(k), k))
    return mapping[best]


_names = st.text(alphabet="abc-", min_size=1, max_size=6)


@given(
    mapping=st.dictionaries(_names, _names, max_size=8),
    models=st.lists(st.text(alphabet="abc-", max_size=10)),
)
def test_compiled_table_agrees_with_brute_force(mapping: dict[str, str], models: list[str]) -> None:
    table = ModelTable(mapping)
    for model in models:
        assert table.lookup(model) == _brute_force(mapping, model)


@pytest.mark.parametrize(
    "patterns, admitted, refused",
    [
        pytest.param([], ["anything"], [], id="empty-admits-all"),
        pytest.param(["claude-opus-4"], ["claude-opus-4"], ["claude-opus-4-1"], id="exact"),
        pytest.param(["claude-*"], ["claude-x"], ["xclaude-"], id="prefix"),
        pytest.param(["*-haiku"], ["claude-haiku"], ["haiku-x"], id="suffix"),
        pytest.param(["*sonnet*"], ["a-sonnet-b", "sonnet"], ["sonet"], id="contains"),
        pytest.param(["*"], ["x"], [], id="star"),
        pytest.param(["*", "!*haiku*"], ["opus"], ["claude-haiku"], id="exclusion-wins"),
        pytest.param(
            ["claude-*", "!claude-2*"], ["claude-3"], ["claude-2.1", "gpt"], id="prefix-minus-prefix"
        ),
        pytest.param(["!gpt-*"], ["claude"], ["gpt-4"], id="only-exclusions"),
    ],
)
def test_allowlist(patterns: list[str], admitted: list[str], refused: list[str]) -> None:
    allow = Allowlist(patterns)
    for model in admitted:
        assert allow.admits(model), model
    for model in refused:
        assert not allow.admits(model), model


def test_allowlist_exact_names_skip_wildcards_and_exclusions() -> None:
    assert Allowlist(["a", "b*", "!c", "d"]).exact_names() == ("a", "d")


@pytest.mark.parametrize("pattern", ["", "!", "a*b", "*a*b*"])
def test_bad_patterns(pattern: str) -> None:
    assert pattern_problem(pattern)


@pytest.mark.parametrize("pattern", ["a", "*", "**", "a*", "*a", "*a*", "!a*"])
def test_good_patterns(pattern: str) -> None:
    assert pattern_problem(pattern) is None
