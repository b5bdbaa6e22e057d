from ccx_proxy.affinity import SessionAffinity, carries_thinking, session_of
from ccx_proxy.policy import AffinityPolicy


def test_session_identity_sources() -> None:
    body = b'{"model":"m","messages":[],"metadata":{"user_id":"user_abc_session_1"}}'
    assert session_of({"x-claude-code-session-id": "s-1"}, body) == "h:s-1"
    assert session_of({}, body) == "u:user_abc_session_1"
    assert session_of({}, b'{"model":"m","messages":[{"content":"user_id"}]}') is None
    assert session_of({}, b'{"model":"m","tools":[{"user_id":"x"}]}') is None


def test_ttl_and_bound() -> None:
    affinity = SessionAffinity(AffinityPolicy(ttlMs=10_000, maxSessions=3))
    for i in range(5):
        affinity.remember(f"s{i}", "a", now=float(i))
    assert len(affinity) == 3 and affinity.channel_for("s0", 5) is None
    assert affinity.channel_for("s4", 5) == "a"
    assert affinity.channel_for("s4", 14.5) is None  # idle past the TTL
    affinity.remember("new", "b", now=100)
    # Every earlier session is past its TTL by now: only the new one is left.
    assert len(affinity) == 1
    assert affinity.channel_for("new", 100) == "b" and affinity.channel_for("s4", 100) is None


THINKING_BODY = (
    b'{"model":"m","thinking":{"type":"enabled","budget_tokens":1024},"messages":[{"role":"assistant",'
    b'"content":[{"type":"thinking","thinking":"hm","signature":"abc"}]}]}'
)


def test_carries_thinking() -> None:
    assert carries_thinking(THINKING_BODY)
    assert carries_thinking(b'{"messages":[{"content":[{"type":"redacted_thinking","data":"x"}]}]}')
    assert not carries_thinking(b'{"model":"m","messages":[{"role":"user","content":"think about it"}]}')


def test_a_thinking_session_outlives_the_plain_ttl() -> None:
    affinity = SessionAffinity(AffinityPolicy(ttlMs=10_000, thinkingTtlMs=100_000))
    affinity.remember("plain", "a", now=0, body=b'{"model":"m","messages":[]}')
    affinity.remember("thinking", "a", now=0, body=THINKING_BODY)
    assert affinity.channel_for("plain", 11) is None  # past ttlMs
    assert affinity.channel_for("thinking", 11) == "a"
    assert affinity.channel_for("thinking", 99) == "a"
    # Once marked, later requests without thinking bytes (a compacted history) keep the mark.
    affinity.remember("thinking", "b", now=99, body=b'{"model":"m","messages":[]}')
    assert affinity.channel_for("thinking", 190) == "b"
    assert affinity.channel_for("thinking", 200) is None  # idle past thinkingTtlMs


def test_thinking_ttl_is_never_shorter_than_the_plain_one() -> None:
    affinity = SessionAffinity(AffinityPolicy(ttlMs=10_000, thinkingTtlMs=1_000))
    affinity.remember("thinking", "a", now=0, body=THINKING_BODY)
    assert affinity.channel_for("thinking", 9) == "a"
