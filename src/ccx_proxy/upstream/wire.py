"""Where requests go, computed once at config load: origins (scheme, host, port, egress
proxy, TLS verification), endpoints (URL, request-line bytes) and request heads.

An :class:`Origin` is also the pool key: connections are shared only between
requests that would open the very same connection.  Per request, the head is one
``%``-format of prebuilt bytes (:meth:`Endpoint.head`).
"""

from __future__ import annotations

import base64
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import unquote

from yarl import URL

_VERSION_SUFFIX = re.compile(r"/v\d+$")
# Control characters other than HTAB, and spaces, may not appear in a request target.
_BAD_TARGET = re.compile(rb"[\x00-\x20\x7f]")


class WireError(ValueError):
    """A URL or proxy setting that cannot be turned into a request (a config problem)."""


@dataclass(frozen=True, slots=True)
class Proxy:
    """An egress proxy: ``http://`` (plain) or ``https://`` (TLS to the proxy itself)."""

    scheme: str
    host: str
    port: int
    # b"" or the full "Proxy-Authorization: Basic ...\r\n" line, from the URL's user:password
    authorization: bytes = field(default=b"", repr=False)
    display: str = ""  # the URL with its password masked: the only form logs and the API show

    def __repr__(self) -> str:
        return f"Proxy({self.display})"


@dataclass(frozen=True, slots=True)
class Origin:
    """One upstream server as a connection sees it; hashable, the pool's key."""

    scheme: str
    host: str  # as in the URL (an IPv6 literal without brackets)
    port: int
    proxy: Proxy | None = None
    verify: bool = True  # False only for a channel with insecureSkipVerify

    @property
    def tls(self) -> bool:
        return self.scheme == "https"

    @property
    def tunnel(self) -> bool:
        """Reached through a CONNECT tunnel (an https origin behind a proxy)."""
        return self.proxy is not None and self.tls

    def describe(self) -> str:
        via = f" via {self.proxy.display}" if self.proxy is not None else ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}{via}"


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One upstream URL, with its request line split around the client's query string."""

    url: str
    origin: Origin
    start: bytes  # b"POST /anthropic/v1/messages" (absolute-form through a plain-HTTP proxy)
    rest: bytes  # b" HTTP/1.1\r\nHost: api.example.com\r\n" (+ Proxy-Authorization when forwarding)

    def head(self, query: bytes, header_block: bytes, length: int) -> bytes:
        """The request head: request line, Host, the header lines (each CRLF-terminated,
        from :func:`ccx_proxy.headers.upstream_header_block`), Content-Length."""
        return b"%s%s%s%sContent-Length: %d\r\n\r\n" % (self.start, query, self.rest, header_block, length)


@dataclass(frozen=True, slots=True)
class Endpoints:
    """A base URL's three endpoints."""

    base_url: str
    messages: Endpoint
    count_tokens: Endpoint
    models: Endpoint


def check_query(query: bytes) -> bytes:
    """The client's ``?query`` as it goes upstream; refuses what could split the request line."""
    if query and _BAD_TARGET.search(query):
        raise WireError("control character or space in the query string")
    return query


def endpoint_root(base_url: str) -> str:
    """The URL that endpoint names are appended to.

    ``https://api.deepseek.com/anthropic`` -> ``.../anthropic/v1``; trailing slashes are
    ignored; a base that already ends in a version segment (``.../v1``) gets no second
    one; a base ending in ``#`` is used verbatim (the ``#`` dropped)."""
    if base_url.endswith("#"):
        return base_url[:-1].rstrip("/")
    root = base_url.rstrip("/")
    if not _VERSION_SUFFIX.search(URL(root).path):
        root += "/v1"
    return root


def endpoints(base_url: str, proxy: Proxy | None = None, verify: bool = True) -> Endpoints:
    root = endpoint_root(base_url)
    url = URL(root, encoded=True)
    if url.scheme not in ("http", "https") or not url.raw_host:
        raise WireError(f"not an http(s) URL: {base_url!r}")
    if url.explicit_port == 0:  # yarl's port would say 80 or 443: not what was written
        raise WireError(f"port 0 in {base_url!r}")
    origin = Origin(
        url.scheme, url.raw_host, url.port or (443 if url.scheme == "https" else 80), proxy, verify
    )
    return Endpoints(
        base_url=base_url,
        messages=_endpoint(root + "/messages", origin),
        count_tokens=_endpoint(root + "/messages/count_tokens", origin),
        models=_endpoint(root + "/models", origin),
    )


def _endpoint(text: str, origin: Origin) -> Endpoint:
    url = URL(text, encoded=True)
    host = (url.host_port_subcomponent or "").encode("ascii", "strict")
    path = url.raw_path.encode("ascii", "strict")
    if _BAD_TARGET.search(path) or _BAD_TARGET.search(host):
        raise WireError(f"control character or space in URL {text!r}")
    rest = b" HTTP/1.1\r\nHost: " + host + b"\r\n"
    if origin.proxy is not None and not origin.tls:
        # A plain-HTTP origin behind a proxy: the request goes to the proxy in absolute form.
        target = b"%s://%s%s" % (origin.scheme.encode(), host, path)
        return Endpoint(text, origin, b"POST " + target, rest + origin.proxy.authorization)
    return Endpoint(text, origin, b"POST " + path, rest)


# -- egress proxies ----------------------------------------------------------------------


def parse_proxy(value: str) -> Proxy:
    """``http://[user:password@]host[:port]`` or ``https://...``; raises WireError."""
    try:
        url = URL(value.strip())
    except ValueError as exc:
        raise WireError(f"not a valid proxy URL: {exc}") from None
    if url.scheme not in ("http", "https") or not url.raw_host:
        raise WireError("must be an http:// or https:// proxy URL (socks is not supported)")
    if url.raw_path not in ("", "/") or url.query_string or url.fragment:
        raise WireError("a proxy URL has no path, query or fragment")
    host = url.raw_host
    if any(c.isspace() or not c.isprintable() for c in host):
        raise WireError("the proxy host contains spaces or control characters")
    if url.explicit_port == 0:  # not "the default port": nothing listens on port 0
        raise WireError("port 0 is not a proxy port")
    port = url.port or (443 if url.scheme == "https" else 80)
    authorization = b""
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    shown = f"{url.scheme}://{where}"
    if url.raw_user is not None:
        user, password = unquote(url.raw_user), unquote(url.raw_password or "")
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        authorization = f"Proxy-Authorization: Basic {token}\r\n".encode()
        shown = f"{url.scheme}://{url.raw_user}:***@{where}"
    return Proxy(url.scheme, host, port, authorization, shown)


def mask_proxy_url(value: str) -> str:
    """A proxy URL as logs and the admin API may show it: the password replaced by ``***``."""
    try:
        url = URL(value.strip())
    except ValueError:
        return "<invalid proxy URL>"
    if url.raw_password is None:
        return value
    return str(url.with_password("***"))


def environment_proxy(base_url: str, env: Mapping[str, str]) -> str | None:
    """The proxy the environment names for ``base_url`` (``HTTPS_PROXY`` / ``HTTP_PROXY``,
    lower-case names first as curl reads them), unless ``NO_PROXY`` exempts its host."""
    url = URL(base_url.removesuffix("#"))
    names = ("https_proxy", "HTTPS_PROXY") if url.scheme == "https" else ("http_proxy", "HTTP_PROXY")
    proxy = next((env[n].strip() for n in names if env.get(n, "").strip()), None)
    if proxy is None:
        return None
    no_proxy = env.get("no_proxy", "").strip() or env.get("NO_PROXY", "").strip()
    if no_proxy and bypassed(url.host or "", url.port, no_proxy):
        return None
    return proxy


def bypassed(host: str, port: int | None, no_proxy: str) -> bool:
    """Whether ``NO_PROXY`` exempts ``host``: ``*``, exact names, domain suffixes
    (``example.com`` and ``.example.com`` both cover ``api.example.com``), ``host:port``,
    IP addresses and CIDR ranges."""
    host = host.lower().strip("[]")
    try:
        address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(host)
    except ValueError:
        address = None
    for entry in (e.strip().lower() for e in no_proxy.split(",")):
        if not entry:
            continue
        if entry == "*":
            return True
        if entry.startswith("["):  # a bracketed IPv6 address, with or without a port
            name, _, entry_port = entry[1:].partition("]")
            entry_port = entry_port.removeprefix(":")
        elif entry.count(":") == 1:  # host:port (a bare IPv6 address has more colons)
            name, _, entry_port = entry.rpartition(":")
        else:
            name, entry_port = entry, ""
        if entry_port:
            if not entry_port.isdigit():
                continue  # not an entry that can match anything
            if port != int(entry_port):
                continue
        entry = name
        if address is not None:
            try:
                if address in ipaddress.ip_network(entry, strict=False):
                    return True
            except ValueError:
                pass
            continue
        domain = entry.lstrip(".")
        if host == domain or host.endswith("." + domain):
            return True
    return False
