"""Per-channel thinking / Claude Code compatibility rewrites (ccx_proxy.thinking)."""

from __future__ import annotations

import importlib.util
import timeit
from pathlib import Path
from typing import Any

import orjson
import pytest

from ccx_proxy.thinking import (
    OFF,
    THINKING_FIELDS,
    ThinkingOptions,
    anthropic_signature,
    is_anthropic,
    parse_thinking,
    rewrite,
)

REPO = Path(__file__).resolve().parent.parent
SIG = "EqQBCgIYAhIM1gbcDa9GJwZA2b3hGgxBdjrkzLoky3dl1pkiMOYds/vtpBqhp+eC3Pnfa6HL0nuwfowfEahHR0BJ6vYEnNW=="
BILLING = "x-anthropic-billing-header: cc_version=2.1.117.48f; cc_entrypoint=cli; cch=71fea;"

FOREIGN = ThinkingOptions(signatures="strip-foreign")
FOREIGN_ANTHROPIC = ThinkingOptions(signatures="strip-foreign", anthropic=True)
STRIP_ALL = ThinkingOptions(signatures="strip-all")
PASSBACK = ThinkingOptions(passback=True)
BILLING_ONLY = ThinkingOptions(strip_billing=True)
EVERYTHING = ThinkingOptions(signatures="strip-all", passback=True, strip_billing=True)


def dumps(doc: Any) -> bytes:
    return orjson.dumps(doc)


def user(text: str = "hi") -> dict[str, Any]:
    return {"role": "user", "content": [{"type": "text", "text": text}]}


def result(tool_id: str = "t1") -> dict[str, Any]:
    return {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tool_id, "content": "ok"}]}


def tool(tool_id: str = "t1") -> dict[str, Any]:
    return {"type": "tool_use", "id": tool_id, "name": "Read", "input": {"path": "/a"}}


def thinking(text: str = "hmm", signature: str | None = SIG) -> dict[str, Any]:
    block: dict[str, Any] = {"type": "thinking", "thinking": text}
    if signature is not None:
        block["signature"] = signature
    return block


REDACTED = {"type": "redacted_thinking", "data": "EmwKAhgBEgy3va3pzix/LafPsn4aDFIT"}


def body(*messages: dict[str, Any], setting: Any = None, **rest: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"model": "m", "max_tokens": 100}
    if setting is not None:
        doc["thinking"] = setting
    return {**doc, **rest, "messages": list(messages)}


ON = {"type": "enabled", "budget_tokens": 2000}
OFF_SETTING = {"type": "disabled"}


# --- parsing -----------------------------------------------------------------------------


def test_parse_defaults_are_off() -> None:
    problems: list[str] = []
    options = parse_thinking({"name": "x"}, "channels[0]", problems, "https://api.deepseek.com/anthropic")
    assert options == OFF == ThinkingOptions()
    assert not options.enabled and problems == []
    assert THINKING_FIELDS == (
        "thinkingSignatures",
        "thinkingPassback",
        "stripBillingBlock",
        "thinkingProvider",
    )


def test_parse_values_and_upstream_kind() -> None:
    problems: list[str] = []
    item = {"thinkingSignatures": "strip-foreign", "thinkingPassback": True, "stripBillingBlock": True}
    options = parse_thinking(item, "channels[2]", problems, "https://api.anthropic.com")
    assert problems == []
    assert options == ThinkingOptions("strip-foreign", True, True, anthropic=True)
    assert options.enabled
    assert parse_thinking(item, "c", problems, "https://api.deepseek.com/anthropic").anthropic is False


def test_parse_reports_problems_with_paths() -> None:
    problems: list[str] = []
    item = {"thinkingSignatures": "strip", "thinkingPassback": "yes", "stripBillingBlock": 1}
    assert parse_thinking(item, "channels[1]", problems) == OFF
    assert problems == [
        "channels[1].thinkingSignatures: must be one of keep, strip-foreign, strip-all (got 'strip')",
        "channels[1].thinkingPassback: must be true or false (got 'yes')",
        "channels[1].stripBillingBlock: must be true or false (got 1)",
    ]


@pytest.mark.parametrize(
    "url, expected",
    [
        ("https://api.anthropic.com", True),
        ("https://api.anthropic.com/", True),
        ("https://API.Anthropic.com.:443/v1", True),
        ("https://anthropic.com", True),
        ("https://api.deepseek.com/anthropic", False),
        ("https://anthropic.com.evil.example", False),
        ("https://notanthropic.com", False),
        ("http://[::1", False),
        ("", False),
        (None, False),
    ],
)
def test_is_anthropic(url: str | None, expected: bool) -> None:
    assert is_anthropic(url) is expected


@pytest.mark.parametrize(
    "signature, expected",
    [
        (SIG, True),
        ("A" * 64, True),
        ("A" * 63, False),
        ("", False),
        (None, False),
        (12345, False),
        ("claude#" + "A" * 80, False),
        ("a" * 40 + " " + "b" * 40, False),
    ],
)
def test_anthropic_signature_shape(signature: Any, expected: bool) -> None:
    assert anthropic_signature(signature) is expected


# --- the byte-exact path -----------------------------------------------------------------


PLAIN = dumps(body(user(), {"role": "assistant", "content": [{"type": "text", "text": "yo"}]}, user()))


@pytest.mark.parametrize(
    "options",
    [OFF, FOREIGN, FOREIGN_ANTHROPIC, STRIP_ALL, PASSBACK, BILLING_ONLY, EVERYTHING],
    ids=["off", "foreign", "foreign-anthropic", "strip-all", "passback", "billing", "everything"],
)
def test_no_trigger_bytes_same_object(options: ThinkingOptions) -> None:
    assert rewrite(PLAIN, options) is PLAIN


def test_off_never_looks_at_the_body() -> None:
    raw = dumps(body(user(), {"role": "assistant", "content": [thinking(), tool()]}, result(), setting=ON))
    assert rewrite(raw, OFF) is raw
    assert rewrite(b"not json", OFF) == b"not json"


@pytest.mark.parametrize(
    "raw, options",
    [
        # The request's own "thinking" setting is one occurrence: no block to strip.
        (dumps(body(user(), setting=ON)), STRIP_ALL),
        (dumps(body(user(), setting=ON)), FOREIGN_ANTHROPIC),
        # The trigger bytes are there, but there is nothing to change.
        (dumps(body(user(), {"role": "assistant", "content": [thinking(), tool()]}, result())), PASSBACK),
        (dumps(body(user(BILLING))), BILLING_ONLY),  # in a message, not in the system prompt
        (dumps(body(user(), system="x-anthropic-billing-header is what it says")), BILLING_ONLY),
        (dumps(body(user(), {"role": "assistant", "content": [thinking(), tool()]})), FOREIGN_ANTHROPIC),
        (dumps(body(user(), {"role": "assistant", "content": [thinking(signature=None)]})), FOREIGN),
        (b'{"messages": [{"type": "tool_use"', PASSBACK),  # not JSON: the upstream answers it
        (b'["tool_use", "thinking", "thinking"]', EVERYTHING),  # not an object
    ],
)
def test_nothing_to_change_same_object(raw: bytes, options: ThinkingOptions) -> None:
    assert rewrite(raw, options) is raw


# --- thinkingSignatures ------------------------------------------------------------------


def history(*, first: dict[str, Any], last: list[dict[str, Any]]) -> dict[str, Any]:
    return body(
        user(),
        {"role": "assistant", "content": [first, {"type": "text", "text": "a"}, tool("t1")]},
        result("t1"),
        {"role": "assistant", "content": [*last, tool("t2")]},
        result("t2"),
        setting=ON,
    )


def test_strip_foreign_non_anthropic_removes_signatures_and_redacted() -> None:
    raw = dumps(history(first=REDACTED, last=[thinking("mine", SIG), thinking("other", "short")]))
    expected = history(first=REDACTED, last=[thinking("mine", None), thinking("other", None)])
    expected["messages"][1]["content"].pop(0)  # redacted_thinking: unreadable off Anthropic
    assert rewrite(raw, FOREIGN) == dumps(expected)


def test_strip_foreign_non_anthropic_keeps_unsigned_blocks_untouched() -> None:
    raw = dumps(history(first=thinking("a", None), last=[thinking("b", None)]))
    assert rewrite(raw, FOREIGN) is raw  # DeepSeek's own blocks: nothing to change


def test_a_lone_redacted_block_is_seen_without_a_thinking_setting() -> None:
    doc = body(user(), {"role": "assistant", "content": [REDACTED, {"type": "text", "text": "a"}]}, user())
    assert dumps(doc).count(b'thinking"') == 1
    expected = body(user(), {"role": "assistant", "content": [{"type": "text", "text": "a"}]}, user())
    assert rewrite(dumps(doc), FOREIGN) == dumps(expected)


def test_strip_foreign_anthropic_drops_what_anthropic_did_not_mint() -> None:
    raw = dumps(
        history(
            first=thinking("deepseek", None),
            last=[REDACTED, thinking("empty", ""), thinking("odd", "claude#abc"), thinking("real", SIG)],
        )
    )
    expected = body(
        user(),
        {"role": "assistant", "content": [{"type": "text", "text": "a"}, tool("t1")]},
        result("t1"),
        {"role": "assistant", "content": [REDACTED, thinking("real", SIG), tool("t2")]},
        result("t2"),
        setting=ON,
    )
    assert rewrite(raw, FOREIGN_ANTHROPIC) == dumps(expected)


def test_last_tool_turn_losing_its_thinking_turns_thinking_off() -> None:
    """Anthropic: a final assistant message with tool_use must start with thinking, or thinking off."""
    raw = dumps(history(first=thinking("ok", SIG), last=[thinking("from deepseek", None)]))
    expected = body(
        user(),
        {"role": "assistant", "content": [thinking("ok", SIG), {"type": "text", "text": "a"}, tool("t1")]},
        result("t1"),
        {"role": "assistant", "content": [tool("t2")]},
        result("t2"),
        setting=OFF_SETTING,  # replaced where it was
    )
    assert rewrite(raw, FOREIGN_ANTHROPIC) == dumps(expected)


def test_thinking_off_also_drops_interleaved_thinking_and_clear_thinking_edits() -> None:
    text = {"type": "text", "text": "b"}
    doc = history(
        first=thinking("a", SIG), last=[thinking("deepseek", None), text, thinking("later", SIG), REDACTED]
    )
    doc["context_management"] = {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]}
    out = orjson.loads(rewrite(dumps(doc), FOREIGN_ANTHROPIC))
    assert out["thinking"] == {"type": "disabled"}
    assert out["messages"][3]["content"] == [text, tool("t2")]
    assert out["messages"][1]["content"][0] == thinking("a", SIG)  # earlier turns may keep theirs
    assert "context_management" not in out

    doc["context_management"] = {
        "edits": [{"type": "clear_thinking_20251015"}, {"type": "clear_tool_uses_20250919"}]
    }
    out = orjson.loads(rewrite(dumps(doc), FOREIGN_ANTHROPIC))
    assert out["context_management"] == {"edits": [{"type": "clear_tool_uses_20250919"}]}
    doc["context_management"] = {"edits": [{"type": "clear_tool_uses_20250919"}]}
    out = orjson.loads(rewrite(dumps(doc), FOREIGN_ANTHROPIC))
    assert out["context_management"] == {"edits": [{"type": "clear_tool_uses_20250919"}]}


def test_thinking_off_is_added_when_the_setting_was_absent() -> None:
    doc = history(first=thinking("a", SIG), last=[thinking("b", SIG)])
    del doc["thinking"]
    out = orjson.loads(rewrite(dumps(doc), STRIP_ALL))
    assert out["thinking"] == {"type": "disabled"}
    assert list(out)[-1] == "thinking"
    assert out["messages"][3]["content"] == [tool("t2")]


def test_strip_all_drops_every_thinking_block_and_turns_thinking_off() -> None:
    raw = dumps(history(first=REDACTED, last=[thinking("b", SIG), thinking("c", None)]))
    expected = body(
        user(),
        {"role": "assistant", "content": [{"type": "text", "text": "a"}, tool("t1")]},
        result("t1"),
        {"role": "assistant", "content": [tool("t2")]},
        result("t2"),
        setting=OFF_SETTING,
    )
    assert rewrite(raw, STRIP_ALL) == dumps(expected)
    assert rewrite(raw, ThinkingOptions("strip-all", anthropic=True)) == dumps(expected)


def test_thinking_stays_on_when_the_last_turn_keeps_leading_with_thinking() -> None:
    raw = dumps(history(first=thinking("x", None), last=[thinking("y", SIG)]))
    out = orjson.loads(rewrite(raw, FOREIGN_ANTHROPIC))
    assert out["thinking"] == ON
    assert out["messages"][1]["content"] == [{"type": "text", "text": "a"}, tool("t1")]
    assert out["messages"][3]["content"] == [thinking("y", SIG), tool("t2")]


def test_thinking_left_alone_when_the_last_turn_had_no_thinking_to_lose() -> None:
    doc = history(first=thinking("x", None), last=[])
    out = orjson.loads(rewrite(dumps(doc), STRIP_ALL))
    assert out["thinking"] == ON  # the client sent it that way: not ours to fix
    assert out["messages"][1]["content"] == [{"type": "text", "text": "a"}, tool("t1")]


def test_last_assistant_without_tool_use_needs_no_thinking() -> None:
    doc = body(
        user(),
        {"role": "assistant", "content": [thinking("x", SIG), tool("t1")]},
        result("t1"),
        {"role": "assistant", "content": [thinking("y", SIG), {"type": "text", "text": "done"}]},
        user("next"),
        setting=ON,
    )
    out = orjson.loads(rewrite(dumps(doc), STRIP_ALL))
    assert out["thinking"] == ON
    assert out["messages"][3]["content"] == [{"type": "text", "text": "done"}]


def test_thinking_already_disabled_stays_as_sent() -> None:
    doc = history(first=thinking("a", SIG), last=[thinking("b", SIG)])
    doc["thinking"] = {"type": "disabled"}
    out = orjson.loads(rewrite(dumps(doc), STRIP_ALL))
    assert out["thinking"] == {"type": "disabled"}
    assert out["messages"][3]["content"] == [tool("t2")]


def test_an_assistant_message_left_empty_is_removed() -> None:
    doc = body(
        user("a"),
        {"role": "assistant", "content": [thinking("only thought", None)]},
        user("b"),
        setting=ON,
    )
    expected = body(user("a"), user("b"), setting=ON)
    assert rewrite(dumps(doc), FOREIGN_ANTHROPIC) == dumps(expected)


def test_string_content_and_odd_shapes_are_left_alone() -> None:
    doc = {
        "model": "m",
        "thinking": ON,
        "messages": [
            user(),
            {"role": "assistant", "content": "plain thinking"},
            {"role": "assistant", "content": [thinking("x", SIG), "not a block"]},
            {"role": "user", "content": [thinking("user side", None)]},  # only assistant turns
            "junk",
        ],
    }
    out = orjson.loads(rewrite(dumps(doc), STRIP_ALL))
    assert out["messages"] == [
        user(),
        {"role": "assistant", "content": "plain thinking"},
        {"role": "assistant", "content": ["not a block"]},
        {"role": "user", "content": [thinking("user side", None)]},
        "junk",
    ]


# --- thinkingPassback --------------------------------------------------------------------


def test_passback_inserts_an_empty_thinking_block_on_tool_turns_without_one() -> None:
    doc = body(
        user(),
        {"role": "assistant", "content": [{"type": "text", "text": "a"}, tool("t1")]},
        result("t1"),
        {"role": "assistant", "content": [thinking("kept", None), tool("t2")]},
        result("t2"),
        {"role": "assistant", "content": [{"type": "text", "text": "no tool"}]},
        user(),
        setting=ON,
    )
    expected = body(
        user(),
        {
            "role": "assistant",
            "content": [{"type": "thinking", "thinking": ""}, {"type": "text", "text": "a"}, tool("t1")],
        },
        result("t1"),
        {"role": "assistant", "content": [thinking("kept", None), tool("t2")]},
        result("t2"),
        {"role": "assistant", "content": [{"type": "text", "text": "no tool"}]},
        user(),
        setting=ON,
    )
    assert rewrite(dumps(doc), PASSBACK) == dumps(expected)


def test_passback_applies_when_the_setting_is_absent_but_not_when_disabled() -> None:
    turn = {"role": "assistant", "content": [tool("t1")]}
    absent = dumps(body(user(), turn, result()))
    assert orjson.loads(rewrite(absent, PASSBACK))["messages"][1]["content"] == [
        {"type": "thinking", "thinking": ""},
        tool("t1"),
    ]
    disabled = dumps(body(user(), turn, result(), setting=OFF_SETTING))
    assert rewrite(disabled, PASSBACK) is disabled


def test_passback_after_strip_all_keeps_thinking_on() -> None:
    raw = dumps(history(first=thinking("a", SIG), last=[thinking("b", SIG)]))
    expected = body(
        user(),
        {
            "role": "assistant",
            "content": [{"type": "thinking", "thinking": ""}, {"type": "text", "text": "a"}, tool("t1")],
        },
        result("t1"),
        {"role": "assistant", "content": [{"type": "thinking", "thinking": ""}, tool("t2")]},
        result("t2"),
        setting=ON,
    )
    assert rewrite(raw, ThinkingOptions("strip-all", passback=True)) == dumps(expected)


# --- stripBillingBlock -------------------------------------------------------------------


def test_billing_block_removed_from_system_blocks() -> None:
    cached = {"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}}
    doc = body(user(), system=[{"type": "text", "text": BILLING}, cached])
    assert rewrite(dumps(doc), BILLING_ONLY) == dumps(body(user(), system=[cached]))


def test_billing_line_removed_from_a_block_that_holds_more() -> None:
    doc = body(user(), system=[{"type": "text", "text": BILLING + "\n\nYou are Claude Code.", "x": 1}])
    expected = body(user(), system=[{"type": "text", "text": "You are Claude Code.", "x": 1}])
    assert rewrite(dumps(doc), BILLING_ONLY) == dumps(expected)


def test_billing_line_removed_from_a_string_system() -> None:
    doc = body(user(), system=BILLING + "\nYou are Claude Code.")
    assert rewrite(dumps(doc), BILLING_ONLY) == dumps(body(user(), system="You are Claude Code."))


@pytest.mark.parametrize("system", [BILLING, [{"type": "text", "text": BILLING}]], ids=["string", "blocks"])
def test_system_removed_when_only_the_billing_block_was_in_it(system: Any) -> None:
    doc = body(user(), system=system)
    assert rewrite(dumps(doc), BILLING_ONLY) == dumps(body(user()))


def test_billing_not_at_the_start_of_a_block_is_kept() -> None:
    doc = body(user(), system=[{"type": "text", "text": "Note: " + BILLING}, {"type": "image"}, "odd"])
    raw = dumps(doc)
    assert rewrite(raw, BILLING_ONLY) is raw


def test_all_options_together_on_a_claude_code_turn() -> None:
    doc = history(first=thinking("a", SIG), last=[thinking("b", None)])
    doc["system"] = [{"type": "text", "text": BILLING}, {"type": "text", "text": "You are Claude Code."}]
    out = orjson.loads(rewrite(dumps(doc), EVERYTHING))
    assert out["system"] == [{"type": "text", "text": "You are Claude Code."}]
    assert out["thinking"] == ON
    assert out["messages"][1]["content"][0] == {"type": "thinking", "thinking": ""}
    assert out["messages"][3]["content"] == [{"type": "thinking", "thinking": ""}, tool("t2")]


# --- cost on a Claude Code-sized body ----------------------------------------------------


def _claude_code_body() -> bytes:
    spec = importlib.util.spec_from_file_location("bench_body_model", REPO / "bench" / "body_model.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    raw: bytes = module.claude_code_body()
    return raw


def _with_thinking_turns(raw: bytes) -> bytes:
    """The same body as a Claude Code tool loop: billing block, thinking on, signed tool turns."""
    doc = orjson.loads(raw)
    doc["system"].insert(0, {"type": "text", "text": BILLING})
    doc["thinking"] = ON
    for i, message in enumerate(doc["messages"]):
        if message["role"] == "assistant":
            message["content"] = [thinking("Let me look. " * 20, SIG * 4), *message["content"], tool(f"t{i}")]
        elif i:
            message["content"].insert(0, {"type": "tool_result", "tool_use_id": f"t{i - 1}", "content": "ok"})
    return orjson.dumps(doc)


def test_cost_on_a_claude_code_body(capsys: pytest.CaptureFixture[str]) -> None:
    """Prints the cost; asserts only what the result is (timings are machine-dependent)."""
    plain = _claude_code_body()
    loop = _with_thinking_turns(plain)
    assert rewrite(plain, EVERYTHING) is plain
    assert b"x-anthropic-billing-header" not in rewrite(loop, BILLING_ONLY)

    def us(fn: Any, number: int) -> float:
        return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6

    rows = [
        ("options off (every channel by default)", us(lambda: rewrite(loop, OFF), 20000)),
        ("stripBillingBlock, no trigger bytes", us(lambda: rewrite(plain, BILLING_ONLY), 2000)),
        ("thinkingSignatures=strip-foreign, no trigger bytes", us(lambda: rewrite(plain, FOREIGN), 2000)),
        ("thinkingPassback, no trigger bytes", us(lambda: rewrite(plain, PASSBACK), 2000)),
        ("all options on, no trigger bytes", us(lambda: rewrite(plain, EVERYTHING), 2000)),
        ("thinkingPassback, trigger but nothing to change", us(lambda: rewrite(loop, PASSBACK), 200)),
        ("stripBillingBlock, rewrite", us(lambda: rewrite(loop, BILLING_ONLY), 200)),
        ("thinkingSignatures=strip-foreign, rewrite", us(lambda: rewrite(loop, FOREIGN), 200)),
        ("all options on, rewrite", us(lambda: rewrite(loop, EVERYTHING), 200)),
        ("reference: orjson.loads + dumps", us(lambda: orjson.dumps(orjson.loads(loop)), 200)),
    ]
    with capsys.disabled():
        print(f"\nbody: plain {len(plain) / 1024:.1f} KiB, tool loop {len(loop) / 1024:.1f} KiB")
        for name, cost in rows:
            print(f"  {name:52} {cost:9.1f} µs")


def test_thinking_provider_overrides_the_host_guess() -> None:
    problems: list[str] = []
    relay = "https://llm-egress.example.com/anthropic"
    assert not parse_thinking({}, "c", problems, relay).anthropic
    assert parse_thinking({"thinkingProvider": "anthropic"}, "c", problems, relay).anthropic
    assert parse_thinking({"thinkingProvider": "auto"}, "c", problems, "https://api.anthropic.com").anthropic
    assert not parse_thinking(
        {"thinkingProvider": "other"}, "c", problems, "https://api.anthropic.com"
    ).anthropic
    assert problems == []
    parse_thinking({"thinkingProvider": "claude"}, "channels[2]", problems, relay)
    assert problems == ["channels[2].thinkingProvider: must be one of auto, anthropic, other (got 'claude')"]
