import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ccx_proxy.body import find_model, replace_model
from ccx_proxy.errors import InvalidRequest


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
