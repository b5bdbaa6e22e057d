from ccx_proxy.affinity import SessionAffinity, session_of
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
