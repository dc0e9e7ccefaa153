"""A dead broker's server connections: find them, end them, or count them.

A broker killed with SIGKILL leaves its backends to the server, still
running their statements; a restarted broker that opened its own
connections beside them would hold more than ``max_connections``.  Each
broker therefore marks its connections: ``application_name`` is the
configured name followed by ``~<where>.<pid>``, ``<where>`` a hash of
the host and the endpoint.  One broker serves an endpoint on a host at a
time (``endpoint.claim``), so a newcomer that holds the endpoint knows
that every other connection marked with its ``<where>`` belongs to a dead
predecessor; brokers of other endpoints or hosts, even with the same
application_name, are never touched.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
import socket
import time

import psycopg
from psycopg import errors

logger = logging.getLogger("poolbroker")

MARK = "~"
"""Separates the configured application_name from the broker's mark."""
MARK_BYTES = 1 + 8 + 1 + 7
"""``~``, 8 hex digits, ``.``, a pid (pid_max is at most 2**22: 7 digits)."""
SETTLE_TIMEOUT = 2.0
"""Seconds to wait for terminated backends to exit before counting them."""
SETTLE_POLL = 0.05

Backend = tuple[int, datetime.datetime | None]
"""(pid, backend_start): a backend, whatever pid the server reuses later.
backend_start is NULL for another role's backends without pg_read_all_stats."""

# Not this broker's own: its other pools may use the same server.
_MARKED = ("SELECT pid, backend_start FROM pg_stat_activity "
           "WHERE starts_with(application_name, %s) AND application_name <> %s "
           "AND pid <> pg_backend_pid()")


def marked_prefix(application_name: str, endpoint: str) -> str:
    """What every connection of every broker of ``endpoint`` on this host,
    with this ``application_name``, starts with."""
    where = hashlib.sha256(f"{socket.gethostname()}\0{endpoint}".encode()).hexdigest()[:8]
    return f"{application_name}{MARK}{where}."


def own_name(prefix: str) -> str:
    """This broker's connections' application_name."""
    return f"{prefix}{os.getpid()}"


def listed(conn: psycopg.Connection, prefix: str) -> set[Backend]:
    """The backends marked with ``prefix``, but this broker's own."""
    return set(conn.execute(_MARKED, [prefix, own_name(prefix)]).fetchall())


def sweep(conn: psycopg.Connection, prefix: str) -> set[Backend]:
    """Terminate the backends of dead predecessors (every backend marked
    with ``prefix`` but this broker's: the caller holds the endpoint); return
    those still there: their termination was
    refused, or they did not exit within SETTLE_TIMEOUT."""
    found = listed(conn, prefix)
    refused: set[int] = set()
    reason = ""
    for pid, _ in found:
        try:
            conn.execute("SELECT pg_terminate_backend(%s)", [pid])
        except errors.InsufficientPrivilege as exc:
            refused.add(pid)
            reason = exc.diag.message_primary or str(exc)
    left = found & listed(conn, prefix) if found else found
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while any(pid not in refused for pid, _ in left) and time.monotonic() < deadline:
        time.sleep(SETTLE_POLL)
        left = found & listed(conn, prefix)
    if len(left) < len(found):
        logger.warning("terminated %d server connections of a dead broker of this endpoint "
                       "(a previous instance, killed or crashed)", len(found) - len(left))
    if refused:
        logger.warning(
            "cannot terminate %d server connections of a dead broker of this endpoint "
            "(pids %s: %s); they count against max_connections until they end",
            len(refused), ", ".join(map(str, sorted(refused))), reason)
    slow = sorted(pid for pid, _ in left if pid not in refused)
    if slow:
        logger.warning("server connections of a dead broker (pids %s) have not exited yet; "
                       "they count against max_connections until they do",
                       ", ".join(map(str, slow)))
    return left
