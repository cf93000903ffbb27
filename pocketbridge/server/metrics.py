"""
Every Prometheus metric of the server, defined once (STYLE.md §13).

Names are ``pocketbridge_<noun>_<unit>``; labels come from small fixed sets,
never user or device ids.
"""

from prometheus_client import Counter, Gauge, Histogram

CONNECTIONS = Gauge("pocketbridge_connections", "Open WebSocket connections on this node", ["state"])
HANDSHAKES = Counter("pocketbridge_handshakes_total", "Handshakes by result", ["result"])
EVENTS_RECEIVED = Counter("pocketbridge_events_received_total", "Event frames read from devices")
EVENTS_WRITTEN = Counter("pocketbridge_events_written_total", "Writer outcomes", ["outcome"])
EVENTS_STORED = Counter("pocketbridge_events_stored_total", "Events durably stored")
EVENTS_DUPLICATE = Counter("pocketbridge_events_duplicate_total", "Events acked as duplicates")
EVENTS_REJECTED = Counter("pocketbridge_events_rejected_total", "Events rejected", ["reason"])
EVENTS_RELAYED = Counter("pocketbridge_events_relayed_total", "Events sent to sockets", ["path"])
COMMIT_BATCH_SIZE = Histogram(
    "pocketbridge_commit_batch_events", "Events per writer transaction",
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000),
)
COMMIT_SECONDS = Histogram(
    "pocketbridge_commit_seconds", "Writer transaction latency",
    buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
DELIVERY_SECONDS = Histogram(
    "pocketbridge_delivery_seconds", "Commit to socket write latency of live events",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1),
)
LIMIT_HITS = Counter("pocketbridge_limit_hits_total", "Limit hits", ["limit"])
REPLAY_PAGES = Counter("pocketbridge_replay_pages_total", "Catch-up pages sent")
DELIVERY_GAVE_UP = Counter("pocketbridge_delivery_gave_up_total", "Events treated as acknowledged after 3 unacknowledged deliveries")
CURSOR_WRITES = Counter("pocketbridge_cursor_writes_total", "Delivery cursor rows written")
BUS_GAP_READS = Counter("pocketbridge_bus_gap_reads_total", "Storage reads to fill a gap in bus notifications")
BUS_RECONNECTS = Counter("pocketbridge_bus_reconnects_total", "Bus reconnections", ["connection"])
CLOSES = Counter("pocketbridge_closes_total", "Connections closed by the server, by close code", ["code"])
HTTP_REQUESTS = Counter("pocketbridge_http_requests_total", "HTTP requests", ["route", "status"])
JOB_RUNS = Counter("pocketbridge_job_runs_total", "Background job runs", ["job", "result"])
JOB_ROWS = Counter("pocketbridge_job_rows_total", "Rows deleted by background jobs", ["job"])
REST_AUTH_FAILURES = Counter("pocketbridge_rest_auth_failures_total", "Rejected PB-Ed25519 requests", ["reason"])
PAIRING = Counter("pocketbridge_pairing_total", "Pairing operations by result", ["op", "result"])
