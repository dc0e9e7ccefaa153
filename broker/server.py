"""The broker: one loop that owns every server connection.

Clients talk to a ROUTER socket.  Plain statements, batches, BEGIN and
the statements of a transaction (the hot path) are run by this loop
itself: appended with non-blocking libpq calls to a connection's
pipeline, each followed by its own Sync, and read back when the
connection's socket (in the poller) is readable.  Autocommit statements
from different clients share a busy connection's pipeline, up to
PIPELINE_DEPTH, unless the statement at its head has stalled.
Everything else (executemany, multi-statement strings, ends of
transactions that must reset session state) goes to the connection's own
thread (``connection.py``), which pushes completions back to an inproc
PULL socket.  The loop keeps the FIFO queue of requests waiting for a
connection, pins connections to transactions, and enforces the cap, the
deadlines and the leases.  It never blocks on the database.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import sys
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from client import protocol
from client.protocol import (
    HEADER_FIELDS, OP_BATCH, OP_BEGIN, OP_COMMIT, OP_EXECUTE, OP_EXECUTEMANY,
    OP_NAMES, OP_PING, OP_ROLLBACK, OP_STATS, STATUS_ERROR, STATUS_OK, error_payload,
)

from . import stats as S
from .config import ConfigError, Settings
from .redact import Redactor
from .sqlscan import shareable
from .connection import (
    ENDING_OPS, EV_BROKEN, EV_CONNECT_FAILED, EV_DONE, EV_FAILED, EV_READY, EV_REQUEUE,
    OP_RESET, Job,
    ServerConnection, build_adapters, decode_batch, decode_execute, failure_payload, runs_direct,
)

logger = logging.getLogger("poolbroker")

HOUSEKEEPING_INTERVAL = 0.05
"""Seconds between checks of deadlines, leases and owner processes."""

OWNER_CHECK_INTERVAL = 0.25
"""Seconds between checks that the processes owning transactions are alive."""

GIL_SWITCH_INTERVAL = 0.0001
"""Work that goes to a connection's thread (transactions that reset session
state, executemany...) is handed back and forth; with Python's default 5 ms
interval a woken thread waits for the GIL.  Measured when every statement
took that path: 8 clients, cap 4, SELECT 1: 3,725 -> 5,349 q/s."""

PEER_PROBE_INTERVAL = 1.0
"""Seconds between checks that clients holding transactions are still connected."""

MAX_HEADER_BYTES = 4096
DIRECT_MAX_BODY_BYTES = 64 * 1024
"""Executes up to this size are decoded and run by the loop itself; larger
ones go to the connection's thread, where sending them may block."""
EXPIRED_SESSIONS_KEPT = 10_000
CONNECT_BACKOFF_MIN = 0.1
CONNECT_BACKOFF_MAX = 5.0
NO_DEADLINE = 24 * 3600.0
MALFORMED_LOG_INTERVAL = 1.0
REPLY_FLUSH_MS = 1000
"""On exit, how long queued replies may take to reach their clients."""
PIPELINE_DEPTH = 16
"""Autocommit jobs in flight on one connection at most: the server runs
them one after another, each ended by its own Sync."""
PIPELINE_STALL = 0.001
"""A connection whose job at the head has run this long (seconds) takes no
more jobs behind it: a slow statement holds up at most what arrived in its
first millisecond, when every connection was busy."""
PIPELINE_MAX_BODY = 8 * 1024
"""Larger requests only go to an idle connection: what is queued behind a
job must never fill the socket while the server writes that job's rows."""
REPLY_QUEUE_LIMIT = 1000
"""Replies queued for one client that is not reading; beyond it they are
dropped (counted as undeliverable), so a stuck client cannot grow the broker."""

_PROBE = protocol.pack([protocol.PROBE_REQUEST_ID, STATUS_OK, None])
_DIRECT_OPS = frozenset((OP_EXECUTE, OP_BATCH))
_BEGIN = [("BEGIN", None)]
# Ending a transaction directly needs no DISCARD ALL (the thread does that).
_DIRECT_ENDINGS = {OP_COMMIT: [("COMMIT", None)], OP_ROLLBACK: [("ROLLBACK", None)]}
_POOLED_OPS = frozenset((OP_EXECUTE, OP_EXECUTEMANY, OP_BATCH, OP_BEGIN))
_SESSION_OPS = frozenset((OP_EXECUTE, OP_EXECUTEMANY, OP_COMMIT, OP_ROLLBACK))


@dataclass(slots=True, eq=False)
class Session:
    """A transaction pinned to one server connection, owned by one client socket."""

    token: bytes
    routing_id: bytes
    conn: ServerConnection
    owner_pid: int
    last_active: float
    busy: bool = True
    expired: str = ""  # why the broker is ending it, if it is


def _peer_pid(frame: zmq.Frame) -> int:
    """The sender's pid over ipc ("localhost:UID:GID:PID"), else 0."""
    try:
        address = frame.get("Peer-Address")
    except zmq.ZMQError:
        return 0
    tail = address.rpartition(":")[2] if address else ""
    return int(tail) if tail.isdigit() and address.count(":") >= 3 else 0


def _pid_alive(pid: int) -> bool:
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


def prepare_ipc_directory(endpoint: str) -> None:
    """Create the socket's directory 0700 and refuse one others can write."""
    path = endpoint[len("ipc://"):]
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, mode=0o700, exist_ok=True)
    st = os.stat(directory)
    if st.st_uid != os.getuid():
        raise ConfigError(f"{directory} belongs to uid {st.st_uid}, not to this user")
    if st.st_mode & 0o077:
        raise ConfigError(
            f"{directory} is accessible to other users (mode {st.st_mode & 0o777:o}); "
            "the broker's socket must live in a 0700 directory")


class Broker:
    """Owns the pool; ``run()`` serves until SIGTERM/SIGINT or ``stop()``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._context = zmq.Context()
        self._router = self._context.socket(zmq.ROUTER)
        self._completions = self._context.socket(zmq.PULL)
        self._completions_endpoint = f"inproc://poolbroker-completions-{id(self)}"
        self._poller = zmq.Poller()
        self._direct_fds: dict[int, ServerConnection] = {}  # statements the loop runs
        self._adapters = build_adapters()
        self._redact = Redactor(settings.dsn)
        self._query_timeout_reason = (
            f"the statement ran longer than query_timeout ({settings.query_timeout:g} s) "
            "and was cancelled on the server")
        self._conns: dict[int, ServerConnection] = {}
        self._idle: list[ServerConnection] = []
        self._shared: list[ServerConnection] = []  # running autocommit jobs, taking more
        self._unflushed: list[ServerConnection] = []  # jobs sent, still in libpq's buffer
        self._opening = 0
        self._next_conn_id = 1
        self._waiting: deque[Job] = deque()
        self._running: dict[int, Job] = {}  # conn id -> job on its thread
        self._in_flight: dict[bytes, int] = {}  # routing id -> requests waiting or running
        self._sessions: dict[bytes, Session] = {}
        self._pinned: dict[int, Session] = {}
        self._expired: OrderedDict[bytes, str] = OrderedDict()
        self._authenticator: ThreadAuthenticator | None = None
        self._connect_backoff = 0.0
        self._connect_retry_at = 0.0
        self._stopping = False
        self._drain_deadline = 0.0
        self._next_housekeeping = 0.0
        self._next_owner_check = 0.0
        self._next_peer_probe = 0.0
        self._malformed_log_at = 0.0
        self._malformed_unlogged = 0
        self.stats: dict[str, int] = dict.fromkeys(S.COUNTERS, 0)

    # Set-up and teardown

    def bind(self) -> None:
        s = self.settings
        endpoint = s.endpoint
        if endpoint.startswith("ipc://"):
            prepare_ipc_directory(endpoint)
        if s.curve_secret_key_file:
            self._enable_curve()
        elif endpoint.startswith("tcp://") and not s.insecure_tcp:
            raise ConfigError(
                "a tcp endpoint needs CURVE: set curve_secret_key_file and "
                "curve_allowed_clients (make keys with 'poolbroker keygen'), or pass "
                "--insecure-tcp on a network you trust")
        router = self._router
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.MAXMSGSIZE, s.max_message_bytes)
        router.setsockopt(zmq.SNDHWM, REPLY_QUEUE_LIMIT)
        router.setsockopt(zmq.RCVHWM, 100_000)
        router.setsockopt(zmq.HEARTBEAT_IVL, 1000)
        router.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3000)
        router.bind(endpoint)
        self._completions.bind(self._completions_endpoint)
        logger.info("listening on %s, max_connections=%d", endpoint, s.max_connections)

    def _enable_curve(self) -> None:
        """Encrypt the transport and admit only clients on the allow-list."""
        s = self.settings
        try:
            public, secret = zmq.auth.load_certificate(s.curve_secret_key_file)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read curve_secret_key_file: {exc}") from None
        if not secret:
            raise ConfigError(f"{s.curve_secret_key_file} holds no secret key")
        if not os.path.isdir(s.curve_allowed_clients):
            raise ConfigError(f"curve_allowed_clients {s.curve_allowed_clients!r} "
                              "is not a directory")
        self._authenticator = ThreadAuthenticator(self._context)
        self._authenticator.start()
        self._authenticator.configure_curve(domain="*", location=s.curve_allowed_clients)
        self._router.curve_secretkey = secret
        self._router.curve_publickey = public
        self._router.curve_server = True
        logger.info("CURVE on: clients allowed from %s", s.curve_allowed_clients)

    def stop(self) -> None:
        """Begin a graceful shutdown (safe from a signal handler)."""
        self._stopping = True

    def _install_signal_handlers(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: self.stop())

    def _close(self) -> None:
        for conn in list(self._conns.values()):
            conn.stop()
        for conn in list(self._conns.values()):
            conn.join(timeout=2.0)
        # Give the last replies (answers to drained statements) a moment to
        # leave; a client that stopped reading cannot hold the exit longer.
        self._router.close(linger=REPLY_FLUSH_MS)
        self._completions.close(linger=0)
        if self._authenticator is not None:
            self._authenticator.stop()
        self._context.term()
        logger.info("stopped")

    # The loop

    def run(self, *, install_signal_handlers: bool = True) -> None:
        if install_signal_handlers:
            self._install_signal_handlers()
        sys.setswitchinterval(GIL_SWITCH_INTERVAL)
        self.bind()
        poller = self._poller
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._completions, zmq.POLLIN)
        router, completions = self._router, self._completions
        direct = self._direct_fds
        timeout_ms = int(HOUSEKEEPING_INTERVAL * 1000)
        try:
            while True:
                ready = dict(poller.poll(timeout_ms))
                now = time.monotonic()
                if direct:
                    for fd in [fd for fd in direct if fd in ready]:
                        conn = direct.get(fd)
                        if conn is not None:
                            self._on_direct_input(conn, now)
                if completions in ready:
                    while True:
                        try:
                            frames = completions.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._on_completion(frames, now)
                if router in ready:
                    for _ in range(256):  # then let completions in
                        try:
                            frames = router.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self._on_request(frames, now)
                if self._unflushed:
                    for conn in self._unflushed:
                        conn.flush_direct()
                    self._unflushed.clear()
                if now >= self._next_housekeeping:
                    self._next_housekeeping = now + HOUSEKEEPING_INTERVAL
                    self._housekeeping(now)
                    if self._stopping and self._drained(now):
                        break
        finally:
            self._close()

    # Requests

    def _reply(self, routing_id: bytes, reply: bytes) -> None:
        try:
            self._router.send_multipart([routing_id, reply], zmq.NOBLOCK)
        except zmq.ZMQError:
            # EHOSTUNREACH: the client is gone; EAGAIN: it stopped reading.
            self.stats[S.REPLIES_UNDELIVERABLE] += 1

    def _peer_connected(self, routing_id: bytes) -> bool:
        """Whether the client's connection is up: a frozen or vanished peer
        fails its heartbeats and its pipe is closed, so ROUTER_MANDATORY
        refuses a message to it."""
        try:
            self._router.send_multipart([routing_id, _PROBE], zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            return exc.errno != zmq.EHOSTUNREACH  # EAGAIN: up, just not reading
        return True

    def _reply_error(self, routing_id: bytes, request_id: Any, kind: str, message: str,
                     **extra: Any) -> None:
        self._reply_payload(routing_id, request_id, error_payload(kind, message, **extra))

    def _reply_payload(self, routing_id: bytes, request_id: Any, payload: dict[str, Any]) -> None:
        self.stats[S.REQUESTS_ERRORS] += 1
        self._reply(routing_id, protocol.pack([request_id, STATUS_ERROR, payload]))

    def _malformed(self, routing_id: bytes, request_id: Any, why: str) -> None:
        self.stats[S.MESSAGES_MALFORMED] += 1
        now = time.monotonic()
        if now >= self._malformed_log_at:
            # At most one line a second: a hostile client must not flood the log.
            self._malformed_log_at = now + MALFORMED_LOG_INTERVAL
            suppressed, self._malformed_unlogged = self._malformed_unlogged, 0
            logger.warning("malformed request: %s%s", why,
                           f" ({suppressed} more since the last report)" if suppressed else "")
        else:
            self._malformed_unlogged += 1
        self._reply_error(routing_id, request_id, "MessageError", why)

    def _on_request(self, frames: list[zmq.Frame], now: float) -> None:
        self.stats[S.REQUESTS_NUM] += 1
        routing_id = frames[0].bytes
        if len(frames) != 3:
            self._malformed(routing_id, None, f"expected 2 frames (header, body), got {len(frames) - 1}")
            return
        header_bytes = frames[1].bytes
        if len(header_bytes) > MAX_HEADER_BYTES:
            self._malformed(routing_id, None, "header frame too large")
            return
        try:
            header = protocol.unpack(header_bytes, MAX_HEADER_BYTES)
        except Exception as exc:  # msgpack raises many types on garbage
            self._malformed(routing_id, None, f"undecodable header: {exc}")
            return
        if not isinstance(header, list) or len(header) != HEADER_FIELDS:
            self._malformed(routing_id, None, "header must be [request_id, op, timeout_ms, session]")
            return
        request_id, op, timeout_ms, session = header
        if not isinstance(request_id, int) or not isinstance(op, int) or isinstance(op, bool):
            self._malformed(routing_id, request_id if isinstance(request_id, int) else None,
                            "request_id and op must be integers")
            return
        if op not in OP_NAMES:
            self._malformed(routing_id, request_id, f"unknown operation {op}")
            return
        if timeout_ms is None:
            deadline = now + NO_DEADLINE
        elif isinstance(timeout_ms, int) and not isinstance(timeout_ms, bool) and timeout_ms > 0:
            deadline = now + timeout_ms / 1000.0
        else:
            self._malformed(routing_id, request_id, "timeout_ms must be a positive integer or nil")
            return
        if session is not None and not isinstance(session, bytes):
            self._malformed(routing_id, request_id, "session must be bytes or nil")
            return

        if op == OP_STATS:
            self._reply(routing_id, protocol.pack([request_id, STATUS_OK, self.snapshot()]))
            return
        if op == OP_PING:
            self._reply(routing_id, protocol.pack([request_id, STATUS_OK, None]))
            return
        if self._stopping:
            self._reply_error(routing_id, request_id, "BrokerUnavailable",
                              "the broker is shutting down; the request was not run")
            return
        in_flight = self._in_flight.get(routing_id, 0)
        if in_flight >= self.settings.max_client_requests:
            self.stats[S.REQUESTS_REFUSED] += 1
            self._reply_error(
                routing_id, request_id, "TooManyRequests",
                f"this client already has {in_flight} requests waiting or running "
                f"(max_client_requests={self.settings.max_client_requests}); "
                "the request was not run")
            return
        job = Job(op, routing_id, request_id, frames[2].bytes, deadline=deadline)
        if session is not None:
            self._on_session_request(job, session, now)
            return
        if op not in _POOLED_OPS:
            self._malformed(routing_id, request_id, f"{OP_NAMES[op]} needs a transaction")
            return
        if op == OP_BEGIN:
            job.session = secrets.token_bytes(16)
            job.owner_pid = _peer_pid(frames[1])
            job.statements = _BEGIN
            job.direct = True
        elif op in _DIRECT_OPS and not self._decode_for_direct(job):
            return
        if len(self._waiting) >= self.settings.max_waiting and not self._idle:
            self.stats[S.REQUESTS_REFUSED] += 1
            self._reply_error(
                routing_id, request_id, "TooManyRequests",
                f"{len(self._waiting)} requests are already waiting for a connection "
                f"(max_waiting={self.settings.max_waiting}); the request was not run")
            return
        job.queued_at = now
        self._admit(job)
        self._waiting.append(job)
        self._dispatch(now)

    def _decode_for_direct(self, job: Job) -> bool:
        """Decode and screen an execute or a batch; mark it for the loop to run
        when it is plain single statements (anything else goes to a thread).
        False if it was refused (and answered)."""
        if len(job.body) > DIRECT_MAX_BODY_BYTES:
            return True  # decoding it here would stall the loop: the thread does
        max_bytes = self.settings.max_message_bytes
        try:
            if job.op == OP_EXECUTE:
                sql, params, dirty = decode_execute(job, max_bytes)
                statements = [(sql, params)]
            else:
                statements, dirty = decode_batch(job, max_bytes)
        except Exception as exc:
            self._reply_payload(job.routing_id, job.request_id, failure_payload(exc, job))
            return False
        if runs_direct(job, statements, dirty):
            job.shareable = (not job.in_session and len(job.body) <= PIPELINE_MAX_BODY
                             and all(shareable(sql) for sql, _ in statements))
        return True

    def _on_session_request(self, job: Job, token: bytes, now: float) -> None:
        session = self._sessions.get(token)
        if session is None or session.routing_id != job.routing_id:
            # Same answer for a forged token and a stale one: nothing to learn.
            reason = self._expired.get(token) if session is None else None
            self._reply_error(job.routing_id, job.request_id, "TransactionExpired",
                              reason or "unknown transaction: it was rolled back or never existed")
            return
        if job.op not in _SESSION_OPS:
            self._malformed(job.routing_id, job.request_id,
                            f"{OP_NAMES[job.op]} is not allowed inside a transaction")
            return
        if session.busy:
            self._reply_error(job.routing_id, job.request_id, "InterfaceError",
                              "the transaction is already running a statement")
            return
        session.busy = True
        session.last_active = now
        job.in_session = True
        job.session = token
        if job.op in ENDING_OPS:
            del self._sessions[token]
        if job.op == OP_EXECUTE:
            if not self._decode_for_direct(job):
                session.busy = False
                return
        elif job.op in _DIRECT_ENDINGS and not session.conn.needs_reset:
            job.statements = _DIRECT_ENDINGS[job.op]
            job.direct = True
        self._admit(job)
        if job.direct:
            self._start_direct(session.conn, job, now)
        else:
            self._start(session.conn, job, now)

    def _dispatch(self, now: float) -> None:
        waiting = self._waiting
        while waiting:
            job = waiting[0]
            if job.deadline <= now:
                waiting.popleft()
                self._abandon(job, now)
                continue
            conn = self._connection_for(job, now)
            if conn is None:
                break  # first come, first served: nothing overtakes the head
            waiting.popleft()
            waited = now - job.queued_at
            if waited > 0.001:
                self.stats[S.REQUESTS_QUEUED] += 1
                self.stats[S.REQUESTS_WAIT_MS] += int(waited * 1000)
            if job.direct:
                self._start_direct(conn, job, now)
                continue
            if job.op == OP_BEGIN:
                self._pin(conn, job, now)
            self._start(conn, job, now)
        if waiting:
            self._grow(now)

    def _connection_for(self, job: Job, now: float) -> ServerConnection | None:
        """An idle connection, else, for a shareable job, the least loaded
        connection running autocommit jobs whose head is not stalled."""
        if self._idle:
            return self._idle.pop()
        if not job.shareable:
            return None
        best, depth = None, PIPELINE_DEPTH
        for conn in self._shared:
            if conn.in_flight < depth and now - conn.head_since < PIPELINE_STALL:
                best, depth = conn, conn.in_flight
        return best

    def _pin(self, conn: ServerConnection, job: Job, now: float) -> None:
        session = Session(job.session, job.routing_id, conn, job.owner_pid, now)
        self._sessions[job.session] = session
        self._pinned[conn.conn_id] = session

    def _admit(self, job: Job) -> None:
        routing_id = job.routing_id
        self._in_flight[routing_id] = self._in_flight.get(routing_id, 0) + 1

    def _finish(self, job: Job) -> None:
        """The job was answered (or will be by its connection): it no longer counts."""
        routing_id = job.routing_id
        left = self._in_flight.get(routing_id, 0) - 1
        if left > 0:
            self._in_flight[routing_id] = left
        else:
            self._in_flight.pop(routing_id, None)

    def _fail_waiting(self, job: Job, kind: str, message: str, **extra: Any) -> None:
        self._finish(job)
        self._reply_error(job.routing_id, job.request_id, kind, message, **extra)

    def _arm(self, job: Job, now: float) -> None:
        """Set the moment ``job``, about to run, gets cancelled."""
        query_timeout = self.settings.query_timeout
        if query_timeout and now + query_timeout < job.deadline:
            job.cancel_at = now + query_timeout
            job.cancel_reason = self._query_timeout_reason
        else:
            job.cancel_at = job.deadline

    def _start(self, conn: ServerConnection, job: Job, now: float) -> None:
        """Hand ``job`` to the connection's thread."""
        self._arm(job, now)
        self._running[conn.conn_id] = job
        conn.submit(job)

    def _start_direct(self, conn: ServerConnection, job: Job, now: float) -> None:
        """Run ``job`` from this loop: appended to the connection's pipeline."""
        if not conn.in_flight and not conn.alive_before_use():
            # Requeued for another connection, or the transaction is lost.
            event, _, reply = conn.lost_before_use(job)
            self._completed(conn, event, job, reply, now)
            return
        if job.op == OP_BEGIN:
            self._pin(conn, job, now)
        self._arm(job, now)
        try:
            conn.send_direct(job, flush=False)
        except Exception as exc:  # bad parameters, or the connection broke
            self._on_direct_outcomes(conn, conn.fail_direct(job, exc), now)
            return
        if conn not in self._unflushed:
            self._unflushed.append(conn)
        if conn.in_flight > 1:
            self.stats[S.REQUESTS_PIPELINED] += 1
            # Every connection is busy: pipelining saves this job a wait,
            # and a new connection (below the cap) adds parallelism.
            self._grow(now, wanted=1)
        elif conn.in_flight == 1:
            fd = conn.fileno()
            self._direct_fds[fd] = conn
            self._poller.register(fd, zmq.POLLIN)
            if job.shareable:
                self._shared.append(conn)

    def _unwatch(self, conn: ServerConnection) -> None:
        """The connection has no direct job in flight any more."""
        for fd, watched in self._direct_fds.items():
            if watched is conn:
                del self._direct_fds[fd]
                self._poller.unregister(fd)
                break
        if conn in self._shared:
            self._shared.remove(conn)

    def _start_reset(self, conn: ServerConnection) -> None:
        """Roll back whatever the connection's transaction left open; no reply."""
        self._start(conn, Job(OP_RESET, b"", 0, b"", deadline=float("inf")), 0.0)

    def _abandon(self, job: Job, now: float) -> None:
        self.stats[S.REQUESTS_ABANDONED] += 1
        self._fail_waiting(
            job, "PoolTimeout",
            f"the request's deadline passed after {now - job.queued_at:.3f} s waiting for a "
            "connection; the statement was not run")

    # Connections

    def _grow(self, now: float, wanted: int = 0) -> None:
        """Open connections for waiting requests (or ``wanted`` more), never
        beyond the cap."""
        if now < self._connect_retry_at:
            return
        cap = self.settings.max_connections
        wanted = max(wanted, len(self._waiting))
        while len(self._conns) + self._opening < cap and self._opening < wanted:
            conn_id = self._next_conn_id
            self._next_conn_id += 1
            conn = ServerConnection(conn_id, self.settings, self._adapters, self._redact,
                                    self._context, self._completions_endpoint)
            self._opening += 1
            self._conns[conn_id] = conn
            conn.start()

    def _release(self, conn: ServerConnection, now: float) -> None:
        if self._stopping:
            self._retire(conn)
            conn.stop()
            return
        self._idle.append(conn)
        self._dispatch(now)

    def _retire(self, conn: ServerConnection) -> None:
        self._conns.pop(conn.conn_id, None)
        self._running.pop(conn.conn_id, None)
        self._unwatch(conn)
        if conn in self._idle:
            self._idle.remove(conn)

    def _on_completion(self, frames: list[bytes], now: float) -> None:
        id_frame, event, routing_id, reply = frames
        conn = self._conns.get(int.from_bytes(id_frame, "big"))
        if conn is not None:
            self._completed(conn, event, self._running.pop(conn.conn_id, None), reply, now)

    def _on_direct_input(self, conn: ServerConnection, now: float) -> None:
        outcomes = conn.read_direct()
        if not conn.in_flight:
            self._unwatch(conn)
        if outcomes:
            self._on_direct_outcomes(conn, outcomes, now)

    def _on_direct_outcomes(self, conn: ServerConnection,
                            outcomes: list[tuple[Job, bytes, bytes]], now: float) -> None:
        for job, event, reply in outcomes[:-1]:
            self._answer(job, event, reply)
        job, event, reply = outcomes[-1]
        self._completed(conn, event, job, reply, now)

    def _answer(self, job: Job | None, event: bytes, reply: bytes) -> None:
        if job is None or not job.routing_id:
            return  # an internal job, or a connection event
        if event != EV_REQUEUE:
            self._finish(job)
        if job.rerun:
            self.stats[S.REQUESTS_RERUN] += 1
        if event == EV_FAILED:
            self.stats[S.REQUESTS_ERRORS] += 1
        if reply:
            self._reply(job.routing_id, reply)

    def _completed(self, conn: ServerConnection, event: bytes, job: Job | None,
                   reply: bytes, now: float) -> None:
        """A job ended (or a connection opened or failed): reply and move on."""
        conn_id = conn.conn_id
        self._answer(job, event, reply)
        if event == EV_READY:
            self._opening -= 1
            self.stats[S.CONNECTIONS_NUM] += 1
            self._connect_backoff = 0.0
            self._release(conn, now)
        elif event == EV_CONNECT_FAILED:
            self._opening -= 1
            self._retire(conn)
            self._on_connect_failed(reply.decode(errors="replace"), now)
        elif event == EV_DONE or event == EV_FAILED:
            session = self._pinned.get(conn_id)
            if session is None:
                if conn.in_flight:
                    self._dispatch(now)  # room for one more behind the others
                else:
                    self._release(conn, now)
            elif job is not None and (job.op in ENDING_OPS or
                                      (job.op == OP_BEGIN and event == EV_FAILED)):
                self._unpin(session)
                self._release(conn, now)
            elif session.expired:
                self._start_reset(conn)
            else:
                session.busy = False
                session.last_active = now
        else:  # EV_BROKEN, EV_REQUEUE
            self.stats[S.CONNECTIONS_LOST] += 1
            self._retire(conn)
            conn.stop()  # its thread closes it (it may have stopped by itself already)
            session = self._pinned.get(conn_id)
            if session is not None:
                self._unpin(session)
                self._expire_token(session.token, "the transaction's server connection was lost")
            if event == EV_REQUEUE and job is not None:
                self._waiting.appendleft(job)
            if self._waiting:
                self._grow(now)

    def _on_connect_failed(self, message: str, now: float) -> None:
        self.stats[S.CONNECTIONS_ERRORS] += 1
        self._connect_backoff = min(CONNECT_BACKOFF_MAX,
                                    max(CONNECT_BACKOFF_MIN, self._connect_backoff * 2))
        self._connect_retry_at = now + self._connect_backoff
        logger.error("cannot connect to the database (retry in %.1f s): %s",
                     self._connect_backoff, message)
        if not self._conns:
            # Nobody will free a connection: fail the queue now, clearly.
            while self._waiting:
                self._fail_waiting(self._waiting.popleft(), "OperationalError",
                                   f"cannot connect to the database: {message}",
                                   sqlstate="08006")

    # Sessions

    def _unpin(self, session: Session) -> None:
        self._pinned.pop(session.conn.conn_id, None)
        self._sessions.pop(session.token, None)

    def _expire_token(self, token: bytes, reason: str) -> None:
        self._expired[token] = reason
        while len(self._expired) > EXPIRED_SESSIONS_KEPT:
            self._expired.popitem(last=False)

    def _expire(self, session: Session, reason: str) -> None:
        """Roll the transaction back on the broker's own initiative."""
        self.stats[S.TRANSACTIONS_EXPIRED] += 1
        logger.info("rolling back a transaction: %s", reason)
        session.expired = reason
        self._sessions.pop(session.token, None)
        self._expire_token(session.token, reason)
        conn = session.conn
        if session.busy:
            job = self._running.get(conn.conn_id) or conn.head
            if job is not None and job.op not in ENDING_OPS:
                conn.cancel(job)
        else:
            session.busy = True
            self._start_reset(conn)

    # Timers

    def _housekeeping(self, now: float) -> None:
        if self._waiting:
            self._expire_waiting(now)
        for conn, job in self._jobs_running():
            if job.cancel_at <= now and not job.cancel_sent:
                self.stats[S.REQUESTS_CANCELLED] += 1
                conn.cancel(job)
        idle_limit = self.settings.idle_transaction_timeout
        check_owners = now >= self._next_owner_check
        if check_owners:
            self._next_owner_check = now + OWNER_CHECK_INTERVAL
        probe_peers = now >= self._next_peer_probe
        if probe_peers:
            self._next_peer_probe = now + PEER_PROBE_INTERVAL
        for session in list(self._pinned.values()):
            if session.expired:
                continue
            if self._stopping:
                if not session.busy:
                    self._expire(session, "the broker is shutting down")
            elif check_owners and session.owner_pid and not _pid_alive(session.owner_pid):
                self._expire(session, f"its owner process {session.owner_pid} exited")
            elif probe_peers and not self._peer_connected(session.routing_id):
                self._expire(session, "its client's connection was lost (closed, or "
                                      "no answer to transport heartbeats)")
            elif idle_limit and not session.busy and now - session.last_active > idle_limit:
                self._expire(session, (
                    f"the transaction was idle for more than {idle_limit:g} s "
                    "(idle_transaction_timeout) and was rolled back"))
        if self._waiting and not self._idle:
            self._grow(now)

    def _expire_waiting(self, now: float) -> None:
        pool_timeout = self.settings.pool_timeout
        kept: deque[Job] = deque()
        for job in self._waiting:
            if job.deadline <= now:
                self._abandon(job, now)
            elif pool_timeout and now - job.queued_at > pool_timeout:
                self.stats[S.REQUESTS_TIMEOUTS] += 1
                self._fail_waiting(
                    job, "PoolTimeout",
                    f"no server connection became free within {now - job.queued_at:.1f} s "
                    f"(pool_timeout={pool_timeout:g} s, max_connections="
                    f"{self.settings.max_connections}); the statement was not run")
            else:
                kept.append(job)
        self._waiting = kept

    def _drained(self, now: float) -> bool:
        if not self._drain_deadline:
            self._drain_deadline = now + self.settings.drain_timeout
            logger.info("shutting down: draining %d running statements",
                        len(self._running) + sum(c.in_flight for c in self._direct_fds.values()))
            while self._waiting:
                self._fail_waiting(self._waiting.popleft(), "BrokerUnavailable",
                                   "the broker is shutting down; the request was not run")
            for conn in list(self._idle):
                self._retire(conn)
                conn.stop()
        if now >= self._drain_deadline:
            for conn, job in self._jobs_running():
                conn.cancel(job)
            return True
        return not self._running and not self._direct_fds and not self._opening

    def _jobs_running(self) -> list[tuple[ServerConnection, Job]]:
        """Each job the server is running now: one per busy connection."""
        running = [(self._conns[conn_id], job) for conn_id, job in self._running.items()]
        running.extend((conn, conn.head) for conn in self._direct_fds.values())
        return running

    def snapshot(self) -> dict[str, Any]:
        """Counters plus gauges, for ``poolbroker stats``."""
        result: dict[str, Any] = dict(self.stats)
        result[S.POOL_MAX] = self.settings.max_connections
        result[S.POOL_SIZE] = len(self._conns)
        result[S.POOL_AVAILABLE] = len(self._idle)
        result[S.REQUESTS_WAITING] = len(self._waiting)
        result[S.SESSIONS_ACTIVE] = len(self._pinned)
        result[S.CLIENTS_ACTIVE] = len(self._in_flight)
        return result

