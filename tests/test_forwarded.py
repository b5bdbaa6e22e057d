"""FORWARDED_ALLOW_IPS: who may say who the client is (ccx_proxy.forwarded)."""

from __future__ import annotations

import pytest

from ccx_proxy.forwarded import MOST_HOPS, TrustedProxies
from ccx_proxy.settings import Settings, SettingsError

LB = TrustedProxies.parse("127.0.0.1, 10.0.0.0/8, ::1")


def test_nobody_is_trusted_by_default() -> None:
    none = TrustedProxies.parse("")
    assert not none
    assert none.client("127.0.0.1", ["203.0.113.7"]) == "127.0.0.1"  # anyone can send the header


def test_a_trusted_balancer_names_the_client() -> None:
    assert LB.client("127.0.0.1", ["203.0.113.7"]) == "203.0.113.7"
    assert LB.client("::1", ["2001:db8::5"]) == "2001:db8::5"
    assert LB.client("::ffff:10.1.2.3", ["203.0.113.7"]) == "203.0.113.7"  # dual-stack listener


def test_an_untrusted_peer_is_not_believed() -> None:
    assert LB.client("198.51.100.9", ["203.0.113.7"]) == "198.51.100.9"


def test_read_from_the_right_past_every_trusted_hop() -> None:
    # The client wrote 1.1.1.1 itself; the edge proxy saw 203.0.113.7; an inner one saw the edge.
    assert LB.client("127.0.0.1", ["1.1.1.1, 203.0.113.7, 10.0.0.2"]) == "203.0.113.7"
    # HAProxy adds a header line of its own rather than extending the client's one.
    assert LB.client("127.0.0.1", ["1.1.1.1", "203.0.113.7"]) == "203.0.113.7"
    # Every hop trusted: the leftmost is as far as anyone knows.
    assert LB.client("127.0.0.1", ["10.0.0.3, 10.0.0.2"]) == "10.0.0.3"


def test_an_entry_that_is_not_an_address_is_not_believed() -> None:
    # Whatever a client wrote reaches the log only as an address: the hop that reported it.
    assert LB.client("127.0.0.1", ["evil\n injected, 10.0.0.2"]) == "10.0.0.2"
    assert LB.client("127.0.0.1", ["unknown"]) == "127.0.0.1"
    assert LB.client("127.0.0.1", [""]) == "127.0.0.1"
    assert LB.client("127.0.0.1", []) == "127.0.0.1"
    # An IPv6 zone may hold any text (spaces, non-ASCII): never believed.
    assert LB.client("127.0.0.1", ["fe80::1%x member=root status=200"]) == "127.0.0.1"
    assert LB.client("127.0.0.1", ["[fe80::1%\udcff]:80, 10.0.0.2"]) == "10.0.0.2"


def test_ipv4_mapped_addresses() -> None:
    # A dual-stack listener's peer, trusted as its IPv4 form, and kept as it was without a header.
    assert LB.client("::ffff:127.0.0.1", []) == "::ffff:127.0.0.1"
    assert LB.client("::ffff:127.0.0.1", ["::ffff:203.0.113.7"]) == "203.0.113.7"  # shown as IPv4
    mapped_net = TrustedProxies.parse("::ffff:10.0.0.0/104")
    assert mapped_net.client("::ffff:10.1.2.3", ["203.0.113.7"]) == "203.0.113.7"


def test_proxy_spellings_with_ports_and_brackets() -> None:
    assert LB.client("127.0.0.1", ["203.0.113.7:51234"]) == "203.0.113.7"
    assert LB.client("127.0.0.1", ["[2001:db8::5]:443"]) == "2001:db8::5"
    assert LB.client("127.0.0.1", ["[2001:db8::5]"]) == "2001:db8::5"


def test_a_huge_header_is_read_only_so_far() -> None:
    trusted = ", ".join(["10.0.0.1"] * 10_000)
    # 10,000 trusted hops after the client: only the last MOST_HOPS are read.
    assert LB.client("127.0.0.1", [f"203.0.113.7, {trusted}"]) == "10.0.0.1"
    near = ", ".join(["10.0.0.1"] * (MOST_HOPS - 1))
    assert LB.client("127.0.0.1", [f"203.0.113.7, {near}"]) == "203.0.113.7"


def test_everyone() -> None:
    anyone = TrustedProxies.parse(" * ")
    assert anyone.client("198.51.100.9", ["203.0.113.7"]) == "203.0.113.7"


def test_settings_read_and_validate_it() -> None:
    env = {"PROXY_ACCESS_KEY": "k" * 32}
    assert not Settings.from_env(env).forwarded_allow_ips
    got = Settings.from_env({**env, "FORWARDED_ALLOW_IPS": "10.0.0.0/8"}).forwarded_allow_ips
    assert got.client("10.9.9.9", ["203.0.113.7"]) == "203.0.113.7"
    with pytest.raises(SettingsError, match="'10.0.0.0/33' is not an IP address or network"):
        Settings.from_env({**env, "FORWARDED_ALLOW_IPS": "127.0.0.1,10.0.0.0/33"})
    with pytest.raises(SettingsError, match=r"\* \(anyone\) must stand alone"):
        Settings.from_env({**env, "FORWARDED_ALLOW_IPS": "*,10.0.0.1"})
