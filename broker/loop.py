"""The broker's loop: one thread that owns every server connection.

The request path, top to bottom::

    a client's frames (router.RouterTransport, or zmtp.Listener over ipc)
      --requests.decode_request/Decoder--> Job (or a refusal)
      --> a pinned session's connection, or the pool's FIFO queue
      --> _dispatch: an idle connection, or a shared pipeline (quick jobs)
      --> PgConn.send (libpq pipeline, one Sync per job)
      ... the connection's socket is readable ...
      --> PgConn.read --> outcomes --> reply; _settle the connection:
          idle again, reset (ROLLBACK / DISCARD ALL) first, or closed

Every statement runs here, through ``pgconn``; threads only open
connections and send cancel requests.  The loop never blocks on the
database.
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
import secrets
import signal
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Callable

import psycopg
import zmq
import zmq.auth
from psycopg import pq

from client import _zmtp, protocol
from client.protocol import (
    CONTROL_COMMANDS, OP_BEGIN, OP_COMMIT, OP_CONTROL, OP_COPY_FROM, OP_COPY_TO, OP_EXECUTEMANY,
    OP_NAMES, OP_PING, OP_ROLLBACK, OP_STATS, EMPTY_RESULT, ErrorKind, error_payload,
)

from . import endpoint as endpoints
from . import logs, replies, statements
from . import stats as S
from ._psycopg import placeholder_query
from .adapters import build_adapters
from .clients import ClientGate, default_max_clients, raise_open_files_limit
from .config import POOL_SPECS, SPECS, ConfigError, PoolSettings, Settings
from .logs import LogBudget, request_fields, shown_sql
from .memory import return_large_buffers
from .pgconn import Outcome, PgConn
from .pool import (
    AGED, BUSY, FOREIGN_RECHECK_INTERVAL, IDLE, PINNED, QUICK_STATEMENT, REBALANCE, RECONNECT,
    RESETTING, SHARED, SURPLUS, ConnectError, Pool, Pools, State,
)
from .redact import Redactor
from .requests import (
    ENDING_OPS, NO_DEADLINE, OP_RESET, POOLED_OPS, SESSION_OPS, Decoder, Job, Query, Refusal,
    decode_request,
)
from .router import RouterTransport
from .sessions import Session, Sessions, pid_alive
from .zmtp import Listener

if TYPE_CHECKING:
    from .metrics import MetricsServer

logger = logging.getLogger("poolbroker")

HOUSEKEEPING_INTERVAL = 0.05
"""Seconds between checks of deadlines, leases and owner processes."""
OWNER_CHECK_INTERVAL = 0.25
"""Seconds between checks that the processes owning transactions are alive."""
PEER_PROBE_INTERVAL = 1.0
"""Seconds between checks that clients holding transactions are still connected."""
MALFORMED_LOGS_PER_SECOND = 1.0
REQUEST_LOGS_PER_SECOND = 20.0
"""Lines a second at most of each kind of request-level event (PoolTimeout,
a transaction rolled back, a slow statement); the next line counts the rest."""
REPLY_FLUSH_MS = 1000
"""On exit, how long queued replies may take to reach their clients."""
PIPELINE_DEPTH = 16
"""Autocommit jobs in flight on one connection at most."""
PIPELINE_STALL = 0.001
"""A connection whose job at the head has run this long (seconds) takes no
more jobs behind it."""
REPLY_QUEUE_SLACK = 16
"""Messages queued for one client socket beyond its max_client_requests, in
each direction.  Replies past it (stale ones, probes) are dropped, counted
as undeliverable: a client that never reads holds at most
(max_client_requests + REPLY_QUEUE_SLACK) x max_result_bytes of the broker.
Requests past it wait in the client: libzmq stops reading its socket."""
ESTIMATE_SPREAD = 0.01
"""A statement's time varies around its estimate: as much again, up to this
many seconds, is counted on (short ones vary the most, relatively)."""
ANSWER_MARGIN = 0.003
"""Seconds an answer needs besides the statement: the loop's turn, the
reply's way to the client.  Measured on the overload bench (cap 2, 3 ms
statements, 100 ms deadlines, 2x capacity offered): with no margin 57-59%
of capacity answered in time, with these 69-72%."""
BACKLOG_SHARE = 0.5
"""A queue whose oldest request has waited this share of its timeout (or of
pool_timeout, when that ends its wait first) is
backed up: its newest requests are served first (adaptive LIFO).  First
come, first served would then start every request with little of its time
left, and the least delay on its way back would answer it late; the newest
has nearly all of its time, and the oldest are refused when too little of
theirs is left."""
GUARD_MARGIN = 0.02
"""Seconds past a pipelined job's deadline before its client is told it will
not run: covers the error of the measured clock offset and a result still in
transit, so the server cannot have started it (its guard) in time."""
GONE_CLIENTS_KEPT = 10_000
"""Client sockets remembered as gone, so that the backlog they left is dropped."""

_ENDINGS = {OP_COMMIT: Query(b"COMMIT", None, (), None),
            OP_ROLLBACK: Query(b"ROLLBACK", None, (), None)}
_ROLLBACK = _ENDINGS[OP_ROLLBACK]
_DISCARD = Query(b"DISCARD ALL", None, (), None)
_COPY_OPS = frozenset((OP_COPY_FROM, OP_COPY_TO))
_IN_TRANSACTION = (pq.TransactionStatus.INTRANS, pq.TransactionStatus.INERROR)
# As a plain module name, for each request's path: Python 3.11 finds an
# enum's member through EnumType's __getattr__ hook (see pool.IDLE).
_NOT_IN_TRANSACTION = pq.TransactionStatus.IDLE
_POLLIN, _POLLOUT = int(zmq.POLLIN), int(zmq.POLLOUT)  # plain ints: Flag arithmetic is slow
INSUFFICIENT_PRIVILEGE = "42501"
"""The SQLSTATE of a control command refused to its sender."""
INVALID_CATALOG_NAME = "3D000"
"""The SQLSTATE of a request for a pool the broker does not have, as for a
database the server does not have."""
CONTROL_BODY_BYTES = 1024
"""A control request's body is one short word: anything longer is refused."""


class Broker:
    """Owns the pool; ``run()`` serves until SIGTERM/SIGINT or ``stop()``.

    ``reread`` loads the settings again from where they came from (the
    config file, the environment, the flags; ``cli`` passes it): SIGHUP and
    ``poolbroker ctl reload`` apply what it gives that can change live.
    """

    def __init__(self, settings: Settings,
                 reread: Callable[[], Settings] | None = None) -> None:
        self.settings = settings
        self._reread = reread
        self._transport: RouterTransport | Listener | None = None
        self._poller = zmq.Poller()
        adapters = build_adapters()
        self._redact = Redactor(*settings.all_dsns)
        self._decoder = Decoder(placeholder_query(adapters), settings.max_message_bytes)
        self._pools = Pools(settings, adapters, self._redact)
        self._sessions = Sessions()
        self._schema_version = 0  # DDL seen to end: see _schema_changed
        self._ddl_open: set[PgConn] = set()  # connections whose DDL has not ended yet
        self._by_fd: dict[int, PgConn] = {}
        self._closing: dict[int, Pool] = {}  # a closed connection's descriptor -> its pool
        self._unflushed: set[PgConn] = set()
        self._in_flight: dict[bytes, int] = {}  # routing id -> requests waiting or running
        self._queued_bytes = 0  # Job.size of every request waiting or running
        self._gone: OrderedDict[bytes, None] = OrderedDict()  # routing ids of dead clients
        self._query_timeout_reason = ""
        self._describe_query_timeout()
        self._curve = False  # CURVE on: the gate checks keys against the allow-list
        self._gate: ClientGate | None = None
        self._admin_keys: frozenset[str] = frozenset()  # z85 CURVE keys of curve_admin_clients
        self._reload_requested = False
        self._paused = False  # poolbroker ctl pause: the queue is not served
        self._claim: endpoints.Claim | None = None
        self._stopping = False
        self._drain_deadline = 0.0
        self._next_housekeeping = 0.0
        self._next_owner_check = 0.0
        self._next_peer_probe = 0.0
        self._next_foreign_check = 0.0
        # What clients can cause in bulk is logged within a budget each.
        self._malformed_log = LogBudget(MALFORMED_LOGS_PER_SECOND)
        self._timeout_log = LogBudget(REQUEST_LOGS_PER_SECOND)
        self._expiry_log = LogBudget(REQUEST_LOGS_PER_SECOND)
        self._slow_log = LogBudget(REQUEST_LOGS_PER_SECOND)
        self.stats: dict[str, int] = dict.fromkeys(S.COUNTERS, 0)
        self._started = time.monotonic()
        self._metrics: MetricsServer | None = None

    # Set-up and teardown

    def bind(self) -> None:
        """Claim the endpoint and listen on it; ConfigError (EndpointInUse
        included) when it cannot be ours."""
        s = self.settings
        endpoint = s.endpoint
        if endpoint.startswith("tcp://") and not s.curve_secret_key_file and not s.insecure_tcp:
            raise ConfigError(
                "a tcp endpoint needs CURVE: set curve_secret_key_file and "
                "curve_allowed_clients (make keys with 'poolbroker keygen'), or pass "
                "--insecure-tcp on a network you trust")
        endpoints.prepare_ipc_directory(endpoint)
        self._claim = endpoints.claim(endpoint)
        open_files = raise_open_files_limit()
        max_clients = s.max_clients or default_max_clients(open_files, s.max_connections)
        ipc = endpoint.startswith("ipc://")
        self._gate = ClientGate(max_clients=max_clients, ipc=ipc, allowed_uids=s.allowed_uids)
        curve = self._curve_keys() if s.curve_secret_key_file else None
        queue_limit = s.max_client_requests + REPLY_QUEUE_SLACK
        if ipc and curve is None and endpoint != "ipc://*":
            try:
                address = _zmtp.address(endpoint)
            except ValueError as exc:
                raise ConfigError(f"cannot bind {endpoint}: {exc}") from None
            self._transport = Listener(
                endpoints.listen(endpoint, address), self._gate,
                max_message_bytes=s.max_message_bytes, queue_limit=queue_limit)
        else:
            self._transport = RouterTransport(
                endpoint, self._gate, max_message_bytes=s.max_message_bytes,
                queue_limit=queue_limit, curve=curve)
        return_large_buffers()
        logger.info("listening on %s, min_connections=%d, max_connections=%d, max_clients=%d "
                    "(open files: %d), pools: %s, server connections marked "
                    "application_name=%s", endpoint, s.min_connections, s.max_connections,
                    max_clients, open_files, ", ".join(self._pools.by_name),
                    self._pools.all[0].application_name)
        if s.metrics_listen:
            # Imported here: a broker without metrics never loads prometheus_client.
            from .metrics import MetricsServer
            self._metrics = MetricsServer(s.metrics_listen)  # ConfigError if it cannot listen

    def _describe_query_timeout(self) -> None:
        self._query_timeout_reason = (
            f"the statement ran longer than query_timeout ({self.settings.query_timeout:g} s) "
            "and was cancelled on the server")

    def _curve_keys(self) -> tuple[bytes, bytes]:
        """The server's CURVE keys (public, secret): the transport is encrypted,
        and only clients on the allow-list are admitted."""
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
        self._curve = True
        self._load_allowed_clients()
        logger.info("CURVE on: clients allowed from %s", s.curve_allowed_clients)
        return public, secret

    def stop(self) -> None:
        """Begin a graceful shutdown (safe from a signal handler)."""
        self._stopping = True

    def reload(self) -> None:
        """Re-read what can change live (safe from a signal handler)."""
        self._reload_requested = True

    def _install_signal_handlers(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: self.stop())
        signal.signal(signal.SIGHUP, lambda *_: self.reload())

    def _reload(self, why: str = "SIGHUP") -> dict[str, Any]:
        """Read the settings again and apply those that can change live; a
        changed one that cannot is named and keeps its value; an invalid
        file changes nothing.  What happened, for ``poolbroker ctl reload``."""
        self._reload_requested = False
        answer: dict[str, Any] = {"applied": {}, "restart_needed": [], "problems": []}
        if self._reread is not None:
            try:
                new = self._reread()
            except ConfigError as exc:
                for problem in exc.problems:
                    logger.error("%s: %s", why, problem)
                logger.error("%s: the settings are invalid: kept the running ones", why)
                answer["problems"] = list(exc.problems)
                return answer
            old = self.settings
            changed = [name for name in (*SPECS, "pools")
                       if getattr(new, name) != getattr(old, name)]
            applied = {name: getattr(new, name) for name in changed
                       if (SPECS[name].live if name in SPECS else _same_databases(old, new))}
            # Packable for ctl, and no DSN in the log: the pools by their sizes.
            answer["applied"] = {name: _pool_sizes(value) if name == "pools" else value
                                 for name, value in applied.items()}
            answer["restart_needed"] = [name for name in changed if name not in applied]
            if answer["restart_needed"]:
                logger.warning("%s: changed but only applied at a restart (kept as they are): "
                               "%s", why, ", ".join(answer["restart_needed"]))
            if applied:
                self._apply(dataclasses.replace(old, **applied))
                logger.info("%s: applied %s", why, ", ".join(
                    f"{name}={value!r}" for name, value in answer["applied"].items()))
        if self._curve:
            # A key removed from the directory is refused on its next connection.
            self._load_allowed_clients()
            logger.info("%s: CURVE allow-list reloaded from %s", why,
                        self.settings.curve_allowed_clients)
        elif not answer["applied"]:
            logger.info("%s: no setting changed", why)
        self.stats[S.RELOADS] += 1
        return answer

    def _apply(self, settings: Settings) -> None:
        """Run with ``settings`` from now on.  Most are read where they are
        used; these were turned into state at start."""
        lifetime_changed = settings.max_lifetime != self.settings.max_lifetime
        if settings.log_format != self.settings.log_format:
            logs.configure(settings.log_level, settings.log_format)
            self._redact.install()  # the new handler masks the password too
        self.settings = settings
        self._pools.apply(settings)
        self._describe_query_timeout()
        self._transport.set_queue_limit(settings.max_client_requests + REPLY_QUEUE_SLACK)
        logging.getLogger().setLevel(settings.log_level)
        self._transport.allow_uids(settings.allowed_uids)
        if lifetime_changed:
            for conn in self._pools.conns():
                if conn.state != State.OPENING:
                    conn.pool.set_expiry(conn)
        # A lower cap: _size_pools retires the surplus as it becomes idle;
        # a higher one: the queues may be served at once.
        self._dispatch_all(time.monotonic())

    def _load_allowed_clients(self) -> None:
        """The allow-list: the clients' keys and the operators' (who connect
        as clients too)."""
        allowed = _public_keys("curve_allowed_clients", self.settings.curve_allowed_clients)
        admins = _public_keys("curve_admin_clients", self.settings.curve_admin_clients) \
            if self.settings.curve_admin_clients else set()
        self._admin_keys = frozenset(key.decode("ascii") for key in admins)
        self._gate.allow_keys(frozenset(allowed | admins))

    def _close(self) -> None:
        for pool in self._pools.all:
            pool.close_all()
        self._close_transport()
        logger.info("stopped")

    def _close_transport(self) -> None:
        if self._metrics is not None:
            self._metrics.close()  # scrapes waiting for the loop get poolbroker_up 0
        # Give the last replies (answers to drained statements) a moment to
        # leave; a client that stopped reading cannot hold the exit longer.
        if self._transport is not None:
            self._transport.close(REPLY_FLUSH_MS)
        elif self._gate is not None:
            self._gate.close()
        if self._claim is not None:
            self._claim.release()  # last: the socket is closed, a successor may bind

    # The loop

    def run(self, *, install_signal_handlers: bool = True) -> None:
        if install_signal_handlers:
            self._install_signal_handlers()
        try:
            self.bind()
        except BaseException:
            self._close_transport()
            raise
        poller, by_fd, transport = self._poller, self._by_fd, self._transport
        requests, transport_events = transport.requests, transport.events
        pools = self._pools.all
        by_wakeup = self._pools.by_wakeup
        if transport_events is not None:
            # First: a socket beyond max_clients goes before its requests
            # are read, if it can.
            poller.register(transport_events, zmq.POLLIN)
        poller.register(requests, zmq.POLLIN)
        for wakeup in by_wakeup:
            poller.register(wakeup, zmq.POLLIN)
        scrapes = -1  # no descriptor is -1: the branch below never matches
        if self._metrics is not None:
            scrapes = self._metrics.handoff.fileno()
            poller.register(scrapes, zmq.POLLIN)
        timeout_ms = int(HOUSEKEEPING_INTERVAL * 1000)
        try:
            # Clients connect meanwhile, and their requests wait in their
            # sockets: none is served before it.
            with transport.accepting():
                for pool in pools:
                    pool.open_first(lambda: self._stopping)
            while True:
                # Requests read but left for this turn (a client's share of
                # the last one was spent) must not wait for the timeout.
                ready = transport.backlogged
                events = poller.poll(0 if ready else timeout_ms)
                now = time.monotonic()
                for what, _ in events:
                    if what == requests:
                        ready = True
                    elif (pool := by_wakeup.get(what)) is not None:
                        self._on_opened(pool, now)
                    elif (conn := by_fd.get(what)) is not None:
                        self._unflushed.add(conn)  # a rerun or a DEALLOCATE may follow
                        self._on_outcomes(conn, conn.read(now), now)
                    elif what == scrapes:
                        self._metrics.handoff.answer(self.snapshot)
                    elif what is transport_events:
                        transport.on_events()
                    else:  # a closed connection's socket: see _on_closing
                        self._on_closing(what, now)
                if ready:
                    transport.receive(self._on_request, now)
                if now >= self._next_housekeeping:
                    self._next_housekeeping = now + HOUSEKEEPING_INTERVAL
                    if self._reload_requested:
                        self._reload()
                    self._housekeeping(now)
                    if self._stopping and self._drained(now):
                        break
                if self._unflushed:
                    self._flush(now)
        finally:
            self._close()

    # Requests

    def _on_request(self, routing_id: bytes, frames: list, client_pid: int | None,
                    same_clock: bool, now: float) -> None:
        """``frames``: the request's own, after its routing id; ``client_pid``
        its sender's (0: unknown, over tcp; None: not allowed, dropped unread);
        ``same_clock``: the sender reads the broker's monotonic clock."""
        if client_pid is None:
            return  # another user's process: not a word back
        self.stats[S.REQUESTS_NUM] += 1
        if routing_id in self._gone:
            # Queued in the socket before its client died: nobody waits for it.
            self.stats[S.REQUESTS_DROPPED] += 1
            return
        try:
            request_id, op, deadline, token, pool_name, body = decode_request(
                frames, now, same_clock)
        except Refusal as exc:
            self._malformed(routing_id, exc.request_id, str(exc))
            return
        if op == OP_STATS:
            self._reply(routing_id, replies.ok(request_id, self.snapshot()))
            return
        if op == OP_PING:
            self._reply(routing_id, replies.ok(request_id, None))
            return
        if op == OP_CONTROL:
            self._on_control(routing_id, frames, request_id, body, now)
            return
        if self._stopping and token is None:  # a transaction may finish (drain_timeout)
            self._reply_error(routing_id, request_id, ErrorKind.BROKER_UNAVAILABLE,
                              "the broker is shutting down; the request was not run")
            return
        in_flight = self._in_flight.get(routing_id, 0)
        if in_flight >= self.settings.max_client_requests:
            self._refuse(routing_id, request_id,
                         f"this client already has {in_flight} requests waiting or running "
                         f"(max_client_requests={self.settings.max_client_requests}); "
                         "the request was not run")
            return
        job = Job(op, routing_id, request_id, deadline, client_pid=client_pid)
        if token is not None:
            self._on_session_request(job, token, body, now)
            return
        if op not in POOLED_OPS:
            self._malformed(routing_id, request_id, f"{OP_NAMES[op]} needs a transaction")
            return
        pool = self._pools.default if pool_name is None else self._pools.by_name.get(pool_name)
        if pool is None:
            self._no_such_pool(job, pool_name)
            return
        job.pool = pool
        if not self._decode(job, body):
            return
        if op == OP_BEGIN:  # its BEGIN, and the first statement it may carry
            job.session = secrets.token_bytes(16)
        elif not job.queries:  # executemany of nothing
            self._reply(routing_id, replies.ok(request_id, EMPTY_RESULT))
            return
        if not pool.conns and (error := pool.unreachable(now)) is not None:
            self._cannot_connect(job, error)
            return
        # Paused, idle connections serve nobody: max_waiting bounds the queue still.
        if len(pool.waiting) >= self.settings.max_waiting \
                and (self._paused or not pool.count(State.IDLE)):
            self._refuse(routing_id, request_id,
                         f"{len(pool.waiting)} requests are already waiting for a connection "
                         f"of pool {pool.name!r} (max_waiting={self.settings.max_waiting}); "
                         "the request was not run")
            return
        job.queued_at = pool.demand_at = now
        self._admit(job)
        pool.waiting.append(job)
        self._dispatch(now, pool)
        # After the dispatch: a request served at once never counts as waiting,
        # and only here does the queue grow.
        if len(pool.waiting) > pool.waiting_peak:
            pool.waiting_peak = len(pool.waiting)

    def _no_such_pool(self, job: Job, name: str | None) -> None:
        names = ", ".join(repr(name) for name in self._pools.by_name)
        if name is None:
            why = (f"this broker has no default pool (no dsn is set): name one of its pools "
                   f"({names})")
        else:
            why = f"the broker has no pool named {name!r}; its pools: {names}"
        self._reply_error(job.routing_id, job.request_id, ErrorKind.OPERATIONAL, why,
                          sqlstate=INVALID_CATALOG_NAME)

    def _on_control(self, routing_id: bytes, frames: list, request_id: Any,
                    body: bytes, now: float) -> None:
        """``poolbroker ctl``: from the broker's own uid over ipc or an operator's key (see
        ClientGate.may_control); anyone else is refused, and told so."""
        if not self._transport.may_control(routing_id, frames, self._admin_keys):
            self._reply_error(routing_id, request_id, ErrorKind.PROGRAMMING,
                              "control commands are taken only from the broker's own user "
                              "over ipc, or a key of curve_admin_clients over tcp",
                              sqlstate=INSUFFICIENT_PRIVILEGE)
            return
        try:
            args = protocol.unpack(body, CONTROL_BODY_BYTES)
        except Exception:  # whatever msgpack raises for a hostile body
            args = None
        command = args[0] if isinstance(args, list) and len(args) == 1 else None
        if command not in CONTROL_COMMANDS:
            self._malformed(routing_id, request_id,
                            f"control takes one of {', '.join(CONTROL_COMMANDS)}")
            return
        answer = None
        if command in ("stats", "pools"):
            answer = self.snapshot()
        elif command == "reload":
            answer = self._reload("poolbroker ctl reload")
        elif command == "pause":
            self._paused = True
            logger.info("paused: running statements finish, new requests wait (their "
                        "deadlines and pool_timeout still apply)")
        elif command == "resume":
            self._paused = False
            logger.info("resumed: %d waiting requests released",
                        sum(len(pool.waiting) for pool in self._pools.all))
            self._dispatch_all(now)
        elif command == "reconnect":
            self._reconnect(now)
        else:  # drain
            logger.info("poolbroker ctl drain: draining, then exiting")
            self.stop()
        self._reply(routing_id, replies.ok(request_id, answer))

    def _reconnect(self, now: float) -> None:
        """Every connection, opening ones included, is replaced: closed once
        nothing of a client's is on it, reopened as needed (after a database
        failover, the old ones may reach the old server)."""
        conns = list(self._pools.conns())
        logger.info("poolbroker ctl reconnect: replacing %d server connections as they "
                    "become idle", len(conns))
        for conn in conns:
            self._retire_when_idle(conn, RECONNECT, now)

    def _decode(self, job: Job, body: bytes) -> bool:
        """Fill ``job`` from its body; False if it was refused (and answered)."""
        try:
            self._check_room(len(body))  # before decoding: that is where memory goes
            self._decoder.fill(job, body, self.settings.max_queued_bytes - self._queued_bytes
                               if self.settings.max_queued_bytes else 1 << 62)
            self._check_room(job.size)
        except Refusal as exc:
            if exc.kind == ErrorKind.TOO_MANY_REQUESTS:
                self.stats[S.REQUESTS_REFUSED] += 1
            self.stats[S.REQUESTS_ERRORS] += 1
            self._reply(job.routing_id, replies.refusal(job.request_id, exc))
            return False
        if job.shareable:
            estimate = job.pool.estimate(job.queries[0].key)
            if estimate is not None:
                job.expected = estimate
                job.expected_fast = estimate < QUICK_STATEMENT
        return True

    def _check_room(self, size: int) -> None:
        limit = self.settings.max_queued_bytes
        if limit and self._queued_bytes + size > limit:
            raise Refusal(
                ErrorKind.TOO_MANY_REQUESTS,
                f"the broker already holds {self._queued_bytes} bytes of requests waiting or "
                f"running (max_queued_bytes={limit}); this one ({size} bytes) was not run")

    def _on_session_request(self, job: Job, token: bytes, body: bytes, now: float) -> None:
        session = self._sessions.by_token.get(token)
        if session is None or not (session.routing_id == job.routing_id or _ends_own(job, session)):
            # Same answer for a forged token and a stale one: nothing to learn.
            reason = self._sessions.why_ended(token) if session is None else None
            self._reply_error(job.routing_id, job.request_id, ErrorKind.TRANSACTION_EXPIRED,
                              reason or "unknown transaction: it was rolled back or never existed")
            return
        if job.op not in SESSION_OPS:
            self._malformed(job.routing_id, job.request_id,
                            f"{OP_NAMES[job.op]} is not allowed inside a transaction")
            return
        if session.busy:
            self._reply_error(job.routing_id, job.request_id, ErrorKind.INTERFACE,
                              "the transaction is already running a statement")
            return
        if job.deadline <= now and job.op not in ENDING_OPS:  # its client has given up
            self._reply_error(job.routing_id, job.request_id, ErrorKind.POOL_TIMEOUT,
                              f"{_READ_TOO_LATE}; the statement was not run")
            return
        job.in_session = True
        job.session = token
        job.pool = session.conn.pool
        if session.conn.copying and job.op not in _COPY_OPS:
            self._interrupt_copy(session, job, now)
            return
        if job.op in _ENDINGS:
            job.queries = [_ENDINGS[job.op]]
            del self._sessions.by_token[token]  # nothing more may join it
        elif not self._decode(job, body):
            return
        elif not job.queries and job.op == OP_EXECUTEMANY:
            self._reply(job.routing_id, replies.ok(job.request_id, EMPTY_RESULT))
            return
        session.busy = True
        session.last_active = now
        self._admit(job)
        self._send(session.conn, job, now)

    def _interrupt_copy(self, session: Session, job: Job, now: float) -> None:
        """A COPY cannot be left half done: ROLLBACK drops the connection (the
        server rolls back), anything else is refused."""
        if job.op != OP_ROLLBACK:
            self._reply_error(job.routing_id, job.request_id, ErrorKind.INTERFACE,
                              "a COPY is in progress in this transaction: finish it first")
            return
        self._sessions.close(session)
        session.conn.broken = "its transaction was rolled back in the middle of a COPY"
        self._close_conn(session.conn, now)
        self._reply(job.routing_id, replies.ok(job.request_id, None))

    def _dispatch_all(self, now: float) -> None:
        """Serve every pool's queue, the longest-waiting head first: a slot
        freed under the global cap goes to whoever has waited longest."""
        for pool in sorted((p for p in self._pools.all if p.waiting),
                           key=lambda p: p.waiting[0].queued_at):
            self._dispatch(now, pool)

    def _dispatch(self, now: float, pool: Pool) -> None:
        if self._paused:
            return  # housekeeping still fails what outlives its deadline or pool_timeout
        waiting = pool.waiting
        while waiting:
            job = waiting[0]
            if _too_late(job, now):  # it would end late: no use running it
                waiting.popleft()
                self._abandon(job, now)
                continue
            newest = _backed_up(job, now, self.settings.pool_timeout)
            if newest:
                job = waiting[-1]
                if _too_late(job, now):
                    waiting.pop()
                    self._abandon(job, now)
                    continue
            conn = self._connection_for(job, now)
            if conn is None:
                if newest:
                    # It stays the one served next: newer requests arriving
                    # meanwhile would each overtake it.  At the head it has
                    # hardly waited, and keeps its place (see _backed_up).
                    waiting.pop()
                    waiting.appendleft(job)
                break  # nothing overtakes the request chosen: it is served next
            if newest:
                waiting.pop()
            else:
                waiting.popleft()
            self._left_queue(job, now)
            if job.op == OP_BEGIN:
                self._sessions.open(Session(job.session, job.routing_id, conn, job.client_pid,
                                            now, opened_at=now))
                pool.move(conn, PINNED)
            self._send(conn, job, now)
        if waiting:
            pool.grow(now, len(waiting))

    def _connection_for(self, job: Job, now: float) -> PgConn | None:
        """An idle connection, else, for a shareable job, the least loaded
        shared pipeline whose head has not stalled.  While the pool can
        still grow, or a connection is still opening, only quick jobs go
        behind quick ones: N slow statements at cap N run side by side."""
        pool = job.pool
        conn = pool.idle()
        if conn is not None or not job.shareable:
            return conn
        only_quick = not pool.at_cap or pool.count(State.OPENING) > 0
        if only_quick and not job.expected_fast:
            return None
        best, depth = None, PIPELINE_DEPTH
        # Behind the others' work it would end after its deadline: better wait
        # for a connection of its own, or be refused in time.
        room = job.deadline - now - job.expected
        for conn in pool.shared():
            if conn.in_flight < depth and now - conn.head_since < PIPELINE_STALL \
                    and not conn.dirty and not (only_quick and conn.slow_in_flight) \
                    and conn.expected_in_flight < room:
                best, depth = conn, conn.in_flight
        return best

    def _send(self, conn: PgConn, job: Job, now: float) -> None:
        """Put ``job`` on ``conn``'s wire (flushed at the end of the turn)."""
        query_timeout = self.settings.query_timeout
        if query_timeout and now + query_timeout < job.deadline:
            job.cancel_at = now + query_timeout
            job.cancel_reason = self._query_timeout_reason
        else:
            job.cancel_at = job.deadline
        guard = None
        if conn.in_flight and not job.in_session and job.deadline - now < NO_DEADLINE / 2:
            # Both clocks read now: ``now`` is the turn's start, up to tens of
            # ms ago under load, which would put the guard that much too late
            # (a statement refused at its deadline could still run).
            guard = job.deadline - time.monotonic() + time.time() + conn.clock_offset
        if job.resets:
            conn.dirty = True
        if job.changes_schema or conn.prepared.schema_version != self._schema_version:
            self._drop_stale_plans(conn, job)
        elif self._ddl_open and job.in_session and not self._ddl_open <= {conn}:
            # DDL is in progress on another connection: a statement by name may
            # wait for its lock, then be replanned against what it made (0A000,
            # which a transaction cannot rerun).  Unprepared, it just waits.
            conn.forget_prepared(at_once=job.op == OP_BEGIN)
        if job.drops_plans and not job.shareable:  # alone in its implicit transaction: harmless
            # After it, names may resolve to other tables (search_path) or the
            # server's statements be gone (DEALLOCATE): none of this connection's
            # plans may be used, and whatever is prepared after it is dropped by
            # the reset (a plan made under another search_path would break the
            # next client's transaction with 0A000).
            conn.prepared.forget()
            conn.dirty = True
        try:
            outcomes = conn.send(job, guard)
        except Refusal as exc:
            outcomes = [(job, False, replies.refusal(job.request_id, exc))]
        except psycopg.Error as exc:
            outcomes = conn.fail_all(exc)
        if conn.state == IDLE:
            conn.pool.move(conn, SHARED if job.shareable else BUSY)
        if not job.shareable:
            # Nothing else joins it this turn: the server starts on it now,
            # on the other core, not after the rest of the turn's work (a
            # transaction's statements are one round trip each).
            conn.flush()
        self._unflushed.add(conn)  # the flush's bookkeeping at the turn's end
        if conn.in_flight > 1:
            self.stats[S.REQUESTS_PIPELINED] += 1
            conn.pool.grow(now, 1)  # every connection is busy: more would help
        if outcomes or conn.broken:
            self._on_outcomes(conn, outcomes, now)
        else:  # sent, nothing known yet: only what to poll for changes
            self._watch(conn)

    def _drop_stale_plans(self, conn: PgConn, job: Job) -> None:
        """Before ``job`` runs: a plan prepared before some DDL may return other
        columns (0A000), which would abort a transaction.  A transaction in
        progress, or a reset (maybe the ROLLBACK of an aborted one), is left
        alone: the reset after it drops them."""
        conn.forget_prepared(at_once=job.op == OP_BEGIN
                             or not (job.in_session or job.op == OP_RESET))
        conn.prepared.schema_version = self._schema_version
        if job.changes_schema:
            self._ddl_open.add(conn)

    # Outcomes

    def _on_outcomes(self, conn: PgConn, outcomes: list[Outcome], now: float) -> None:
        sessions = self._sessions
        pool = conn.pool
        statement_times = pool.statement_times
        slow = self.settings.log_slow_statements
        for job, ok, reply in outcomes:
            if job.ran_for and job.shareable:
                pool.ran(job.queries[0].key, job.ran_for)
            if job.op == OP_RESET:
                self._reset_done(conn, job, ok)
                continue
            if job.answered:  # refused at its deadline; its guard stopped it
                if ok:
                    self.stats[S.STATEMENTS_LATE] += 1
                    logger.error("a statement refused at its deadline ran after all: "
                                 "the clocks of the broker and the server disagree")
                continue
            if job.ran_for is not None:  # it reached the server, did not fail unsent
                statement_times.observe(job.ran_for)
                if slow and job.ran_for >= slow:
                    self._log_slow(job, ok, reply)
            self._finish(job)
            if not ok:
                self.stats[S.REQUESTS_ERRORS] += 1
            if job.rerun:
                self.stats[S.REQUESTS_RERUN] += 1
            self._reply(job.routing_id, reply)
            session = sessions.by_conn.get(conn.conn_id)
            if session is not None:
                if job.op in ENDING_OPS or (job.op == OP_BEGIN and not ok):
                    sessions.close(session)
                    pool.move(conn, RESETTING)
                else:
                    session.busy = False
                    session.last_active = now
        self._settle(conn, now)

    def _log_slow(self, job: Job, ok: bool, reply: bytes) -> None:
        """``log_slow_statements``: the statement, its server time, its client."""
        if (more := self._slow_log.allow()) is None:
            return
        sqlstate = None if ok else protocol.unpack(reply)[2].get("sqlstate")
        logger.info("slow statement (%s): %s%s", OP_NAMES[job.op],
                    shown_sql(job.simple or job.queries[-1].sql), more,
                    extra=request_fields(job.client_pid, job.pool.name, job.ran_for, sqlstate))

    def _reset_done(self, conn: PgConn, job: Job, ok: bool) -> None:
        if not ok:
            conn.broken = "its reset failed"
        elif job.queries[0] is _DISCARD:
            conn.dirty = False
            conn.prepared.forget()  # DISCARD ALL dropped them
            if conn.session_changed():
                conn.broken = "a reported setting survived DISCARD ALL"

    def _settle(self, conn: PgConn, now: float) -> None:
        """Decide what ``conn`` does next, from its state and the server's word."""
        pool = conn.pool
        if conn.broken:
            self._close_conn(conn, now)
            return
        self._watch(conn)
        if conn.copying and conn.conn_id not in self._sessions.by_conn:
            conn.broken = "its transaction ended in the middle of a COPY"
            self._close_conn(conn, now)
            return
        if conn.in_flight or conn.copying:
            if conn.state == State.SHARED and pool.waiting:
                self._dispatch(now, pool)  # room for one more behind the others
            return
        status = conn.transaction_status
        if conn in self._ddl_open and status == _NOT_IN_TRANSACTION:
            self._schema_changed(conn)
        session = self._sessions.by_conn.get(conn.conn_id)
        if session is not None:
            if status not in _IN_TRANSACTION and not session.busy:
                self._end_session(session, "the transaction ended on the server")
                self._settle(conn, now)
            return
        if status in _IN_TRANSACTION and conn.state == RESETTING:
            self._send(conn, Job(OP_RESET, b"", 0, float("inf"), [_ROLLBACK]), now)
            return
        if status != _NOT_IN_TRANSACTION:
            conn.broken = f"left in transaction status {status.name} outside a transaction"
            self._close_conn(conn, now)
            return
        if conn.dirty or conn.session_changed():
            if conn.state != RESETTING:
                pool.move(conn, RESETTING)
            self._send(conn, Job(OP_RESET, b"", 0, float("inf"), [_DISCARD]), now)
            return
        if self._stopping or conn.retiring:
            self._retire(conn, now)
            return
        pool.move(conn, IDLE)
        if pool.waiting:
            self._dispatch(now, pool)

    def _schema_changed(self, conn: PgConn) -> None:
        """DDL ended on ``conn`` (committed, as far as the broker can know):
        a plan prepared before it may now return other columns (0A000), so
        every connection drops its prepared statements before its next job."""
        self._ddl_open.discard(conn)
        self._schema_version += 1

    def _flush(self, now: float) -> None:
        unflushed = list(self._unflushed)
        self._unflushed.clear()
        for conn in unflushed:
            conn.flush()
            if conn.broken:
                self._close_conn(conn, now)
            elif conn.wants_output != bool(conn.polled & _POLLOUT):
                self._watch(conn)

    def _watch(self, conn: PgConn) -> None:
        """Poll the socket for input unless a COPY TO waits for its client,
        and for room to write while libpq holds output or a COPY FROM chunk
        waits to be handed to it."""
        mask = (_POLLIN if conn.wants_input else 0) | (_POLLOUT if conn.wants_output else 0)
        if mask == conn.polled:
            return
        fd = conn.fileno()
        if mask:
            self._by_fd[fd] = conn
            self._poller.register(fd, mask)  # registered already: the mask changes
        else:
            del self._by_fd[fd]
            self._poller.unregister(fd)
        conn.polled = mask

    def _close_conn(self, conn: PgConn, now: float) -> None:
        if conn in self._ddl_open:  # its DDL may have committed before the connection went
            self._schema_changed(conn)
        if conn.broken:
            self.stats[S.CONNECTIONS_LOST] += 1
            logger.warning("closing server connection %d: %s", conn.conn_id, conn.broken)
        for job, _, reply in conn.fail_all(psycopg.OperationalError(conn.broken or "closed")):
            if job.routing_id and not job.answered:  # not a reset, not refused already
                self._finish(job)
                self._reply(job.routing_id, reply)
        session = self._sessions.by_conn.get(conn.conn_id)
        if session is not None:
            self._sessions.close(session, "the transaction's server connection was lost")
        for fd, watched in list(self._by_fd.items()):
            if watched is conn:
                del self._by_fd[fd]
                self._poller.unregister(fd)
        conn.polled = 0
        self._unflushed.discard(conn)
        pool = conn.pool
        held = pool.close(conn)
        if held is not None:
            self._poller.register(held, zmq.POLLIN)  # see _on_closing
            self._closing[held] = pool
        self._fail_if_unreachable(pool, now)
        if pool.waiting:
            pool.grow(now, len(pool.waiting))

    def _retire(self, conn: PgConn, now: float) -> None:
        """Close ``conn`` once nothing of a client's is on it: at shutdown,
        after a burst that grew its buffers, at its lifetime, beyond a
        lowered cap, or on ``poolbroker ctl reconnect``."""
        if conn.retiring in (AGED, RECONNECT, REBALANCE):
            self.stats[S.CONNECTIONS_RECYCLED] += 1
        if conn.retiring:
            logger.debug("server connection %d retired (%s): closed", conn.conn_id,
                         conn.retiring)
        self._close_conn(conn, now)

    def _on_closing(self, fd: int, now: float) -> None:
        """A closed connection's socket is readable.  Once the server has
        closed its end, the backend has exited: its slot may go to a new
        connection, if the queue wants one."""
        pool = self._closing.get(fd)
        if pool is not None and pool.backend_gone(fd):
            del self._closing[fd]
            self._poller.unregister(fd)
            self._dispatch_all(now)  # which grows a pool that cannot serve

    def _on_opened(self, pool: Pool, now: float) -> None:
        ready, failed = pool.opened(now)
        for conn in ready:
            self.stats[S.CONNECTIONS_NUM] += 1
            pool.move(conn, State.IDLE)
            self._watch(conn)
            if conn.retiring:  # opening when ctl reconnect came: maybe to the old server
                self._retire(conn, now)
        self.stats[S.CONNECTIONS_ERRORS] += len(failed)
        self._fail_if_unreachable(pool, now)
        if pool.waiting:
            self._dispatch(now, pool)

    def _fail_if_unreachable(self, pool: Pool, now: float) -> None:
        """Fail the queue at once when no connection is left to serve it and
        the database refused the last attempt: the backoff delays the next
        attempt, it must not delay telling the clients."""
        if pool.waiting and (error := pool.unreachable(now)) is not None:
            while pool.waiting:
                job = pool.waiting.popleft()
                self._left_queue(job, now)
                self._finish(job)
                self._cannot_connect(job, error)

    def _cannot_connect(self, job: Job, error: ConnectError) -> None:
        self._reply_error(job.routing_id, job.request_id, ErrorKind.OPERATIONAL,
                          f"cannot connect to the database: {error.message}",
                          sqlstate=error.sqlstate)

    # Sessions

    def _end_session(self, session: Session, reason: str) -> None:
        """Roll the transaction back on the broker's own initiative."""
        self._sessions.close(session, reason)
        conn = session.conn
        conn.pool.move(conn, State.RESETTING)
        if session.busy and conn.head is not None and conn.head.op not in ENDING_OPS:
            conn.cancel(conn.head)

    def _expire(self, session: Session, reason: str, now: float) -> None:
        self.stats[S.TRANSACTIONS_EXPIRED] += 1
        if (more := self._expiry_log.allow()) is not None:
            logger.info("rolling back a transaction: %s%s", reason, more,
                        extra=request_fields(session.owner_pid, session.conn.pool.name,
                                             now - session.opened_at))
        self._end_session(session, reason)
        if not session.busy:
            self._settle(session.conn, now)

    # Bookkeeping

    def _admit(self, job: Job) -> None:
        routing_id = job.routing_id
        self._in_flight[routing_id] = self._in_flight.get(routing_id, 0) + 1
        self._queued_bytes += job.size

    def _finish(self, job: Job) -> None:
        """The job was answered: it no longer counts against its client."""
        self._queued_bytes -= job.size
        routing_id = job.routing_id
        left = self._in_flight.get(routing_id, 0) - 1
        if left > 0:
            self._in_flight[routing_id] = left
        else:
            self._in_flight.pop(routing_id, None)

    def _left_queue(self, job: Job, now: float) -> None:
        """``job`` leaves the queue, for a connection or not: its wait counts
        the same either way (a PoolTimeout's wait is the longest of all)."""
        waited = now - job.queued_at
        job.pool.waits.observe(waited)
        if waited > 0.001:
            self.stats[S.REQUESTS_QUEUED] += 1

    def _fail_waiting(self, job: Job, kind: ErrorKind, message: str, **extra: Any) -> None:
        self._finish(job)
        if kind == ErrorKind.POOL_TIMEOUT and (more := self._timeout_log.allow()) is not None:
            logger.info("PoolTimeout: %s%s", message, more, extra=request_fields(
                job.client_pid, job.pool.name, time.monotonic() - job.queued_at))
        self._reply_error(job.routing_id, job.request_id, kind, message, **extra)

    def _abandon(self, job: Job, now: float) -> None:
        """Its deadline passed while it was queued, or it would end after it."""
        self._left_queue(job, now)
        self.stats[S.REQUESTS_ABANDONED] += 1
        waited = f"after {now - job.queued_at:.3f} s waiting for a connection"
        if job.deadline > now:
            job.pool.doubt(job.queries[0].key)  # else a stale estimate refuses it for good
            why = (f"too little time was left {waited} ({(job.deadline - now) * 1000:.1f} ms) "
                   f"for the statement, which lately took {job.expected * 1000:.1f} ms on the "
                   "server")
        elif job.deadline <= job.queued_at:
            why = _READ_TOO_LATE
        else:
            why = f"the request's deadline passed {waited}"
        self._fail_waiting(job, ErrorKind.POOL_TIMEOUT, f"{why}; the statement was not run")

    # Replies

    def _reply(self, routing_id: bytes, reply: bytes) -> None:
        if not self._transport.send(routing_id, reply):
            # The client is gone, or stopped reading.
            self.stats[S.REPLIES_UNDELIVERABLE] += 1

    def _reply_error(self, routing_id: bytes, request_id: Any, kind: ErrorKind, message: str,
                     **extra: Any) -> None:
        self.stats[S.REQUESTS_ERRORS] += 1
        self._reply(routing_id, replies.error(request_id, error_payload(kind, message, **extra)))

    def _refuse(self, routing_id: bytes, request_id: Any, why: str) -> None:
        """A request over a limit, refused unrun (TooManyRequests)."""
        self.stats[S.REQUESTS_REFUSED] += 1
        self._reply_error(routing_id, request_id, ErrorKind.TOO_MANY_REQUESTS, why)

    def _malformed(self, routing_id: bytes, request_id: Any, why: str) -> None:
        self.stats[S.MESSAGES_MALFORMED] += 1
        if (more := self._malformed_log.allow()) is not None:
            logger.warning("malformed request: %s%s", why, more)
        self._reply_error(routing_id, request_id, ErrorKind.MESSAGE, why)

    # Timers

    def _housekeeping(self, now: float) -> None:
        self._transport.tick(now)
        for pool in self._pools.all:
            if pool.waiting:
                self._expire_waiting(pool, now)
        for conn in list(self._pools.conns()):
            job = conn.head
            if job is not None and job.cancel_at <= now and not job.cancel_sent:
                self.stats[S.REQUESTS_CANCELLED] += 1
                conn.cancel(job)
            if conn.in_flight > 1 and conn.guarded_past(now - GUARD_MARGIN):
                self._refuse_behind_head(conn, now)
        idle_limit = self.settings.idle_transaction_timeout
        check_owners = now >= self._next_owner_check
        if check_owners:
            self._next_owner_check = now + OWNER_CHECK_INTERVAL
        probe_peers = now >= self._next_peer_probe
        if probe_peers:
            self._next_peer_probe = now + PEER_PROBE_INTERVAL
        exited = _Exited()
        if check_owners:
            self._forget_exited_clients(exited, now)
        for session in list(self._sessions.by_conn.values()):
            if check_owners and exited(session.owner_pid):
                self._expire(session, f"its owner process {session.owner_pid} exited", now)
                self._forget_client(session.routing_id, now)
            elif probe_peers and not self._transport.connected(session.routing_id):
                self._expire(session, "its client's connection was lost (closed, or "
                                      "no answer to transport heartbeats)", now)
                self._forget_client(session.routing_id, now)
            elif idle_limit and not session.busy and now - session.last_active > idle_limit:
                self._expire(session, (
                    f"the transaction was idle for more than {idle_limit:g} s "
                    "(idle_transaction_timeout) and was rolled back"), now)
        for pool in self._pools.all:
            if pool.closing:
                for fd in pool.overdue(now):
                    self._poller.unregister(fd)
                    del self._closing[fd]
        if not self._stopping:
            self._size_pools(now)
        recheck_foreign = now >= self._next_foreign_check
        if recheck_foreign:
            self._next_foreign_check = now + FOREIGN_RECHECK_INTERVAL
        for pool in self._pools.all:
            if pool.waiting and not pool.count(State.IDLE) and not self._paused:
                pool.grow(now, len(pool.waiting))
            if pool.foreign and recheck_foreign:
                self._recheck_foreign(pool, now)

    def _size_pools(self, now: float) -> None:
        """min_connections, max_idle, max_lifetime and the pools' shares of
        the global cap, on the housekeeping tick: the request path does none
        of it."""
        pools = self._pools
        if self.settings.max_lifetime:
            for pool in pools.all:
                for conn in pool.aged(now):
                    self._retire_when_idle(conn, AGED, now)
        for conn in pools.surplus():
            self._retire_when_idle(conn, SURPLUS, now)
        for pool in pools.all:
            for conn in pool.idled_out(now):
                self.stats[S.CONNECTIONS_CLOSED_IDLE] += 1
                logger.debug("server connection %d idle for max_idle: closed", conn.conn_id)
                self._close_conn(conn, now)
        if (conn := pools.rebalance(now)) is not None:
            logger.debug("server connection %d of pool %r makes way for a starved pool",
                         conn.conn_id, conn.pool.name)
            self._retire_when_idle(conn, REBALANCE, now)
        for pool in pools.all:
            pool.keep_warm(now)

    def _retire_when_idle(self, conn: PgConn, why: str, now: float) -> None:
        """Close ``conn`` now if idle, else once its clients' work is done:
        nothing in flight fails (see _settle)."""
        conn.retiring = why
        if conn.state == State.IDLE:
            self._retire(conn, now)
        elif conn.state == State.SHARED:
            conn.pool.move(conn, State.BUSY)  # nothing more is pipelined onto it

    def _recheck_foreign(self, pool: Pool, now: float) -> None:
        """Learn whether a dead predecessor's connections have ended, so the
        cap they hold comes back: a connection that opens looks.  At the cap,
        an idle connection makes way for a new one."""
        if pool.count(State.OPENING):
            return  # it will look
        if pool.at_cap:
            conn = pool.idle()
            if conn is None:
                return
            self._close_conn(conn, now)
        pool.grow(now, 1)

    def _refuse_behind_head(self, conn: PgConn, now: float) -> None:
        """Answer the jobs pipelined behind a head that outlived their
        deadline, now rather than when the head ends: their guards will
        skip them.  What the server finished meanwhile is read first."""
        self._unflushed.add(conn)  # a rerun or a DEALLOCATE may follow
        self._on_outcomes(conn, conn.read(now), now)
        for job in conn.guarded_past(now - GUARD_MARGIN):
            job.answered = True
            self.stats[S.REQUESTS_ABANDONED] += 1
            self._fail_waiting(
                job, ErrorKind.POOL_TIMEOUT,
                f"the request's deadline passed after {now - job.queued_at:.3f} s while it "
                "waited behind another client's statement on the server connection; "
                "the statement was not run")

    def _forget_exited_clients(self, exited: _Exited, now: float) -> None:
        """Nobody waits for what a client process that exited asked for
        outside a transaction: what it queued is dropped, and its statement
        a server connection is running is cancelled (a batch, atomic, rolls
        back whole).  Its transactions are the sessions' check's."""
        for pool in self._pools.all:
            for routing_id in {job.routing_id for job in pool.waiting if exited(job.client_pid)}:
                self._forget_client(routing_id, now)
        for conn in self._pools.conns():
            job = conn.head
            if job is not None and job.session is None and not job.cancel_sent \
                    and exited(job.client_pid):
                job.cancel_reason = f"its client process {job.client_pid} exited"
                self.stats[S.REQUESTS_CANCELLED] += 1
                conn.cancel(job)

    def _forget_client(self, routing_id: bytes, now: float) -> None:
        """Drop what a dead client queued (a BEGIN among it would pin a
        connection to nobody) and whatever of its backlog arrives later."""
        gone = self._gone
        gone[routing_id] = None
        while len(gone) > GONE_CLIENTS_KEPT:
            gone.popitem(last=False)
        for pool in self._pools.all:
            waiting = pool.waiting
            kept = []
            for job in waiting:
                if job.routing_id != routing_id:
                    kept.append(job)
                else:
                    self.stats[S.REQUESTS_DROPPED] += 1
                    self._left_queue(job, now)
                    self._finish(job)
            if len(kept) != len(waiting):
                waiting.clear()
                waiting.extend(kept)

    def _expire_waiting(self, pool: Pool, now: float) -> None:
        pool_timeout = self.settings.pool_timeout
        kept = []
        for job in pool.waiting:
            if _too_late(job, now):
                self._abandon(job, now)
            elif pool_timeout and now - job.queued_at > pool_timeout:
                self._left_queue(job, now)
                self.stats[S.REQUESTS_TIMEOUTS] += 1
                self._fail_waiting(
                    job, ErrorKind.POOL_TIMEOUT,
                    f"no server connection became free within {now - job.queued_at:.1f} s "
                    f"(pool_timeout={pool_timeout:g} s, {self._cap_of(pool)}); the statement "
                    "was not run")
            else:
                kept.append(job)
        pool.waiting.clear()
        pool.waiting.extend(kept)

    def _cap_of(self, pool: Pool) -> str:
        """What bounds ``pool``'s connections, for an error message."""
        if self._pools.alone:
            return f"max_connections={self.settings.max_connections}"
        return (f"pool {pool.name!r}: max_connections={pool.settings.max_connections}, "
                f"{self.settings.max_connections} across every pool")

    def _drained(self, now: float) -> bool:
        pools = self._pools
        if not self._drain_deadline:
            self._drain_deadline = now + self.settings.drain_timeout
            logger.info("shutting down: draining %d running statements",
                        sum(c.in_flight for c in pools.conns()))
            for pool in pools.all:
                while pool.waiting:
                    job = pool.waiting.popleft()
                    self._left_queue(job, now)
                    self._fail_waiting(job, ErrorKind.BROKER_UNAVAILABLE,
                                       "the broker is shutting down; the request was not run")
                for conn in pool.in_state(State.IDLE):
                    self._close_conn(conn, now)
        busy = [c for c in pools.conns() if c.in_flight or c.copying]
        if now >= self._drain_deadline:
            for conn in busy:
                conn.cancel(conn.head)
            return True
        return not busy and not any(pool.count(State.OPENING) for pool in pools.all) \
            and not self._sessions.by_conn

    def snapshot(self) -> dict[str, Any]:
        """Counters, gauges, peaks and percentiles, with one entry per pool
        (``stats.POOLS``), for ``poolbroker stats`` and the metrics endpoint:
        built by the loop's thread between two turns, so its numbers agree."""
        now = time.monotonic()
        pools = self._pools.all
        sessions = self._sessions.by_conn
        result: dict[str, Any] = dict(self.stats)
        entries = [pool.snapshot(now) for pool in pools]
        for pool, entry in zip(pools, entries):
            # A client counts where it waits: PgBouncer's cl_active are those
            # served, not waiting.  A connected client with nothing asked
            # belongs to no pool (see clients_connected).
            served = {job.routing_id for conn in pool.conns.values() for job in conn.jobs()}
            served.update(session.routing_id for session in sessions.values()
                          if session.conn.pool is pool)
            served.difference_update(job.routing_id for job in pool.waiting)
            entry[S.CL_ACTIVE] = len(served)
        result[S.POOLS] = entries
        result[S.UPTIME_SECONDS] = round(now - self._started, 3)
        result[S.PAUSED] = int(self._paused)
        result[S.POOL_MAX] = self.settings.max_connections
        result[S.POOL_MIN] = sum(pool.settings.min_connections for pool in pools)
        result[S.POOL_SIZE] = sum(len(pool.conns) for pool in pools)
        result[S.POOL_AVAILABLE] = sum(pool.count(State.IDLE) for pool in pools)
        result[S.POOL_ACTIVE] = sum(pool.active for pool in pools)
        result[S.POOL_ACTIVE_PEAK] = self._pools.active_peak
        result[S.REQUESTS_WAITING] = sum(len(pool.waiting) for pool in pools)
        result[S.REQUESTS_WAITING_PEAK] = sum(pool.waiting_peak for pool in pools)
        result[S.SESSIONS_ACTIVE] = len(sessions)
        result[S.CLIENTS_ACTIVE] = len(self._in_flight)
        result[S.QUEUED_BYTES] = self._queued_bytes
        result[S.POOL_PREDECESSORS] = len(self._pools.foreign())
        result[S.STATEMENTS_UNPARSED] = statements.budget.refused
        waits = S.merged([entry[S.WAIT_SECONDS] for entry in entries])
        statement_times = S.merged([entry[S.STATEMENT_SECONDS] for entry in entries])
        result[S.REQUESTS_WAIT_MS] = int(waits["sum"] * 1000)
        for p in S.PERCENTILES:
            result[S.REQUESTS_WAIT_PERCENTILE.format(p)] = _ms(S.quantile(waits, p / 100))
            result[S.STATEMENT_PERCENTILE.format(p)] = _ms(S.quantile(statement_times, p / 100))
        if self._gate is not None:
            result[S.CLIENTS_CONNECTED] = self._gate.admitted
            result[S.CLIENTS_CONNECTED_PEAK] = self._gate.peak
            result[S.CLIENTS_MAX] = self._gate.max_clients
            result[S.CLIENTS_REFUSED] = self._gate.refused
            result[S.MESSAGES_REJECTED] = self._gate.rejected
            result[S.CLIENTS_DENIED] = self._gate.denied
        return result


class _Exited:
    """Whether a client's process has exited (False when its pid is not
    known: over tcp), each pid asked of the kernel once per check."""

    def __init__(self) -> None:
        self._alive: dict[int, bool] = {}

    def __call__(self, pid: int) -> bool:
        if not pid:
            return False
        alive = self._alive.get(pid)
        if alive is None:
            alive = self._alive[pid] = pid_alive(pid)
        return not alive


_READ_TOO_LATE = ("the request's deadline had passed when the broker read it (it spent its "
                  "time on its way: a busy or stalled broker)")


def _ends_own(job: Job, session: Session) -> bool:
    """A COMMIT or ROLLBACK from another socket of the process that opened
    the transaction (over ipc, whose pid the kernel vouches for): a
    connection or a named cursor closed by another of its threads, whose
    socket is not the owner's."""
    return job.op in ENDING_OPS and job.client_pid != 0 and job.client_pid == session.owner_pid


def _too_late(job: Job, now: float) -> bool:
    """Whether ``job`` would be answered after its deadline if it started
    now: the deadline has passed, or, once it has waited, less time is left
    than its statement lately took plus a margin.  Estimates can be wrong (a
    slow spell, a cold first run) and only running the statement corrects
    them: so a request that would start as it arrives runs, one whose
    estimate is longer than its whole timeout runs, and each refusal lowers
    the estimate a little (``Pool.doubt``)."""
    left = job.deadline - now
    expected = job.expected
    return left <= 0 or (now > job.queued_at  # waited: one that would start at once runs
                         and left <= expected + min(expected, ESTIMATE_SPREAD) + ANSWER_MARGIN
                         and expected < job.deadline - job.queued_at)


def _backed_up(head: Job, now: float, pool_timeout: float) -> bool:
    """Whether the queue whose oldest request is ``head`` is backed up (see
    BACKLOG_SHARE): that request has waited that share of what it may wait,
    its timeout or pool_timeout, whichever ends first.  Never while it needs
    a connection of its own (a BEGIN): the requests that share one would go
    around it, each into a busy connection's pipeline, and the connection
    would never be free for it."""
    if not head.shareable:
        return False
    may_wait = head.deadline - head.queued_at
    if pool_timeout and pool_timeout < may_wait:
        may_wait = pool_timeout
    return now - head.queued_at > may_wait * BACKLOG_SHARE


def _same_databases(old: Settings, new: Settings) -> bool:
    """Whether the pools differ only in what a reload applies (their sizes)
    or in order; a pool added, removed or pointed elsewhere needs a restart."""
    fixed = [name for name, spec in POOL_SPECS.items() if not spec.live]

    def databases(settings: Settings) -> set[tuple]:
        return {(p.name, *(getattr(p, name) for name in fixed)) for p in settings.pools}

    return databases(old) == databases(new)


def _pool_sizes(pools: tuple[PoolSettings, ...]) -> dict[str, dict[str, int]]:
    return {p.name: {"max_connections": p.max_connections,
                     "min_connections": p.min_connections} for p in pools}


def _public_keys(setting: str, directory: str) -> set[bytes]:
    """The public keys (z85) of a directory's certificates, file by file: a
    file that is not a certificate is skipped and logged.  (pyzmq's own
    loader gives up on the first such file and keeps the previous list: a
    revoked key stayed admitted.)"""
    keys = set()
    for path in sorted(glob.glob(os.path.join(glob.escape(directory), "*.key"))):
        try:
            public, _ = zmq.auth.load_certificate(path)
        except (OSError, ValueError) as exc:
            logger.error("%s: skipping %s: %s", setting, path, exc)
            continue
        if public:
            keys.add(public)
    return keys


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)
