"""HTTP/1.1 wire format for the upstream client: the request head, the response
head, and the response body's framing (RFC 9112).

Pure functions and a small incremental decoder, no I/O, so that the hot path
(:mod:`ccx_proxy.client`) stays short and this part can be tested byte by byte.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from multidict import CIMultiDict
from yarl import URL

MAX_HEAD = 64 * 1024  # a response head larger than this is refused
_MAX_CHUNK_LINE = 4096
# Control characters other than HTAB may not appear in a header (header injection).
_CTL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_HEX = frozenset(b"0123456789abcdefABCDEF")
# A chunk boundary: CRLF ending the previous chunk's data, a bare size line.
# Size lines of small chunks, parsed once (int(x, 16) per chunk shows in profiles).
_SIZES = {b"%x" % n: n for n in range(1, 4096)} | {b"%X" % n: n for n in range(1, 4096)}
_BOUNDARY = re.compile(rb"\r\n([0-9a-fA-F]{1,8})\r\n")


class UpstreamClientError(Exception):
    """Talking to an upstream failed: the base of the upstream client's errors."""


class BadResponse(UpstreamClientError):
    """The upstream's bytes are not a valid HTTP/1.1 response."""


_DIGITS = re.compile(r"[0-9]+")  # str.isdigit() admits "²" and other non-ASCII digits


def request_head(url: URL, header_block: bytes, body_length: int) -> bytes:
    """``POST`` request head: Host, the header lines (each CRLF-terminated), Content-Length."""
    target, host = url.raw_path_qs, url.host_port_subcomponent or ""
    if _CTL.search(target) or _CTL.search(host):
        raise ValueError("control character in the upstream request line")
    line = f"POST {target} HTTP/1.1\r\nHost: {host}\r\n".encode("utf-8", "surrogateescape")
    return b"%sContent-Length: %d\r\n\r\n" % (line + header_block, body_length)


@dataclass(slots=True)
class Head:
    status: int
    reason: str
    headers: CIMultiDict[str]
    keep_alive: bool
    # Body framing: "length" (with length), "chunked", "close" (until EOF) or "none".
    framing: str
    length: int


def parse_head(raw: bytes, *, response_to_head: bool = False) -> Head:
    """Parse a response head (status line and headers, without the final blank line)."""
    text = raw.decode("utf-8", "surrogateescape")
    lines = text.split("\r\n")
    version, _, rest = lines[0].partition(" ")
    code, _, reason = rest.partition(" ")
    if version not in ("HTTP/1.1", "HTTP/1.0") or not _DIGITS.fullmatch(code) or len(code) != 3:
        raise BadResponse(f"bad status line {lines[0][:100]!r}")
    headers: CIMultiDict[str] = CIMultiDict()
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not name or name[-1] in " \t" or name[0] in " \t":
            raise BadResponse(f"bad header line {line[:100]!r}")
        value = value.strip(" \t")
        if _CTL.search(value) or _CTL.search(name):  # a bare CR/LF or NUL: never pass it on
            raise BadResponse(f"control character in header {name[:100]!r}")
        headers.add(name, value)
    status = int(code)
    connection = headers.get("Connection", "").lower()
    keep_alive = version == "HTTP/1.1" and "close" not in connection
    framing, length = "none", 0
    if status >= 200 and status not in (204, 304) and not response_to_head:
        encoding = headers.get("Transfer-Encoding")
        if encoding is not None:
            # chunked must be the last coding; anything else ends at close (RFC 9112 6.3)
            if encoding.rsplit(",", 1)[-1].strip().lower() == "chunked":
                framing = "chunked"
            else:
                framing = "close"
            if "Content-Length" in headers:
                keep_alive = False  # both framings: never reuse the connection
        elif "Content-Length" in headers:
            values = {v.strip() for v in headers.getall("Content-Length")}
            value = values.pop()
            if values or not _DIGITS.fullmatch(value):
                raise BadResponse("bad Content-Length")
            framing, length = "length", int(value)
        else:
            framing = "close"
        if framing == "close":
            keep_alive = False
    return Head(status, reason, headers, keep_alive, framing, length)


class ChunkedDecoder:
    """Incremental ``Transfer-Encoding: chunked`` decoder.

    ``feed`` returns the payload bytes in what it was given; ``done`` turns
    true after the last chunk and its trailer section, and ``rest`` then holds
    any bytes that followed.
    """

    __slots__ = ("_pending", "_remaining", "_state", "done", "rest")

    # states: 0 = size line, 1 = data, 2 = CRLF after data, 3 = trailer lines
    def __init__(self) -> None:
        self._pending = b""
        self._remaining = 0
        self._state = 0
        self.done = False
        self.rest = b""

    def feed(self, data: bytes) -> bytes:
        if self._pending:
            data = self._pending + data
            self._pending = b""
        elif self._state == 0 and data.endswith(b"\r\n"):
            payload = self._feed_whole(data)
            if payload is not None:
                return payload
        return self._feed_stepwise(data)

    def _feed_whole(self, data: bytes) -> bytes | None:
        """Fast path for reads that hold only whole chunks (the usual case): split on
        every size line in C, then check each piece against its declared size.  Any
        mismatch (chunk extensions, trailers, data that looks like a size line, a
        partial chunk) returns None and the step-by-step decoder takes over.  When
        every size matches, the split is exactly what the step-by-step parse reads."""
        parts = _BOUNDARY.split(b"\r\n" + data)
        if parts[0]:
            return None
        sizes = parts[1::2]
        pieces = parts[2::2]
        last = pieces.pop()
        last_size = int(sizes.pop(), 16)
        lengths = list(map(len, pieces))
        if 0 in lengths or lengths != [_SIZES.get(size) or int(size, 16) for size in sizes]:
            return None
        if last_size == 0:
            if last != b"\r\n":  # trailers or bytes after the body: let the slow path judge
                return None
            self.done = True
        elif len(last) != last_size + 2:
            return None
        else:
            pieces.append(last[:-2])
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def _feed_stepwise(self, data: bytes) -> bytes:
        out: list[bytes] = []
        pos, end = 0, len(data)
        find = data.find
        while pos < end:
            state = self._state
            if state == 0:
                line_end = find(b"\r\n", pos)
                if line_end < 0:
                    if end - pos > _MAX_CHUNK_LINE:
                        raise BadResponse("chunk size line too long")
                    self._pending = data[pos:]
                    break
                size = _chunk_size(data[pos:line_end])
                pos = line_end + 2
                if size == 0:
                    self._state = 3
                    continue
                stop = pos + size
                if stop + 2 <= end:  # the common case: the whole chunk is here
                    if data[stop : stop + 2] != b"\r\n":
                        raise BadResponse("chunk data not followed by CRLF")
                    out.append(data[pos:stop])
                    pos = stop + 2
                    continue
                self._remaining = size
                self._state = 1
            elif state == 1:
                take = min(self._remaining, end - pos)
                out.append(data[pos : pos + take])
                pos += take
                self._remaining -= take
                if not self._remaining:
                    self._state = 2
            elif state == 2:
                if end - pos < 2:
                    self._pending = data[pos:]
                    break
                if data[pos : pos + 2] != b"\r\n":
                    raise BadResponse("chunk data not followed by CRLF")
                pos += 2
                self._state = 0
            else:  # trailer section: lines until an empty one
                line_end = find(b"\r\n", pos)
                if line_end < 0:
                    if end - pos > MAX_HEAD:
                        raise BadResponse("trailer section too long")
                    self._pending = data[pos:]
                    break
                if line_end == pos:
                    self.done = True
                    self.rest = data[pos + 2 :]
                    break
                pos = line_end + 2
        if len(out) == 1:
            return out[0]
        return b"".join(out)


def _chunk_size(line: bytes) -> int:
    if 0 < len(line) <= 8 and _HEX.issuperset(line):  # no extension, no padding: the usual case
        return int(line, 16)
    digits = line.split(b";", 1)[0].strip(b" \t")
    if not digits or len(digits) > 16 or not _HEX.issuperset(digits):
        raise BadResponse(f"bad chunk size line {line[:40]!r}")
    return int(digits, 16)
