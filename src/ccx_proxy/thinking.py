"""Thinking and Claude Code compatibility rewrites, per channel, off unless set.

A pure module (no I/O): ``parse_thinking`` reads a channel's options from
``channels.json`` and ``rewrite`` applies them to one upstream request body.
Each option exists to stop one upstream error:

``thinkingSignatures`` -- ``keep`` (default) | ``strip-foreign`` | ``strip-all``
    Thinking blocks carry a ``signature`` minted by the provider that wrote
    them.  Anthropic rejects any it did not mint: ``messages.1.content.0:
    Invalid `signature` in `thinking` block`` (seen whenever a conversation
    moves between Anthropic and non-Anthropic channels: ding113/claude-code-hub
    #518, anthropics/anthropic-sdk-python #1598, caozhiyuan/copilot-api #73).
    Other providers cannot verify Anthropic's signatures and cannot read
    ``redacted_thinking`` (DeepSeek's Anthropic compatibility table lists
    ``content[].redacted_thinking`` as unsupported and answers 400:
    svtter.cn "DeepSeek + Claude Code: Thinking Block Compatibility Analysis").

    Which signatures are *foreign* depends on the channel's upstream
    (``ThinkingOptions.anthropic``): ``thinkingProvider`` says it -- ``auto``
    (default: Anthropic when the ``baseUrl`` host is ``anthropic.com`` or a
    subdomain of it), ``anthropic`` (Anthropic's API behind another host: a
    company egress gateway, a relay), or ``other``:

    * Anthropic upstream, ``strip-foreign``: a ``thinking`` block is kept only
      when its signature is Anthropic-shaped -- a string of at least
      ``MIN_SIGNATURE`` characters of the base64 alphabet (standard or
      URL-safe, ``=`` padding allowed).  Blocks with no signature, an empty
      one, or any other shape (minted elsewhere, or a placeholder) are dropped.
      ``redacted_thinking`` blocks are always Anthropic's and stay.  This is a
      heuristic: another provider that mints long base64 signatures passes it,
      and Anthropic still answers for those.  Anthropic documents the signature
      only as opaque; real ones seen run to hundreds of characters (two decoded
      in anthropics/anthropic-sdk-python #1598 fixtures: 248, prefix ``ErUB``),
      and another proxy uses 100 as its floor (azerozero/grob), so 64 keeps
      every real one (checked 2026-11-27).
    * Any other upstream, ``strip-foreign``: signatures mean nothing there, so
      the ``signature`` field is removed from every ``thinking`` block while
      its text stays (DeepSeek needs the text passed back, see below), and
      ``redacted_thinking`` blocks (Anthropic-encrypted, unreadable
      elsewhere) are dropped.
    * ``strip-all``, any upstream: every ``thinking`` and ``redacted_thinking``
      block is dropped.

    An assistant message left with no content by a drop is removed.  While
    thinking is on, Anthropic requires the final assistant message with
    ``tool_use`` to start with a thinking block: ``Expected `thinking` or
    `redacted_thinking`, but found `tool_use`. When `thinking` is enabled, a
    final `assistant` message must start with a thinking block ... To avoid
    this requirement, disable `thinking`.`` (anomalyco/opencode #8010,
    lbjlaq/Antigravity-Manager #139; platform.claude.com "Thinking in tool and
    multi-turn workflows").  So when the last assistant message holds a
    ``tool_use`` block, started with a thinking block before the rewrite and no
    longer does after it, the request is sent with ``"thinking": {"type":
    "disabled"}`` (set even when the field was absent: some upstreams think by
    default) rather than as a body the upstream must refuse.  Then, as a final
    assistant message may not hold thinking blocks while thinking is off
    (``When thinking is disabled, an `assistant` message in the final position
    cannot contain `thinking```: anthropics/claude-code #7946), the thinking
    blocks still in that message are dropped too, and so are
    ``clear_thinking_*`` edits in ``context_management`` (they manage thinking
    blocks only while thinking is on -- Anthropic answers ```clear_thinking_20251015`
    strategy requires `thinking` to be enabled``, anthropics/claude-code #11971;
    ``context_management`` goes when no edit is left).

``thinkingPassback`` -- ``false`` (default) | ``true``
    DeepSeek's ``/anthropic`` endpoint, in thinking mode, refuses assistant
    tool-use turns whose thinking is missing: ``The `content[].thinking` in the
    thinking mode must be passed back to the API.`` (NousResearch/hermes-agent
    #22313, QwenLM/qwen-code #3788, Alishahryar1/free-claude-code #600).  Its
    thinking blocks carry no signature, and an empty one is accepted
    (esengine/DeepSeek-Reasonix #8927: ``{"type":"thinking","thinking":""}`` ->
    200).  With this option, every assistant message that has a ``tool_use``
    block and no ``thinking`` block gets ``{"type": "thinking", "thinking": ""}``
    inserted first, unless the request turns thinking off (``"type":
    "disabled"``).  Never set it on an Anthropic channel: Anthropic refuses
    unsigned thinking blocks.

``stripBillingBlock`` -- ``false`` (default) | ``true``
    Claude Code puts an attribution text first in the system prompt,
    ``x-anthropic-billing-header: cc_version=...; cc_entrypoint=cli;
    cch=<nonce>;``, whose ``cch`` value changes on every request; on upstreams
    with prefix-based prompt caching it makes every prompt a cache miss
    (anthropics/claude-code #68900, waybarrios/vllm-mlx #277, ollama/ollama
    #14918).  With this option, a top-level ``system`` text block whose text
    starts with ``x-anthropic-billing-header:`` loses that first line (the
    block is removed when nothing else is in it; ``system`` is removed when no
    block is left); a string ``system`` loses that first line the same way.
    Message content is never touched.

Cost: ``rewrite`` returns the very object it was given (``is``) unless an option
is set *and* the body holds the bytes that option acts on -- one substring search
per enabled option first (``x-anthropic-billing-header``; ``thinking"`` twice, or
once as ``"redacted_thinking"``; ``"tool_use"``).  Only then is it parsed (orjson),
rewritten and dumped again; if the parse finds nothing to change, or the body
is not a JSON object, the original object is still returned, so byte-exact
forwarding (and the upstream's prompt cache) is kept whenever possible.  Keys
written with ``\\u`` escapes are not seen by the byte search: such a body is
forwarded as it came.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, cast
from urllib.parse import urlsplit

import orjson

Signatures = Literal["keep", "strip-foreign", "strip-all"]
SIGNATURE_MODES: tuple[str, ...] = ("keep", "strip-foreign", "strip-all")
# The channel fields this module reads (for config.CHANNEL_FIELDS).
THINKING_FIELDS: tuple[str, ...] = (
    "thinkingSignatures",
    "thinkingPassback",
    "stripBillingBlock",
    "thinkingProvider",
)
PROVIDERS: tuple[str, ...] = ("auto", "anthropic", "other")

BILLING_PREFIX = "x-anthropic-billing-header:"
MIN_SIGNATURE = 64  # Anthropic's signatures run to hundreds of base64 characters
_ANTHROPIC_SIGNATURE = re.compile(r"[A-Za-z0-9+/_-]+={0,2}")
_THINKING_TYPES = frozenset({"thinking", "redacted_thinking"})
_EMPTY_THINKING: dict[str, Any] = {"type": "thinking", "thinking": ""}

_B_BILLING = BILLING_PREFIX[:-1].encode()
_B_THINKING = b'thinking"'
_B_REDACTED = b'"redacted_'
_B_TOOL_USE = b'"tool_use"'


@dataclass(frozen=True, slots=True)
class ThinkingOptions:
    signatures: Signatures = "keep"  # thinkingSignatures
    passback: bool = False  # thinkingPassback
    strip_billing: bool = False  # stripBillingBlock
    # Whether the upstream is Anthropic's API, which decides what "foreign" means for
    # strip-foreign: thinkingProvider, whose default "auto" asks the baseUrl's host.
    anthropic: bool = False

    @property
    def enabled(self) -> bool:
        return self.signatures != "keep" or self.passback or self.strip_billing

    def describe(self) -> str:
        """The options set, for a channel's one-line summary ("" when none is)."""
        parts = [f"signatures={self.signatures}"] if self.signatures != "keep" else []
        parts += ["passback"] if self.passback else []
        parts += ["strip-billing"] if self.strip_billing else []
        if parts and self.anthropic:
            parts.append("provider=anthropic")
        return ",".join(parts)


OFF = ThinkingOptions()


def is_anthropic(base_url: str | None) -> bool:
    """Whether ``base_url`` is Anthropic's own API (host ``anthropic.com`` or a subdomain)."""
    if not base_url:
        return False
    try:
        host = (urlsplit(base_url.strip()).hostname or "").rstrip(".").lower()
    except ValueError:
        return False
    return host == "anthropic.com" or host.endswith(".anthropic.com")


def parse_thinking(
    item: Mapping[str, Any], where: str, problems: list[str], base_url: str | None = None
) -> ThinkingOptions:
    """A channel's options from its object in ``channels.json``.

    Problems are appended with their path (``channels[1].thinkingPassback: ...``), as
    config.py reports them; the defaults stand in for a field that has one.
    """
    signatures = item.get("thinkingSignatures", "keep")
    if signatures not in SIGNATURE_MODES:
        problems.append(
            f"{where}.thinkingSignatures: must be one of {', '.join(SIGNATURE_MODES)} (got {signatures!r})"
        )
        signatures = "keep"
    provider = item.get("thinkingProvider", "auto")
    if provider not in PROVIDERS:
        problems.append(f"{where}.thinkingProvider: must be one of {', '.join(PROVIDERS)} (got {provider!r})")
        provider = "auto"
    flags: dict[str, bool] = {}
    for name in ("thinkingPassback", "stripBillingBlock"):
        value = item.get(name, False)
        if not isinstance(value, bool):
            problems.append(f"{where}.{name}: must be true or false (got {value!r})")
            value = False
        flags[name] = value
    return ThinkingOptions(
        signatures=cast(Signatures, signatures),
        passback=flags["thinkingPassback"],
        strip_billing=flags["stripBillingBlock"],
        anthropic=provider == "anthropic" or (provider == "auto" and is_anthropic(base_url)),
    )


def rewrite(body: bytes, options: ThinkingOptions) -> bytes:
    """``body`` with ``options`` applied; the same object when none of them changes it."""
    if not options.enabled or not _triggered(body, options):
        return body
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body  # the upstream answers it as it came
    if not isinstance(doc, dict):
        return body
    changed = False
    if options.strip_billing:
        changed |= _strip_billing(doc)
    messages = doc.get("messages")
    if isinstance(messages, list):
        thinking_on = _thinking_on(doc)
        last = _last_tool_turn(messages)
        led_before = last is not None and _leads_with_thinking(last)
        if options.signatures != "keep":
            changed |= _strip_signatures(messages, options)
        if options.passback and thinking_on:
            changed |= _pass_back(messages)
        if led_before and thinking_on and last is not None and not _leads_with_thinking(last):
            _thinking_off(doc, last)
            changed = True
    return orjson.dumps(doc) if changed else body


def _triggered(body: bytes, options: ThinkingOptions) -> bool:
    """The cheap byte test: does the body hold anything an enabled option acts on?

    Each test is one substring search (``bytes.__contains__`` / ``find``), stopping at the
    first hit; ordered cheapest first.
    """
    if options.strip_billing and _B_BILLING in body:
        return True
    if options.signatures != "keep" and _has_thinking_blocks(body):
        return True
    return options.passback and _B_TOOL_USE in body


def _has_thinking_blocks(body: bytes) -> bool:
    """Whether ``body`` may hold a thinking or redacted_thinking block, in one scan.

    ``thinking"`` ends the block type ``"thinking"`` and the key ``"thinking"`` (so a
    thinking block holds it twice), the type ``"redacted_thinking"`` and the request's own
    ``"thinking"`` setting: two occurrences, or one that is ``redacted_thinking"``.
    """
    first = body.find(_B_THINKING)
    if first < 0:
        return False
    return body.find(_B_THINKING, first + len(_B_THINKING)) >= 0 or body.endswith(_B_REDACTED, 0, first)


def _thinking_on(doc: dict[str, Any]) -> bool:
    setting = doc.get("thinking")
    return not (isinstance(setting, dict) and setting.get("type") == "disabled")


def _thinking_off(doc: dict[str, Any], last: dict[str, Any]) -> None:
    """Send the request with thinking off, and nothing that needs it on."""
    doc["thinking"] = {"type": "disabled"}
    # "When thinking is disabled, an `assistant` message in the final position cannot contain
    # `thinking`" (anthropics/claude-code #7946): interleaved blocks left in the turn go too.
    last["content"] = [b for b in last["content"] if _type(b) not in _THINKING_TYPES]
    # clear_thinking_* context edits manage thinking blocks "when extended thinking is enabled"
    # (docs.claude.com, build-with-claude/context-editing): with it off they have nothing to do.
    management = doc.get("context_management")
    edits = management.get("edits") if isinstance(management, dict) else None
    if isinstance(management, dict) and isinstance(edits, list):
        kept = [e for e in edits if not str(_type(e)).startswith("clear_thinking")]
        if len(kept) < len(edits):
            if kept:
                management["edits"] = kept
            else:
                del doc["context_management"]


def _strip_billing(doc: dict[str, Any]) -> bool:
    system = doc.get("system")
    if isinstance(system, str):
        if not system.startswith(BILLING_PREFIX):
            return False
        rest = _after_first_line(system)
        if rest:
            doc["system"] = rest
        else:
            del doc["system"]
        return True
    if not isinstance(system, list):
        return False
    kept: list[Any] = []
    changed = False
    for block in system:
        text = block.get("text") if isinstance(block, dict) and block.get("type") == "text" else None
        if isinstance(text, str) and text.startswith(BILLING_PREFIX):
            changed = True
            rest = _after_first_line(text)
            if rest:
                kept.append({**block, "text": rest})
            continue
        kept.append(block)
    if not changed:
        return False
    if kept:
        doc["system"] = kept
    else:
        del doc["system"]
    return True


def _after_first_line(text: str) -> str:
    _, _, rest = text.partition("\n")
    return rest.lstrip("\n")


def _blocks(message: Any) -> list[Any] | None:
    """An assistant message's content blocks (None for a string or any other shape)."""
    if not isinstance(message, dict) or message.get("role") != "assistant":
        return None
    content = message.get("content")
    return content if isinstance(content, list) else None


def _type(block: Any) -> Any:
    return block.get("type") if isinstance(block, dict) else None


def _last_tool_turn(messages: list[Any]) -> dict[str, Any] | None:
    """The last assistant message, when it holds a tool_use block."""
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "assistant":
            blocks = _blocks(message)
            if blocks is not None and any(_type(b) == "tool_use" for b in blocks):
                return message
            return None
    return None


def _leads_with_thinking(message: dict[str, Any]) -> bool:
    blocks = _blocks(message)
    return blocks is not None and len(blocks) > 0 and _type(blocks[0]) in _THINKING_TYPES


def anthropic_signature(signature: Any) -> bool:
    """Whether ``signature`` looks minted by Anthropic: a long base64 string."""
    return (
        isinstance(signature, str)
        and len(signature) >= MIN_SIGNATURE
        and _ANTHROPIC_SIGNATURE.fullmatch(signature) is not None
    )


def _keep_block(block: Any, options: ThinkingOptions) -> tuple[bool, Any]:
    """(keep it?, the block to keep) for one content block under ``options.signatures``."""
    kind = _type(block)
    if kind not in _THINKING_TYPES:
        return True, block
    if options.signatures == "strip-all":
        return False, None
    if options.anthropic:  # strip-foreign: keep what Anthropic minted
        return kind == "redacted_thinking" or anthropic_signature(block.get("signature")), block
    if kind == "redacted_thinking":
        return False, None
    if "signature" in block:
        return True, {k: v for k, v in block.items() if k != "signature"}
    return True, block


def _strip_signatures(messages: list[Any], options: ThinkingOptions) -> bool:
    changed = False
    emptied: list[int] = []
    for index, message in enumerate(messages):
        blocks = _blocks(message)
        if not blocks:
            continue
        kept: list[Any] = []
        touched = False
        for block in blocks:
            keep, new = _keep_block(block, options)
            touched |= not keep or new is not block
            if keep:
                kept.append(new)
        if touched:
            changed = True
            message["content"] = kept
            if not kept:
                emptied.append(index)
    for index in reversed(emptied):
        del messages[index]
    return changed


def _pass_back(messages: list[Any]) -> bool:
    changed = False
    for message in messages:
        blocks = _blocks(message)
        if not blocks:
            continue
        kinds = {_type(b) for b in blocks}
        if "tool_use" in kinds and "thinking" not in kinds:
            blocks.insert(0, dict(_EMPTY_THINKING))
            changed = True
    return changed
