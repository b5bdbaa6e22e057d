"""Finding and replacing the top-level ``model`` field of a Messages request body.

The gateway routes on one field of a body that is often 100+ KB (Claude Code sends
its system prompt and tool schemas every turn), and the upstream must serve the
model the gateway routed.  So the field has to be found exactly as a JSON parser
would find it, and a body that two parsers could read differently is refused:

* more than one top-level ``model`` key, in any spelling (``"mod\\u0065l"`` is the
  same key), is a 400: the gateway would route on one and most upstreams serve the
  last.  ``model`` keys inside messages, tools or metadata are ordinary content;
* a model name longer than :data:`MAX_MODEL_BYTES` is a 400 before any routing.

How much work that takes is bounded, so that one hostile body cannot stall the event
loop that serves every other request:

* a body up to :data:`INLINE_PARSE_BYTES` gets one ``orjson`` parse (about 0.5 ns a
  byte) on the loop, with the model key renamed to a token of our own first so that
  every other top-level ``model`` key shows (a few ms at worst, ~60 µs for 110 KB);
* a larger body is walked at its top level, skipping nested values with ``memchr``
  and short regex steps, and :func:`read_model` hands the loop back every
  :data:`SLICE_SECONDS` (``orjson`` holds the GIL, so a worker thread would not
  help); when ``model`` is the first key (the SDKs write it first) and no other
  ``"model"`` or ``\\u006`` token appears at all, the walk is skipped;
* a body whose ``model`` is not first and that is larger than
  :data:`MAX_SLOW_BODY_BYTES` is refused with 413 before any parse, and a walk
  stops with 413 after :data:`MAX_SCAN_STEPS` steps.

The body goes upstream byte for byte, with only the model's value replaced when a
mapping renames it.  The inline parse validates the whole document; the walk checks
the top level only, and leaves the rest to the upstream.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import Generator

import orjson

from .errors import InvalidRequest, RequestTooLarge

MAX_MODEL_BYTES = 256  # UTF-8 bytes of a model name
INLINE_PARSE_BYTES = 256 * 1024  # bodies up to this size: one orjson parse on the loop
MAX_SLOW_BODY_BYTES = 8 * 1024 * 1024  # "model" not first: parsed up to this size, else 413
MAX_SCAN_STEPS = 500_000  # strings, brackets and top-level keys (x3) one walk may visit, else 413
SLICE_SECONDS = 0.002  # read_model gives the loop back at least this often during a walk

_FAST_WINDOW = 4096  # the model-first match looks no further (a longer name takes the walk)
_CHUNK = 64 * 1024  # bytes one regex call of the walk may look at (well under a ms)
_FIND_CHUNK = 1024 * 1024  # bytes one bytes.find call may look at
_MEMCHR_QUOTES = 8  # a string with more escaped quotes than this is scanned by regex
_MAX_KEY_SPELLING = 6 * 6 + 2  # "stream" with every letter written as \uXXXX

_WS = b"[ \t\r\n]*"
# {"model":"<string>" followed by , or } -- the value may not contain raw control
# characters, as in JSON.  Group 1 is the key, group 2 the value.
_MODEL_FIRST = re.compile(
    rb"\A"
    + _WS
    + rb"\{"
    + _WS
    + rb'("model")'
    + _WS
    + rb":"
    + _WS
    + rb'("[^"\\\x00-\x1f]*(?:\\.[^"\\\x00-\x1f]*)*")'
    + _WS
    + rb"[,}]"
)
# The same up to the value's opening quote: "model" comes first, with a name too long for
# the window (the walk measures it).
_MODEL_FIRST_OPEN = re.compile(rb"\A" + _WS + rb"\{" + _WS + rb'"model"' + _WS + rb":" + _WS + rb'"')
# A key that JSON decodes to "model", however its letters are written (they are all
# U+0060..U+006F, so an escaped spelling always contains \u006).  In a valid document
# a match is a key, or lies inside a longer string, where renaming it changes nothing.
_ANY_MODEL_KEY = re.compile(
    rb'"(?:m|\\u006[dD])(?:o|\\u006[fF])(?:d|\\u0064)(?:e|\\u0065)(?:l|\\u006[cC])"(?=' + _WS + rb":)"
)
_ESCAPED_LETTER = b"\\u006"
_COLON = re.compile(_WS + rb":" + _WS)
_STRING_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
# For the walk.
_WS_RUN = re.compile(_WS)
_SCALAR_RUN = re.compile(rb'[^ \t\r\n,:{}\[\]"]*')
_STRING_RUN = re.compile(rb'[^"\\]*(?:\\.[^"\\]*)*', re.DOTALL)
_STRUCTURE = re.compile(rb'["{}\[\]]')
# Whitespace, a top-level key token (group 1), its colon, and the whitespace up to the value.
_MEMBER = re.compile(_WS + rb'("[^"\\]*(?:\\.[^"\\]*)*")' + _WS + rb":" + _WS, re.DOTALL)
# The whitespace after a top-level value and the comma or brace (group 1) that ends it.
_AFTER_VALUE = re.compile(_WS + rb"([,}])")
_CLOSER = {0x7B: 0x7D, 0x5B: 0x5D}  # { -> }, [ -> ]
_TYPE_NAMES = {0x5B: "list", 0x22: "str", 0x74: "bool", 0x66: "bool", 0x6E: "NoneType", 0x2D: "number"}
_TYPE_NAMES.update((digit, "number") for digit in b"0123456789")


class ModelField:
    """The requested model and where its JSON string token sits in the body; and whether
    the request asks for a stream (which first-byte timeout applies)."""

    __slots__ = ("name", "start", "end", "stream")

    def __init__(self, name: str, start: int, end: int, stream: bool = False) -> None:
        self.name = name
        self.start = start
        self.end = end
        self.stream = stream


def find_model(body: bytes) -> ModelField:
    """The top-level ``model`` of ``body``, checked (see the module's docstring).

    Raises :class:`InvalidRequest` (400) for a body without exactly one top-level string
    ``model`` of at most :data:`MAX_MODEL_BYTES`, or that is not JSON, and
    :class:`RequestTooLarge` (413) for one the gateway will not parse.  Runs to the end
    at once: the event loop uses :func:`read_model`."""
    job = _inspect(body)
    while True:
        try:
            next(job)
        except StopIteration as done:
            result: ModelField = done.value
            return result


async def read_model(body: bytes) -> ModelField:
    """:func:`find_model` for the event loop: the same answer and exceptions, but a large
    body's walk gives the loop back every :data:`SLICE_SECONDS`."""
    if len(body) <= INLINE_PARSE_BYTES:  # the usual case: one parse, no generator to drive
        return _parse_inline(body, _MODEL_FIRST.match(body, 0, _FAST_WINDOW))
    job = _inspect(body)
    while True:
        try:
            next(job)
        except StopIteration as done:
            result: ModelField = done.value
            return result
        await asyncio.sleep(0)


_STREAM_KEY = b'"stream"'
_STREAM_TRUE = re.compile(rb'"stream"[ \t\r\n]*:[ \t\r\n]*true')


def wants_stream(body: bytes) -> bool:
    """Whether the body sets ``"stream": true``, without parsing it.

    The SDKs write ``stream`` at the top level after ``messages``, so the last
    ``"stream"`` key that is not inside a string (a string's quotes are escaped)
    decides.  A nested ``"stream"`` key after the top-level one can only make a
    streaming request wait for headers as long as a non-streaming one; it changes
    nothing else."""
    at = body.rfind(_STREAM_KEY)
    while at > 0 and body[at - 1] == 0x5C:  # \"stream\" inside a string
        at = body.rfind(_STREAM_KEY, 0, at)
    return at >= 0 and _STREAM_TRUE.match(body, at) is not None


def replace_model(body: bytes, field: ModelField, new_name: str) -> bytes:
    return b"".join((body[: field.start], orjson.dumps(new_name), body[field.end :]))


# -- errors ---------------------------------------------------------------------------


def _duplicate_model() -> InvalidRequest:
    return InvalidRequest(
        "request body has more than one top-level 'model' key; send exactly one "
        "(JSON parsers disagree on which of two duplicates counts)"
    )


def _model_too_long() -> InvalidRequest:
    return InvalidRequest(f"request body: 'model' is longer than {MAX_MODEL_BYTES} bytes; no model name is")


def _model_required() -> InvalidRequest:
    return InvalidRequest("request body: 'model' is required")


def _model_not_string() -> InvalidRequest:
    return InvalidRequest("request body: 'model' must be a string")


def _not_json(what: str, at: int) -> InvalidRequest:
    return InvalidRequest(f"request body is not valid JSON: {what} at byte {at}")


def _too_large_to_parse(size: int) -> RequestTooLarge:
    return RequestTooLarge(
        f'request body is {size / 1048576:.1f} MB and its JSON object does not start with "model"; '
        f'the gateway parses such a body only up to {MAX_SLOW_BODY_BYTES / 1048576:g} MB. Put "model" '
        "first in the body, as the Anthropic SDKs do"
    )


def _too_complex() -> RequestTooLarge:
    return RequestTooLarge(
        f"request body has more than {MAX_SCAN_STEPS:,} JSON strings and brackets; the gateway "
        "inspects at most that many in one request"
    )


# -- the model name -------------------------------------------------------------------


def _decode_string(token: bytes) -> str:
    if b"\\" not in token:
        try:
            return token[1:-1].decode()
        except UnicodeDecodeError:
            raise InvalidRequest("request body: model is not valid UTF-8") from None
    try:
        value = orjson.loads(token)
    except orjson.JSONDecodeError:
        raise InvalidRequest("request body: model is not a valid JSON string") from None
    assert isinstance(value, str)
    return value


def _check_length(name: str) -> str:
    # A str of n code points is n to 4n bytes of UTF-8.
    if len(name) > MAX_MODEL_BYTES or (
        len(name) * 4 > MAX_MODEL_BYTES and len(name.encode("utf-8", "surrogatepass")) > MAX_MODEL_BYTES
    ):
        raise _model_too_long()
    return name


def _name_at(body: bytes, start: int, end: int) -> str:
    """The model name in the string token ``body[start:end]``, checked for length."""
    if end - start - 2 > 6 * MAX_MODEL_BYTES:  # \uXXXX is the longest spelling of a byte
        raise _model_too_long()
    return _check_length(_decode_string(body[start:end]))


# -- the work -------------------------------------------------------------------------


def _inspect(body: bytes) -> Generator[None, None, ModelField]:
    """find_model's work; it yields (to be resumed at once) whenever the loop should run."""
    first = _MODEL_FIRST.match(body, 0, _FAST_WINDOW)
    size = len(body)
    if size <= INLINE_PARSE_BYTES:
        return _parse_inline(body, first)
    if first is not None:
        if not (yield from _may_repeat_model(body, first.end(2))):
            return ModelField(_name_at(body, *first.span(2)), *first.span(2), wants_stream(body))
    elif size > MAX_SLOW_BODY_BYTES and _MODEL_FIRST_OPEN.match(body) is None:
        raise _too_large_to_parse(size)
    models, stream = yield from _Walk(body).top_level()
    if len(models) > 1 and len({body[a:b] for a, b in models}) > 1:
        raise _duplicate_model()  # (the very same value twice is no ambiguity)
    if not models:
        raise _model_required()
    start, end = models[0]
    if body[start] != 0x22:
        raise _model_required() if body.startswith(b"null", start) else _model_not_string()
    return ModelField(_name_at(body, start, end), start, end, stream)


def _parse_inline(body: bytes, first: re.Match[bytes] | None) -> ModelField:
    """One orjson parse of ``body`` with each ``model`` key renamed to a token of our own:
    exact about every top-level key, whatever its spelling."""
    if not body:
        raise InvalidRequest("request body is empty; expected a JSON object with a 'model' field")
    if first is not None:
        return _check_model_first(body, first)
    spans = [m.span() for m in _ANY_MODEL_KEY.finditer(body)]
    nonce = os.urandom(6).hex()  # unguessable: no key in the body can be one of ours
    names = [f"{nonce}.{i}" for i in range(len(spans))]
    view = memoryview(body)
    pieces: list[bytes | memoryview] = []
    at = 0
    for (start, end), name in zip(spans, names, strict=True):
        pieces += (view[at:start], b'"', name.encode(), b'"')
        at = end
    pieces.append(view[at:])
    try:
        document = orjson.loads(b"".join(pieces))
    except orjson.JSONDecodeError:
        try:  # again, for an error message whose positions are the client's
            orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise InvalidRequest(f"request body is not valid JSON: {exc}") from None
        raise InvalidRequest("request body is not valid JSON") from None
    if not isinstance(document, dict):
        raise InvalidRequest(f"request body must be a JSON object, not {type(document).__name__}")
    if "model" in document:  # a top-level model key that was not renamed: not the first one
        raise _duplicate_model()
    top = [i for i, name in enumerate(names) if name in document]
    if len(top) > 1:
        raise _duplicate_model()
    if not top:
        raise _model_required()
    value = document[names[top[0]]]
    if value is None:
        raise _model_required()
    if not isinstance(value, str):
        raise _model_not_string()
    stream = document.get("stream") is True
    if first is not None:
        start, end = first.span(2)
    else:
        colon = _COLON.match(body, spans[top[0]][1])
        assert colon is not None
        start = colon.end()
        token = _STRING_TOKEN.match(body, start)
        assert token is not None
        end = token.end()
    return ModelField(_check_length(value), start, end, stream)


def _check_model_first(body: bytes, first: re.Match[bytes]) -> ModelField:
    """A body that starts with its model (Claude Code, the SDKs): one orjson parse of the
    body as it is.  The parser keeps the last of duplicate keys, however they are spelled,
    so a top-level ``model`` other than the first one shows as a different value -- the
    ambiguity that would let the gateway route on one name while the upstream serves
    another.  (A duplicate with the very same value is no ambiguity and passes.)"""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(document, dict):  # unreachable: the body starts with {"model": ...
        raise InvalidRequest(f"request body must be a JSON object, not {type(document).__name__}")
    start, end = first.span(2)
    name = _name_at(body, start, end)
    if document.get("model") != name:
        raise _duplicate_model()
    return ModelField(name, start, end, document.get("stream") is True)


def _may_repeat_model(body: bytes, start: int) -> Generator[None, None, bool]:
    """Whether ``body[start:]`` holds anything that could be a second ``model`` key."""
    clock = time.perf_counter
    deadline = clock() + SLICE_SECONDS
    size = len(body)
    for needle in (b'"model"', _ESCAPED_LETTER):
        at = start
        while at < size:
            if body.find(needle, at, at + _FIND_CHUNK + len(needle) - 1) >= 0:
                return True
            at += _FIND_CHUNK
            if clock() > deadline:
                yield
                deadline = clock() + SLICE_SECONDS
    return False


class _Walk:
    """A walk over the top level of a JSON object that skips nested values: exact about
    the top-level keys for any body, in steps that never hold the loop for long (each
    regex call sees at most ``_CHUNK`` bytes; the generators yield when a slice is up).

    Only the top level is checked strictly; inside nested values it tracks strings
    and brackets.  The upstream validates the rest, as it does for the fast path."""

    __slots__ = ("body", "steps", "deadline")

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.steps = 0
        self.deadline = time.perf_counter() + SLICE_SECONDS

    def _pause_due(self) -> bool:
        self.steps += 1
        if self.steps > MAX_SCAN_STEPS:
            raise _too_complex()
        return time.perf_counter() > self.deadline

    def _resumed(self) -> None:
        self.deadline = time.perf_counter() + SLICE_SECONDS

    def top_level(self) -> Generator[None, None, tuple[list[tuple[int, int]], bool]]:
        """The value spans of the top-level ``model`` keys, and whether ``stream`` is true."""
        body = self.body
        size = len(body)
        pos = yield from self._run_end(_WS_RUN, 0)
        if pos >= size:
            raise InvalidRequest("request body is empty; expected a JSON object with a 'model' field")
        if body[pos] != 0x7B:
            kind = _TYPE_NAMES.get(body[pos])
            if kind is None:
                raise _not_json("expected '{'", pos)
            raise InvalidRequest(f"request body must be a JSON object, not {kind}")
        models: list[tuple[int, int]] = []
        stream = False
        find = body.find
        pos = yield from self._run_end(_WS_RUN, pos + 1)
        if pos < size and body[pos] == 0x7D:
            pos += 1
        else:
            while True:
                self.steps += 2  # a top-level member costs about three nested tokens
                if self._pause_due():
                    yield
                    self._resumed()
                # The key, its colon and the value's first byte: one regex call, usually.
                member = _MEMBER.match(body, pos, pos + _CHUNK)
                if member is not None and member.end() < pos + _CHUNK:
                    key_start, key_end = member.span(1)
                    value_start = member.end()
                else:
                    key_start, key_end, value_start = yield from self._member(pos)
                if value_start >= size:
                    raise _not_json("expected a value", value_start)
                first = body[value_start]
                if first == 0x22:
                    close = find(b'"', value_start + 1)
                    if close > 0 and body[close - 1] != 0x5C:
                        pos = close + 1
                    else:
                        pos = yield from self._string_end(value_start)
                elif first in _CLOSER:
                    pos = yield from self._container_end(value_start)
                else:
                    scalar = _SCALAR_RUN.match(body, value_start, value_start + _CHUNK)
                    assert scalar is not None  # the run patterns match the empty string
                    pos = scalar.end()
                    if pos == value_start or pos == value_start + _CHUNK:
                        pos = yield from self._value_end(value_start)
                if key_end - key_start <= _MAX_KEY_SPELLING:
                    key = _key_name(body[key_start:key_end])
                    if key == "model":
                        models.append((value_start, pos))
                    elif key == "stream":
                        stream = body[value_start:pos] == b"true"
                after = _AFTER_VALUE.match(body, pos, pos + _CHUNK)
                if after is not None:
                    pos = after.end()
                    if after.group(1) == b",":
                        continue
                    break
                pos = yield from self._run_end(_WS_RUN, pos)
                if pos < size and body[pos] == 0x2C:
                    pos = yield from self._run_end(_WS_RUN, pos + 1)
                    continue
                if pos < size and body[pos] == 0x7D:
                    pos += 1
                    break
                raise _not_json("expected ',' or '}'", pos)
        pos = yield from self._run_end(_WS_RUN, pos)
        if pos != size:
            raise _not_json("data after the JSON object", pos)
        return models, stream

    def _member(self, at: int) -> Generator[None, None, tuple[int, int, int]]:
        """A key, its colon and what follows, step by step: where the key token starts and
        ends, and where the value starts."""
        body = self.body
        size = len(body)
        at = yield from self._run_end(_WS_RUN, at)
        if at >= size or body[at] != 0x22:
            raise _not_json("expected a string key", at)
        key_end = yield from self._string_end(at)
        pos = yield from self._run_end(_WS_RUN, key_end)
        if pos >= size or body[pos] != 0x3A:
            raise _not_json("expected ':'", pos)
        value_start = yield from self._run_end(_WS_RUN, pos + 1)
        return at, key_end, value_start

    def _run_end(self, run: re.Pattern[bytes], at: int) -> Generator[None, None, int]:
        """Where the run of ``run``'s characters that starts at ``at`` ends."""
        body = self.body
        while True:
            stop = at + _CHUNK
            match = run.match(body, at, stop)
            assert match is not None  # the run patterns match the empty string
            end = match.end()
            if end < stop or end >= len(body):
                return end
            at = end
            if self._pause_due():
                yield
                self._resumed()

    def _value_end(self, at: int) -> Generator[None, None, int]:
        body = self.body
        if at >= len(body):
            raise _not_json("expected a value", at)
        first = body[at]
        if first == 0x22:
            return (yield from self._string_end(at))
        if first in _CLOSER:
            return (yield from self._container_end(at))
        end = yield from self._run_end(_SCALAR_RUN, at)
        if end == at:
            raise _not_json("expected a value", at)
        return end

    def _string_end(self, at: int) -> Generator[None, None, int]:
        """Just past the string token that opens at ``at``."""
        body = self.body
        pos = at + 1
        for _ in range(_MEMCHR_QUOTES):
            close = body.find(b'"', pos)
            if close < 0:
                raise _not_json("unterminated string", at)
            if body[close - 1] != 0x5C:
                return close + 1
            if body[close - 2] == 0x5C:  # \\" or longer: count the escapes properly
                break
            pos = close + 1  # \" inside the string
        return (yield from self._escaped_string_end(at))

    def _escaped_string_end(self, at: int) -> Generator[None, None, int]:
        body = self.body
        size = len(body)
        pos = at + 1
        while True:
            stop = min(pos + _CHUNK, size)
            match = _STRING_RUN.match(body, pos, stop)
            assert match is not None
            end = match.end()
            if end < stop and body[end] == 0x22:
                return end + 1
            if stop == size:
                raise _not_json("unterminated string", at)
            pos = end  # the chunk ended, or cut a backslash from what it escapes
            if self._pause_due():
                yield
                self._resumed()

    def _container_end(self, at: int) -> Generator[None, None, int]:
        """Just past the object or array that opens at ``at``: strings and brackets only."""
        body = self.body
        size = len(body)
        find = body.find
        search = _STRUCTURE.search
        closers = [_CLOSER[body[at]]]
        pos = at + 1
        while closers:
            if self._pause_due():
                yield
                self._resumed()
            match = search(body, pos, pos + _CHUNK)
            if match is None:
                pos += _CHUNK
                if pos >= size:
                    raise _not_json("unterminated object or array", at)
                continue
            token = match.start()
            char = body[token]
            if char == 0x22:
                close = find(b'"', token + 1)
                if close >= 0 and body[close - 1] != 0x5C:  # the common case, inline
                    pos = close + 1
                else:
                    pos = yield from self._string_end(token)
            elif char in _CLOSER:
                closers.append(_CLOSER[char])
                pos = token + 1
            elif closers.pop() == char:
                pos = token + 1
            else:
                raise _not_json("mismatched bracket", token)
        return pos


def _key_name(token: bytes) -> str | None:
    """``"model"`` or ``"stream"`` if the key token decodes to one of them, else None."""
    if token == b'"model"':
        return "model"
    if token == _STREAM_KEY:
        return "stream"
    if b"\\" in token:
        try:
            name = orjson.loads(token)
        except orjson.JSONDecodeError:
            return None
        if name in ("model", "stream"):
            return str(name)
    return None
