"""The /v1/models catalogue: which ids each channel lists, and the ``models`` field."""

from typing import Any

import orjson
import pytest

from ccx_proxy.catalog import CLAUDE_CODE_MODELS, ModelCatalog, channel_ids, served_ids
from ccx_proxy.config import ConfigError
from ccx_proxy.errors import ModelNotFound
from ccx_proxy.routing import Router
from tests.conftest import channel, make_config

TABLE = [model_id for model_id, _, _ in CLAUDE_CODE_MODELS]


def ids_of(**fields: Any) -> tuple[str, ...]:
    return channel_ids(make_config(channel("c", **fields)).channels[0])


def test_the_table_is_claude_style_ids() -> None:
    assert {"claude-opus-4-5", "claude-sonnet-4-5", "claude-haiku-4-5"} <= set(TABLE)
    assert len(set(TABLE)) == len(TABLE)
    assert all(m.startswith("claude-") and m.split("-")[1] in ("opus", "sonnet", "haiku") for m in TABLE)


@pytest.mark.parametrize(
    "fields, expected",
    [
        pytest.param({}, TABLE, id="pass-through: every current id"),
        pytest.param(
            {"modelMapping": {"opus": "up-opus"}},
            [m for m in TABLE if "opus" in m],
            id="mapping: the ids it covers, never the bare key",
        ),
        pytest.param(
            {
                "modelMapping": {"sonnet": "s", "haiku": "h"},
                "supportedModels": ["claude-*", "!claude-sonnet-4-5"],
            },
            ["claude-sonnet-5", "claude-sonnet-4-6", "claude-haiku-4-5"],
            id="mapping, minus what the allowlist refuses",
        ),
        pytest.param(
            {
                "modelMapping": {"opus": "x"},
                "supportedModels": ["claude-b", "claude-*", "claude-a", "claude-b"],
            },
            ["claude-b", "claude-a"],
            id="exact allowlist entries, deduplicated",
        ),
        pytest.param(
            {"supportedModels": ["gpt-*"]},
            [],
            id="nothing Claude-style is served",
        ),
        pytest.param(
            {
                "modelMapping": {"opus": "x"},
                "supportedModels": ["claude-exact", "claude-*"],
                "models": ["claude-opus-4-8", "claude-custom-1"],
            },
            ["claude-opus-4-8", "claude-custom-1"],
            id="advertised ids win",
        ),
    ],
)
def test_channel_ids(fields: dict[str, Any], expected: list[str]) -> None:
    assert list(ids_of(**fields)) == expected


def test_served_ids_follow_priority_skip_inactive_and_deduplicate() -> None:
    config = make_config(
        channel("late", priority=5, modelMapping={"sonnet": "s"}),
        channel("early", priority=1, models=["claude-sonnet-4-6", "claude-early"]),
        channel("off", status="disabled", models=["claude-off"]),
    )
    assert served_ids(config) == ("claude-sonnet-4-6", "claude-early", "claude-sonnet-5", "claude-sonnet-4-5")


def test_every_listed_id_is_routed_and_no_bare_key_is_listed() -> None:
    # An id is refused only when neither it nor its mapped name is admitted (see routing).
    config = make_config(
        channel(
            "a", modelMapping={"opus": "o", "sonnet": "s"}, supportedModels=["claude-*", "!claude-opus-4-7"]
        ),
        channel("b", supportedModels=["only-this", "claude-*"], models=["claude-haiku-4-5"]),
    )
    router = Router(config)
    listed = ModelCatalog(config).ids
    assert listed and "claude-opus-4-7" not in listed and "opus" not in listed
    assert all(router.candidates(m) for m in listed)


def test_created_at_is_stable_across_builds() -> None:
    config = make_config(channel("c", models=["claude-x"]), channel("d"))
    first = ModelCatalog(config).page({"limit": "1000"})
    second = ModelCatalog(make_config(channel("c", models=["claude-x"]), channel("d"))).page(
        {"limit": "1000"}
    )
    assert first == second
    entries = orjson.loads(first)["data"]
    by_id = {e["id"]: e for e in entries}
    assert by_id["claude-sonnet-4-5"]["created_at"] == "2025-09-29T00:00:00Z"
    assert by_id["claude-x"] == {
        "type": "model",
        "id": "claude-x",
        "display_name": "claude-x",
        "created_at": by_id["claude-x"]["created_at"],
    }


def test_model_not_found_is_a_400_naming_the_served_ids() -> None:
    ids = ["claude-one", "claude-two"]
    router = Router(make_config(channel("c", supportedModels=ids, models=ids)))
    with pytest.raises(ModelNotFound) as caught:
        router.route("claude-three")
    error = caught.value
    assert error.status == 400 and error.error_type == "invalid_request_error" and not error.retryable
    assert error.message == (
        "model_not_found: this gateway does not serve model 'claude-three'; "
        "it serves claude-one, claude-two (GET /v1/models lists them)"
    )


@pytest.mark.parametrize(
    "models, fragment",
    [
        pytest.param("claude-x", "models: must be an array of strings", id="not-a-list"),
        pytest.param([""], "models[0]: must be a model id", id="empty"),
        pytest.param(["claude-*"], "models[0]: 'claude-*': an exact model id", id="wildcard"),
        pytest.param(["!claude-x"], "an exact model id", id="exclusion"),
        pytest.param(["claude x"], "an exact model id", id="space"),
        pytest.param(["claude-x", "claude-x"], "models[1]: 'claude-x' is listed twice", id="twice"),
        pytest.param(
            ["gpt-4o"], "models[0]: 'gpt-4o' is refused by this channel's supportedModels", id="refused"
        ),
    ],
)
def test_models_field_is_validated(models: Any, fragment: str) -> None:
    with pytest.raises(ConfigError) as caught:
        make_config(channel("c", supportedModels=["claude-*"], models=models))
    assert any(fragment in p for p in caught.value.problems), caught.value.problems


def test_models_field_warns_about_ids_claude_code_hides() -> None:
    config = make_config(channel("c", models=["claude-a", "my-model"]))
    assert config.channels[0].advertised_models == ("claude-a", "my-model")
    assert any("channels[0].models[1]" in w and "hidden" in w for w in config.warnings)
    assert not any("unknown channel field" in w for w in config.warnings)
