"""Names of the broker's counters and gauges, as ``poolbroker stats`` shows
them, and the fixed-bucket histograms behind its percentiles.

Each counter and gauge is described once, here: ``poolbroker stats`` shows
the names, the Prometheus endpoint (``broker/metrics.py``) exports them with
these descriptions.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any

# Gauges, computed when asked.
POOL_MAX = "pool_max"
POOL_MIN = "pool_min"
POOL_SIZE = "pool_size"
POOL_AVAILABLE = "pool_available"
POOL_ACTIVE = "pool_active"
REQUESTS_WAITING = "requests_waiting"
SESSIONS_ACTIVE = "sessions_active"
CLIENTS_ACTIVE = "clients_active"
CLIENTS_CONNECTED = "clients_connected"
CLIENTS_MAX = "clients_max"
QUEUED_BYTES = "queued_bytes"
POOL_PREDECESSORS = "pool_predecessors"
UPTIME_SECONDS = "uptime_seconds"
PAUSED = "paused"

# Peaks since start.
CLIENTS_CONNECTED_PEAK = "clients_connected_peak"
REQUESTS_WAITING_PEAK = "requests_waiting_peak"
POOL_ACTIVE_PEAK = "pool_active_peak"

# Counters kept by the client gate, reported as counters.
CLIENTS_REFUSED = "clients_refused"
CLIENTS_DENIED = "clients_denied"
MESSAGES_REJECTED = "messages_rejected"
STATEMENTS_UNPARSED = "statements_unparsed"

# Counters since start.
REQUESTS_NUM = "requests_num"
REQUESTS_QUEUED = "requests_queued"
REQUESTS_WAIT_MS = "requests_wait_ms"
REQUESTS_ERRORS = "requests_errors"
REQUESTS_TIMEOUTS = "requests_timeouts"
REQUESTS_ABANDONED = "requests_abandoned"
REQUESTS_REFUSED = "requests_refused"
REQUESTS_CANCELLED = "requests_cancelled"
REQUESTS_PIPELINED = "requests_pipelined"
REQUESTS_RERUN = "requests_rerun"
REQUESTS_DROPPED = "requests_dropped"
STATEMENTS_LATE = "statements_late"
MESSAGES_MALFORMED = "messages_malformed"
REPLIES_UNDELIVERABLE = "replies_undeliverable"
CONNECTIONS_NUM = "connections_num"
CONNECTIONS_ERRORS = "connections_errors"
CONNECTIONS_LOST = "connections_lost"
CONNECTIONS_CLOSED_IDLE = "connections_closed_idle"
CONNECTIONS_RECYCLED = "connections_recycled"
TRANSACTIONS_EXPIRED = "transactions_expired"
RELOADS = "reloads"

COUNTERS: dict[str, str] = {
    REQUESTS_NUM: "Requests received",
    REQUESTS_QUEUED: "Requests that waited over 1 ms for a connection, timed out ones included",
    REQUESTS_ERRORS: "Requests answered with an error",
    REQUESTS_TIMEOUTS: "Requests that waited longer than pool_timeout (PoolTimeout, not run)",
    REQUESTS_ABANDONED: "Requests refused unrun at their deadline, or before it when the "
                        "statement lately took longer than the time left (PoolTimeout)",
    STATEMENTS_LATE: "Statements that ran after their client was told they would not "
                     "(the broker's and the server's clocks disagreed): the target is 0",
    REQUESTS_REFUSED: "Requests refused with TooManyRequests",
    REQUESTS_CANCELLED: "Statements cancelled on the server at their deadline",
    REQUESTS_PIPELINED: "Statements sent behind other clients' on a busy connection",
    REQUESTS_RERUN: "Statements sent again (hit by a cancel meant for another, stale plan)",
    REQUESTS_DROPPED: "Requests from a client known to be gone: not run, not answered",
    MESSAGES_MALFORMED: "Undecodable or ill-formed requests",
    REPLIES_UNDELIVERABLE: "Replies dropped: the client was gone or not reading",
    CONNECTIONS_NUM: "Server connections opened",
    CONNECTIONS_ERRORS: "Failed attempts to open a server connection",
    CONNECTIONS_LOST: "Server connections found broken",
    CONNECTIONS_CLOSED_IDLE: "Server connections closed after max_idle unused, above min_connections",
    CONNECTIONS_RECYCLED: "Server connections replaced once idle: at max_lifetime or after "
                          "poolbroker ctl reconnect",
    TRANSACTIONS_EXPIRED: "Transactions rolled back by the broker: idle, owner dead, shutdown",
    RELOADS: "Settings reloads that succeeded (SIGHUP, poolbroker ctl reload)",
}
"""Counters the loop increments; ``requests_wait_ms`` is not among them: it
is the wait histogram's sum, so that waits ending in PoolTimeout count too."""

OTHER_COUNTERS: dict[str, str] = {
    CLIENTS_REFUSED: "Client sockets shut down at once: max_clients reached",
    CLIENTS_DENIED: "Client connections refused at the handshake: over ipc a uid not "
                    "allowed, with CURVE a key not on the allow-list",
    MESSAGES_REJECTED: "Messages dropped: sent over ipc by a uid no longer allowed",
    STATEMENTS_UNPARSED: "New long statement texts run unparsed: the parsing time was spent",
}
"""Counters kept outside the loop's ``stats`` (by the client gate, the parse
budget), copied into each snapshot."""

GAUGES: dict[str, str] = {
    CLIENTS_ACTIVE: "Client sockets with requests waiting or running",
    CLIENTS_CONNECTED: "Client sockets connected, less those being turned away",
    CLIENTS_CONNECTED_PEAK: "Most client sockets connected at once since start",
    CLIENTS_MAX: "max_clients, as set or sized from the open-files limit",
    SESSIONS_ACTIVE: "Transactions pinned to a server connection",
    QUEUED_BYTES: "Bytes of requests waiting or running (max_queued_bytes)",
    POOL_PREDECESSORS: "A dead broker's server connections still counted against the cap",
    UPTIME_SECONDS: "Seconds since the broker started",
    PAUSED: "1 while paused (poolbroker ctl pause): queued requests are not started",
}
"""Gauges of the whole broker.  Those of a pool (its connections by state,
its queue) are in its entry of POOLS."""

PERCENTILES = (50, 90, 99)
REQUESTS_WAIT_PERCENTILE = "requests_wait_p{}_ms"
"""Queue wait percentiles, PoolTimeouts included, estimated from the buckets."""
STATEMENT_PERCENTILE = "statement_p{}_ms"
"""Statement time percentiles (server time, from the head of its connection's
pipeline to its result), estimated from the buckets."""

POOLS = "pools"
"""A list with one entry per pool: its name (POOL_NAME), SHOW POOLS'
columns, its peaks and its two histograms (as Histogram.as_dict)."""
POOL_NAME = "pool"
CL_ACTIVE = "cl_active"  # client sockets with work running here and none queued
CL_WAITING = "cl_waiting"  # client sockets with a request queued here
SV_ACTIVE = "sv_active"  # server connections running clients' work (shared, busy, pinned)
SV_IDLE = "sv_idle"
SV_USED = "sv_used"  # PgBouncer's idle-but-needs-a-check: no such state here, always 0
SV_TESTED = "sv_tested"  # running ROLLBACK / DISCARD ALL before anyone else gets it
SV_LOGIN = "sv_login"  # opening
MAXWAIT = "maxwait"  # seconds the oldest queued request has waited
WAIT_SECONDS = "wait_seconds"
STATEMENT_SECONDS = "statement_seconds"
SHOW_POOLS = (CL_ACTIVE, CL_WAITING, SV_ACTIVE, SV_IDLE, SV_USED, SV_TESTED, SV_LOGIN, MAXWAIT)
"""The columns of ``poolbroker stats``'s pool table, in PgBouncer's order."""

SECONDS_BUCKETS = (0.0, 0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05,
                   0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0)
"""Upper bounds of the wait and statement time buckets, 100 us to a minute
(pool_timeout's default, 30 s, is a bound): 1-2-5 steps keep a percentile
within its bucket, a factor of 2-2.5, and a wait that ended in PoolTimeout
lands beside the others instead of off the scale.  0 first: a request served
in the loop turn it arrived in waited 0 by the loop's clock, the commonest
wait of all, and without that bucket its percentiles would read as a made-up
fraction of 100 us."""


class Histogram:
    """Counts of observations per fixed bucket, and their sum: bounded memory
    whatever the traffic.  Kept by the loop's thread alone; an observation
    costs a bisect and two additions (see README, Statistics)."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...] = SECONDS_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last: above every bound (+Inf)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # bisect_left: a value equal to a bound counts in that bound's bucket,
        # as Prometheus's "le" (less than or equal) says.
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def as_dict(self) -> dict[str, Any]:
        """A copy that the wire (msgpack) and other threads may keep."""
        return {"le": list(self.bounds), "counts": list(self.counts), "sum": self.sum}


def merged(histograms: list[dict[str, Any]]) -> dict[str, Any]:
    """One histogram (as ``Histogram.as_dict``) of the observations of
    several with the same buckets: the broker's, of its pools'."""
    first = histograms[0]
    return {"le": first["le"], "counts": [sum(c) for c in zip(*(h["counts"] for h in histograms))],
            "sum": sum(h["sum"] for h in histograms)}


def quantile(histogram: dict[str, Any], q: float) -> float | None:
    """The ``q`` quantile (0..1) of a histogram as ``Histogram.as_dict`` gives
    it; None without observations.  Interpolated linearly within its bucket,
    as Prometheus's histogram_quantile() does; beyond the last bound, that
    bound (the histogram cannot say more)."""
    bounds, counts = histogram["le"], histogram["counts"]
    total = sum(counts)
    if not total:
        return None
    rank = q * total
    seen = 0
    for i, count in enumerate(counts):
        if count and seen + count >= rank:
            if i == len(bounds):
                return bounds[-1]
            lower = bounds[i - 1] if i else 0.0
            return lower + (bounds[i] - lower) * (rank - seen) / count
        seen += count
    return bounds[-1]
