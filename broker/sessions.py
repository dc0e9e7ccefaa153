"""Pinned transactions: which client owns which server connection, until when.

A transaction (``client.transaction()``) leases one connection to one
client socket from BEGIN to COMMIT/ROLLBACK.  The lease ends early when
its owner process exits, its client's transport goes silent, it sits idle
longer than ``idle_transaction_timeout``, or the broker shuts down; the
token then stays known for a while so the client hears why.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass

from .pgconn import PgConn

EXPIRED_SESSIONS_KEPT = 10_000


@dataclass(slots=True, eq=False)
class Session:
    """A transaction pinned to one server connection, owned by one client socket."""

    token: bytes
    routing_id: bytes
    conn: PgConn
    owner_pid: int
    last_active: float
    busy: bool = True  # a request of its own is running
    opened_at: float = 0.0

class Sessions:
    """The open sessions by token and by connection, and the recently ended."""

    def __init__(self) -> None:
        self.by_token: dict[bytes, Session] = {}
        self.by_conn: dict[int, Session] = {}
        self._ended: OrderedDict[bytes, str] = OrderedDict()

    def open(self, session: Session) -> None:
        self.by_token[session.token] = session
        self.by_conn[session.conn.conn_id] = session

    def close(self, session: Session, reason: str = "") -> None:
        """Forget ``session``; with ``reason``, remember why for its client."""
        self.by_conn.pop(session.conn.conn_id, None)
        self.by_token.pop(session.token, None)
        if reason:
            self._ended[session.token] = reason
            while len(self._ended) > EXPIRED_SESSIONS_KEPT:
                self._ended.popitem(last=False)

    def why_ended(self, token: bytes) -> str | None:
        return self._ended.get(token)

def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rpartition(b")")[2].split()[0]
    except (OSError, IndexError):
        return True
    return state not in (b"Z", b"X")  # a zombie holds no socket
