import asyncio
from typing import Any
from unittest import mock

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ccx_proxy import body as body_module
from ccx_proxy.body import find_model, read_model, replace_model
from ccx_proxy.errors import GatewayError, InvalidRequest


@pytest.mark.parametrize(
    "body, model",
    [
        pytest.param(b'{"model":"claude-opus-4","messages":[]}', "claude-opus-4", id="model-first-compact"),
        pytest.param(b' \n{ "model" : "a b" , "x": 1}', "a b", id="model-first-spaced"),
        pytest.param(b'{"model":"caf\\u00e9"}', "caf\u00e9", id="model-first-escaped"),
        pytest.param('{"model":"café"}'.encode(), "café", id="model-first-utf8"),
        pytest.param(
            b'{"max_tokens":5,"messages":[{"model":"inner"}],"model":"outer"}',
            "outer",
            id="model-last-nested-decoy",
        ),
        pytest.param(
            b'{"tools":[{"input_schema":{"properties":{"model":{"type":"string"}}}}],"model":"m"}',
            "m",
            id="tool-schema-with-model-property",
        ),
        pytest.param(b'{"a":"\\"model\\": \\"x\\"","model":"real"}', "real", id="escaped-decoy-in-string"),
    ],
)
def test_find_model(body: bytes, model: str) -> None:
    assert find_model(body).name == model


@pytest.mark.parametrize(
    "body, fragment",
    [
        pytest.param(b"", "empty", id="empty"),
        pytest.param(b"hello", "not valid JSON", id="not-json"),
        pytest.param(b'{"model":"x"', "not valid JSON", id="truncated"),
        pytest.param(b"[1,2]", "must be a JSON object", id="array"),
        pytest.param(b'"str"', "must be a JSON object", id="string"),
        pytest.param(b'{"messages":[]}', "'model' is required", id="no-model"),
        pytest.param(b'{"model":42}', "'model' must be a string", id="model-number"),
        pytest.param(b'{"x":1,"model":null}', "'model' is required", id="model-null"),
        pytest.param(b'{"model":"\xff"}', "not valid", id="model-bad-utf8"),
    ],
)
def test_bad_bodies_are_invalid_requests(body: bytes, fragment: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        find_model(body)
    assert fragment in info.value.message


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b'{"model":"opus","messages":[{"role":"user","content":"opus?"}],"z":1.50}', id="first"),
        pytest.param(b'{"z":1.50,"messages":[{"model":"opus"}],  "model" :\t"opus" }', id="last-same-nested"),
        pytest.param(b'{"z":1.50,"messages":[{"model":"haiku"}],"model":"opus"}', id="last-other-nested"),
    ],
)
def test_replace_touches_only_the_model_value(body: bytes) -> None:
    field = find_model(body)
    out = replace_model(body, field, "up-\u00e9")
    assert out == body[: field.start] + b'"up-\xc3\xa9"' + body[field.end :]
    assert orjson.loads(out)["model"] == "up-\u00e9"
    assert b"1.50" in out  # untouched bytes, not re-serialised


_json_scalars = st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=8)
_json = st.recursive(
    _json_scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["model", "a", "b"]), inner, max_size=3)
    ),
    max_leaves=10,
)


@given(
    before=st.dictionaries(st.sampled_from(["a", "messages", "tools"]), _json, max_size=3),
    after=st.dictionaries(st.sampled_from(["c", "system", "metadata"]), _json, max_size=3),
    model=st.text(max_size=20),
    new=st.text(max_size=20),
    model_first=st.booleans(),
)
def test_find_and_replace_agree_with_a_full_parse(before, after, model, new, model_first) -> None:
    doc = {"model": model, **before, **after} if model_first else {**before, "model": model, **after}
    body = orjson.dumps(doc)
    field = find_model(body)
    assert field.name == model
    replaced = orjson.loads(replace_model(body, field, new))
    assert replaced == {**doc, "model": new}


# -- hostile bodies: duplicate keys, long names, sizes, the event loop ------------------

WALK = "walk"  # the path for bodies over INLINE_PARSE_BYTES, forced on small bodies


@pytest.fixture(params=["inline", WALK])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == WALK:
        monkeypatch.setattr(body_module, "INLINE_PARSE_BYTES", 0)
    return str(request.param)


def _error(body: bytes) -> GatewayError:
    with pytest.raises(GatewayError) as info:
        find_model(body)
    return info.value


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b'{"model":"haiku","model":"forbidden"}', id="issue"),
        pytest.param(b'{ "model" : "haiku" ,\n\t"model"\r\n:\n"forbidden" }', id="whitespace"),
        pytest.param(b'{"model":"haiku","mod\\u0065l":"forbidden"}', id="escaped-e"),
        pytest.param(b'{"model":"haiku","\\u006dodel":"forbidden"}', id="escaped-m"),
        pytest.param(b'{"model":"haiku","\\u006D\\u006F\\u0064\\u0065\\u006C":"x"}', id="all-escaped-upper"),
        pytest.param(b'{"model":"haiku","model":null}', id="second-null"),
        pytest.param(b'{"model":"haiku","tools":[{"model":1}],"model":{"a":[1]}}', id="second-object"),
        pytest.param(b'{"max_tokens":1,"model":"a","messages":[{"model":"x"}],"model":"b"}', id="not-first"),
        pytest.param(b'{"x":1,"mod\\u0065l":"a","model":"b"}', id="not-first-escaped"),
        pytest.param(b'{"m\\u006fdel":"a","model":"b"}', id="escaped-first"),
        pytest.param(b'{"model":"a","model":"b","model":"c"}', id="three"),
    ],
)
def test_duplicate_top_level_model_keys_are_refused(path: str, body: bytes) -> None:
    error = _error(body)
    assert (error.status, error.error_type) == (400, "invalid_request_error")
    assert "more than one top-level 'model' key" in error.message


def test_the_same_model_twice_is_no_ambiguity(path: str) -> None:
    # Whichever one an upstream's parser keeps, it is the model the gateway routed on.
    assert find_model(b'{"model":"haiku","messages":[],"model":"haiku"}').name == "haiku"


@pytest.mark.parametrize(
    "body, model",
    [
        pytest.param(
            b'{"model":"m","tools":[{"input_schema":{"properties":{"model":{"type":"string"}}}}]}',
            "m",
            id="tool-schema",
        ),
        pytest.param(b'{"model":"m","metadata":{"model":"x","mod\\u0065l":"y"}}', "m", id="metadata"),
        pytest.param(
            b'{"messages":[{"content":[{"type":"tool_use","input":{"model":"opus"}}]}],"model":"m"}',
            "m",
            id="tool-use-input",
        ),
        pytest.param(b'{"model":"m","x\\"model":"n"}', "m", id="key-ending-in-quoted-model"),
        pytest.param(b'{"a":"{\\"model\\": \\"n\\"}","model":"m"}', "m", id="json-in-a-string"),
        pytest.param(b'{"model":"m","models":["n"],"model_":"n"," model":"n"}', "m", id="other-keys"),
        pytest.param(b'{"a":[[{"model":"n"}],{"b":{"model":"n"}}],"model":"m","c":{"model":"n"}}', "m"),
        pytest.param(b'{"a":"\\\\","model":"m","b":"\\\\\\"model\\\\\\""}', "m", id="backslash-runs"),
    ],
)
def test_nested_model_keys_are_content(path: str, body: bytes, model: str) -> None:
    field = find_model(body)
    assert field.name == model
    assert orjson.loads(replace_model(body, field, "new"))["model"] == "new"


@pytest.mark.parametrize(
    "name, ok",
    [
        pytest.param(b"m" * 256, True, id="256-ascii"),
        pytest.param(b"m" * 257, False, id="257-ascii"),
        pytest.param("\u00e9".encode() * 128, True, id="256-bytes-utf8"),
        pytest.param("\u00e9".encode() * 129, False, id="258-bytes-utf8"),
        pytest.param(b"\\u00e9" * 128, True, id="256-bytes-escaped"),
        pytest.param(b"\\u00e9" * 129, False, id="258-bytes-escaped"),
        pytest.param(b"x" * 5_000_000, False, id="5MB"),
    ],
)
@pytest.mark.parametrize("model_first", [True, False])
def test_model_names_over_256_bytes_are_refused(path: str, name: bytes, ok: bool, model_first: bool) -> None:
    member = b'"model":"' + name + b'"'
    body = b"{" + member + b',"x":1}' if model_first else b'{"x":1,' + member + b"}"
    if ok:
        assert len(find_model(body).name.encode()) == 256
    else:
        error = _error(body)
        assert error.status == 400
        assert "'model' is longer than 256 bytes" in error.message


def test_a_large_body_whose_model_is_not_first_is_413_before_parsing() -> None:
    size = body_module.MAX_SLOW_BODY_BYTES + 1
    body = b'{"messages":"' + b"x" * (size - 27) + b'","model":"m"}'
    assert len(body) == size
    error = _error(body)
    assert (error.status, error.error_type) == (413, "request_too_large")
    assert 'Put "model" first' in error.message and "8 MB" in error.message
    # The same body with "model" first is read (the SDKs write it first) ...
    first = b'{"model":"m","messages":"' + b"x" * (size - 26) + b'"}'
    assert find_model(first).name == "m"
    # ... and so is one whose name is too long for the fast match: a 400, not a 413.
    long_name = b'{"model":"' + b"x" * size + b'"}'
    assert _error(long_name).status == 400


def test_a_walk_that_would_visit_too_many_values_is_413(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(body_module, "MAX_SCAN_STEPS", 1000)
    monkeypatch.setattr(body_module, "INLINE_PARSE_BYTES", 0)
    error = _error(b'{"a":[' + b"{}," * 1000 + b'{}],"model":"m"}')
    assert (error.status, error.error_type) == (413, "request_too_large")
    assert find_model(b'{"a":[' + b"{}," * 100 + b'{}],"model":"m"}').name == "m"


@pytest.mark.parametrize(
    "body, fragment",
    [
        pytest.param(b'  [{"model":"m"}]', "must be a JSON object, not list", id="array"),
        pytest.param(b"  hello", "not valid JSON", id="garbage"),
        pytest.param(b"  ", "empty", id="blank"),
        pytest.param(b'{"a":[1,2},"model":"m"}', "not valid JSON", id="mismatched"),
        pytest.param(b'{"model":"m","a":{"model":"c}', "not valid JSON", id="unterminated-string"),
        pytest.param(b'{"a":1,"model":"m"} x', "not valid JSON", id="trailing-data"),
        pytest.param(b'{"a" 1,"model":"m"}', "not valid JSON", id="no-colon"),
        pytest.param(b'{"a":1 "model":"m"}', "not valid JSON", id="no-comma"),
        pytest.param(b'{"a":1,"model":7}', "'model' must be a string", id="number"),
        pytest.param(b'{"a":1,"model":null}', "'model' is required", id="null"),
        pytest.param(b'{"a":1}', "'model' is required", id="absent"),
    ],
)
def test_bad_bodies_on_the_walk(path: str, body: bytes, fragment: str) -> None:
    assert fragment in _error(body).message


def test_the_fast_path_now_validates_small_bodies() -> None:
    assert "not valid JSON" in _error(b'{"model":"m","x":}').message


@pytest.mark.parametrize(
    "body, stream",
    [
        pytest.param(b'{"model":"m","messages":[],"stream":true}', True, id="true"),
        pytest.param(b'{"model":"m","stream":false}', False, id="false"),
        pytest.param(
            b'{"model":"m","stream":true,"messages":[{"stream":false,"model":"x"}]}', True, id="nested-after"
        ),
        pytest.param(b'{"model":"m","messages":[{"stream":true,"model":"x"}]}', False, id="nested-only"),
        pytest.param(b'{"a":1,"model":"m","str\\u0065am":true}', True, id="escaped-key"),
    ],
)
def test_stream_is_the_top_level_value(path: str, body: bytes, stream: bool) -> None:
    # With "model" first and no other "model" token the walk is skipped and wants_stream()
    # decides; the nested "model" keys here make it run, so it is exact too.
    assert find_model(body).stream is stream


def test_the_second_model_token_is_found_at_any_chunk_boundary(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(body_module, "INLINE_PARSE_BYTES", 0)
    monkeypatch.setattr(body_module, "_FIND_CHUNK", 5)
    monkeypatch.setattr(body_module, "_CHUNK", 3)
    for pad in range(12):
        for key in (b'"model"', b'"mod\\u0065l"'):
            body = b'{"model":"a","p":"' + b"x" * pad + b'",' + key + b':"b"}'
            assert "more than one" in _error(body).message
        ok = b'{"model":"a","p":"' + b"x" * pad + b'","q":{"model":"b"}}'
        assert find_model(ok).name == "a"


def test_a_large_body_takes_the_walk_without_patching() -> None:
    filler = b'"' + b"x" * (body_module.INLINE_PARSE_BYTES + 10) + b'"'
    assert find_model(b'{"model":"a","p":' + filler + b',"q":{"model":"b"}}').name == "a"
    assert find_model(b'{"p":' + filler + b',"model":"a","q":{"model":"b"}}').name == "a"
    for body in (
        b'{"model":"a","p":' + filler + b',"model":"b"}',
        b'{"p":' + filler + b',"model":"a","mod\\u0065l":"b"}',
    ):
        assert "more than one" in _error(body).message


async def test_read_model_agrees_with_find_model(path: str) -> None:
    for body in (
        b'{"model":"claude-opus-4","messages":[],"stream":true}',
        b'{"messages":[{"model":"x"}],"model":"m"}',
        b'{"model":"a","tools":[{"model":{}}]}',
    ):
        got, want = await read_model(body), find_model(body)
        assert (got.name, got.start, got.end, got.stream) == (want.name, want.start, want.end, want.stream)
    with pytest.raises(InvalidRequest, match="more than one"):
        await read_model(b'{"model":"a","model":"b"}')


def _claude_code_like(megabytes: int, *, model_first: bool) -> bytes:
    turn = {"role": "user", "content": [{"type": "text", "text": "Please edit the file.\n" * 60}]}
    rest: dict[str, Any] = {
        "messages": [turn] * (megabytes * 1_000_000 // 1400),
        "tools": [{"name": "Task", "input_schema": {"properties": {"model": {"type": "string"}}}}],
        "stream": True,
    }
    return orjson.dumps(
        {"model": "claude-opus-4-1", **rest} if model_first else {**rest, "model": "claude-opus-4-1"}
    )


@pytest.mark.parametrize("model_first", [True, False])
async def test_a_20mb_body_does_not_block_the_loop(
    monkeypatch: pytest.MonkeyPatch, model_first: bool
) -> None:
    # Not model first: allowed here up to 32 MB, so that the 20 MB body is walked.
    monkeypatch.setattr(body_module, "MAX_SLOW_BODY_BYTES", 32 * 1024 * 1024)
    body = _claude_code_like(20, model_first=model_first)
    assert len(body) > 19_000_000
    ticks = 0
    done = False

    async def tick() -> None:
        nonlocal ticks
        while not done:
            await asyncio.sleep(0)
            ticks += 1

    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0)
    before = ticks
    field = await read_model(body)
    during = ticks - before
    done = True
    await ticker
    assert (field.name, field.stream) == ("claude-opus-4-1", True)
    # The walk yields to the loop between slices: other tasks ran many times meanwhile (one
    # blocking pass would let them run at most once).  Counted, not timed: load-proof.
    assert during >= 5, f"other tasks ran only {during} times while 20 MB were read"


@given(
    before=st.dictionaries(st.sampled_from(["a", "messages", "tools"]), _json, max_size=3),
    after=st.dictionaries(st.sampled_from(["c", "system", "metadata"]), _json, max_size=3),
    model=st.text(max_size=20),
    model_first=st.booleans(),
    stream=st.booleans(),
)
def test_the_walk_agrees_with_a_full_parse(before, after, model, model_first, stream) -> None:
    doc = {"model": model, **before, **after} if model_first else {**before, "model": model, **after}
    doc["stream"] = stream
    body = orjson.dumps(doc, option=orjson.OPT_INDENT_2 if stream else 0)
    with mock.patch.object(body_module, "INLINE_PARSE_BYTES", 0):
        field = find_model(body)
    assert field.name == model
    assert orjson.loads(replace_model(body, field, "new")) == {**doc, "model": "new"}
    if b'"model"' in body[field.end :]:  # the walk ran: exact about stream too
        assert field.stream is stream
