"""The worker side: send statements to the broker, get psycopg-like results."""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import zmq
from zmq.utils.monitor import parse_monitor_message

from . import _zmtp, errors
from .protocol import (
    MAX_PARAMETERS, MAX_STATEMENTS, OP_BATCH, OP_BEGIN, OP_COMMIT, OP_CONTROL, OP_COPY_FROM,
    OP_COPY_TO, OP_EXECUTE, OP_EXECUTEMANY, OP_PING, OP_ROLLBACK, OP_STATS, PROBE_REQUEST_ID,
    STATUS_OK, default_endpoint, pack, pack_request, request_packer, unpack,
)

logger = logging.getLogger("poolbroker.client")

DEFAULT_TIMEOUT = 60.0
"""Seconds a request may take end to end (queueing included) by default."""

DEFAULT_CONNECT_TIMEOUT = 2.0
"""Seconds a request waits for a broker to connect to before it fails with
BrokerUnavailable, never sent (env POOLBROKER_CLIENT_CONNECT_TIMEOUT).  Short, so
that a missing broker fails a worker long before gunicorn's 30 s worker
timeout kills it; long enough to ride out a broker restarted by supervisord."""

DEFAULT_CHUNK_ROWS = 10_000
"""Rows per round trip of ``Client.stream()``."""

COPY_CHUNK_BYTES = 256 * 1024
"""Bytes per message of a COPY, either way: the broker holds at most one."""

REPLY_GRACE = 1.0
"""The broker answers at the deadline itself (PoolTimeout, QueryCanceled);
wait this much longer for that answer before declaring it unavailable."""

FAST_REPLY_WAIT = 0.05
"""Seconds a reply is awaited with a plain blocking recv before polling for
it (over tcp, the libzmq socket together with its disconnect monitor, so a
request in flight when the broker dies fails at most this late)."""

LARGE_MESSAGE = 64 * 1024
"""A request larger than this leaves its Packer behind, with its buffer."""

MONITOR_DRAIN_INTERVAL = 1.0
"""A request sent this long after the monitor was last read first drops
what it reported (its queue stays short: a few events a second at most,
libzmq reconnecting every 100 ms), instead of every request paying for it."""

# Plain ints: pyzmq's enums cost a microsecond or more a use on the hot path.
_NOBLOCK = int(zmq.NOBLOCK)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)

_ANY_SIZE = sys.maxsize
_UNSENDABLE = (TypeError, ValueError, OverflowError)
"""What msgpack raises for a value the wire cannot carry."""

Params = Sequence[Any] | dict[str, Any] | None

_clients: weakref.WeakSet[Client] = weakref.WeakSet()


class Result:
    """What a statement returned: ``rows`` (tuples), ``columns``, ``rowcount``,
    ``types`` (the columns' PostgreSQL type OIDs) and, when the text held
    several statements, ``more_results``: the results of those after the first."""

    __slots__ = ("columns", "more_results", "rows", "rowcount", "types")

    def __init__(self, columns: list[str], rows: list[tuple], rowcount: int,
                 types: Sequence[int] = (), more_results: Sequence[Result] = ()) -> None:
        self.columns = columns
        self.rows = rows
        self.rowcount = rowcount
        self.types = types
        self.more_results = more_results

    @classmethod
    def _from_wire(cls, payload: list) -> Result:
        try:  # the usual RESULT, one statement's; a try costs less than len() here
            columns, rows, rowcount, types = payload
        except ValueError:
            return cls._from_other_wire(payload)
        # map, not a comprehension: one Python frame fewer a result (3.11)
        return cls(columns or [], list(map(tuple, rows)), rowcount, types or [])

    @classmethod
    def _from_other_wire(cls, payload: list) -> Result:
        if len(payload) == 3:  # a broker from before the types travelled
            columns, rows, rowcount = payload
            return cls(columns or [], [tuple(row) for row in rows], rowcount, [])
        columns, rows, rowcount, types, more = payload  # several statements
        return cls(columns or [], [tuple(row) for row in rows], rowcount, types or [],
                   [cls._from_wire(r) for r in more])

    def __iter__(self) -> Iterator[tuple]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __repr__(self) -> str:
        return (f"Result(columns={self.columns!r}, types={self.types!r}, "
                f"rowcount={self.rowcount}, rows={self.rows!r})")


class _Owned:
    """A thread's way to the broker in one process, and what its requests
    reuse: a Packer.  ``send(message, deadline, give_up_at)`` raises
    _zmtp.Unsent if no broker took the message; ``recv(deadline)`` returns
    the next reply frame, None at the deadline, or raises _zmtp.Closed if the
    connection was lost with the request in flight.  The thread holds
    ``lock`` from its send to its reply."""

    __slots__ = ("busy", "lock", "packer", "pid")

    def __init__(self, pid: int, lock: threading.Lock) -> None:
        self.pid = pid
        self.lock = lock
        self.packer = request_packer()
        self.busy = False  # a request of this thread is under way


class _DirectSocket(_Owned):
    """Over ipc: ZMTP spoken from this thread (see _zmtp), no libzmq."""

    __slots__ = ("close", "recv", "send")

    def __init__(self, pid: int, address: str) -> None:
        dealer = _zmtp.Dealer(address, FAST_REPLY_WAIT)
        super().__init__(pid, dealer.lock)
        self.send, self.recv, self.close = dealer.send, dealer.recv, dealer.close


class _ThreadSocket(_Owned):
    """Over tcp (and CURVE): a libzmq DEALER socket owned by one thread of
    one process, its send and recv bound once (send past pyzmq's Python
    wrapper, which only adds draft-socket options).

    ``monitor`` reports the socket's connections and disconnections, so that
    a request in flight when the broker dies fails at once instead of at its
    deadline.  It is read only when a reply is late, or when a request
    follows MONITOR_DRAIN_INTERVAL of silence, not on every request
    (measured: 4 to 8 us each).
    """

    __slots__ = ("_recv", "_send", "drain_at", "monitor", "poller", "socket")

    def __init__(self, pid: int, socket: zmq.Socket, monitor: zmq.Socket) -> None:
        super().__init__(pid, threading.Lock())
        self.socket = socket
        self._send = zmq.backend.Socket.send.__get__(socket)
        self._recv = socket.recv
        self.monitor = monitor
        self.drain_at = 0.0
        self.poller = zmq.Poller()
        self.poller.register(socket, zmq.POLLIN)
        self.poller.register(monitor, zmq.POLLIN)

    @classmethod
    def connect(cls, pid: int, endpoint: str,
                curve: tuple[bytes, bytes, bytes] | None) -> _ThreadSocket:
        socket = _process_context(pid).socket(zmq.DEALER)
        try:
            socket.setsockopt(zmq.IMMEDIATE, 1)
            socket.setsockopt(zmq.LINGER, 0)
            socket.setsockopt(zmq.HEARTBEAT_IVL, 1000)
            socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3000)
            # Most replies arrive within FAST_REPLY_WAIT: wait for them with a
            # plain blocking recv (measured: polling both sockets cost ~5 us of
            # CPU per request), and only then poll the socket and its monitor.
            socket.setsockopt(zmq.RCVTIMEO, int(FAST_REPLY_WAIT * 1000))
            if curve is not None:
                socket.curve_serverkey, socket.curve_publickey, socket.curve_secretkey = curve
            # pyzmq names the monitor after the socket's descriptor, which a
            # socket dropped by an ended thread frees before libzmq releases
            # the name: a new socket reusing the number then failed with
            # "Address already in use".  A counter never repeats.
            # Connections too: a disconnection followed by a connection is
            # the broker restarted before a request was sent, not a loss.
            monitor = socket.get_monitor_socket(
                zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED,
                f"inproc://poolbroker-monitor-{next(_monitor_ids)}")
        except BaseException:
            socket.close(linger=0)
            raise
        owned = cls(pid, socket, monitor)
        if endpoint.startswith("inproc://"):
            owned.close()  # it would wait its whole timeout for a broker that cannot be there
            raise errors.InterfaceError(
                f"invalid broker endpoint {endpoint!r}: inproc endpoints only reach sockets "
                "of the same process; the broker runs in its own")
        try:
            socket.connect(endpoint)
        except zmq.ZMQError as exc:
            owned.close()
            raise _invalid_endpoint(endpoint, zmq.strerror(exc.errno)) from None
        return owned

    def send(self, message: bytes, deadline: float, give_up_at: float) -> None:
        now = time.monotonic()
        if now >= self.drain_at:
            self.forget_disconnections(now)
        try:
            self._send(message, _NOBLOCK)
        except zmq.Again:
            self._send_when_connected(message, give_up_at)

    def _send_when_connected(self, message: bytes, give_up_at: float) -> None:
        """The first try found no broker connected (IMMEDIATE), so nothing
        was queued: wait for one until ``give_up_at`` (connect_timeout: with
        no broker at the endpoint a worker must fail now, not at the end of
        its whole budget)."""
        while True:
            now = time.monotonic()
            if now >= give_up_at:
                raise _zmtp.Unsent("no broker connected")
            self.socket.poll(max(1, int((give_up_at - now) * 1000)), zmq.POLLOUT)
            try:
                self._send(message, _NOBLOCK)
                return
            except zmq.Again:
                continue

    def recv(self, deadline: float) -> bytes | None:
        socket = self.socket
        while True:
            try:
                return self._recv()
            except zmq.Again:  # no reply within FAST_REPLY_WAIT
                remaining = deadline - time.monotonic()
                ready = dict(self.poller.poll(max(1, int(remaining * 1000)))) if remaining > 0 else {}
                if socket in ready:
                    continue
                if self.monitor in ready:
                    if not self.connection_lost():
                        continue  # a reconnection before the request was sent
                    raise _zmtp.Closed("disconnected") from None
                return None

    def forget_disconnections(self, now: float) -> None:
        """Drop what the monitor reported so far (before this request was
        sent, and it was sent: the socket is connected)."""
        self.drain_at = now + MONITOR_DRAIN_INTERVAL
        monitor = self.monitor
        while monitor.get(_EVENTS) & _POLLIN:  # cheaper than catching Again
            monitor.recv_multipart()

    def connection_lost(self) -> bool:
        """Whether the broker is disconnected now, by the monitor's last event.

        A request is sent only on a live connection (IMMEDIATE): the events
        from before it end with that connection's, or were drained.  So a
        disconnection last means the one it went on is gone.  A reconnection
        cannot hide it: libzmq reconnects after 100 ms at the soonest, and
        the monitor is read once a reply is FAST_REPLY_WAIT late and then as
        soon as it reports anything."""
        monitor, lost = self.monitor, False
        while monitor.get(_EVENTS) & _POLLIN:
            event = parse_monitor_message(monitor.recv_multipart())["event"]
            lost = event == zmq.EVENT_DISCONNECTED
        return lost

    def close(self) -> None:
        if self.socket.closed:
            return
        self.socket.disable_monitor()
        self.monitor.close(linger=0)
        self.socket.close(linger=0)

    def __del__(self) -> None:
        # A thread that ends without close() leaves its socket here; one
        # inherited across fork belongs to the parent and is never touched.
        if self.pid == os.getpid():
            self.close()


class Client:
    """A connection to the broker, safe to use from any thread and across fork.

    Each thread of each process gets its own socket, created on first use;
    nothing created before a fork is used after it.
    """

    def __init__(self, endpoint: str | None = None, *, timeout: float | None = None,
                 connect_timeout: float | None = None,
                 curve_server_key: str | None = None,
                 curve_client_cert: str | None = None,
                 pool: str | None = None) -> None:
        """``timeout`` is each request's whole budget (DEFAULT_TIMEOUT);
        ``connect_timeout`` how long a request waits for the broker to be
        connected before it fails unsent (env POOLBROKER_CLIENT_CONNECT_TIMEOUT,
        DEFAULT_CONNECT_TIMEOUT).  ``curve_server_key`` is the broker's
        public certificate file and ``curve_client_cert`` this client's
        secret certificate file (env POOLBROKER_CURVE_SERVER_KEY /
        POOLBROKER_CURVE_CLIENT_CERT); both are needed to reach a broker on
        a CURVE tcp endpoint.  ``pool`` names the broker's pool (a
        ``[pools.NAME]`` table of its settings) the statements run on; None:
        its default pool (env POOLBROKER_POOL)."""
        if endpoint is not None and not isinstance(endpoint, str):
            raise errors.InterfaceError(f"the endpoint must be a string, got {endpoint!r}")
        pool = pool or os.environ.get("POOLBROKER_POOL") or None
        if pool is not None and not isinstance(pool, str):
            raise errors.InterfaceError(f"the pool must be a name (a string), got {pool!r}")
        self.pool = pool
        self.endpoint = endpoint or default_endpoint()
        # Over ipc the broker reads the same monotonic clock: a request's
        # timeout then counts from its sending, not from its reading.
        self._same_clock = self.endpoint.startswith("ipc://")
        self.timeout = DEFAULT_TIMEOUT if timeout is None else _seconds("timeout", timeout)
        if connect_timeout is None:
            connect_timeout = _seconds(
                "POOLBROKER_CLIENT_CONNECT_TIMEOUT",
                os.environ.get("POOLBROKER_CLIENT_CONNECT_TIMEOUT") or DEFAULT_CONNECT_TIMEOUT)
        self.connect_timeout = _seconds("connect_timeout", connect_timeout)
        self._curve = _load_curve_keys(
            curve_server_key or os.environ.get("POOLBROKER_CURVE_SERVER_KEY"),
            curve_client_cert or os.environ.get("POOLBROKER_CURVE_CLIENT_CERT"))
        # Over ipc without CURVE, the client speaks ZMTP itself (see _zmtp).
        self._direct = self.endpoint.startswith("ipc://") and self._curve is None
        self._ids = itertools.count(1)
        self._stale_replies = 0  # the soak test checks none arrive unasked
        self._reset()
        _clients.add(self)

    def _reset(self) -> None:
        # Sockets inherited across fork are dropped, never closed: closing
        # them would touch the parent's context from the child.
        self._local = threading.local()

    def _connection(self) -> _Owned:
        """A new way to the broker for this thread of this process."""
        if self._direct:
            try:
                address = _zmtp.address(self.endpoint)
            except ValueError as exc:
                raise _invalid_endpoint(self.endpoint, str(exc)) from None
            return _DirectSocket(os.getpid(), address)
        return _ThreadSocket.connect(os.getpid(), self.endpoint, self._curve)

    def _request(self, op: int, session: bytes | None, body: list, timeout: float | None) -> Any:
        # Every request's path: each call and lookup here costs far more
        # among 32 busy processes (caches cold) than timeit shows.
        timeout = self.timeout if timeout is None else _seconds("timeout", timeout)
        request_id = next(self._ids)
        try:
            owned = getattr(self._local, "owned", None)
            # A request made while this thread's is under way (by a signal
            # handler, or a finalizer run by a garbage collection), or on the
            # keep-alive thread (which may hold any connection's lock), takes
            # a connection of its own: on this one it would wait for the other,
            # or read the other's reply as its own.
            nested = (owned is not None and owned.busy
                      or threading.get_ident() == _zmtp.keeper_ident)
            if nested:
                owned = self._connection()
            elif owned is None or owned.pid != os.getpid():  # a new thread, or forked
                owned = self._local.owned = self._connection()
        except zmq.ZMQError as exc:
            raise self._transport_failed(exc, None, outcome_unknown=False) from exc
        now = time.monotonic()
        deadline = now + timeout
        try:
            # At least 1 ms: the wire counts whole milliseconds, 0 is no timeout.
            message = pack_request(owned.packer, request_id, op, int(timeout * 1000) or 1,
                                   session, body, self.pool, now if self._same_clock else None)
        except _UNSENDABLE as exc:
            raise _cannot_send(exc) from exc
        if len(message) > LARGE_MESSAGE:
            owned.packer = request_packer()  # its buffer grew as large: let it go
        owned.busy = True  # before the lock: a nested request from here on goes apart
        try:
            with owned.lock:  # the keep-alive thread's (see _zmtp)
                try:
                    owned.send(message, deadline, min(deadline, now + self.connect_timeout))
                except zmq.ZMQError as exc:
                    raise self._transport_failed(exc, owned, outcome_unknown=False) from exc
                except _zmtp.Unsent as exc:
                    # A libzmq socket refused at the handshake (an allow-list)
                    # never reconnects by itself: the next request starts afresh.
                    self._drop(owned)
                    raise self._never_sent(timeout, exc) from None
                try:
                    return self._wait_reply(owned, request_id, deadline + REPLY_GRACE, timeout)
                except zmq.ZMQError as exc:
                    raise self._transport_failed(exc, owned, outcome_unknown=True) from exc
        finally:
            owned.busy = False
            if nested:
                owned.close()

    def _drop(self, owned: _Owned) -> None:
        """Close ``owned``: the next request of its thread makes another."""
        owned.close()
        if getattr(self._local, "owned", None) is owned:
            self._local.owned = None

    def _transport_failed(self, exc: zmq.ZMQError, owned: _Owned | None, *,
                          outcome_unknown: bool) -> errors.BrokerUnavailable:
        """The transport itself failed (no descriptor left, a socket closed
        under us): drop the socket used, if any, so that the next call
        starts afresh."""
        if owned is not None:
            self._drop(owned)
        outcome = ("the statement may have run (outcome unknown)" if outcome_unknown
                   else "the request was never sent")
        return errors.BrokerUnavailable(
            f"ZeroMQ failed talking to the broker at {self.endpoint}: {exc}; {outcome}",
            outcome_unknown=outcome_unknown)

    def _never_sent(self, timeout: float, unsent: _zmtp.Unsent) -> errors.BrokerUnavailable:
        if unsent.connected:
            return errors.BrokerUnavailable(
                f"the broker at {self.endpoint} did not read the request within "
                f"{timeout:g} s (stopped, or the connection was lost: {unsent}); it was "
                "never run", outcome_unknown=False)
        within = (f"connect_timeout ({self.connect_timeout:g} s)"
                  if self.connect_timeout < timeout else f"the request's timeout ({timeout:g} s)")
        return errors.BrokerUnavailable(
            f"no broker answered at {self.endpoint} within {within}: none is running "
            "there, or it does not accept this client; the request was never sent",
            outcome_unknown=False)

    def _wait_reply(self, owned: _Owned, request_id: int, deadline: float,
                    timeout: float) -> Any:
        recv = owned.recv
        while True:
            try:
                reply = recv(deadline)
                if reply is None:
                    raise errors.BrokerUnavailable(
                        f"no reply from the broker at {self.endpoint} within {timeout:g} s; "
                        "the statement may have run (outcome unknown)",
                        outcome_unknown=True)
                # Whatever its size: the broker bounds results (max_result_bytes).
                reply_id, status, payload = unpack(reply, _ANY_SIZE)
            except _zmtp.Closed:
                raise errors.BrokerUnavailable(
                    f"the connection to the broker at {self.endpoint} was lost while "
                    "the request was in flight; the statement may have run "
                    "(outcome unknown)",
                    outcome_unknown=True,
                ) from None
            except (ValueError, TypeError) as exc:
                # Not poolbroker's wire format: whoever listens there is not a
                # broker of this version (and what follows cannot be trusted).
                self._drop(owned)
                raise errors.InterfaceError(
                    f"undecodable reply from {self.endpoint} ({exc}): is a poolbroker of "
                    "this version listening there? The statement may have run "
                    "(outcome unknown)") from None
            if reply_id != request_id:
                if reply_id != PROBE_REQUEST_ID:
                    self._stale_replies += 1  # a late reply to a request we gave up on
                continue
            if status == STATUS_OK:
                return payload
            raise errors.from_payload(payload)

    # Public API

    def close(self) -> None:
        """Close the calling thread's socket (others close when their thread ends)."""
        owned = getattr(self._local, "owned", None)
        if owned is not None and owned.pid == os.getpid():
            owned.close()
        self._local.owned = None

    def _execute(self, session: bytes | None, sql: str, params: Params,
                 timeout: float | None) -> Result:
        return Result._from_wire(self._request(OP_EXECUTE, session, [sql, params], timeout))

    def _executemany(self, session: bytes | None, sql: str, seq_of_params: Iterable[Params],
                     timeout: float | None) -> Result:
        """One request; beyond what one may hold (MAX_STATEMENTS, MAX_PARAMETERS)
        several, all or none: inside ``session`` behind a savepoint, or in a
        transaction of their own."""
        params = list(seq_of_params)
        parts = in_parts(params)
        if len(parts) == 1:
            return Result._from_wire(self._request(OP_EXECUTEMANY, session, [sql, params],
                                                   timeout))
        timeout = self.timeout if timeout is None else _seconds("timeout", timeout)
        if session is None:
            with self.transaction(timeout=timeout) as transaction:
                return self._parts(transaction._live_session(), sql, parts, timeout,
                                   savepoint=False)
        self._request(OP_EXECUTE, session, [PARTS_SAVEPOINT, None], timeout)
        return self._parts(session, sql, parts, timeout, savepoint=True)

    def _parts(self, session: bytes, sql: str, parts: list[list[Params]], timeout: float, *,
               savepoint: bool) -> Result:
        """Run an executemany's ``parts`` in ``session``, within one ``timeout``.

        A part that fails on the server aborts the transaction, so nothing of
        the executemany can commit.  One refused unrun (no SQLSTATE: a
        refusal, the timeout) leaves the transaction going with the parts
        before it done: ``savepoint`` (set before the first part) undoes
        them, as a refused executemany leaves nothing."""
        deadline = time.monotonic() + timeout
        results: list[Result] = []
        try:
            for part in parts:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise errors.QueryCanceled(
                        f"executemany ran out of its timeout ({timeout:g} s) after {len(results)} "
                        f"of its {len(parts)} parts; none of it is kept")
                results.append(Result._from_wire(
                    self._request(OP_EXECUTEMANY, session, [sql, part], left)))
        except errors.Error as exc:
            if savepoint and exc.sqlstate is None and results:
                try:
                    self._request(OP_EXECUTE, session, [PARTS_UNDO, None], self.timeout)
                except errors.Error as undo_error:  # the original error matters more
                    logger.debug("undoing the parts after %r failed: %s", exc, undo_error)
            raise
        if savepoint:
            self._request(OP_EXECUTE, session, [PARTS_RELEASE, None], self.timeout)
        return parts_total(results)

    def _begin(self, characteristics: list | None, op: int, args: list,
               timeout: float | None) -> tuple[bytes, Result]:
        """Open a transaction whose first statement is ``op`` (OP_EXECUTE or
        OP_EXECUTEMANY) with ``args``, in one round trip: (token, its result).

        ``characteristics`` is ``[isolation_level, read_only, deferrable]``
        (see protocol.ISOLATION_LEVELS) or None for the server's defaults.
        If the statement fails the broker has already rolled back: the
        error is raised and there is no transaction to end."""
        body = [characteristics, op, _pack_body(args)]
        token, payload = self._request(OP_BEGIN, None, body, timeout)
        return token, Result._from_wire(payload)

    def execute(self, sql: str, params: Params = None, *, timeout: float | None = None) -> Result:
        """Run one statement in autocommit and return its result."""
        # _execute's line, not a call to it: one Python frame fewer a request
        return Result._from_wire(self._request(OP_EXECUTE, None, [sql, params], timeout))

    def executemany(self, sql: str, seq_of_params: Iterable[Params], *,
                    timeout: float | None = None) -> Result:
        """Run one statement once per parameter set, atomically."""
        return self._executemany(None, sql, seq_of_params, timeout)

    def batch(self, statements: Iterable[str | tuple[str, Params]], *,
              timeout: float | None = None) -> list[Result]:
        """Run statements atomically in one round trip: all commit or none do.

        Each item is a SQL string or a ``(sql, params)`` pair.  The batch
        holds a server connection only while the database works on it.
        """
        try:
            items = [[s, None] if isinstance(s, str) else [s[0], s[1]] for s in statements]
        except (TypeError, IndexError, KeyError):
            raise errors.InterfaceError("batch takes SQL strings or (sql, params) pairs") from None
        payload = self._request(OP_BATCH, None, [items], timeout)
        return [Result._from_wire(r) for r in payload]

    def transaction(self, *, timeout: float | None = None) -> Transaction:
        """A transaction pinned to one server connection, for this thread.

        Commits when the ``with`` block exits cleanly, rolls back when it
        raises.  The broker rolls it back if this process dies or leaves
        it idle longer than ``idle_transaction_timeout``.
        """
        return Transaction(self, timeout)

    def stream(self, sql: str, params: Params = None, *, chunk_rows: int = DEFAULT_CHUNK_ROWS,
               timeout: float | None = None) -> RowStream:
        """Iterate over the rows of a big result, ``chunk_rows`` at a time.

        The query runs behind a server-side cursor in a transaction pinned
        for the stream's life, so neither the broker nor this process holds
        more than one chunk.  Use it as a context manager (or exhaust it) so
        that the transaction ends promptly; between chunks it is subject to
        ``idle_transaction_timeout`` like any transaction.
        """
        return RowStream(self, sql, params, chunk_rows, timeout)

    def copy(self, sql: str, data: Iterable[Any] | None = None, *,
             timeout: float | None = None) -> Result | CopyOut:
        """Run ``COPY ... FROM STDIN`` with ``data``, or ``COPY ... TO STDOUT``.

        ``data`` is an iterable of ``bytes`` or ``str`` chunks in COPY's own
        format, or of row tuples (formatted as COPY text: None is NULL).
        FROM STDIN returns a Result whose ``rowcount`` is the rows copied; TO
        STDOUT returns an iterator of ``bytes`` chunks (a context manager:
        leaving it early ends the COPY).  Either runs atomically in a
        transaction of its own; inside ``transaction()`` use ``tx.copy``.
        """
        if data is None:
            return CopyOut(self, None, sql, timeout)
        with self.transaction(timeout=timeout) as tx:
            return tx.copy(sql, data, timeout=timeout)

    def stats(self, *, timeout: float | None = None) -> dict[str, Any]:
        """The broker's counters and gauges (see ``broker.stats``)."""
        return self._request(OP_STATS, None, [], timeout)

    def control(self, command: str, *, timeout: float | None = None) -> Any:
        """Send an operator's command (``protocol.CONTROL_COMMANDS``; see
        ``poolbroker ctl``) and return the broker's answer.  Only a process of
        the broker's own uid over ipc, or an operator's CURVE key over tcp, may."""
        return self._request(OP_CONTROL, None, [command], timeout)

    def ping(self, *, timeout: float | None = None) -> None:
        """Raise BrokerUnavailable unless the broker answers."""
        self._request(OP_PING, None, [], timeout)


PARTS_SAVEPOINT = "SAVEPOINT poolbroker_executemany"
PARTS_UNDO = "ROLLBACK TO SAVEPOINT poolbroker_executemany"
PARTS_RELEASE = "RELEASE SAVEPOINT poolbroker_executemany"


def in_parts(params: list[Params]) -> list[list[Params]]:
    """An executemany's parameter sets in parts of at most MAX_STATEMENTS sets
    and MAX_PARAMETERS values."""
    parts: list[list[Params]] = []
    part: list[Params] = []
    values = 0
    for row in params:
        width = len(row) if isinstance(row, (list, tuple, dict)) else 0
        if part and (len(part) == MAX_STATEMENTS or values + width > MAX_PARAMETERS):
            parts.append(part)
            part, values = [], 0
        part.append(row)
        values += width
    parts.append(part)
    return parts


def parts_total(results: list[Result]) -> Result:
    """The result of an executemany sent in parts: its rowcount."""
    counts = [result.rowcount for result in results if result.rowcount >= 0]
    return Result([], [], sum(counts) if counts else -1, [])


def _pack_body(body: Any) -> bytes:
    """``pack(body)``; a value the wire cannot carry is the caller's error
    (as in ``_ThreadSocket.pack``)."""
    try:
        return pack(body)
    except _UNSENDABLE as exc:
        raise _cannot_send(exc) from exc


def _aborts_transaction(exc: errors.Error, first: bool) -> bool:
    """Whether ``exc`` leaves a transaction aborted where the server cannot
    say so: a statement that may have run (the request reached the broker and
    no answer came), after which nothing may commit; or a ``first``
    statement that failed on the server, whose transaction the broker has
    rolled back.  A later statement's failure the server tracks itself
    (ROLLBACK TO SAVEPOINT may recover it, as in psycopg); a request refused
    unrun changed nothing."""
    if isinstance(exc, errors.BrokerUnavailable) and exc.outcome_unknown:
        return True
    return first and exc.sqlstate is not None


def _invalid_endpoint(endpoint: str, why: str) -> errors.InterfaceError:
    return errors.InterfaceError(f"invalid broker endpoint {endpoint!r}: {why} (expected "
                                 "ipc:///path/to/socket, ipc://@name or tcp://host:port)")


def _aborted() -> errors.InternalError:
    """What the server would answer in an aborted transaction, for a
    transaction the client holds aborted (see _aborts_transaction)."""
    return errors.InternalError(
        "current transaction is aborted, commands ignored until end of transaction block "
        "(roll back first)", sqlstate=errors.IN_FAILED_TRANSACTION)


def _cannot_send(exc: Exception) -> errors.InterfaceError:
    return errors.InterfaceError(f"cannot send parameters: {exc}")


def _seconds(name: str, value: Any) -> float:
    """``value`` as a positive, finite number of seconds, else InterfaceError."""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = math.nan
    if not 0 < seconds < math.inf:  # NaN fails too
        raise errors.InterfaceError(f"{name} must be a positive number of seconds, got {value!r}")
    return seconds


def _load_curve_keys(server_key_file: str | None,
                     client_cert_file: str | None) -> tuple[bytes, bytes, bytes] | None:
    """(server public, client public, client secret), or None without CURVE."""
    if not server_key_file and not client_cert_file:
        return None
    if not (server_key_file and client_cert_file):
        raise errors.InterfaceError(
            "CURVE needs both the broker's public certificate (curve_server_key) and "
            "this client's secret certificate (curve_client_cert)")
    import zmq.auth

    try:
        server_public, _ = zmq.auth.load_certificate(server_key_file)
        client_public, client_secret = zmq.auth.load_certificate(client_cert_file)
    except (OSError, ValueError) as exc:
        raise errors.InterfaceError(f"cannot read a CURVE certificate: {exc}") from exc
    if not client_secret:
        raise errors.InterfaceError(f"{client_cert_file} holds no secret key")
    return server_public, client_public, client_secret


class Transaction:
    """A pinned transaction; use as a context manager from one thread.

    Its BEGIN travels with its first statement: one round trip fewer, and
    no server connection held before the first statement is sent (a
    ``with`` block that runs nothing never asks the broker).  So the wait
    for a connection, and a PoolTimeout, come with the first statement."""

    def __init__(self, client: Client, timeout: float | None) -> None:
        self._client = client
        self._timeout = timeout
        self._entered = False
        self._owner = (0, 0)  # (pid, thread) of the socket the transaction belongs to
        self._session: bytes | None = None  # the broker's token, once BEGIN ran
        # Aborted where the server cannot say so (see _aborts_transaction):
        # what comes next fails as in an aborted transaction, the end rolls back.
        self._failed = False

    def __enter__(self) -> Transaction:
        if self._entered:
            raise errors.InterfaceError("the transaction is already open")
        self._entered = True
        self._owner = (os.getpid(), threading.get_ident())
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: Any) -> None:
        session, self._session = self._session, None
        failed, self._entered, self._failed = self._failed, False, False
        if session is None:
            return
        if exc_type is None and not failed:
            self._client._request(OP_COMMIT, session, [], self._timeout)
            return
        try:
            self._client._request(OP_ROLLBACK, session, [], self._timeout)
        except errors.Error as rollback_error:
            # The original exception matters more; the broker rolls back
            # an abandoned transaction by itself.
            logger.debug("rollback after %r failed: %s", exc, rollback_error)

    def _check_usable(self) -> None:
        if not self._entered:
            raise errors.InterfaceError("the transaction is not open: use it inside 'with'")
        if self._session is None and self._owner != (os.getpid(), threading.get_ident()):
            # Its BEGIN would go on this thread's socket, which the broker
            # takes for another client: as it answers once the BEGIN ran.
            raise errors.TransactionExpired(
                "the transaction belongs to the thread (and process) that entered it")
        if self._failed:
            raise _aborted()

    def _live_session(self) -> bytes:
        """The broker's token, after a BEGIN of its own if no statement ran yet."""
        self._check_usable()
        if self._session is None:
            self._session = self._client._request(OP_BEGIN, None, [], self._timeout)
        return self._session

    def _run(self, op: int, args: list, timeout: float | None) -> Result:
        """OP_EXECUTE or OP_EXECUTEMANY; the first one carries the BEGIN."""
        self._check_usable()
        timeout = timeout or self._timeout
        session = self._session
        try:
            if session is not None:
                return Result._from_wire(self._client._request(op, session, args, timeout))
            self._session, result = self._client._begin(None, op, args, timeout)
        except errors.Error as exc:
            if _aborts_transaction(exc, first=session is None):
                self._failed = True
            raise
        return result

    def execute(self, sql: str, params: Params = None, *, timeout: float | None = None) -> Result:
        return self._run(OP_EXECUTE, [sql, params], timeout)

    def executemany(self, sql: str, seq_of_params: Iterable[Params], *,
                    timeout: float | None = None) -> Result:
        params = list(seq_of_params)
        if self._session is None and len(in_parts(params)) == 1:
            return self._run(OP_EXECUTEMANY, [sql, params], timeout)
        with self._aborted_if_unknown():
            return self._client._executemany(self._live_session(), sql, params,
                                             timeout or self._timeout)

    def copy(self, sql: str, data: Iterable[Any] | None = None, *,
             timeout: float | None = None) -> Result | CopyOut:
        """``Client.copy`` inside this transaction."""
        if data is None:
            return CopyOut(self._client, self, sql, timeout or self._timeout)
        session, request = self._live_session(), self._client._request
        first: str | None = sql
        buffer = bytearray()
        with self._aborted_if_unknown():
            for item in data:
                buffer += _copy_chunk(item)
                if len(buffer) >= COPY_CHUNK_BYTES:
                    request(OP_COPY_FROM, session, [first, bytes(buffer), False],
                            timeout or self._timeout)
                    first = None
                    buffer.clear()
            payload = request(OP_COPY_FROM, session, [first, bytes(buffer), True],
                              timeout or self._timeout)
        return Result._from_wire(payload)

    @contextmanager
    def _aborted_if_unknown(self) -> Iterator[None]:
        """Requests after the first that may leave work done unknown to the
        client (see _aborts_transaction)."""
        try:
            yield
        except errors.Error as exc:
            if _aborts_transaction(exc, first=False):
                self._failed = True
            raise


class CopyOut:
    """The output of ``COPY ... TO STDOUT``, as ``bytes`` chunks."""

    def __init__(self, client: Client, transaction: Transaction | None, sql: str,
                 timeout: float | None) -> None:
        self._client = client
        self._transaction = transaction
        self._own: Transaction | None = None  # opened for this COPY alone
        self._sql = sql
        self._timeout = timeout
        self._started = False
        self._done = False

    def __enter__(self) -> CopyOut:
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: Any) -> None:
        self.close(exc_type, exc, tb)

    def close(self, exc_type: type | None = None, exc: BaseException | None = None,
              tb: Any = None) -> None:
        """End the COPY (what was not read is dropped) and its own transaction.

        Inside the caller's transaction the rest is read and dropped: a COPY
        cannot be stopped half way without ending the transaction."""
        own, self._own = self._own, None
        if self._transaction is not None and self._started and not self._done \
                and exc_type is None:
            session = self._transaction._live_session()
            while not self._done:
                _, self._done = self._client._request(
                    OP_COPY_TO, session, [None, COPY_CHUNK_BYTES], self._timeout)
        if own is not None:
            if not self._done and exc_type is None:  # stopped early: nothing to commit
                exc_type, exc = GeneratorExit, GeneratorExit()
            own.__exit__(exc_type, exc, tb)

    def __iter__(self) -> Iterator[bytes]:
        transaction = self._transaction
        if transaction is None:
            transaction = self._own = self._client.transaction(timeout=self._timeout).__enter__()
        session = transaction._live_session()
        sql: str | None = self._sql
        try:
            while not self._done:
                data, self._done = self._client._request(
                    OP_COPY_TO, session, [sql, COPY_CHUNK_BYTES], self._timeout)
                sql, self._started = None, True
                if data:
                    yield data
        except BaseException as exc:
            self.close(type(exc), exc, exc.__traceback__)
            raise
        self.close()


def _copy_chunk(item: Any) -> bytes:
    if isinstance(item, (bytes, bytearray, memoryview)):
        return bytes(item)
    if isinstance(item, str):
        return item.encode()
    if isinstance(item, (tuple, list)):
        return ("\t".join(map(_copy_field, item)) + "\n").encode()
    raise errors.InterfaceError(
        f"copy data items are bytes, str or row tuples, got {type(item).__name__}")


_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def _copy_field(value: Any) -> str:
    """One value in COPY's text format."""
    if value is None:
        return "\\N"
    if isinstance(value, bool):
        return "t" if value else "f"
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "\\\\x" + bytes(value).hex()  # bytea's hex form, its backslash escaped
    if isinstance(value, dict):
        value = json.dumps(value)
    return str(value).translate(_COPY_ESCAPES)


class RowStream:
    """The rows of one query, fetched in chunks from a server-side cursor.

    ``columns`` and ``types`` are set once the first chunk has arrived.  The
    cursor lives in a transaction of its own, pinned for the stream's life;
    with ``within`` (a function that runs a statement in the caller's
    transaction, as a DB-API connection's does) it is declared there
    instead, named ``name``, and the stream leaves that transaction alone.
    """

    _CURSOR = "poolbroker_stream"

    def __init__(self, client: Client, sql: str, params: Params, chunk_rows: int,
                 timeout: float | None, *,
                 within: Callable[[str, Params], Result] | None = None,
                 name: str | None = None) -> None:
        if not isinstance(chunk_rows, int) or chunk_rows < 1:
            raise errors.InterfaceError(f"chunk_rows must be a positive integer, got {chunk_rows!r}")
        self._client = client
        self._sql = sql
        self._params = params
        self._chunk_rows = chunk_rows
        self._timeout = timeout
        self._within = within
        self._cursor = quote_identifier(name) if name is not None else self._CURSOR
        self._execute: Callable[[str, Params], Result] | None = None  # while open
        self._transaction: Transaction | None = None  # its own, without ``within``
        self.columns: list[str] = []
        self.types: list[int] = []

    def __enter__(self) -> RowStream:
        self._open()
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: Any) -> None:
        self._close(exc_type, exc, tb)

    def _open(self) -> None:
        execute = self._within
        if execute is None:
            self._transaction = self._client.transaction(timeout=self._timeout).__enter__()
            execute = self._transaction.execute
        self._execute = execute
        try:
            execute(f"DECLARE {self._cursor} NO SCROLL CURSOR FOR {self._sql}", self._params)
        except BaseException as exc:
            self._close(type(exc), exc, exc.__traceback__)
            raise

    def _fetch(self, count: int | None) -> Result:
        """The next ``count`` rows (with None, all that are left): one round trip."""
        if self._execute is None:
            raise errors.InterfaceError("the stream is closed")
        chunk = self._execute(
            f"FETCH FORWARD {'ALL' if count is None else int(count)} FROM {self._cursor}", None)
        self.columns, self.types = chunk.columns, chunk.types
        if self._transaction is not None and (count is None or len(chunk.rows) < count):
            self._close()  # read to the end: its own transaction ends now, not at close()
        return chunk

    def _close(self, exc_type: type | None = None, exc: BaseException | None = None,
               tb: Any = None) -> None:
        self._execute = None
        transaction, self._transaction = self._transaction, None
        if transaction is not None:
            transaction.__exit__(exc_type, exc, tb)

    def close(self) -> None:
        """End the stream's transaction now (rows not yet read are dropped)."""
        self._close()

    def __iter__(self) -> Iterator[tuple]:
        if self._execute is None:
            self._open()
        try:
            while True:
                chunk = self._fetch(self._chunk_rows)
                yield from chunk.rows
                if len(chunk.rows) < self._chunk_rows:
                    break
        except BaseException as exc:
            self._close(type(exc), exc, exc.__traceback__)
            raise
        self._close()


def _quietly(work: Callable[[], None]) -> None:
    """A finalizer's request: nobody to tell if it fails, and the broker
    ends what it cannot reach its client about."""
    try:
        work()
    except errors.Error as exc:
        logger.debug("a finalizer's request failed: %s", exc)


def quote_identifier(name: str) -> str:
    """``name`` as a quoted SQL identifier."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise errors.ProgrammingError(f"invalid identifier {name!r}")
    return '"' + name.replace('"', '""') + '"'


# One ZeroMQ context per process, shared by every Client and never
# terminated: a context collected while a thread's socket is open would
# block in term() inside whichever thread ran the garbage collector.
_context: zmq.Context | None = None
_context_pid = 0
_context_lock = threading.Lock()

# Contexts and sockets inherited across fork, kept alive so that the
# garbage collector never closes them in the child.
_abandoned: list[Any] = []

_monitor_ids = itertools.count(1)


def _process_context(pid: int) -> zmq.Context:
    global _context, _context_pid
    with _context_lock:
        if _context is None or _context_pid != pid:
            if _context is not None:
                _abandoned.append(_context)
            _context = zmq.Context()
            _context_pid = pid
        return _context


def _after_fork_in_child() -> None:
    global _context_lock
    _context_lock = threading.Lock()
    for client in list(_clients):
        _abandoned.append(client._local)
        client._reset()


os.register_at_fork(after_in_child=_after_fork_in_child)
