"""The prices table: parsing, lookup order, cost to the cent."""

from __future__ import annotations

import pytest

from ccx_proxy.config import ConfigError
from ccx_proxy.team.meter import Usage
from ccx_proxy.team.prices import Price, PriceTable, parse_prices
from tests.conftest import channel, make_config

SONNET = {"input": 3, "output": 15, "cacheWrite5m": 3.75, "cacheWrite1h": 6, "cacheRead": 0.3}


def test_cost_of_every_kind_of_token() -> None:
    usage = Usage(
        input_tokens=1_000_000,
        output_tokens=200_000,
        cache_write_5m=100_000,
        cache_write_1h=50_000,
        cache_read=2_000_000,
    )
    # 3 + 15*0.2 + 3.75*0.1 + 6*0.05 + 0.3*2 = 3 + 3 + 0.375 + 0.3 + 0.6
    assert Price(**SONNET).cost(usage) == pytest.approx(7.275)


def test_missing_cache_prices_charge_the_input_price() -> None:
    usage = Usage(cache_write_5m=1_000_000, cache_read=1_000_000)
    assert Price(input=2, output=8).cost(usage) == pytest.approx(4.0)


def test_exact_beats_patterns_and_longer_patterns_win() -> None:
    problems: list[str] = []
    table = parse_prices(
        {
            "claude-*": {"input": 1, "output": 1},
            "claude-sonnet-*": {"input": 3, "output": 15},
            "claude-sonnet-4-5": {"input": 9, "output": 9},
            "*-flash": {"input": 0.1, "output": 0.4},
        },
        "prices",
        problems,
    )
    assert problems == []
    assert table.lookup("claude-sonnet-4-5").input == 9  # type: ignore[union-attr]
    assert table.lookup("claude-sonnet-4-6").input == 3  # type: ignore[union-attr]
    assert table.lookup("claude-haiku-4-5").input == 1  # type: ignore[union-attr]
    assert table.lookup("deepseek-flash").input == 0.1  # type: ignore[union-attr]
    assert table.lookup("gpt-5") is None
    assert not PriceTable() and table


@pytest.mark.parametrize(
    "raw, problem",
    [
        ({"m": {"input": 1}}, "prices.m.output: required (USD per million tokens)"),
        ({"m": {"input": -1, "output": 1}}, "prices.m.input: must be a non-negative number (got -1)"),
        ({"m": {"input": True, "output": 1}}, "prices.m.input: must be a non-negative number (got True)"),
        (
            {"m": {"input": 1, "output": 1, "cacheWrite": 2}},
            "prices.m: unknown field 'cacheWrite' "
            "(known: input, output, cacheWrite5m, cacheWrite1h, cacheRead)",
        ),
        (
            {"a*b": {"input": 1, "output": 1}},
            "prices.a*b: 'a*b': '*' may only stand at the start and/or the end",
        ),
        ({"!m": {"input": 1, "output": 1}}, "prices.!m: exclusions have no price"),
        ({"m": 3}, "prices.m: must be an object with input and output (USD per million tokens)"),
    ],
)
def test_bad_prices_are_config_problems(raw: dict[str, object], problem: str) -> None:
    problems: list[str] = []
    parse_prices(raw, "prices", problems)
    assert problems == [problem]


def test_prices_in_channels_json_top_level_and_per_channel() -> None:
    config = make_config(
        channel("a", "https://a.example", prices={"deepseek-*": {"input": 0.5, "output": 2}}),
        prices={"claude-*": SONNET},
    )
    assert config.prices.lookup("claude-sonnet-4-5").output == 15  # type: ignore[union-attr]
    assert config.channels[0].prices.lookup("deepseek-v4-pro").input == 0.5  # type: ignore[union-attr]
    with pytest.raises(ConfigError) as caught:
        make_config(channel("a", "https://a.example"), prices={"m": {"input": "3", "output": 1}})
    assert caught.value.problems == ["prices.m.input: must be a non-negative number (got '3')"]
