"""Names of the broker's counters and gauges, as ``poolbroker stats`` shows them."""

# Gauges, computed when asked.
POOL_MAX = "pool_max"  # max_connections
POOL_MIN = "pool_min"  # min_connections
POOL_SIZE = "pool_size"  # server connections open or opening
POOL_AVAILABLE = "pool_available"  # open and idle
REQUESTS_WAITING = "requests_waiting"  # queued for a connection now
SESSIONS_ACTIVE = "sessions_active"  # pinned transactions open now
CLIENTS_ACTIVE = "clients_active"  # client sockets with requests waiting or running
CLIENTS_CONNECTED = "clients_connected"  # client sockets connected now, less those turned away
CLIENTS_MAX = "clients_max"  # max_clients, as set or sized from the open-files limit
QUEUED_BYTES = "queued_bytes"  # bytes of requests waiting or running now

# Counters kept by the client gate, reported as counters.
CLIENTS_REFUSED = "clients_refused"  # sockets shut down at once: max_clients reached
MESSAGES_REJECTED = "messages_rejected"  # dropped: sent over ipc by a uid not allowed
POOL_PREDECESSORS = "pool_predecessors"  # a dead broker's connections counted against the cap
STATEMENTS_UNPARSED = "statements_unparsed"  # new long texts not parsed: parsing's time was spent

# Counters since start.
REQUESTS_NUM = "requests_num"  # requests received
REQUESTS_QUEUED = "requests_queued"  # requests that had to wait for a connection
REQUESTS_WAIT_MS = "requests_wait_ms"  # total time spent waiting in the queue
REQUESTS_ERRORS = "requests_errors"  # requests answered with an error
REQUESTS_TIMEOUTS = "requests_timeouts"  # PoolTimeout: waited too long, not run
REQUESTS_ABANDONED = "requests_abandoned"  # the client's deadline passed in the queue
REQUESTS_REFUSED = "requests_refused"  # TooManyRequests
REQUESTS_CANCELLED = "requests_cancelled"  # cancelled on the server at their deadline
REQUESTS_PIPELINED = "requests_pipelined"  # sent behind other clients' on a busy connection
REQUESTS_RERUN = "requests_rerun"  # sent again: hit by a cancel meant for another, stale plan
REQUESTS_DROPPED = "requests_dropped"  # from a client known to be gone: not run, not answered
MESSAGES_MALFORMED = "messages_malformed"  # undecodable or ill-formed requests
REPLIES_UNDELIVERABLE = "replies_undeliverable"  # the client was gone or not reading
CONNECTIONS_NUM = "connections_num"  # server connections opened
CONNECTIONS_ERRORS = "connections_errors"  # failed connection attempts
CONNECTIONS_LOST = "connections_lost"  # connections found broken
CONNECTIONS_CLOSED_IDLE = "connections_closed_idle"  # unused for max_idle, above min_connections
CONNECTIONS_RECYCLED = "connections_recycled"  # replaced at max_lifetime, once idle
TRANSACTIONS_EXPIRED = "transactions_expired"  # rolled back: idle, owner dead, shutdown

COUNTERS = (
    REQUESTS_NUM, REQUESTS_QUEUED, REQUESTS_WAIT_MS, REQUESTS_ERRORS,
    REQUESTS_TIMEOUTS, REQUESTS_ABANDONED, REQUESTS_REFUSED, REQUESTS_CANCELLED,
    REQUESTS_PIPELINED, REQUESTS_RERUN, REQUESTS_DROPPED,
    MESSAGES_MALFORMED, REPLIES_UNDELIVERABLE, CONNECTIONS_NUM,
    CONNECTIONS_ERRORS, CONNECTIONS_LOST, CONNECTIONS_CLOSED_IDLE, CONNECTIONS_RECYCLED,
    TRANSACTIONS_EXPIRED,
)
