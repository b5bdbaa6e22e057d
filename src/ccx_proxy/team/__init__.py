"""The team gateway: members, usage and cost, per-member limits.

::

    db        the embedded SQLite database (DATA_DIR/ccx.db): one writer thread, WAL,
              migrations recorded in PRAGMA user_version
    members   member keys (ccx-..., stored as SHA-256), the member table, the in-memory
              index every request is authenticated against (refreshed on change)
    meter     token usage read from a relayed response (SSE or JSON), never changing a byte
    prices    the prices table: upstream model -> USD per million tokens
    recorder  one usage record per request, written in batches off the event loop
    limits    requests per minute, concurrency, token and USD budgets, models, channels
    reports   usage totals grouped by member / model / channel / day, JSON and CSV
    service   the Team object the gateway holds: wires the parts together

The request path touches only memory: a hash lookup, a few counters, one record appended
to a list.  Everything that reaches the disk runs on the database thread, and a slow or
failing database never delays or fails a request (losses are counted and logged).
"""
