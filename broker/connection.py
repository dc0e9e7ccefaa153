"""One server connection, and the two ways statements run on it.

Direct: the loop appends plain statements and batches to the
connection's libpq pipeline, each job ended by its own Sync, and reads
the results when the socket is readable (the hot path, no thread
hand-off; several clients' jobs may be in flight at once).  Threaded:
for everything else the loop hands a job to the connection's thread,
which runs it with psycopg, packs the reply and pushes a completion event
back.  Connecting happens on that thread too, off the loop.  Never both
at once: the loop only sends directly while the thread waits for a job.
"""

from __future__ import annotations

import ctypes
import logging
import queue
import select
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import psycopg
import zmq
from psycopg import adapt, pq
from psycopg._queries import PostgresQuery  # psycopg's placeholder conversion, as execute() does it
from psycopg.adapt import AdaptersMap
from psycopg.types.json import JsonbDumper
from psycopg.types.string import TextLoader

from client import protocol
from client.protocol import (
    OP_BATCH, OP_BEGIN, OP_COMMIT, OP_EXECUTE, OP_EXECUTEMANY, OP_ROLLBACK,
    DIAG_FIELDS, STATUS_ERROR, STATUS_OK, error_payload,
)

from .config import Settings
from .redact import Redactor
from .sqlscan import Kind, classify, single_statement

logger = logging.getLogger("poolbroker.connection")

# Completion events pushed to the loop: [conn_id, event, routing_id, reply]
EV_READY = b"R"  # connected, idle
EV_CONNECT_FAILED = b"F"  # reply frame: the error message (utf-8)
EV_DONE = b"D"  # job finished, connection healthy and idle
EV_FAILED = b"E"  # job answered with an error, connection healthy and idle
EV_BROKEN = b"B"  # job finished (or not), connection is gone
EV_REQUEUE = b"Q"  # connection found dead before the job ran: run it elsewhere

OP_RESET = -1  # internal: end whatever transaction is open, no reply

STREAM_CHUNK_ROWS = 1000
"""Rows read from the server at a time, so a result over max_result_bytes
is stopped after at most one chunk more than the limit."""

RESULT_TOO_LARGE = "54000"  # program_limit_exceeded

_CHUNKED_ROWS = pq.version() >= 170000  # PQsetChunkedRowsMode


def _libpq_send_pipeline_sync() -> Any:
    """libpq 17's PQsendPipelineSync, which psycopg does not wrap: a Sync
    that is not flushed at once, so the loop sends all it queued on a
    connection in one write.  None where it is missing (pipeline_sync then
    flushes after every job)."""
    if pq.version() < 170000:
        return None
    try:
        with open("/proc/self/maps") as maps:  # the libpq psycopg loaded, bundled or not
            paths = {line.split()[-1] for line in maps if "/libpq" in line}
        for path in paths:
            function = getattr(ctypes.CDLL(path), "PQsendPipelineSync", None)
            if function is not None:
                function.argtypes = [ctypes.c_void_p]
                function.restype = ctypes.c_int
                return function
    except OSError:
        pass
    return None


_SEND_PIPELINE_SYNC = _libpq_send_pipeline_sync()

PREPARE_THRESHOLD = 2
"""Runs of the same query on a connection before the loop prepares it there:
parse and plan once (measured: a primary-key lookup 137 -> 110 us)."""
MAX_PREPARED = 1000
"""Statements prepared per connection; beyond it queries run unprepared."""
_STALE_PREPARED = frozenset(("26000", "0A000"))  # gone; result type changed
_ROW_STATUSES = frozenset((pq.ExecStatus.TUPLES_OK, pq.ExecStatus.TUPLES_CHUNK,
                           pq.ExecStatus.SINGLE_TUPLE))

ENDING_OPS = frozenset((OP_COMMIT, OP_ROLLBACK, OP_RESET))
"""Operations after which a pinned connection goes back to the pool."""

_DBAPI_NAMES = (
    "QueryCanceled", "IntegrityError", "ProgrammingError", "DataError",
    "OperationalError", "InternalError", "NotSupportedError", "InterfaceError",
    "DatabaseError",
)

# Types msgpack does not carry come back as PostgreSQL's text form.
_TEXT_TYPES = (
    "inet", "cidr", "macaddr", "macaddr8",
    "int4range", "int8range", "numrange", "daterange", "tsrange", "tstzrange",
    "int4multirange", "int8multirange", "nummultirange", "datemultirange",
    "tsmultirange", "tstzmultirange",
)


class _WireJsonDumper(JsonbDumper):
    """Binds ``client.Json`` parameters as jsonb."""

    def dump(self, obj: Any) -> bytes:
        return super().dump(obj.obj)


def build_adapters() -> AdaptersMap:
    """The adapters every server connection uses; built once at start-up."""
    adapters = AdaptersMap(psycopg.adapters)
    adapters.register_dumper(dict, JsonbDumper)
    adapters.register_dumper(protocol.Json, _WireJsonDumper)
    for name in _TEXT_TYPES:
        adapters.register_loader(name, TextLoader)
    return adapters


@dataclass(slots=True)
class Job:
    op: int
    routing_id: bytes
    request_id: int
    body: bytes
    in_session: bool = False
    session: bytes | None = None
    deadline: float = 0.0
    queued_at: float = 0.0
    owner_pid: int = 0
    cancel_at: float = 0.0  # when the loop cancels it on the server
    cancel_reason: str = ""  # why, when it is not the client's own timeout
    direct: bool = False  # run by the loop itself (see ServerConnection.send_direct)
    shareable: bool = False  # may be pipelined behind other clients' jobs
    cancel_sent: bool = False
    rerun: bool = False  # sent a second time (see ServerConnection._rerun)
    statements: list[tuple[str, Any]] | None = None  # decoded by the loop when direct
    dirty: bool = False  # changes session state (allowed inside a transaction)


class RequestError(Exception):
    """A request the broker refuses, or stops, on its own account."""

    def __init__(self, kind: str, message: str, sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.sqlstate = sqlstate


class _PackedReply(bytes):
    """A reply built while the rows were read; sent as it is."""


class _PackedError(bytes):
    """An error reply built by the direct machinery; sent as it is."""


def error_from_psycopg(exc: psycopg.Error) -> dict[str, Any]:
    kind = next((c.__name__ for c in type(exc).__mro__ if c.__name__ in _DBAPI_NAMES),
                "DatabaseError")
    diag = exc.diag
    fields = {name: getattr(diag, name, None) for name in DIAG_FIELDS}
    message = fields.get("message_primary") or str(exc).strip() or type(exc).__name__
    return error_payload(kind, message, exc.sqlstate, **fields)


def _result_payload(cur: psycopg.Cursor) -> list:
    if cur.description is None:
        return [None, [], cur.rowcount]
    return [[c.name for c in cur.description], cur.fetchall(), cur.rowcount]


def _check_text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise RequestError("MessageError", f"{what} must be a string, got {type(value).__name__}")
    return value


def _check_params(value: Any) -> Any:
    if value is not None and not isinstance(value, (list, dict)):
        raise RequestError(
            "MessageError", f"params must be a list, a dict or None, got {type(value).__name__}")
    return value


def decode_args(job: Job, arity: int, max_bytes: int) -> list:
    body = protocol.unpack(job.body, max_bytes)
    if not isinstance(body, list) or len(body) != arity:
        raise RequestError("MessageError", f"{protocol.OP_NAMES[job.op]} takes {arity} arguments")
    return body


def decode_execute(job: Job, max_bytes: int) -> tuple[str, Any, bool]:
    """The checked (sql, params) of an execute, and whether it changes session state."""
    sql, params = decode_args(job, 2, max_bytes)
    dirty = screen(_check_text(sql, "sql"), job.in_session)
    return sql, _check_params(params), dirty


def decode_batch(job: Job, max_bytes: int) -> tuple[list[tuple[str, Any]], bool]:
    """The checked statements of a batch, and whether any changes session state."""
    (items,) = decode_args(job, 1, max_bytes)
    if not isinstance(items, list) or not items:
        raise RequestError("MessageError", "batch takes a non-empty list of [sql, params]")
    statements = []
    dirty = False
    for item in items:
        if not isinstance(item, list) or len(item) != 2:
            raise RequestError("MessageError", "each batch item is [sql, params]")
        sql = _check_text(item[0], "sql")
        dirty = screen(sql, in_session=True) or dirty
        statements.append((sql, _check_params(item[1])))
    return statements, dirty


def runs_direct(job: Job, statements: list[tuple[str, Any]], dirty: bool) -> bool:
    """Whether the direct machinery can run these statements (see send_direct),
    and if so mark ``job`` with them: plain single statements, and no session
    state to reset after, unless a transaction's end will reset it."""
    if (dirty and not job.in_session) or not all(single_statement(s) for s, _ in statements):
        return False
    job.statements, job.dirty, job.direct = statements, dirty, True
    return True


def screen(sql: str, in_session: bool) -> bool:
    """Refuse what the broker cannot allow; True if the session needs a reset after."""
    kind = classify(sql)
    if kind == Kind.TRANSACTION_CONTROL:
        raise RequestError(
            "ProgrammingError",
            "transaction control statements are managed by the broker: "
            "use client.transaction() or client.batch()")
    if kind == Kind.SESSION_STATE:
        if not in_session:
            raise RequestError(
                "SessionStateRefused",
                "this statement changes session state (SET, LISTEN, PREPARE, temp "
                "tables, session advisory locks...) which would leak to other clients "
                "of the shared connection; run it inside client.transaction() (the "
                "connection is reset afterwards) or use SET LOCAL / pg_advisory_xact_lock")
        return True
    return False


def failure_payload(exc: Exception, job: Job) -> dict[str, Any]:
    """The error payload for whatever running ``job`` raised."""
    if isinstance(exc, psycopg.Error):
        payload = error_from_psycopg(exc)
        if isinstance(exc, psycopg.errors.QueryCanceled) and job.cancel_reason:
            payload["message"] = job.cancel_reason
        return payload
    if isinstance(exc, RequestError):
        return error_payload(exc.kind, str(exc), exc.sqlstate)
    if isinstance(exc, (ValueError, TypeError, OverflowError)):
        # Undecodable body, or a value psycopg cannot adapt or we cannot send.
        kind = "DataError" if isinstance(exc, (TypeError, OverflowError)) else "MessageError"
        return error_payload(kind, str(exc))
    logger.error("unexpected error running %s", protocol.OP_NAMES.get(job.op, job.op),
                 exc_info=exc)
    return error_payload("InternalError", f"broker error: {exc!r}")


@dataclass(slots=True)
class _DirectResult:
    """One statement's result, as it arrives: rows are packed at once."""

    columns: list[str] | None = None
    packed: list[bytes] = field(default_factory=list)
    count: int = 0
    rowcount: int = -1


@dataclass(slots=True)
class _Prepare:
    """A PREPARE sent ahead of the statement's first run by name."""

    key: tuple
    name: bytes
    generation: int  # of the connection's cache when it was sent


@dataclass(slots=True)
class _DirectRun:
    """A job in the connection's pipeline: its statements (and any PREPARE
    sent with them), then one Sync."""

    job: Job
    steps: list[_DirectResult | _Prepare]  # one result (NULL-terminated) each, in order
    current: int = 0  # the step whose results arrive now
    by_name: bool = False  # ran a statement prepared earlier
    size: int = 0
    error: Exception | None = None


class ServerConnection(threading.Thread):
    """Owns one psycopg connection; runs the loop's jobs one at a time."""

    def __init__(self, conn_id: int, settings: Settings, adapters: AdaptersMap,
                 redact: Redactor, context: zmq.Context, completions: str) -> None:
        super().__init__(name=f"poolbroker-conn-{conn_id}", daemon=True)
        self.conn_id = conn_id
        self._id_frame = conn_id.to_bytes(4, "big")
        self._settings = settings
        self._adapters = adapters
        self._redact = redact
        self._result_limit = settings.max_result_bytes
        self._chunked = bool(settings.max_result_bytes) and _CHUNKED_ROWS
        self._context = context
        self._completions = completions
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._conn: psycopg.Connection | None = None
        self._dirty = False  # session state changed inside a pinned session
        # Held while the statement at the head changes and while a cancel is
        # sent, so a cancel meant for one statement is never sent once the
        # next one is at the head.  (The server may still have moved on: see
        # _cancel_in_doubt.)
        self._statement_lock = threading.Lock()
        self._statement: Job | None = None
        self.head_since = 0.0  # when the job at the pipeline's head got there
        self._transformer: adapt.Transformer | None = None  # direct execution only
        self._pipeline: deque[_DirectRun] = deque()
        # A cancel may still land on whatever the server runs next; a job it
        # hits by mistake is rerun (see _rerun).  Cleared once the pipeline
        # has emptied with no cancel on its way.
        self._cancel_in_doubt = False
        self._cancels_started = 0  # written by the loop only
        self._cancels_finished = 0  # written by cancel threads only, under the lock
        self._prepared: dict[tuple, bytes] = {}  # (query, types) -> statement name
        self._preparing: set[tuple] = set()  # PREPAREs sent, result not read yet
        self._prepared_generation = 0  # bumped when the server's cache is dropped
        self._executions: dict[tuple, int] = {}  # runs of queries not prepared yet
        self._next_prepared = 1

    # Called from the loop's thread

    def submit(self, job: Job) -> None:
        self._jobs.put(job)

    def stop(self) -> None:
        self._jobs.put(None)

    def cancel(self, job: Job) -> None:
        """Cancel ``job`` on the server if it is still the one at the head."""
        job.cancel_sent = True
        self._cancel_in_doubt = True
        self._cancels_started += 1

        def cancel() -> None:
            with self._statement_lock:
                try:
                    conn = self._conn
                    if conn is not None and self._statement is job:
                        # Returns once the server has signalled the backend; a
                        # backend idle by then ignores the signal.
                        conn.cancel_safe(timeout=5.0)
                except psycopg.Error as exc:
                    logger.warning("cancel on connection %d failed: %s", self.conn_id, exc)
                finally:
                    self._cancels_finished += 1
        threading.Thread(target=cancel, name="poolbroker-cancel", daemon=True).start()

    # Direct execution, from the loop's thread while this one is idle.  Every
    # job is appended to the connection's libpq pipeline followed by its own
    # Sync: it commits or fails alone, whatever runs before or after it, and
    # several clients' autocommit jobs can be in flight on one connection.
    # The loop polls ``fileno()`` and feeds ``read_direct()``; no hand-off to
    # this thread and back (measured: those hand-offs cost more than the
    # statement).  A batch is several statements before one Sync: one round
    # trip, one implicit transaction.

    @property
    def needs_reset(self) -> bool:
        """Session state was changed in the open transaction: end it on the thread,
        which runs DISCARD ALL after."""
        return self._dirty

    @property
    def in_flight(self) -> int:
        """Jobs sent to the server whose replies are not complete yet."""
        return len(self._pipeline)

    @property
    def head(self) -> Job | None:
        """The job the server is running (or answering) now."""
        return self._pipeline[0].job if self._pipeline else None

    def lost_before_use(self, job: Job) -> tuple[bytes, bytes, bytes]:
        """(event, routing id, reply) for a job whose connection turned out dead:
        run elsewhere, unless it belonged to the connection's transaction."""
        if not (job.in_session or job.op == OP_RESET):
            return EV_REQUEUE, job.routing_id, b""
        reply = self._error_reply(job, error_payload(
            "OperationalError",
            "the server connection of this transaction was lost; "
            "the transaction was rolled back by the server", "08006"))
        return EV_BROKEN, job.routing_id, reply

    def fileno(self) -> int:
        assert self._conn is not None
        return self._conn.pgconn.socket

    def send_direct(self, job: Job, *, flush: bool = True) -> None:
        """Append ``job`` (decoded by the loop) to the pipeline.  Raises before
        sending anything if its parameters cannot be bound; raises
        psycopg.Error if the connection broke while sending.  Without
        ``flush`` it may stay in libpq's buffer until ``flush_direct()``."""
        conn = self._conn
        assert conn is not None and job.statements
        if self._transformer is None:
            self._transformer = adapt.Transformer(conn)
        queries = []
        for sql, params in job.statements:  # all converted before anything is sent
            query = PostgresQuery(self._transformer)
            query.convert(sql, params)  # psycopg's own placeholder rules
            queries.append(query)
        pgconn = conn.pgconn
        run = _DirectRun(job, [])
        pipeline = self._pipeline
        if not pipeline:  # a connection leaves pipeline mode whenever it empties
            pgconn.enter_pipeline_mode()
            self._set_head(job)
        pipeline.append(run)
        if job.dirty:  # session state set inside a transaction: reset when it ends
            self._dirty = True
            self._forget_prepared()  # it may have been DEALLOCATE
        for query in queries:
            self._send_statement(pgconn, run, query)
        if _SEND_PIPELINE_SYNC is None:
            pgconn.pipeline_sync()
        elif not _SEND_PIPELINE_SYNC(pgconn.pgconn_ptr):
            raise psycopg.OperationalError(pgconn.get_error_message())
        if flush:
            self._flush(pgconn)
        if len(pipeline) == 1:
            self._read_head_in_chunks(pgconn, run)

    def _send_statement(self, pgconn: pq.PGconn, run: _DirectRun, query: PostgresQuery) -> None:
        if query.params is not None:
            key = (query.query, tuple(query.types))
            name = self._prepared.get(key)
            if name is None and self._worth_preparing(key):
                # Prepared in the same round trip; the name is recorded once
                # the PREPARE succeeded.
                name = f"_pb_{self._next_prepared}".encode()
                self._next_prepared += 1
                self._preparing.add(key)
                run.steps.append(_Prepare(key, name, self._prepared_generation))
                pgconn.send_prepare(name, query.query, param_types=query.types)
            if name is not None:
                pgconn.send_query_prepared(name, query.params, param_formats=query.formats)
                run.by_name = run.by_name or key in self._prepared
                run.steps.append(_DirectResult())
                return
        pgconn.send_query_params(query.query, query.params,
                                 param_formats=query.formats, param_types=query.types)
        run.steps.append(_DirectResult())

    def flush_direct(self) -> None:
        """Send what ``send_direct(flush=False)`` left in libpq's buffer."""
        try:
            self._flush(self._conn.pgconn)
        except psycopg.Error:
            pass  # the connection is gone: read_direct() reports it

    @staticmethod
    def _flush(pgconn: pq.PGconn) -> None:
        while pgconn.flush():  # only for large parameters: wait until the kernel takes them
            select.select([], [pgconn.socket], [], 1.0)

    def _worth_preparing(self, key: tuple) -> bool:
        """Prepare a query on its PREPARE_THRESHOLD-th run here, as psycopg does."""
        if len(self._prepared) >= MAX_PREPARED or key in self._preparing:
            return False
        seen = self._executions.get(key, 0) + 1
        if len(self._executions) >= MAX_PREPARED * 4:
            self._executions.clear()  # one-off queries: keep the tally bounded
        self._executions[key] = seen
        return seen >= PREPARE_THRESHOLD

    def _forget_prepared(self) -> None:
        """The server dropped them (DISCARD ALL, DEALLOCATE): prepare afresh.
        New statements get new names, so stale ones can never be confused."""
        self._prepared.clear()
        self._executions.clear()
        self._prepared_generation += 1

    def _set_head(self, job: Job | None) -> None:
        with self._statement_lock:
            self._statement = job
        self.head_since = time.monotonic()

    def _read_head_in_chunks(self, pgconn: pq.PGconn, run: _DirectRun) -> None:
        # libpq takes the chunked mode only for the query at the pipeline's
        # head, before its first result is read.
        if self._chunked and run.current < len(run.steps) and \
                type(run.steps[run.current]) is _DirectResult:
            try:
                pgconn.set_chunked_rows_mode(STREAM_CHUNK_ROWS)
            except psycopg.OperationalError:
                pass  # read whole; the size is still checked

    def fail_direct(self, job: Job, exc: Exception) -> list[tuple[Job, bytes, bytes]]:
        """The outcomes after ``send_direct(job)`` raised ``exc``."""
        if any(run.job is job for run in self._pipeline):
            return self._fail_pipeline(exc)  # sending broke the connection
        payload = failure_payload(exc, job)
        payload["message"] = self._redact(payload["message"])
        return [(job, EV_FAILED, self._error_reply(job, payload))]

    def _fail_pipeline(self, exc: Exception) -> list[tuple[Job, bytes, bytes]]:
        """The connection is unusable: every job in flight fails."""
        if isinstance(exc, psycopg.Error) and not exc.sqlstate:  # libpq's own report
            exc = RequestError("OperationalError", "the server connection was lost while "
                               f"the statement was in flight: {str(exc).strip()}", "08006")
        outcomes = []
        while self._pipeline:
            run = self._pipeline.popleft()
            run.error = run.error or exc
            outcomes.append((run.job, EV_BROKEN, self._finish_run(run)[1]))
        self._set_head(None)
        return outcomes

    def read_direct(self) -> list[tuple[Job, bytes, bytes]]:
        """Take what the server sent; (job, event, reply) for each job it ended."""
        assert self._conn is not None
        pgconn = self._conn.pgconn
        pipeline = self._pipeline
        ended = []
        try:
            pgconn.consume_input()
            while pipeline and not pgconn.is_busy():
                run = pipeline[0]
                result = pgconn.get_result()
                if result is None:  # the end of one step's results
                    run.current += 1
                    self._read_head_in_chunks(pgconn, run)
                elif result.status == pq.ExecStatus.PIPELINE_SYNC:
                    pipeline.popleft()
                    if not pipeline:
                        pgconn.exit_pipeline_mode()
                    if not self._rerun(run):
                        ended.append((run.job, *self._finish_run(run)))
                    if pipeline:
                        if pipeline[0].job is not run.job:
                            self._set_head(pipeline[0].job)
                        self._read_head_in_chunks(pgconn, pipeline[0])
                    else:
                        self._set_head(None)
                        if self._cancels_finished == self._cancels_started:
                            self._cancel_in_doubt = False
                elif run.current < len(run.steps):
                    step = run.steps[run.current]
                    if type(step) is _Prepare:
                        self._take_prepare_result(run, step, result)
                    elif result.status != pq.ExecStatus.PIPELINE_ABORTED:
                        self._take_result(run, step, result)
        except psycopg.Error as exc:  # the connection was lost
            ended.extend(self._fail_pipeline(exc))
        return ended

    def _rerun(self, run: _DirectRun) -> bool:
        """Send the job again if it failed for a reason that left nothing done.

        - A prepared statement whose table changed shape fails before it runs
          (0A000, "cached plan must not change result type").
        - A cancel meant for the job ahead of it hit it instead (57014 with
          no cancel of its own): its implicit transaction was rolled back.
        Never inside a transaction, and at most once."""
        job, error = run.job, run.error
        if not isinstance(error, psycopg.Error) or job.rerun or job.in_session:
            return False
        if error.sqlstate in _STALE_PREPARED:
            self._forget_prepared()
            if not run.by_name:
                return False
        elif not (isinstance(error, psycopg.errors.QueryCanceled)
                  and self._cancel_in_doubt and not job.cancel_sent):
            return False
        job.rerun = True
        self.send_direct(job)
        return True

    def _take_prepare_result(self, run: _DirectRun, step: _Prepare,
                             result: pq.PGresult) -> None:
        self._preparing.discard(step.key)
        if result.status == pq.ExecStatus.COMMAND_OK:
            if step.generation == self._prepared_generation:
                self._prepared[step.key] = step.name
        elif run.error is None and result.status == pq.ExecStatus.FATAL_ERROR:
            run.error = psycopg.errors.error_from_result(result, encoding="utf-8")

    def _take_result(self, run: _DirectRun, into: _DirectResult,
                     result: pq.PGresult) -> None:
        status = result.status
        if status in _ROW_STATUSES:
            tx = self._transformer
            first = into.columns is None
            tx.set_pgresult(result, set_loaders=first)
            if first:
                into.columns = [result.fname(i).decode() for i in range(result.nfields)]
            rows = result.ntuples
            if rows and run.error is None:
                packed = protocol.pack_rows(tx.load_rows(0, rows, tuple))
                into.packed.append(packed)
                into.count += rows
                run.size += len(packed)
                if self._result_limit and run.size > self._result_limit:
                    run.error = self._too_large(run.size)
                    self.cancel(run.job)
            if status == pq.ExecStatus.TUPLES_OK:
                into.rowcount = into.count
        elif status == pq.ExecStatus.COMMAND_OK:
            tuples = result.command_tuples
            into.rowcount = -1 if tuples is None else tuples
        elif run.error is None:
            if status == pq.ExecStatus.FATAL_ERROR:
                run.error = psycopg.errors.error_from_result(result, encoding="utf-8")
            else:  # COPY and the like: not something execute() can do
                run.error = RequestError(
                    "NotSupportedError", f"statement returned {status.name}: use "
                    "client.transaction() for COPY")

    def _finish_run(self, run: _DirectRun) -> tuple[bytes, bytes]:
        """(event, reply) for a job whose results are all in."""
        assert self._conn is not None
        job = run.job
        broken = self._conn.pgconn.status != pq.ConnStatus.OK
        if run.error is None:
            if job.op == OP_EXECUTE or job.op == OP_BATCH:
                results = [protocol.pack_result(r.columns, r.packed, r.count, r.rowcount)
                           for r in run.steps if type(r) is _DirectResult]
                payload = protocol.pack_list(results) if job.op == OP_BATCH else results[0]
            else:  # BEGIN answers with the session's token; COMMIT/ROLLBACK with nil
                payload = protocol.pack(job.session if job.op == OP_BEGIN else None)
            reply = protocol.pack_ok_reply(job.request_id, payload)
            if not self._result_limit or len(reply) <= self._result_limit:
                return (EV_BROKEN if broken else EV_DONE), reply
            run.error = self._too_large(len(reply))
        payload = failure_payload(run.error, job)
        payload["message"] = self._redact(payload["message"])
        return (EV_BROKEN if broken else EV_FAILED), self._error_reply(job, payload)

    # The connection's thread

    def run(self) -> None:
        push = self._context.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 1000)
        push.connect(self._completions)
        try:
            self._serve(push)
        finally:
            if self._conn is not None:
                self._conn.close()
            push.close()

    def _connect(self) -> psycopg.Connection:
        s = self._settings
        backstop_ms = int(s.idle_transaction_timeout * 2000) if s.idle_transaction_timeout else 0
        return psycopg.connect(
            s.dsn,
            autocommit=True,
            application_name=s.application_name,
            connect_timeout=max(1, int(s.connect_timeout)),
            options=f"-c idle_in_transaction_session_timeout={backstop_ms}",
            context=self._adapters,
        )

    def _serve(self, push: zmq.Socket) -> None:
        try:
            self._conn = self._connect()
        except psycopg.Error as exc:
            message = self._redact(str(exc).strip())
            push.send_multipart([self._id_frame, EV_CONNECT_FAILED, b"", message.encode()])
            return
        push.send_multipart([self._id_frame, EV_READY, b"", b""])
        while (job := self._jobs.get()) is not None:
            if not self.alive_before_use():
                push.send_multipart([self._id_frame, *self.lost_before_use(job)])
                return
            reply, failed = self._run(job)
            broken = self._conn.closed
            event = EV_BROKEN if broken else EV_FAILED if failed else EV_DONE
            push.send_multipart([self._id_frame, event, job.routing_id, reply])
            if broken:
                return

    def alive_before_use(self) -> bool:
        """An idle connection has nothing to read unless the server hung up.

        Anything readable (a FATAL from pg_terminate_backend or a shutdown,
        EOF) retires it; the rare harmless message, such as a parameter
        change after a reload, costs one reconnect.
        """
        conn = self._conn
        if conn is None or conn.closed:
            return False
        readable, _, _ = select.select([conn.fileno()], [], [], 0)
        if readable:
            logger.info("connection %d had unexpected input while idle: replacing it",
                        self.conn_id)
            conn.close()
            return False
        return True

    def _error_reply(self, job: Job, payload: dict[str, Any]) -> bytes:
        return protocol.pack([job.request_id, STATUS_ERROR, payload])

    def _run(self, job: Job) -> tuple[bytes, bool]:
        """The reply to send (empty for internal jobs) and whether it is an error."""
        try:
            with self._statement_lock:
                self._statement = job
            try:
                result = self._dispatch(job)
            finally:
                with self._statement_lock:
                    self._statement = None
            if job.op == OP_RESET:
                return b"", False
            if isinstance(result, (_PackedReply, _PackedError)):
                return result, isinstance(result, _PackedError)
            reply = protocol.pack([job.request_id, STATUS_OK, result])
            if self._result_limit and len(reply) > self._result_limit:
                raise self._too_large(len(reply))
            return reply, False
        except Exception as exc:  # a bug must cost one request, not the connection thread
            payload = failure_payload(exc, job)
        payload["message"] = self._redact(payload["message"])
        if job.op == OP_RESET:
            logger.warning("resetting connection %d failed: %s", self.conn_id, payload["message"])
            self._conn.close()
            return b"", True
        return self._error_reply(job, payload), True

    def _dispatch(self, job: Job) -> Any:
        conn = self._conn
        assert conn is not None
        op = job.op
        max_bytes = self._settings.max_message_bytes
        if op == OP_EXECUTE:
            sql, params, dirty = decode_execute(job, max_bytes)
            if runs_direct(job, [(sql, params)], dirty):
                return self._run_direct_here(job)
            self._dirty = self._dirty or dirty
            with conn.cursor() as cur:
                cur.execute(sql, params)
                return _result_payload(cur)
        if op == OP_EXECUTEMANY:
            sql, seq = decode_args(job, 2, max_bytes)
            self._dirty = screen(_check_text(sql, "sql"), job.in_session) or self._dirty
            if not isinstance(seq, list):
                raise RequestError("MessageError", "executemany takes a list of parameter sets")
            seq = [_check_params(p) for p in seq]
            with conn.cursor() as cur:
                if job.in_session:
                    cur.executemany(sql, seq)
                else:
                    with conn.transaction():
                        cur.executemany(sql, seq)
                return [None, [], cur.rowcount]
        if op == OP_BATCH:
            return self._run_batch(job)
        if op == OP_BEGIN:
            conn.execute("BEGIN")
            return job.session
        if op in ENDING_OPS:
            return self._end_session("COMMIT" if op == OP_COMMIT else "ROLLBACK")
        raise RequestError("MessageError", f"unknown operation {op!r}")

    def _too_large(self, size: int) -> RequestError:
        return RequestError(
            "ResultTooLarge",
            f"the result exceeds max_result_bytes ({self._settings.max_result_bytes} bytes; "
            f"{size} read before stopping); the statement was cancelled: fetch it in "
            "pieces with client.stream()", RESULT_TOO_LARGE)

    def _run_direct_here(self, job: Job) -> bytes:
        """Run a decoded job through the direct machinery on this thread,
        waiting for the socket: the same chunked reads, pipelining and
        prepared statements as the loop's, for jobs too big to send from it."""
        try:
            self.send_direct(job)
        except Exception as exc:
            outcomes = self.fail_direct(job, exc)
        else:
            while not (outcomes := self.read_direct()):
                select.select([self.fileno()], [], [])
        ((_, event, reply),) = outcomes
        if event == EV_BROKEN:
            self._conn.close()
        return (_PackedReply if event == EV_DONE else _PackedError)(reply)

    def _run_batch(self, job: Job) -> list | bytes:
        statements, dirty = decode_batch(job, self._settings.max_message_bytes)
        if runs_direct(job, statements, dirty):
            return self._run_direct_here(job)
        self._dirty = dirty or self._dirty
        conn = self._conn
        assert conn is not None
        results = []
        try:
            with conn.transaction(), conn.cursor() as cur:
                for sql, params in statements:
                    cur.execute(sql, params)
                    results.append(_result_payload(cur))
        finally:
            self._reset_session_state()
        return results

    def _end_session(self, command: str) -> None:
        conn = self._conn
        assert conn is not None
        try:
            if conn.info.transaction_status != pq.TransactionStatus.IDLE:
                conn.execute(command)
        finally:
            self._reset_session_state()

    def _reset_session_state(self) -> None:
        if self._dirty and self._conn is not None and not self._conn.closed:
            self._dirty = False
            self._conn.execute("DISCARD ALL")
            self._forget_prepared()
