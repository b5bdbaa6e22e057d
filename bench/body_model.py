"""Micro-benchmark: finding the model in a Claude Code-sized request body.

Compares the gateway's field scan (``ccx_proxy.body.find_model``) with a full
``orjson.loads`` of the same ~110 KB body, side by side in one run.

    .venv/bin/python bench/body_model.py
"""

from __future__ import annotations

import statistics
import time

import orjson

from ccx_proxy.body import find_model, replace_model


def claude_code_body(model_first: bool = True) -> bytes:
    """A synthetic body shaped like Claude Code's: system prompt, ~25 tools, a conversation."""
    system = [
        {"type": "text", "text": "You are Claude Code. " * 1600, "cache_control": {"type": "ephemeral"}}
    ]
    tools = [
        {
            "name": f"Tool{i}",
            "description": "Does a thing with files and shells. " * 40,
            "input_schema": {
                "type": "object",
                "properties": {
                    "model": {"type": "string", "enum": ["sonnet", "opus", "haiku"]},
                    "path": {"type": "string", "description": "Absolute path " * 10},
                    "limit": {"type": "integer"},
                },
                "required": ["path"],
            },
        }
        for i in range(25)
    ]
    messages = [
        {
            "role": "user" if i % 2 == 0 else "assistant",
            "content": [{"type": "text", "text": "Please edit. " * 120}],
        }
        for i in range(20)
    ]
    rest = {
        "messages": messages,
        "system": system,
        "tools": tools,
        "max_tokens": 32000,
        "stream": True,
        "metadata": {"user_id": "user_abc_account__session_123"},
    }
    doc = {"model": "claude-opus-4-1", **rest} if model_first else {**rest, "model": "claude-opus-4-1"}
    return orjson.dumps(doc)


def _median_us(fn, body: bytes, rounds: int = 2000) -> float:
    samples = []
    for _ in range(rounds):
        t0 = time.perf_counter_ns()
        fn(body)
        samples.append(time.perf_counter_ns() - t0)
    return statistics.median(samples) / 1000


def main() -> None:
    first = claude_code_body(model_first=True)
    last = claude_code_body(model_first=False)
    print(f"body size: {len(first) / 1024:.1f} KiB")
    rows = [
        ("orjson.loads (full parse)", _median_us(orjson.loads, first)),
        ("find_model, model first (TS SDK / Claude Code)", _median_us(find_model, first)),
        (
            "find_model + replace_model, model first",
            _median_us(lambda b: replace_model(b, find_model(b), "deepseek-v4-pro"), first),
        ),
        ("find_model, model last (fallback path)", _median_us(find_model, last, rounds=300)),
    ]
    base = rows[0][1]
    print(f"{'operation':50} {'median µs':>10} {'vs full parse':>14}")
    for name, us in rows:
        print(f"{name:50} {us:10.1f} {us / base:13.3f}x")


if __name__ == "__main__":
    main()
