"""What a request cost: the ``prices`` table of ``channels.json``.

``prices`` maps an **upstream** model pattern (the ``supportedModels`` syntax: ``exact``,
``prefix*``, ``*suffix``, ``*contains*``) to USD per million tokens::

    "prices": {"claude-sonnet-4-5*": {"input": 3, "output": 15, "cacheWrite5m": 3.75,
                                      "cacheWrite1h": 6, "cacheRead": 0.3}}

at the top level and, overriding it for one channel, in a channel (a channel's table is
looked at first, then the top level's).  Within a table an exact name wins, then the
longest pattern that matches.  ``input`` and ``output`` are required; a cache price left
out is charged at the ``input`` price (an over-estimate rather than a silent zero).  A
model no table names is recorded with its tokens and no cost.  The gateway ships no price.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from ..mapping import pattern_problem
from .meter import Usage

PER = 1_000_000


@dataclass(frozen=True, slots=True)
class Price:
    input: float
    output: float
    cacheWrite5m: float | None = None
    cacheWrite1h: float | None = None
    cacheRead: float | None = None

    def cost(self, usage: Usage) -> float:
        base = self.input
        return (
            usage.input_tokens * base
            + usage.output_tokens * self.output
            + usage.cache_write_5m * (base if self.cacheWrite5m is None else self.cacheWrite5m)
            + usage.cache_write_1h * (base if self.cacheWrite1h is None else self.cacheWrite1h)
            + usage.cache_read * (base if self.cacheRead is None else self.cacheRead)
        ) / PER


PRICE_FIELDS = tuple(f.name for f in fields(Price))


class PriceTable:
    """Patterns in lookup order (exact names first, then longer patterns first); a memo
    of answers by model name (bounded)."""

    __slots__ = ("_exact", "_patterns", "_memo")
    _MEMO_LIMIT = 1024

    def __init__(self, entries: Mapping[str, Price] | None = None) -> None:
        entries = entries or {}
        self._exact = {k: v for k, v in entries.items() if "*" not in k}
        wild = [(k, v) for k, v in entries.items() if "*" in k]
        wild.sort(key=lambda kv: (-len(kv[0].replace("*", "")), kv[0]))
        self._patterns = tuple(wild)
        self._memo: dict[str, Price | None] = {}

    def __bool__(self) -> bool:
        return bool(self._exact or self._patterns)

    def lookup(self, model: str) -> Price | None:
        if model in self._memo:
            return self._memo[model]
        price = self._exact.get(model)
        if price is None:
            for pattern, candidate in self._patterns:
                if _matches(pattern, model):
                    price = candidate
                    break
        if len(self._memo) >= self._MEMO_LIMIT:
            self._memo.clear()
        self._memo[model] = price
        return price


def _matches(pattern: str, model: str) -> bool:
    if pattern == "*":
        return True
    if pattern.startswith("*") and pattern.endswith("*"):
        return pattern[1:-1] in model
    if pattern.endswith("*"):
        return model.startswith(pattern[:-1])
    if pattern.startswith("*"):
        return model.endswith(pattern[1:])
    return model == pattern


EMPTY = PriceTable()


def parse_prices(raw: Any, where: str, problems: list[str]) -> PriceTable:
    """A ``prices`` object; problems are appended with their path."""
    if raw is None:
        return EMPTY
    if not isinstance(raw, Mapping):
        problems.append(f"{where}: must be an object of model pattern -> prices")
        return EMPTY
    entries: dict[str, Price] = {}
    for pattern, value in raw.items():
        at = f"{where}.{pattern}"
        problem = pattern_problem(pattern) if isinstance(pattern, str) and pattern else "empty pattern"
        if problem or pattern.startswith("!"):
            problems.append(f"{at}: {problem or 'exclusions have no price'}")
            continue
        if not isinstance(value, Mapping):
            problems.append(f"{at}: must be an object with input and output (USD per million tokens)")
            continue
        unknown = sorted(set(value) - set(PRICE_FIELDS))
        if unknown:
            problems.append(f"{at}: unknown field {unknown[0]!r} (known: {', '.join(PRICE_FIELDS)})")
            continue
        numbers: dict[str, float] = {}
        for name in PRICE_FIELDS:
            number = value.get(name)
            if number is None:
                if name in ("input", "output"):
                    problems.append(f"{at}.{name}: required (USD per million tokens)")
                continue
            if isinstance(number, bool) or not isinstance(number, (int, float)) or not number >= 0:
                problems.append(f"{at}.{name}: must be a non-negative number (got {number!r})")
                continue
            numbers[name] = float(number)
        if "input" in numbers and "output" in numbers:
            entries[pattern] = Price(**numbers)
    return PriceTable(entries)
