"""Everything that talks to an upstream, on one stack.

Modules (imported by name; this package re-exports nothing, so that
:mod:`ccx_proxy.config` can build endpoints without loading the client)::

    wire        endpoints and origins, built once at config load: URL, request-line
                bytes, pool key, egress proxy
    response    the response state machine on httptools (llhttp), with a terminal
                error state
    connection  one socket: writes the request, feeds the parser, aborts on failure
    proxy       CONNECT tunnels through an egress proxy
    pool        keep-alive connections per origin, and connecting
    client      UpstreamClient.request(): one request, response head in hand
    errors      the exception tree below, and the one mapping to gateway errors
    bodies      bounded decoding of compressed error bodies
    attempt     one attempt's health bookkeeping, and where failover goes next

The exception tree (``errors``)::

    UpstreamFailure
    ├── ConnectFailed             cannot open the connection (DNS, refused, TLS)
    │   └── ProxyFailed           the egress proxy refused or broke the tunnel
    ├── ConnectTimeout            (also a TimeoutError)
    ├── BadResponse               the bytes are not a valid HTTP/1.1 response (terminal)
    ├── ReadTimeout               no byte for the read timeout (also a TimeoutError)
    │   └── DeadlineReached       the failover deadline passed before the head
    └── Disconnected              the upstream closed mid-response
        └── NothingReceived       closed before a single byte: a stale pooled connection
"""
