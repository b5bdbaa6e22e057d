import json
from pathlib import Path

import pytest

from ccx_proxy.config import ConfigError, load_config, parse_config
from ccx_proxy.presets import PRESETS
from tests.conftest import UPSTREAM_KEY, channel

REPO_CHANNELS = Path(__file__).resolve().parent.parent / "channels.json"


def problems_of(data: object, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data, env or {})
    return info.value.problems


def test_issue_example_loads_with_env_key() -> None:
    data = {
        "channels": [
            {
                "name": "deepseek",
                "serviceType": "claude",
                "baseUrl": "https://api.deepseek.com/anthropic",
                "apiKeys": ["${DEEPSEEK_API_KEY}"],
                "authHeader": "auto",
                "modelMapping": {
                    "opus": "deepseek-v4-pro",
                    "sonnet": "deepseek-v4",
                    "haiku": "deepseek-v4-flash",
                },
                "supportedModels": [],
                "priority": 1,
                "status": "active",
                "customHeaders": {},
            }
        ]
    }
    config = parse_config(data, {"DEEPSEEK_API_KEY": "sk-deepseek-real-1234"})
    (ch,) = config.channels
    assert ch.api_keys == ("sk-deepseek-real-1234",)
    assert ch.key_refs == ("${DEEPSEEK_API_KEY}",)
    assert ch.credentials == (("x-api-key", "sk-deepseek-real-1234"),)
    assert ch.urls.messages.url == "https://api.deepseek.com/anthropic/v1/messages"
    assert ch.models.lookup("claude-opus-4-1") == "deepseek-v4-pro"
    assert config.warnings == ()
    assert "sk-deepseek-real-1234" not in ch.summary()
    assert "sk-deepseek-real-1234" not in repr(ch)


def test_repo_channels_json_is_the_working_demo_default() -> None:
    config = load_config(REPO_CHANNELS, env={})
    (active,) = config.channels
    assert active.active and active.base_url.startswith("http://127.0.0.1:")
    assert config.warnings == ()  # its "_comment" is a comment


def test_the_example_file_has_a_preset_per_provider() -> None:
    config = load_config(REPO_CHANNELS.with_name("channels.example.json"), env={})
    (active,) = config.active
    assert active.name == "demo-mock" and active.base_url.startswith("http://127.0.0.1:")
    assert config.warnings == ()
    by_name = {c.name: c for c in config.channels}
    assert set(by_name) == {"demo-mock", "anthropic", "deepseek", "kimi", "glm"}
    anthropic, deepseek = by_name["anthropic"], by_name["deepseek"]
    kimi, glm = by_name["kimi"], by_name["glm"]
    assert anthropic.base_url == "https://api.anthropic.com" and anthropic.auth_header == "x-api-key"
    assert anthropic.thinking.anthropic and not anthropic.thinking.strip_billing
    assert deepseek.base_url == "https://api.deepseek.com/anthropic"
    assert deepseek.thinking.passback and deepseek.thinking.strip_billing
    assert deepseek.models.lookup("claude-opus-4-8") == "deepseek-v4-pro"
    assert kimi.base_url == "https://api.kimi.com/coding/" and not kimi.thinking.passback
    assert glm.base_url == "https://open.bigmodel.cn/api/anthropic" and glm.auth_header == "bearer"
    for preset in (deepseek, kimi, glm):
        assert preset.thinking.signatures == "strip-foreign" and not preset.thinking.anthropic
    assert all(not c.active for c in (anthropic, deepseek, kimi, glm))


def test_underscore_fields_are_comments() -> None:
    config = parse_config(
        {"_comment": "top", "channels": [{**channel("a", "https://a.example"), "_note": ["x"]}]}, {}
    )
    assert config.warnings == () and config.channels[0].name == "a"


def test_unset_env_var_on_an_active_channel_names_channel_and_variable() -> None:
    (problem,) = problems_of({"channels": [channel("deepseek", "https://x", apiKeys=["${NOPE_KEY}"])]})
    assert problem == (
        "channels[0].apiKeys[0]: environment variable NOPE_KEY is not set (channel 'deepseek' is active)"
        ' -- export NOPE_KEY=... before starting ccx-proxy, or set the channel\'s "status" to "disabled"'
    )


@pytest.mark.parametrize(
    "fields, where",
    [
        pytest.param({"customHeaders": {"X-Org": "${NOPE_ORG}"}}, "customHeaders.X-Org", id="header"),
        pytest.param({"proxyUrl": "http://${NOPE_PROXY}:8080"}, "proxyUrl", id="proxy"),
    ],
)
def test_every_unset_env_var_message_names_the_variable_and_the_fix(
    fields: dict[str, object], where: str
) -> None:
    (problem,) = problems_of({"channels": [channel("c", "https://x", **fields)]})
    var = problem.split("environment variable ")[1].split()[0]
    assert problem.startswith(f"channels[0].{where}: environment variable NOPE_")
    assert f"export {var}=..." in problem and '"disabled"' in problem and "'c'" in problem


def test_unset_env_var_on_a_disabled_channel_is_fine() -> None:
    config = parse_config(
        {"channels": [channel("off", "https://x", apiKeys=["${NOPE_KEY}"], status="disabled")]}, {}
    )
    assert config.active == ()
    assert config.channels[0].summary().count("${NOPE_KEY}") == 1


@pytest.mark.parametrize(
    "fields, expected",
    [
        pytest.param(
            {"serviceType": "openai"}, "channels[0].serviceType: 'openai' is not supported", id="service-type"
        ),
        pytest.param({"baseUrl": "ftp://x"}, "channels[0].baseUrl: not an http(s) URL", id="base-url-scheme"),
        pytest.param({"baseUrl": "not a url"}, "channels[0].baseUrl:", id="base-url-garbage"),
        pytest.param(
            {"baseUrl": "https://u:p@x"},
            "channels[0].baseUrl: must not contain credentials",
            id="base-url-creds",
        ),
        pytest.param(
            {"baseUrl": "https://x/a?b=1"},
            "channels[0].baseUrl: must not contain a query",
            id="base-url-query",
        ),
        pytest.param({"authHeader": "basic"}, "channels[0].authHeader: must be one of", id="auth-header"),
        pytest.param({"status": "on"}, "channels[0].status: must be one of", id="status"),
        pytest.param({"priority": "1"}, "channels[0].priority: must be an integer", id="priority"),
        pytest.param(
            {"apiKeys": []}, "channels[0].apiKeys: an active channel needs at least one key", id="no-keys"
        ),
        pytest.param(
            {"apiKeys": "k"}, "channels[0].apiKeys: must be an array of strings", id="keys-not-list"
        ),
        pytest.param({"apiKeys": ["a b"]}, "channels[0].apiKeys[0]: must be printable ASCII", id="key-space"),
        pytest.param(
            {"modelMapping": {"opus": ""}},
            "channels[0].modelMapping.opus: must be a non-empty",
            id="mapping-empty",
        ),
        pytest.param(
            {"modelMapping": {"": "x"}},
            "channels[0].modelMapping: keys must be non-empty",
            id="mapping-empty-key",
        ),
        pytest.param({"modelMapping": []}, "channels[0].modelMapping: must be an object", id="mapping-list"),
        pytest.param({"supportedModels": ["a*b"]}, "channels[0].supportedModels[0]:", id="allowlist-pattern"),
        pytest.param(
            {"customHeaders": {"bad name": "v"}},
            "channels[0].customHeaders.bad name: is not a valid",
            id="header-name",
        ),
        pytest.param(
            {"customHeaders": {"Host": "v"}},
            "channels[0].customHeaders.Host: is managed",
            id="header-reserved",
        ),
        pytest.param(
            {"customHeaders": {"X-A": "a\r\nb"}},
            "channels[0].customHeaders.X-A: must not contain line",
            id="header-crlf",
        ),
        pytest.param(
            {"apiKeys": ["sk-\x00x"]}, "channels[0].apiKeys[0]: must be printable ASCII", id="key-nul"
        ),
        pytest.param(
            {"customHeaders": {"X-A": "a\x7fb"}},
            "channels[0].customHeaders.X-A: must not contain",
            id="header-del",
        ),
        pytest.param({"name": ""}, "channels[0].name: must be a non-empty string", id="name-empty"),
        pytest.param({"name": "a/b"}, "channels[0].name: must be printable", id="name-slash"),
    ],
)
def test_field_problems_have_paths(fields: dict[str, object], expected: str) -> None:
    problems = problems_of({"channels": [{**channel("c", "https://x"), **fields}]})
    assert any(p.startswith(expected) for p in problems), problems


def test_every_problem_is_reported_at_once() -> None:
    data = {
        "channels": [channel("a", "https://x", status="on"), {"name": "b"}, "junk", channel("a", "https://y")]
    }
    problems = problems_of(data)
    assert "channels[0].status: must be one of active, suspended, disabled (got 'on')" in problems
    assert "channels[1].baseUrl: is required" in problems
    assert "channels[2]: must be an object" in problems
    assert any(p.startswith("channels[3].name: duplicate channel name 'a'") for p in problems)


def test_unsupported_service_type_on_a_disabled_channel_is_a_warning() -> None:
    config = parse_config(
        {"channels": [channel("o", "https://x", serviceType="openai", status="disabled")]}, {}
    )
    assert any("openai" in w for w in config.warnings)


@pytest.mark.parametrize(
    "data", [[], {"chans": []}, {"channels": {}}], ids=["array", "no-channels", "not-array"]
)
def test_top_level_shape(data: object) -> None:
    assert problems_of(data)


def test_ccx_config_json_upstream_array_loads_with_one_warning_per_unknown_field() -> None:
    ccx = {
        "upstream": [
            {**channel("a", "https://a.example"), "id": "1", "website": "https://a", "description": "x"},
            {**channel("b", "https://b.example"), "id": "2", "website": "https://b"},
        ],
        "currentUpstream": 0,
        "loadBalance": "failover",
    }
    config = parse_config(ccx, {})
    assert [c.name for c in config.channels] == ["a", "b"]
    assert sorted(config.warnings) == sorted(
        [
            "ignoring unknown top-level field 'currentUpstream'",
            "ignoring unknown top-level field 'loadBalance'",
            "ignoring unknown channel field 'id' (upstream[0], upstream[1])",
            "ignoring unknown channel field 'website' (upstream[0], upstream[1])",
            "ignoring unknown channel field 'description' (upstream[0])",
        ]
    )
    problems = problems_of({"upstream": [{"name": "x"}]})
    assert problems[0].startswith("upstream[0].")


@pytest.mark.parametrize(
    "fields, problem",
    [
        pytest.param(
            {"stauts": "disabled"}, "channels[0].stauts: unknown channel field -- did you mean 'status'?"
        ),
        pytest.param(
            {"baseURL": "https://y"}, "channels[0].baseURL: unknown channel field -- did you mean 'baseUrl'?"
        ),
        pytest.param({"apiKey": "k"}, "channels[0].apiKey: unknown channel field -- did you mean 'apiKeys'?"),
        pytest.param(
            {"model_mapping": {}},
            "channels[0].model_mapping: unknown channel field -- did you mean 'modelMapping'?",
        ),
    ],
)
def test_a_typo_of_a_channel_field_is_an_error_with_a_suggestion(
    fields: dict[str, object], problem: str
) -> None:
    # "stauts" used to be ignored with a warning, leaving the channel active.
    assert problems_of({"channels": [{**channel("a", "https://a.example"), **fields}]}) == [problem]


def test_a_typo_of_a_top_level_field_is_an_error_with_a_suggestion() -> None:
    data = {"channels": [channel("a", "https://a.example")], "sessionAfinity": {}, "circuitbreaker": {}}
    assert problems_of(data) == [
        "circuitbreaker: unknown top-level field -- did you mean 'circuitBreaker'?",
        "sessionAfinity: unknown top-level field -- did you mean 'sessionAffinity'?",
    ]


def test_unknown_fields_far_from_ours_stay_warnings() -> None:
    config = parse_config(
        {"channels": [{**channel("a", "https://a.example"), "someCcxField": True}], "x": 1}, {}
    )
    assert sorted(config.warnings) == [
        "ignoring unknown channel field 'someCcxField' (channels[0])",
        "ignoring unknown top-level field 'x'",
    ]


def test_active_channels_sort_by_priority_then_file_order() -> None:
    config = parse_config(
        {
            "channels": [
                channel("c", "https://x", priority=2),
                channel("a", "https://x", priority=1),
                channel("b", "https://x", priority=2),
                channel("d", "https://x", priority=0, status="suspended"),
            ]
        },
        {},
    )
    assert [c.name for c in config.active] == ["a", "c", "b"]


def test_default_priority_is_file_position() -> None:
    config = parse_config({"channels": [channel("a", "https://x"), channel("b", "https://x")]}, {})
    assert [c.priority for c in config.channels] == [1, 2]


def test_env_refs_in_custom_headers_and_bearer_mode() -> None:
    config = parse_config(
        {"channels": [channel("c", "https://x", authHeader="bearer", customHeaders={"X-Org": "org-${ORG}"})]},
        {"ORG": "42"},
    )
    (ch,) = config.channels
    assert ch.custom_headers == (("X-Org", "org-42"),)
    assert ch.credentials == (("Authorization", f"Bearer {UPSTREAM_KEY}"),)


def test_load_config_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(bad)
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"channels": [channel("a", "https://x")]}))
    assert load_config(good).source == str(good)


def test_resilience_settings_top_level_and_per_channel() -> None:
    config = parse_config(
        {
            "connectTimeoutMs": 2000,
            "keepaliveMs": 0,
            "maxAttempts": 3,
            "allowChannelHeader": False,
            "circuitBreaker": {"consecutiveFailures": 2},
            "sessionAffinity": {"ttlMs": 1000},
            "channels": [
                channel(
                    "a",
                    "https://a",
                    baseUrls=["https://a2/", "https://a"],
                    streamInactivityTimeoutMs=5000,
                    circuitBreaker={"enabled": False},
                ),
                channel("b", "https://b"),
            ],
        },
        {},
    )
    a, b = config.channels
    assert config.routing.maxAttempts == 3 and not config.routing.allowChannelHeader
    assert config.affinity.ttlMs == 1000
    assert a.timeouts.connectTimeoutMs == 2000 and a.timeouts.streamInactivityTimeoutMs == 5000
    assert b.timeouts.streamInactivityTimeoutMs == 120_000 and b.timeouts.keepaliveMs == 0
    assert not a.breaker.enabled and a.breaker.consecutiveFailures == 2
    assert b.breaker.enabled and b.breaker.consecutiveFailures == 2
    assert [u.messages.url for u in a.all_urls] == ["https://a/v1/messages", "https://a2/v1/messages"]
    assert b.timeouts.connect == 2.0 and b.timeouts.first_byte(True) == 60.0
    assert b.timeouts.first_byte(False) == 600.0  # nonStreamTimeoutMs: the SDKs' own default


@pytest.mark.parametrize(
    "top, expected",
    [
        pytest.param(
            {"connectTimeoutMs": -1}, "connectTimeoutMs: must be a non-negative integer", id="negative"
        ),
        pytest.param({"connectTimeoutMs": 0}, "connectTimeoutMs: must be at least 1", id="zero-timeout"),
        pytest.param({"maxAttempts": "2"}, "maxAttempts: must be a non-negative integer", id="string"),
        pytest.param(
            {"circuitBreaker": {"failureRateThreshold": 2}}, "circuitBreaker.failureRateThreshold:", id="rate"
        ),
        pytest.param({"circuitBreaker": {"bogus": 1}}, "circuitBreaker.bogus: unknown field", id="unknown"),
        pytest.param({"sessionAffinity": []}, "sessionAffinity: must be an object", id="not-object"),
        pytest.param({"allowChannelHeader": 1}, "allowChannelHeader: must be true or false", id="bool"),
    ],
)
def test_resilience_setting_problems(top: dict[str, object], expected: str) -> None:
    problems = problems_of({"channels": [channel("a", "https://a")], **top})
    assert any(p.startswith(expected) for p in problems), problems


def test_per_channel_resilience_problems_have_paths() -> None:
    problems = problems_of(
        {
            "channels": [
                channel(
                    "a", "https://a", baseUrls=["ftp://x"], keepaliveMs="1", circuitBreaker={"openMs": -5}
                )
            ]
        }
    )
    assert "channels[0].baseUrls[0]: not an http(s) URL: 'ftp://x'" in problems
    assert any(p.startswith("channels[0].keepaliveMs: must be") for p in problems)
    assert any(p.startswith("channels[0].circuitBreaker.openMs: must be") for p in problems)


def test_channel_test_button_names_the_unset_variable_and_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    from ccx_proxy.admin.probe import no_key_message

    monkeypatch.delenv("NOPE_KEY", raising=False)
    config = parse_config(
        {"channels": [channel("off", "https://x", apiKeys=["${NOPE_KEY}"], status="disabled")]}, {}
    )
    message = no_key_message(config.channels[0], 0)
    assert message.startswith("no usable key at index 0: the channel has 0 resolved key(s); ")
    assert "environment variable NOPE_KEY is not set -- export NOPE_KEY=... and restart ccx-proxy" in message
    assert message.endswith('or set the channel\'s "status" to "disabled"')


def test_the_example_file_holds_the_consoles_presets() -> None:
    """One source for the presets (ccx_proxy.presets): the example file may not drift from it."""
    data = json.loads(REPO_CHANNELS.with_name("channels.example.json").read_text())
    in_file = {
        c["name"]: {k: v for k, v in c.items() if not k.startswith("_") and k not in ("priority", "status")}
        for c in data["channels"]
    }
    for preset in PRESETS.values():
        assert in_file[preset["channel"]["name"]] == preset["channel"]
    assert set(in_file) == {"demo-mock", *(p["channel"]["name"] for p in PRESETS.values())}
