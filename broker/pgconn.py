"""One non-blocking server connection: send jobs, read their outcomes.

Every statement the broker runs goes through here, from the loop's thread.
A connection stays in libpq's pipeline mode; each job is appended and
ended by its own Sync, so it commits or fails alone, and several clients'
autocommit jobs can be in flight at once.  A job pipelined behind others
starts with a deadline guard: a statement that fails on the server when
the job's deadline has passed, so what nobody waits for any more is never
run.  Multi-statement texts (the simple query protocol) and COPY leave
pipeline mode for their duration; they only run on a connection with
nothing else in flight.

``read()`` returns an outcome per finished job.  Anything the engine does
not expect (a result it did not ask for, a broken socket) sets ``broken``:
the pool closes the connection, never hands it out again.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterator

import psycopg
from psycopg import adapt, postgres, pq

from client import protocol
from client.protocol import (
    OP_BATCH, OP_BEGIN, OP_COPY_FROM, OP_COPY_TO, OP_EXECUTE, OP_EXECUTEMANY, ErrorKind,
)

from . import replies
from ._psycopg import CHUNKED_ROWS, send_sync
from .prepared import PreparedCache
from .requests import Job, Query, Refusal

logger = logging.getLogger("poolbroker.pgconn")

STREAM_CHUNK_ROWS = 1000
"""Rows read from the server at a time, so a result over max_result_bytes
is stopped after at most one chunk more than the limit."""

BUFFERS_KEPT = 8 * 1024 * 1024
"""libpq's buffers grow to the most bytes in flight at once and never shrink:
a connection that carried more than this in one go is closed once drained
(and reopened on demand), so the memory of a burst goes back with it."""
BULKY = "its libpq buffers grew past BUFFERS_KEPT"
"""``PgConn.retiring``: why a connection that carried a burst is closed once drained."""

COPY_PIECE_BYTES = 256 * 1024
"""COPY FROM data is handed to libpq this much at a time, each piece once
the one before has been sent: however large a client's chunk, libpq's
output buffer stays about this size."""

RESULT_TOO_LARGE = "54000"  # program_limit_exceeded
DEADLINE_PASSED = "22012"  # what the guard raises: division_by_zero
GUARD = Query(b"SELECT 1 / (extract(epoch FROM clock_timestamp()) < $1)::int", None, (701,), None)
"""Fails (1/0) once the server's clock passes $1: the statements after it in the
same job are then skipped.  701: float8."""

REPORTED_PARAMETERS = (
    b"application_name", b"client_encoding", b"DateStyle", b"default_transaction_read_only",
    b"in_hot_standby", b"integer_datetimes", b"IntervalStyle", b"is_superuser",
    b"search_path", b"server_encoding", b"session_authorization",
    b"standard_conforming_strings", b"TimeZone",
)
"""The settings PostgreSQL reports to the client when they change (GUC_REPORT):
the part of session state no parser can miss, even when a function sets it."""
DATA_EXCEPTION = "22000"
FEATURE_NOT_SUPPORTED = "0A000"
LOADER_SETTINGS = (b"TimeZone", b"DateStyle", b"IntervalStyle")
"""Reported settings psycopg's loaders read when they are made."""
_LOADED_BY_SETTINGS = frozenset(
    oid for name in ("date", "time", "timetz", "timestamp", "timestamptz", "interval")
    for oid in (postgres.types.get(name).oid, postgres.types.get(name).array_oid))
"""Column types whose loaders depend on LOADER_SETTINGS (their arrays too)."""

_STALE_PREPARED = frozenset(("26000", "0A000"))  # gone; result type changed
_ROWS = frozenset((pq.ExecStatus.TUPLES_OK, pq.ExecStatus.TUPLES_CHUNK,
                   pq.ExecStatus.SINGLE_TUPLE))
_DONE = frozenset((pq.ExecStatus.TUPLES_OK, pq.ExecStatus.COMMAND_OK,
                   pq.ExecStatus.EMPTY_QUERY, pq.ExecStatus.FATAL_ERROR))
_COPY = frozenset((pq.ExecStatus.COPY_IN, pq.ExecStatus.COPY_OUT, pq.ExecStatus.COPY_BOTH))
_PIPELINE_SYNC, _PIPELINE_ABORTED = pq.ExecStatus.PIPELINE_SYNC, pq.ExecStatus.PIPELINE_ABORTED
_CONNECTION_OK = pq.ConnStatus.OK
# Plain module names for what each result is tested against: Python 3.11
# finds an enum's member through EnumType's __getattr__ hook, ~4x a plain
# attribute.
_TUPLES_OK, _COMMAND_OK = pq.ExecStatus.TUPLES_OK, pq.ExecStatus.COMMAND_OK
_FATAL_ERROR, _EMPTY_QUERY = pq.ExecStatus.FATAL_ERROR, pq.ExecStatus.EMPTY_QUERY
_NO_ROWS: list[bytes] = []
_NO_RESULTS: list = []


def _load_error(exc: Exception) -> Refusal:
    """The statement's error for a value psycopg could not load.  With a
    SQLSTATE (psycopg's own has none): a transaction's first statement
    failing so must leave the transaction aborted, not taken for unrun
    (the broker rolls back a failed first statement)."""
    message = str(exc).strip() or type(exc).__name__
    if isinstance(exc, NotImplementedError):
        return Refusal(ErrorKind.NOT_SUPPORTED, f"cannot load a value of the result: {message}",
                       FEATURE_NOT_SUPPORTED)
    return Refusal(ErrorKind.DATA, message, DATA_EXCEPTION)


@dataclass(slots=True)
class _Result:
    """One statement's result, as it arrives: rows are packed at once."""

    columns: list[str] | None = None
    types: list[int] | None = None  # the columns' type OIDs
    packed: list[bytes] = field(default_factory=list)
    count: int = 0
    rowcount: int = -1


@dataclass(slots=True)
class _Prepare:
    """A PREPARE sent in the same round trip as the statement's first run by name."""

    key: tuple
    name: bytes
    generation: int


class _Guard:
    """The deadline guard's result."""


_GUARD_STEP = _Guard()


@dataclass(slots=True)
class _Run:
    """A job on the wire: its steps (one result stream each), then a Sync."""

    job: Job | None  # None: the broker's own DEALLOCATE ALL
    steps: list = field(default_factory=list)
    current: int = 0
    by_name: bool = False  # ran a statement prepared earlier
    size: int = 0
    error: Exception | None = None
    simple: bool = False  # outside pipeline mode: results end with NULL, not a Sync
    copy_data: list[bytes] = field(default_factory=list)  # COPY TO: read, not yet sent
    copy_in: bool = False
    copy_sent: int = 0  # COPY FROM: bytes of the current chunk handed to libpq


Outcome = tuple[Job, bool, bytes]
"""(job, ok, reply): reply is empty for internal jobs."""


def _packed(result: _Result, more: list[_Result] = _NO_RESULTS) -> bytes:
    return protocol.pack_result(result.columns, result.packed, result.count, result.rowcount,
                                result.types, [_packed(r) for r in more])


def _payload(op: int, results: list[_Result], run: _Run) -> bytes:
    """The packed answer of ``op`` from its statements' results."""
    if op == OP_EXECUTE or op == OP_BATCH:
        if run.simple:  # one text, several statements: the first, then the others
            packed = [_packed(results[0], results[1:])]
        else:
            packed = [_packed(r) for r in results]
        return protocol.pack_list(packed) if op == OP_BATCH else packed[0]
    if op == OP_EXECUTEMANY or op == OP_COPY_FROM:
        rowcount = sum(r.rowcount for r in results if r.rowcount > 0)
        return protocol.pack_result(None, _NO_ROWS, 0, rowcount)
    if op == OP_COPY_TO:
        return protocol.pack([b"".join(run.copy_data), True])
    return protocol.pack(None)  # COMMIT, ROLLBACK


class PgConn:
    """One psycopg connection driven through libpq's non-blocking calls."""

    def __init__(self, conn_id: int, *, result_limit: int, chunked: bool) -> None:
        self.conn_id = conn_id
        self.state = "opening"  # owned by the pool: see pool.State
        self.pool: Any = None  # the pool.Pool it belongs to
        self.broken = ""  # why it must be closed, once it must
        self.dirty = False  # session state changed: DISCARD ALL before reuse
        # When the job at the head got there; with nothing in flight, since
        # when the connection has been idle (its last job ended, or it opened).
        self.head_since = 0.0
        self.slow_in_flight = 0  # jobs in flight not known to be quick
        self.expected_in_flight = 0.0  # server seconds the jobs in flight took lately, summed
        self.clock_offset = 0.0  # the server's clock minus ours, measured at connect
        self.sending = False  # libpq holds output the kernel has not taken yet
        self.polled = 0  # owned by the loop: the poll events its socket is registered for
        self.retiring = ""  # why it is closed once drained (BULKY, its age); "": it stays
        self.expires_at = float("inf")  # monotonic: retire it from then on (max_lifetime)
        self.opened_at = 0.0  # monotonic
        # Its lifetime's share of max_lifetime (the jitter), kept so that a
        # reload changing max_lifetime moves expires_at the same way.
        self.lifetime_share = 1.0
        self._sent_bytes = 0  # request bytes sent since the pipeline was last empty
        self.prepared = PreparedCache()
        self._conn: psycopg.Connection | None = None
        self._pgconn: pq.PGconn | None = None
        self._transformer: adapt.Transformer | None = None
        self._result_limit = result_limit
        self._chunked = chunked and CHUNKED_ROWS
        self._pipeline: deque[_Run] = deque()
        self._copy: _Run | None = None  # a COPY between two of its requests
        self._baseline: tuple = ()
        # A cancel runs on its own thread; the lock keeps it from reaching
        # the server once the statement it was meant for has left the head.
        self._head_lock = threading.Lock()
        self._head: Job | None = None
        self._cancel_in_doubt = False  # a cancel may still land on whatever runs next
        self._cancels_started = 0
        self._cancels_finished = 0

    # Life

    def attach(self, conn: psycopg.Connection, clock_offset: float, now: float) -> None:
        """Take over a connection opened (off the loop) by the pool; idle from ``now``."""
        self._conn = conn
        self._pgconn = conn.pgconn
        self._pgconn.nonblocking = 1
        self._pgconn.enter_pipeline_mode()
        self._transformer = adapt.Transformer(conn)
        self._loader_settings = self.reported_parameters(LOADER_SETTINGS)
        self._baseline = self.reported_parameters()
        self.clock_offset = clock_offset
        self.head_since = now

    def close(self) -> socket.socket | None:
        """Close the connection.  Returns our end of its socket, shut for
        writing, while the server may still hold the backend: the server
        closes its end only once the backend has exited and left its slot
        (PostgreSQL closes the socket after releasing the backend's shared
        state), which is when the slot may be given to another connection."""
        conn = self._conn
        if conn is None or conn.closed:
            return None
        try:
            fd = os.dup(self._pgconn.socket)
        except (OSError, psycopg.Error):
            fd = -1  # libpq dropped the socket already: the server hung up
        conn.close()  # sends Terminate; the duplicate keeps the socket open
        if fd < 0:
            return None
        try:
            held = socket.socket(fileno=fd)
        except OSError:
            os.close(fd)
            return None
        try:
            held.setblocking(False)
            # EOF for the server, should libpq have failed to send Terminate.
            held.shutdown(socket.SHUT_WR)
        except OSError:  # reset by the server: nothing left to wait for
            held.close()
            return None
        return held

    def fileno(self) -> int:
        return self._pgconn.socket

    @property
    def in_flight(self) -> int:
        """Jobs sent whose outcome is not known yet."""
        return len(self._pipeline)

    @property
    def head(self) -> Job | None:
        return self._head

    @property
    def copying(self) -> bool:
        """A COPY is open between two of its requests."""
        return self._copy is not None

    @property
    def transaction_status(self) -> pq.TransactionStatus:
        return self._pgconn.transaction_status

    def reported_parameters(self, names: tuple[bytes, ...] = REPORTED_PARAMETERS) -> tuple:
        return tuple(map(self._pgconn.parameter_status, names))

    def _transformer_for(self, types: list[int]) -> adapt.Transformer:
        """The transformer to load a result of ``types`` with: psycopg's
        loaders of dates and times read the session's TimeZone, DateStyle or
        IntervalStyle when they are made, and the transformer keeps them, so
        it is made again once one of those changed (a client's SET LOCAL)."""
        if not _LOADED_BY_SETTINGS.isdisjoint(types):
            settings = self.reported_parameters(LOADER_SETTINGS)
            if settings != self._loader_settings:
                self._transformer = adapt.Transformer(self._conn)
                self._loader_settings = settings
        return self._transformer

    def session_changed(self) -> bool:
        """A reported setting differs from what the connection started with."""
        return self.reported_parameters() != self._baseline

    # Sending

    def send(self, job: Job, wall_deadline: float | None = None) -> list[Outcome]:
        """Append ``job``; outcomes known at once (a COPY chunk taken).  With
        ``wall_deadline`` (the server's clock), a guard first skips the job
        if it starts too late.  Raises psycopg.Error if the connection broke
        while sending (``fail_all`` then has the outcomes)."""
        pgconn = self._pgconn
        if job.op == OP_COPY_FROM or job.op == OP_COPY_TO:
            return self._send_copy(pgconn, job)
        run = _Run(job)
        if not self._pipeline:
            self._set_head(job)
        self._pipeline.append(run)
        self._sent_bytes += job.size
        self.expected_in_flight += job.expected
        if not job.expected_fast:
            self.slow_in_flight += 1
        if job.simple is not None:  # several statements: the simple query protocol
            run.simple = True
            pgconn.exit_pipeline_mode()
            if job.op == OP_BEGIN:  # the broker's BEGIN leads, as its own first statement
                pgconn.send_query(b"%s; %s" % (job.queries[0].sql, job.simple))
            else:
                pgconn.send_query(job.simple)
            run.steps.append(_Result())
            self._read_in_chunks(pgconn)
            return []
        if wall_deadline is not None:
            job.guard_at = wall_deadline
            guard = Query(GUARD.sql, [b"%.6f" % wall_deadline], GUARD.types, None)
            self._send_query(pgconn, run, guard, _GUARD_STEP)
        for query in job.queries:
            self._send_query(pgconn, run, query, _Result())
        send_sync(pgconn)
        if len(self._pipeline) == 1:
            self._read_head_in_chunks(run)
        return []

    def jobs(self) -> Iterator[Job]:
        """The clients' jobs sent and not yet ended, oldest first."""
        return (run.job for run in self._pipeline if run.job is not None)

    def guarded_past(self, deadline: float) -> list[Job]:
        """Jobs behind the head, guarded, whose deadline is before ``deadline``:
        the server has not started them, and will refuse to once its clock
        passes their guard."""
        return [run.job for run in list(self._pipeline)[1:]
                if run.job is not None and run.job.guard_at and not run.job.answered
                and run.job.deadline < deadline]

    def forget_prepared(self, *, at_once: bool) -> None:
        """Drop the prepared statements: ``at_once`` by a ``DEALLOCATE ALL``
        sent now, else by the reset (``DISCARD ALL``) once the connection is
        drained, for a transaction that must not be touched."""
        if self.prepared.empty:
            return
        self.prepared.forget()
        if at_once:
            self.send_internal(b"DEALLOCATE ALL")
        else:
            self.dirty = True

    def send_internal(self, sql: bytes) -> None:
        """A statement of the broker's own (DEALLOCATE ALL), with its Sync; no outcome."""
        run = _Run(None, [_Result()])
        if not self._pipeline:
            self._set_head(None)
        self._pipeline.append(run)
        self._pgconn.send_query_params(sql, None)
        send_sync(self._pgconn)

    def _send_query(self, pgconn: pq.PGconn, run: _Run, query: Query,
                    step: _Result | _Guard) -> None:
        if query.params is not None:
            key = query.key
            prepared = self.prepared
            name = prepared.name(key)
            if name is None and (name := prepared.name_to_prepare(key)) is not None:
                run.steps.append(_Prepare(key, name, prepared.generation))
                pgconn.send_prepare(name, query.sql, param_types=query.types)
            elif name is not None:
                run.by_name = True
            if name is not None:
                pgconn.send_query_prepared(name, query.params, param_formats=query.formats)
                run.steps.append(step)
                return
        pgconn.send_query_params(query.sql, query.params, param_formats=query.formats,
                                 param_types=query.types)
        run.steps.append(step)

    def flush(self) -> None:
        """Send what libpq buffered, as much as the kernel takes now; while
        ``sending``, the loop also waits for the socket to be writable."""
        try:
            self.sending = self._pgconn.flush() == 1
        except psycopg.Error as exc:
            self.broken = f"sending failed: {exc}"

    # Reading

    def read(self, now: float) -> list[Outcome]:
        """Take what the server sent; an outcome for each job it ended."""
        pgconn = self._pgconn
        ended: list[Outcome] = []
        try:
            if self._copy is not None:
                return self._read_copy(pgconn, now)
            pgconn.consume_input()
            pipeline = self._pipeline
            while pipeline and not pgconn.is_busy():
                run = pipeline[0]
                result = pgconn.get_result()
                if result is None:
                    if run.simple:
                        self._end_run(run, now, ended)
                        pgconn.enter_pipeline_mode()
                    else:
                        run.current += 1  # the end of one step's results
                        self._read_head_in_chunks(run)
                    continue
                # Read once: each read of it makes an enum member in Python code.
                status = result.status
                if status == _PIPELINE_SYNC:
                    self._end_run(run, now, ended)
                elif status in _COPY:
                    if run.job is not None and run.job.op in (OP_COPY_FROM, OP_COPY_TO):
                        return ended + self._start_copy(pgconn, run, result, now)
                    self.broken = f"unexpected {status.name} result"
                    raise psycopg.OperationalError(self.broken)
                elif status != _PIPELINE_ABORTED:
                    self._take(run, result, status)
            if not pipeline and pgconn.status != _CONNECTION_OK:
                self.broken = "the server closed the connection"
        except psycopg.Error as exc:
            ended.extend(self.fail_all(exc))
        return ended

    def _take(self, run: _Run, result: pq.PGresult, status: pq.ExecStatus) -> None:
        if run.current >= len(run.steps):
            if not run.simple:
                self.broken = "a result nobody asked for"
                raise psycopg.OperationalError(self.broken)
            run.steps.append(_Result())  # the simple protocol: the next statement's
        step = run.steps[run.current]
        if type(step) is _Result:
            self._take_result(run, step, result, status)
            if run.simple and status in _DONE:
                run.current += 1
        elif type(step) is _Prepare:
            ok = status == pq.ExecStatus.COMMAND_OK
            self.prepared.settled(step.key, step.name, step.generation, ok)
            if not ok and run.error is None and status == pq.ExecStatus.FATAL_ERROR:
                run.error = psycopg.errors.error_from_result(result, encoding="utf-8")
        elif status == pq.ExecStatus.FATAL_ERROR and run.error is None:  # the guard
            error = psycopg.errors.error_from_result(result, encoding="utf-8")
            run.error = error if error.sqlstate != DEADLINE_PASSED else Refusal(
                ErrorKind.POOL_TIMEOUT,
                "the request's deadline passed before the server could start it "
                "(it was queued behind other statements); the statement was not run")

    def _take_result(self, run: _Run, into: _Result, result: pq.PGresult,
                     status: pq.ExecStatus) -> None:
        if status in _ROWS:
            first = into.columns is None
            rows = result.ntuples
            if first:
                fields = range(result.nfields)
                into.columns = [result.fname(i).decode() for i in fields]
                into.types = [result.ftype(i) for i in fields]
            if rows and run.error is None:
                # Loaders are chosen once per statement, by its first rows;
                # the empty result that ends a chunked read needs none.
                if into.count:
                    tx = self._transformer  # the loaders of the statement's first rows
                    tx.set_pgresult(result, set_loaders=False)
                else:
                    tx = self._transformer_for(into.types)
                    tx.set_pgresult(result, set_loaders=True)
                try:
                    loaded = tx.load_rows(0, rows, tuple)
                except Exception as exc:  # noqa: BLE001 - whatever psycopg's loaders raise
                    # A value Python cannot hold ('infinity'::date, '24:00'::time)
                    # or a style psycopg cannot parse (IntervalStyle sql_standard):
                    # the statement's error, as psycopg raises it at fetch; the
                    # server is fine, so is the connection and the rest of its
                    # pipeline.  Later chunks of the result are read, not loaded.
                    run.error = _load_error(exc)
                    return
                packed = protocol.pack_rows(loaded)
                into.packed.append(packed)
                into.count += rows
                run.size += len(packed)
                if self._result_limit and run.size > self._result_limit:
                    run.error = self._too_large(run.size)
                    self.cancel(run.job)
            if status == _TUPLES_OK:
                into.rowcount = into.count
        elif status == _COMMAND_OK:
            tuples = result.command_tuples
            into.rowcount = -1 if tuples is None else tuples
        elif status == _FATAL_ERROR:
            if run.error is None:
                run.error = psycopg.errors.error_from_result(result, encoding="utf-8")
        elif status != _EMPTY_QUERY:
            self.broken = f"unexpected {status.name} result"
            raise psycopg.OperationalError(self.broken)

    def _end_run(self, run: _Run, now: float, ended: list[Outcome]) -> None:
        pipeline = self._pipeline
        pipeline.popleft()
        job = run.job
        if run.size > BUFFERS_KEPT:
            self.retiring = self.retiring or BULKY
        if job is not None:
            # Not below 0: a job sent in this turn has a head_since later than
            # the turn's ``now`` when a read in the same turn ends it.
            job.ran_for = max(now - self.head_since, 0.0)
            self.expected_in_flight -= job.expected
            if not job.expected_fast:
                self.slow_in_flight -= 1
            if run.error is None or not self._rerun(run):
                ended.append((job, *self._reply(run)))
        if pipeline:
            self._set_head(pipeline[0].job, now)
            self._read_head_in_chunks(pipeline[0])
        else:
            self._set_head(None, now)
            self.expected_in_flight = 0.0  # no drift from adding and taking floats
            if self._cancels_finished == self._cancels_started:
                self._cancel_in_doubt = False
            if self._sent_bytes > BUFFERS_KEPT:
                self.retiring = self.retiring or BULKY
            self._sent_bytes = 0

    def _rerun(self, run: _Run) -> bool:
        """Send the job again if it failed for a reason that left nothing done.

        - A prepared statement whose table changed shape fails before it runs
          (0A000, "cached plan must not change result type"); the server's
          statements are dropped (DEALLOCATE ALL), the cache starts afresh.
        - A cancel meant for the job ahead of it hit it instead (57014 with
          no cancel of its own): its implicit transaction was rolled back.
        Never inside a transaction, and at most once."""
        job, error = run.job, run.error
        if not isinstance(error, psycopg.Error):
            return False
        if error.sqlstate in _STALE_PREPARED:
            self.forget_prepared(at_once=not job.in_session)  # an aborted transaction can't
            if not run.by_name:
                return False
        elif not (isinstance(error, psycopg.errors.QueryCanceled)
                  and self._cancel_in_doubt and not job.cancel_sent):
            return False
        if job.rerun or job.in_session or not job.shareable:
            return False
        job.rerun = True
        self.expected_in_flight += job.expected
        if not job.expected_fast:
            self.slow_in_flight += 1
        self.send(job, job.guard_at or None)  # its client may have been told it will not run
        return True

    def _reply(self, run: _Run) -> tuple[bool, bytes]:
        """(ok, reply) for a job whose results are all in."""
        job = run.job
        if not job.routing_id:
            return run.error is None, b""
        if run.error is None:
            results = [r for r in run.steps if type(r) is _Result]
            if job.op == OP_BEGIN:  # its first step is the BEGIN's own result
                token = protocol.pack(job.session)
                payload = token if not job.first_op else protocol.pack_list(
                    [token, _payload(job.first_op, results[1:], run)])
            else:
                payload = _payload(job.op, results, run)
            reply = replies.ok_packed(job.request_id, payload)
            if not self._result_limit or len(reply) <= self._result_limit:
                return True, reply
            run.error = self._too_large(len(reply))
        payload = replies.from_exception(run.error, protocol.OP_NAMES.get(job.op, "job"))
        if isinstance(run.error, psycopg.errors.QueryCanceled) and job.cancel_reason:
            payload["message"] = job.cancel_reason
        return False, replies.error(job.request_id, payload)

    def fail_all(self, exc: Exception) -> list[Outcome]:
        """The connection is unusable: every job in flight fails."""
        self.broken = self.broken or f"lost: {str(exc).strip()}"
        if isinstance(exc, psycopg.Error) and not exc.sqlstate:  # libpq's own report
            exc = Refusal(ErrorKind.OPERATIONAL, "the server connection was lost while "
                          f"the statement was in flight: {str(exc).strip()}", "08006")
        outcomes = []
        runs = list(self._pipeline)
        if self._copy is not None and self._copy.job is not None:
            runs.append(self._copy)
        self._pipeline.clear()
        self._copy = None
        for run in runs:
            if run.job is not None:
                run.error = run.error or exc
                outcomes.append((run.job, *self._reply(run)))
        self._set_head(None)
        return outcomes

    # COPY: outside pipeline mode, one request per chunk, nothing read ahead

    def _send_copy(self, pgconn: pq.PGconn, job: Job) -> list[Outcome]:
        if job.queries:  # the first request: start the COPY
            run = _Run(job, [_Result()], simple=True)
            self._pipeline.append(run)
            self._set_head(job)
            pgconn.exit_pipeline_mode()
            pgconn.send_query(job.queries[0].sql)
            return []
        run = self._copy
        if run is None or (job.op == OP_COPY_FROM) != run.copy_in:
            raise Refusal(ErrorKind.PROGRAMMING, "no such COPY is open in this transaction")
        run.job = job
        self._set_head(job)
        if job.op == OP_COPY_FROM:
            return self._put_copy(pgconn, run, job)
        return self._read_copy(pgconn, time.monotonic())

    def _put_copy(self, pgconn: pq.PGconn, run: _Run, job: Job) -> list[Outcome]:
        """Hand a chunk to libpq a piece at a time, each once the one before
        has left for the server; the chunk is answered once all of it has.
        Until then its client waits to send the next: COPY data comes no
        faster than the server reads it, and libpq (whose buffer grows to
        whatever it is given, and never shrinks) holds a piece or two."""
        data = job.copy_data
        try:
            while run.copy_sent < len(data):
                if self.sending:
                    return []  # the loop calls again once the socket takes more
                piece = data[run.copy_sent:run.copy_sent + COPY_PIECE_BYTES]
                if not pgconn.put_copy_data(piece):
                    self.broken = "libpq could not queue COPY data"
                    raise psycopg.OperationalError(self.broken)
                run.copy_sent += len(piece)
                self.flush()
                if self.broken:
                    raise psycopg.OperationalError(self.broken)
            if job.copy_end:
                pgconn.put_copy_end()
        except psycopg.Error:
            if pgconn.status != pq.ConnStatus.OK or self.broken:
                raise
            job.copy_end = True  # the server refused the data: its error follows
        self.flush()
        run.copy_sent = 0
        if job.copy_end:
            self._copy = None
            self._pipeline.append(run)  # now wait for the COPY's result
            return []
        if self.sending:  # the last piece is still in libpq: answered once it left
            run.copy_sent = len(data)
            return []
        run.job = None
        self._set_head(None)
        return [(job, True, replies.ok(job.request_id, None))]

    def _start_copy(self, pgconn: pq.PGconn, run: _Run, result: pq.PGresult,
                    now: float) -> list[Outcome]:
        self._pipeline.popleft()
        self._copy = run
        run.copy_in = result.status == pq.ExecStatus.COPY_IN
        job = run.job
        if run.copy_in != (job.op == OP_COPY_FROM) or result.status == pq.ExecStatus.COPY_BOTH:
            self.broken = f"{result.status.name} started by {protocol.OP_NAMES[job.op]}"
            raise psycopg.OperationalError(self.broken)
        if run.copy_in:
            return self._put_copy(pgconn, run, job)
        return self._read_copy(pgconn, now)

    def _read_copy(self, pgconn: pq.PGconn, now: float) -> list[Outcome]:
        """COPY FROM: go on with a chunk not all handed to libpq.  COPY TO:
        read data while a request for it is open."""
        run = self._copy
        job = run.job
        if run.copy_in:
            pgconn.consume_input()  # an error, say; it is read at the end
            if job is None:
                return []
            self.flush()  # the socket may take more of a chunk now
            return self._put_copy(pgconn, run, job)
        if job is None:
            return []  # COPY TO paused: the loop stops watching the socket
        size = sum(map(len, run.copy_data))
        # The client's chunk size, within max_result_bytes (with room for the
        # row that crosses it): a chunk is never read whole before refusing it.
        limit = min(job.copy_max, self._result_limit // 2) if self._result_limit else job.copy_max
        while size < limit:
            nbytes, data = pgconn.get_copy_data(1)
            if nbytes == 0:
                pgconn.consume_input()
                nbytes, data = pgconn.get_copy_data(1)
                if nbytes == 0:
                    return []  # more later
            if nbytes < 0:  # the end: the COPY's own result follows
                self._copy = None
                self._pipeline.append(run)
                return self.read(now)
            run.copy_data.append(bytes(data))
            size += nbytes
        payload = [b"".join(run.copy_data), False]
        run.copy_data = []
        run.job = None
        self._set_head(None)
        return [(job, True, replies.ok(job.request_id, payload))]

    @property
    def wants_output(self) -> bool:
        """Whether the loop should wait for room to write: libpq holds output,
        or a COPY FROM chunk is not all handed to it yet (see _put_copy)."""
        return self.sending or (self._copy is not None and self._copy.copy_in
                                and self._copy.job is not None)

    @property
    def wants_input(self) -> bool:
        """Whether the loop should watch the socket (not while a COPY TO waits
        for its client: the server then waits, and nothing piles up here)."""
        return self._copy is None or self._copy.copy_in or self._copy.job is not None

    # Cancels and chunks

    def cancel(self, job: Job | None) -> None:
        """Cancel ``job`` on the server if it is still the one at the head."""
        if job is None or self._conn is None:
            return
        job.cancel_sent = True
        self._cancel_in_doubt = True
        self._cancels_started += 1
        conn = self._conn

        def cancel() -> None:
            with self._head_lock:
                try:
                    if self._head is job and not conn.closed:
                        # Returns once the server has signalled the backend; a
                        # backend idle by then ignores the signal.
                        conn.cancel_safe(timeout=5.0)
                except psycopg.Error as exc:
                    logger.warning("cancel on connection %d failed: %s", self.conn_id, exc)
                finally:
                    self._cancels_finished += 1
        threading.Thread(target=cancel, name="poolbroker-cancel", daemon=True).start()

    def _set_head(self, job: Job | None, now: float | None = None) -> None:
        if self._cancels_finished == self._cancels_started:
            self._head = job  # no cancel thread can be looking: no lock needed
        else:
            with self._head_lock:
                self._head = job
        self.head_since = time.monotonic() if now is None else now

    def _read_head_in_chunks(self, run: _Run) -> None:
        # libpq takes the chunked mode only for the query at the pipeline's
        # head, before its first result is read.
        if self._chunked and run.current < len(run.steps) and \
                type(run.steps[run.current]) is _Result:
            self._read_in_chunks(self._pgconn)

    def _read_in_chunks(self, pgconn: pq.PGconn) -> None:
        if self._chunked:
            try:
                pgconn.set_chunked_rows_mode(STREAM_CHUNK_ROWS)
            except psycopg.OperationalError:
                pass  # read whole; the size is still checked

    def _too_large(self, size: int) -> Refusal:
        return Refusal(
            ErrorKind.RESULT_TOO_LARGE,
            f"the result exceeds max_result_bytes ({self._result_limit} bytes; "
            f"{size} read before stopping); the statement was cancelled: fetch it in "
            "pieces with client.stream()", RESULT_TOO_LARGE)
