"""The client's own address behind a load balancer: ``FORWARDED_ALLOW_IPS``.

Behind nginx or HAProxy (``deploy/``) every connection comes from the load balancer, so the
access log would show its address for everyone.  Both add the address they saw to
``X-Forwarded-For``; the gateway believes that header only from the proxies named in
``FORWARDED_ALLOW_IPS`` (addresses or networks, comma-separated, or ``*``; unset: nobody,
and the header is ignored -- anyone can send it).

The header is read from the right, as each proxy appends the address it saw: the first
address not in the trusted set is the client.  An entry that is not an IP address (a
client can write anything before the first proxy) is not believed: the address of the
trusted hop that reported it is used instead.  At most :data:`MOST_HOPS` entries are
read, whatever the header holds.

Only ``X-Forwarded-For`` is read (nginx and HAProxy both set it); ``Forwarded`` and
``X-Real-IP`` are not.  None of these headers is sent on to the upstream provider
(:data:`ccx_proxy.headers.CLIENT_ORIGIN`).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

MOST_HOPS = 32  # entries of X-Forwarded-For read from the right

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class TrustedProxies:
    """Who may say who the client is.  Empty (the default): nobody."""

    networks: tuple[Network, ...] = ()
    everyone: bool = False

    @classmethod
    def parse(cls, value: str) -> TrustedProxies:
        """``"127.0.0.1, 10.0.0.0/8, ::1"`` or ``"*"``; :class:`ValueError` naming the bad entry."""
        entries = [e.strip() for e in value.split(",") if e.strip()]
        if entries == ["*"]:
            return cls(everyone=True)
        if "*" in entries:
            raise ValueError("FORWARDED_ALLOW_IPS: * (anyone) must stand alone, not in a list")
        networks = []
        for entry in entries:
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                raise ValueError(
                    f"FORWARDED_ALLOW_IPS: {entry!r} is not an IP address or network "
                    "(e.g. 127.0.0.1, 10.0.0.0/8, ::1, or * for any)"
                ) from None
        return cls(tuple(networks))

    def __bool__(self) -> bool:
        return self.everyone or bool(self.networks)

    def trusts(self, address: Address) -> bool:
        if self.everyone:
            return True
        if any(address in network for network in self.networks):
            return True
        mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
        return mapped is not None and any(mapped in network for network in self.networks)

    def client(self, peer: str | None, forwarded_for: Iterable[str]) -> str | None:
        """The client's address: ``peer`` itself unless ``peer`` is a trusted proxy that
        passed on an ``X-Forwarded-For`` (every header line of it, in order)."""
        if not self or peer is None:
            return peer
        reporter = _address(peer)
        if reporter is None or not self.trusts(reporter):
            return peer
        hops = ",".join(forwarded_for).rsplit(",", MOST_HOPS)[-MOST_HOPS:]
        client = peer  # unless an entry is believed
        for entry in reversed(hops):
            address = _address(entry)
            if address is None:
                break  # not an address: the trusted hop that reported it is as far as we know
            client = _shown(address)
            if not self.trusts(address):
                break
        return client


def _address(text: str) -> Address | None:
    """An IP address, tolerating the forms proxies write (``[::1]``, ``1.2.3.4:5678``); never
    one with an IPv6 zone (``fe80::1%<any text>``: client text that would reach the log)."""
    text = text.strip()
    if text.startswith("["):  # [v6] or [v6]:port
        text = text[1 : text.find("]")] if "]" in text else ""
    elif text.count(":") == 1:  # v4:port
        text = text.partition(":")[0]
    if "%" in text:
        return None
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _shown(address: Address) -> str:
    """``::ffff:10.0.0.1`` as ``10.0.0.1`` (before Python 3.13 it prints in hex)."""
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    return str(mapped or address)
