"""Usage read from SSE and JSON responses: every field, any chunking, bounded."""

from __future__ import annotations

import orjson
import pytest

from ccx_proxy.team.meter import Usage, UsageMeter

START = {
    "type": "message_start",
    "message": {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude-sonnet-4-5-20250929",
        "content": [],
        "usage": {
            "input_tokens": 12,
            "cache_creation_input_tokens": 700,
            "cache_read_input_tokens": 5000,
            "cache_creation": {"ephemeral_5m_input_tokens": 300, "ephemeral_1h_input_tokens": 400},
            "output_tokens": 1,
        },
    },
}
DELTA = {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 87}}


def sse(*events: dict[str, object]) -> bytes:
    return b"".join(
        b"event: " + str(e["type"]).encode() + b"\ndata: " + orjson.dumps(e) + b"\n\n" for e in events
    )


STREAM = sse(
    START,
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": 'usage "usage"'}},
    {"type": "content_block_stop", "index": 0},
    DELTA,
    {"type": "message_stop"},
)
EXPECTED = Usage(
    input_tokens=12,
    output_tokens=87,
    cache_write_5m=300,
    cache_write_1h=400,
    cache_read=5000,
    model="claude-sonnet-4-5-20250929",
)


def _metered(chunks: list[bytes]) -> Usage:
    meter = UsageMeter()
    for chunk in chunks:
        # The relay's own condition (ccx_proxy.stream).
        if meter.partial or b'"usage"' in chunk or chunk[-1] != 10:
            meter.feed(chunk)
    return meter.usage


def test_whole_stream_in_one_chunk() -> None:
    assert _metered([STREAM]) == EXPECTED


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, 333])
def test_every_chunking_gives_the_same_usage(size: int) -> None:
    chunks = [STREAM[i : i + size] for i in range(0, len(STREAM), size)]
    assert _metered(chunks) == EXPECTED


def test_cache_writes_without_the_split_count_as_5_minute() -> None:
    start = {
        "type": "message_start",
        "message": {"model": "m", "usage": {"input_tokens": 3, "cache_creation_input_tokens": 50}},
    }
    usage = _metered([sse(start, DELTA)])
    assert (usage.cache_write_5m, usage.cache_write_1h, usage.output_tokens) == (50, 0, 87)


def test_a_provider_that_reports_input_in_message_delta() -> None:
    start = {
        "type": "message_start",
        "message": {"model": "glm-4.7", "usage": {"input_tokens": 0, "output_tokens": 0}},
    }
    delta = {
        "type": "message_delta",
        "usage": {"input_tokens": 900, "output_tokens": 40, "cache_read_input_tokens": 64},
    }
    usage = _metered([sse(start, delta)])
    assert (usage.input_tokens, usage.output_tokens, usage.cache_read, usage.total) == (900, 40, 64, 1004)


def test_json_answer() -> None:
    meter = UsageMeter()
    meter.feed_json(
        orjson.dumps({**START["message"], "usage": {**START["message"]["usage"], "output_tokens": 87}})
    )  # type: ignore[dict-item]
    assert meter.usage == EXPECTED


@pytest.mark.parametrize(
    "junk",
    [
        b'data: {"type":"message_delta","usage":{"output_tokens":-5}}\n\n',
        b'data: {"type":"message_delta","usage":{"output_tokens":"7"}}\n\n',
        b'data: {"type":"message_delta","usage":[1,2]}\n\n',
        b'data: {"usage" broken json\n\n',
        b'data: ["usage"]\n\n',
        b': comment "usage"\n\n',
    ],
)
def test_malformed_usage_is_ignored(junk: bytes) -> None:
    assert _metered([junk]) == Usage()


def test_a_long_line_without_newline_is_bounded() -> None:
    meter = UsageMeter()
    for _ in range(200):
        meter.feed(b"x" * 4096)  # 800 KB with no line end: never kept whole
    assert len(meter.partial) <= 64 * 1024
