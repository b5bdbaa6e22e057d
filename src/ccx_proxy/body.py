"""Finding and replacing the top-level ``model`` field of a Messages request body.

The gateway needs one field of a body that is often 100+ KB (Claude Code sends
its system prompt and tool schemas every turn).  Clients built on the official
TypeScript SDK put ``model`` first, so a prefix match finds it in about a
microsecond without parsing the rest; the rest goes upstream as it came and the
upstream validates it.  Any other layout falls back to a full ``orjson`` parse
(which also validates the whole document) plus a top-level scan for the field's
position, used only when the mapping changes the name.
"""

from __future__ import annotations

import re

import orjson

from .errors import InvalidRequest

# {"model":"<string>" followed by , or } -- the value may not contain raw control
# characters, as in JSON.
_MODEL_FIRST = re.compile(
    rb'\A[ \t\r\n]*\{[ \t\r\n]*"model"[ \t\r\n]*:[ \t\r\n]*("(?:[^"\\\x00-\x1f]|\\.)*")[ \t\r\n]*[,}]'
)
# A "model" key and its string value, at any depth.  In a document orjson has
# validated, the top-level one always matches; if it is the only match whose
# value equals the parsed model, it is the top-level one.
_ANY_MODEL = re.compile(rb'"model"[ \t\r\n]*:[ \t\r\n]*("(?:[^"\\]|\\.)*")', re.DOTALL)
# Strings and brackets: enough to walk the top level of a JSON document that
# orjson has already validated.
_TOKEN = re.compile(rb'"(?:[^"\\]|\\.)*"|[{}\[\]]', re.DOTALL)
_COLON = re.compile(rb"[ \t\r\n]*:[ \t\r\n]*")
_MODEL_KEY = b'"model"'


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
    match = _MODEL_FIRST.match(body)
    if match is not None:
        token = match.group(1)
        return ModelField(_decode_string(token), match.start(1), match.end(1), wants_stream(body))
    return _find_model_slow(body)


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


def _find_model_slow(body: bytes) -> ModelField:
    if not body:
        raise InvalidRequest("request body is empty; expected a JSON object with a 'model' field")
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise InvalidRequest(f"request body must be a JSON object, not {type(document).__name__}")
    model = document.get("model")
    if model is None:
        raise InvalidRequest("request body: 'model' is required")
    if not isinstance(model, str):
        raise InvalidRequest("request body: 'model' must be a string")
    spans = [m.span(1) for m in _ANY_MODEL.finditer(body) if orjson.loads(m.group(1)) == model]
    start, end = spans[0] if len(spans) == 1 else _top_level_model_span(body)
    return ModelField(model, start, end, document.get("stream") is True)


def _top_level_model_span(body: bytes) -> tuple[int, int]:
    """Span of the last top-level ``"model"`` value (orjson keeps the last duplicate)."""
    depth = 0
    span = (-1, -1)
    expect_value_at = -1
    for token in _TOKEN.finditer(body):
        first = body[token.start()]
        if first == 0x22:  # a string
            if token.start() == expect_value_at:
                span = (token.start(), token.end())
            elif depth == 1 and token.group() == _MODEL_KEY:
                colon = _COLON.match(body, token.end())
                if colon is not None and body[colon.end() : colon.end() + 1] == b'"':
                    expect_value_at = colon.end()
        elif first in (0x7B, 0x5B):  # { [
            depth += 1
        else:
            depth -= 1
    if span[0] < 0:  # unreachable for a document orjson accepted with a str model
        raise InvalidRequest("request body: could not locate 'model'")
    return span
