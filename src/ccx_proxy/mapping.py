"""Model-name mapping tables and model allowlists, compiled once at load.

A :class:`ModelTable` maps a requested model name to the upstream's model name:
an exact key match wins; otherwise the longest key that occurs in the requested
name (ties broken lexicographically, so results never depend on dict order);
otherwise the name is left unchanged.  Matching is case-sensitive.

An :class:`Allowlist` admits model names by pattern: ``exact``, ``prefix*``,
``*suffix``, ``*contains*``, ``*`` (anything) and ``!pattern`` exclusions, which
always win.  An empty list (or one with only exclusions) admits every name not
excluded.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

# Requested model names come from clients; bound the memo so a client cycling
# through random names cannot grow it without limit.
_MEMO_LIMIT = 4096


class ModelTable:
    __slots__ = ("_exact", "_by_length", "_memo")

    def __init__(self, mapping: Mapping[str, str]) -> None:
        self._exact: dict[str, str] = dict(mapping)
        # Longest key first; equal lengths in lexicographic order.
        self._by_length: tuple[tuple[str, str], ...] = tuple(
            sorted(self._exact.items(), key=lambda kv: (-len(kv[0]), kv[0]))
        )
        self._memo: dict[str, str] = {}

    def __bool__(self) -> bool:
        return bool(self._exact)

    def keys(self) -> tuple[str, ...]:
        return tuple(self._exact)

    def lookup(self, model: str) -> str:
        hit = self._memo.get(model)
        if hit is not None:
            return hit
        result = self._resolve(model)
        if len(self._memo) >= _MEMO_LIMIT:
            self._memo.clear()
        self._memo[model] = result
        return result

    def _resolve(self, model: str) -> str:
        exact = self._exact.get(model)
        if exact is not None:
            return exact
        for key, target in self._by_length:
            if key in model:
                return target
        return model


@dataclass(frozen=True, slots=True)
class _Patterns:
    exact: frozenset[str] = frozenset()
    prefixes: tuple[str, ...] = ()
    suffixes: tuple[str, ...] = ()
    contains: tuple[str, ...] = ()
    anything: bool = False

    def __bool__(self) -> bool:
        return bool(self.exact or self.prefixes or self.suffixes or self.contains or self.anything)

    def match(self, model: str) -> bool:
        return (
            self.anything
            or model in self.exact
            or (bool(self.prefixes) and model.startswith(self.prefixes))
            or (bool(self.suffixes) and model.endswith(self.suffixes))
            or any(part in model for part in self.contains)
        )


def pattern_problem(pattern: str) -> str | None:
    """Why ``pattern`` is not a valid allowlist entry, or None if it is."""
    body = pattern[1:] if pattern.startswith("!") else pattern
    if not body:
        return "empty pattern"
    core = body.removeprefix("*").removesuffix("*")
    if "*" in core:
        return f"{pattern!r}: '*' may only stand at the start and/or the end"
    return None


def _compile(patterns: Iterable[str]) -> _Patterns:
    exact: set[str] = set()
    prefixes: list[str] = []
    suffixes: list[str] = []
    contains: list[str] = []
    anything = False
    for p in patterns:
        if p == "*" or p == "**":
            anything = True
        elif len(p) >= 2 and p.startswith("*") and p.endswith("*"):
            contains.append(p[1:-1])
        elif p.startswith("*"):
            suffixes.append(p[1:])
        elif p.endswith("*"):
            prefixes.append(p[:-1])
        else:
            exact.add(p)
    return _Patterns(frozenset(exact), tuple(prefixes), tuple(suffixes), tuple(contains), anything)


class Allowlist:
    __slots__ = ("_allow", "_deny", "patterns")

    def __init__(self, patterns: Iterable[str] = ()) -> None:
        self.patterns = tuple(patterns)
        self._allow = _compile(p for p in self.patterns if not p.startswith("!"))
        self._deny = _compile(p[1:] for p in self.patterns if p.startswith("!"))

    def admits(self, model: str) -> bool:
        if self._deny and self._deny.match(model):
            return False
        return not self._allow or self._allow.match(model)

    def exact_names(self) -> tuple[str, ...]:
        """The allowlist's plain (non-wildcard, non-exclusion) entries, in file order."""
        return tuple(p for p in self.patterns if "*" not in p and not p.startswith("!"))
