"""From a request's frames to a validated job, or a refusal.  Pure: no I/O.

The header is checked first (it is small and bounded); the body is then
decoded, its placeholders converted with psycopg's own rules, and each
statement classified by PostgreSQL's parser (``statements.classify``,
cached by text).  The policy below decides, per class, what may run where:

================  =====================  ======================  ===================
class             execute / executemany  batch                   in a transaction
================  =====================  ======================  ===================
PLAIN             shared pipeline        runs                    runs
UTILITY           runs alone             runs                    runs
SESSION           refused                runs, reset after       runs, reset at end
OPAQUE (DO...)    runs alone, reset      runs, reset after       runs, reset at end
COPY (STDIN/OUT)  refused: copy()        refused: copy()         refused: copy()
TRANSACTION       refused                refused                 refused
================  =====================  ======================  ===================

The first statement a BEGIN carries is judged as one inside the
transaction; the BEGIN itself is the broker's (``begin_statement``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import psycopg

from client import protocol
from client.protocol import (
    HEADER_FIELDS, OP_BATCH, OP_BEGIN, OP_COMMIT, OP_COPY_FROM, OP_COPY_TO, OP_EXECUTE,
    OP_EXECUTEMANY, OP_NAMES, OP_ROLLBACK, ErrorKind,
)

from ._psycopg import convert_placeholders
from .statements import Classification, Kind, classify

# The kinds every request is tested against, as plain module names: Python
# 3.11 finds an enum's member through EnumType's __getattr__ hook, ~4x a
# plain attribute.
_PLAIN, _SESSION, _COPY, _TRANSACTION = Kind.PLAIN, Kind.SESSION, Kind.COPY, Kind.TRANSACTION

NO_DEADLINE = 24 * 3600.0
MAX_HEADER_BYTES = 4096
MAX_TRANSIT = 3600.0
"""Seconds a request may have spent between its client and the loop, by the
client's clock (a header's sent_at) and the broker's: outside 0 to this,
the two clocks are not the same one (a client in another time namespace),
and its timeout counts from when the broker read it."""
QUERY_BYTES = 256
"""What one decoded statement costs in memory, besides its text and parameters."""
PARAMETER_BYTES = 64
"""What one decoded parameter costs, besides its bytes: a one-byte msgpack
value becomes a Python object and a psycopg-dumped bytes object."""
SHORT_TEXT = 4096
FEW_PERCENT_SIGNS = 64
"""A statement text within both converts by psycopg's own code (cached by
psycopg): its quadratic cases cost at most about 64 x 4 KiB of scanning.
Others go through ``convert_placeholders``, linear in the text."""
LARGE_BODY = 64 * 1024
"""Bodies above this size are decoded counting their arrays, maps and ext
values (those inside parameters: an executemany's parameter sets and a
batch's items are counted as queries), whatever the operation."""
BYTES_PER_CONTAINER = 3
"""Wire bytes an array, map or ext value must average in a large body: a
2-D array parameter of pairs of small integers does (3 bytes each); a flood
of empty containers (1 byte, 56 in memory) does not, so decoding one stops
at about 25 times its size (measured: a 4 MB body of empty arrays, +99 MB)."""

OP_RESET = -1
"""Internal: roll back what is open, and DISCARD ALL when needed; no reply."""

ENDING_OPS = frozenset((OP_COMMIT, OP_ROLLBACK, OP_RESET))
"""Operations after which a pinned connection leaves its session."""

POOLED_OPS = frozenset((OP_EXECUTE, OP_EXECUTEMANY, OP_BATCH, OP_BEGIN))
"""Operations outside a transaction that need a server connection."""

SESSION_OPS = frozenset((OP_EXECUTE, OP_EXECUTEMANY, OP_COMMIT, OP_ROLLBACK,
                         OP_COPY_FROM, OP_COPY_TO))
"""Operations allowed inside a transaction."""

_COPY_HINT = "COPY FROM STDIN / TO STDOUT runs through client.copy(), not execute()"
_TRANSACTION_HINT = ("transaction control statements are managed by the broker: "
                     "use client.transaction() or client.batch()")
_SESSION_HINT = (
    "this statement changes session state ({reason}) which would leak to other "
    "clients of the shared connection; run it inside client.transaction() (the "
    "connection is reset afterwards) or use SET LOCAL / pg_advisory_xact_lock")


class Refusal(Exception):
    """A request the broker answers with an error without running it."""

    def __init__(self, kind: ErrorKind, message: str, sqlstate: str | None = None,
                 request_id: int | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.sqlstate = sqlstate
        self.request_id = request_id  # set when the header could not be trusted


@dataclass(slots=True)
class Query:
    """One statement as libpq takes it: placeholders converted, parameters dumped."""

    sql: bytes
    params: list | None
    types: tuple
    formats: list | None

    @property
    def key(self) -> tuple:
        """What the prepared cache and the duration estimates know it by."""
        return (self.sql, self.types)


@dataclass(slots=True, eq=False)
class Job:
    """One request on its way through the broker (or an internal step)."""

    op: int
    routing_id: bytes
    request_id: int
    deadline: float
    queries: list[Query] = field(default_factory=list)
    simple: bytes | None = None  # a multi-statement text, run with the simple protocol
    first_op: int = 0  # OP_BEGIN: the op of the first statement it carries, if any
    session: bytes | None = None  # the transaction's token
    in_session: bool = False
    shareable: bool = False  # may share a pipeline with other clients' jobs
    resets: bool = False  # the connection needs DISCARD ALL before anyone else gets it
    changes_schema: bool = False  # DDL: once it commits, every prepared plan may be stale
    drops_plans: bool = False  # this connection's prepared statements are unusable after it
    copy_data: bytes = b""  # OP_COPY_FROM: the chunk to send
    copy_end: bool = False  # OP_COPY_FROM: the last chunk
    copy_max: int = 0  # OP_COPY_TO: bytes to return at most
    client_pid: int = 0  # over ipc, from the kernel; 0 over tcp
    size: int = 0  # bytes it holds while waiting or running (max_queued_bytes)
    queued_at: float = 0.0
    cancel_at: float = 0.0  # when the loop cancels it on the server
    cancel_reason: str = ""  # why, when it is not the client's own deadline
    cancel_sent: bool = False
    guard_at: float = 0.0  # sent behind others: the server's clock past which it will not run
    answered: bool = False  # its client was told at its deadline; its outcome is not sent
    rerun: bool = False  # sent a second time (see PgConn._rerun)
    expected_fast: bool = False  # its statement is known to finish within PIPELINE_STALL
    expected: float = 0.0  # server seconds its statement took lately (0: not known)
    ran_for: float | None = None  # seconds from reaching the head of its pipeline to its end
    pool: Any = None  # the pool.Pool it runs on


def decode_request(frames: list[Any], now: float, same_clock: bool = False) -> tuple[
        int, int, float, bytes | None, str | None, bytes]:
    """(request_id, op, deadline, session, pool name, body) of a request's
    frames (those after its routing id), or raise a Refusal (of kind MESSAGE,
    with the request id when it was readable).  One frame holds the header
    and the body back to back; two, as clients before protocol 2 send them,
    one each.  ``same_clock``: the sender reads the broker's monotonic clock
    (its sent_at counts)."""
    if len(frames) == 1:
        message = memoryview(frames[0])  # the body is copied once, below
        request_id, op, deadline, session, pool, end = decode_header(message, now, same_clock)
        return request_id, op, deadline, session, pool, bytes(message[end:])
    if len(frames) == 2:
        header = memoryview(frames[0])
        if len(header) > MAX_HEADER_BYTES:
            raise _malformed(None, "header frame too large")
        request_id, op, deadline, session, pool, end = decode_header(header, now, same_clock)
        if end != len(header):
            raise _malformed(request_id, "undecodable header: extra data after it")
        return request_id, op, deadline, session, pool, bytes(frames[1])
    raise _malformed(None, "expected 1 frame (header and body) or 2 (header, body), "
                           "got more")


def decode_header(message: bytes | memoryview, now: float, same_clock: bool = False) -> tuple[
        int, int, float, bytes | None, str | None, int]:
    """(request_id, op, deadline, session, pool name, end) of the header that
    starts ``message`` (``end``: the offset where it ends), or raise a
    Refusal (of kind MESSAGE, with the request id when it was readable)."""
    try:
        header, end = protocol.unpack_first(message, MAX_HEADER_BYTES)
    except Exception as exc:  # msgpack raises many types on garbage
        raise _malformed(None, f"undecodable header: {exc}") from None
    if not isinstance(header, list) or not HEADER_FIELDS <= len(header) <= HEADER_FIELDS + 2:
        raise _malformed(None, "header must be [request_id, op, timeout_ms, session], "
                               "[request_id, op, timeout_ms, session, pool] or "
                               "[request_id, op, timeout_ms, session, pool, sent_at]")
    request_id, op, timeout_ms, session = header[:HEADER_FIELDS]
    pool = header[HEADER_FIELDS] if len(header) > HEADER_FIELDS else None
    sent_at = header[HEADER_FIELDS + 1] if len(header) > HEADER_FIELDS + 1 else None
    if not isinstance(request_id, int) or not isinstance(op, int) or isinstance(op, bool):
        raise _malformed(request_id if isinstance(request_id, int) else None,
                         "request_id and op must be integers")
    if op not in OP_NAMES:
        raise _malformed(request_id, f"unknown operation {op}")
    if sent_at is not None and (not isinstance(sent_at, (int, float)) or isinstance(sent_at, bool)):
        raise _malformed(request_id, "sent_at must be a number or absent")
    if timeout_ms is None:
        deadline = now + NO_DEADLINE
    elif isinstance(timeout_ms, int) and not isinstance(timeout_ms, bool) and timeout_ms > 0:
        deadline = now + timeout_ms / 1000.0
        if same_clock and sent_at is not None and 0.0 < now - sent_at < MAX_TRANSIT:
            deadline -= now - sent_at
    else:
        raise _malformed(request_id, "timeout_ms must be a positive integer or nil")
    if session is not None and not isinstance(session, bytes):
        raise _malformed(request_id, "session must be bytes or nil")
    if pool is not None and not isinstance(pool, str):
        raise _malformed(request_id, "pool must be a string or nil")
    return request_id, op, deadline, session, pool, end


def _malformed(request_id: int | None, why: str) -> Refusal:
    return Refusal(ErrorKind.MESSAGE, why, request_id=request_id)


class Decoder:
    """Turns request bodies into the queries of a job, by the policy above."""

    def __init__(self, new_query: Callable[[], Any], max_bytes: int) -> None:
        self._new_query = new_query  # psycopg's PostgresQuery over the broker's adapters
        self._max_bytes = max_bytes

    def fill(self, job: Job, body: bytes, room: int) -> None:
        """Decode ``body`` into ``job`` (queries, sharing, reset), or raise
        Refusal; TooManyRequests once the job would hold more than ``room`` bytes."""
        op = job.op
        job.size = len(body)
        if op == OP_BEGIN:
            begin, op, body = self._begin(job, body, room)
            job.queries = [begin]
            if not op:
                return
            job.first_op = op
        if op == OP_EXECUTE:
            sql, params = self._args(op, body, 2, room)
            self._statements(job, [self._convert(_text(sql), _params(params))],
                             batch=False, execute=True)
        elif op == OP_EXECUTEMANY or op == OP_BATCH:
            self._statements(job, self._stream(op, job, body, room), batch=op == OP_BATCH)
        elif op == OP_COPY_FROM:
            sql, data, end = self._args(op, body, 3, room)
            if not isinstance(data, bytes) or not isinstance(end, bool):
                raise Refusal(ErrorKind.MESSAGE, "copy_from takes [sql or nil, bytes, bool]")
            job.copy_data, job.copy_end = data, end
            if sql is not None:
                self._copy(job, _text(sql), from_stdin=True)
        elif op == OP_COPY_TO:
            sql, max_bytes = self._args(op, body, 2, room)
            if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 1:
                raise Refusal(ErrorKind.MESSAGE, "copy_to takes [sql or nil, positive int]")
            job.copy_max = max_bytes
            if sql is not None:
                self._copy(job, _text(sql), from_stdin=False)

    def _args(self, op: int, body: bytes, arity: int, room: int) -> list:
        try:
            if len(body) > LARGE_BODY:
                args = protocol.unpack_within(body, _budget(body, room - len(body)))
            else:
                args = protocol.unpack(body, self._max_bytes)
        except Exception as exc:
            raise _undecodable(exc, room) from None
        if not isinstance(args, list) or len(args) != arity:
            raise Refusal(ErrorKind.MESSAGE, f"{OP_NAMES[op]} takes {arity} arguments")
        return args

    def _begin(self, job: Job, body: bytes, room: int) -> tuple[Query, int, bytes]:
        """(the BEGIN to send, the op of the first statement or 0, its body).

        The transaction's characteristics arrive as values and are checked
        against fixed spellings: no client text reaches the BEGIN.  Its first
        statement follows the policy of statements inside a transaction."""
        job.in_session = True
        if body == _EMPTY_ARRAY:  # a bare BEGIN: nothing to decode
            return _BEGIN, 0, b""
        characteristics, op, first = self._args(OP_BEGIN, body, 3, room)
        begin = _BEGIN if characteristics is None else begin_statement(characteristics)
        if op is None and first is None:
            return begin, 0, b""
        if op not in (OP_EXECUTE, OP_EXECUTEMANY) or not isinstance(first, bytes):
            raise Refusal(ErrorKind.MESSAGE, "begin takes [characteristics, op, body] with op "
                          "execute or executemany and its body as bytes, or op and body nil")
        return begin, op, first

    def _stream(self, op: int, job: Job, body: bytes, room: int) -> list[Query]:
        """The queries of an executemany or a batch, decoded one parameter set
        at a time and converted at once: the decoded message never exists
        whole, and decoding stops as soon as the job outgrows ``room``."""
        many = op == OP_EXECUTEMANY
        usage = ("executemany takes [sql, list of parameter sets]" if many
                 else "batch takes [non-empty list of [sql, params]]")
        queries: list[Query] = []
        budget = _budget(body, room - job.size) if len(body) > LARGE_BODY else None
        try:
            reader = protocol.unpacker(body, budget)
            if reader.read_array_header() != (2 if many else 1):
                raise Refusal(ErrorKind.MESSAGE, usage)
            if many:
                template = self._new_query()
                sql = _text(reader.unpack())
            count = reader.read_array_header()
            if not (many or count):
                raise Refusal(ErrorKind.MESSAGE, usage)
            if count > protocol.MAX_STATEMENTS:
                raise Refusal(
                    ErrorKind.PROGRAMMING,
                    f"{OP_NAMES[op]} holds {count} statements, more than the "
                    f"{protocol.MAX_STATEMENTS} one request may (each holds up every other "
                    "client while the broker works on it): send it in parts inside a "
                    "transaction (the client library does so for executemany), or load "
                    "bulk data with copy()")
            parameters = 0
            for _ in range(count):
                if budget is not None:
                    # A parameter set (an item and its parameters) is counted
                    # in job.size as a query: only what it holds is budgeted,
                    # within what the queries before it leave (their decoded
                    # sets are gone).
                    budget.grant(1 if many else 2)
                    budget.room = room - job.size
                if many:
                    queries.append(self._convert(sql, _params(reader.unpack()), template,
                                                 reuse=bool(queries)))
                else:
                    item = reader.unpack()
                    if not isinstance(item, list) or len(item) != 2:
                        raise Refusal(ErrorKind.MESSAGE, "each batch item is [sql, params]")
                    queries.append(self._convert(_text(item[0]), _params(item[1])))
                job.size += _held(queries[-1])
                parameters += len(queries[-1].params or ())
                if parameters > protocol.MAX_PARAMETERS:
                    raise Refusal(
                        ErrorKind.PROGRAMMING,
                        f"{OP_NAMES[op]} holds more than {protocol.MAX_PARAMETERS} parameters "
                        "in all (each holds up every other client while the broker works on "
                        "it): send it in parts inside a transaction (the client library does "
                        "so for executemany), or load bulk data with copy()")
                if job.size > room:
                    raise Refusal(
                        ErrorKind.TOO_MANY_REQUESTS,
                        f"the request holds more than the {room} bytes left of "
                        "max_queued_bytes once decoded; it was not run: send it in "
                        "smaller parts, or use copy() for bulk loads")
            if reader.tell() != len(body):
                raise Refusal(ErrorKind.MESSAGE, "extra data after the body")
        except Refusal:
            raise
        except Exception as exc:  # msgpack raises many types on garbage
            raise _undecodable(exc, room) from None
        return queries

    def _convert(self, sql: str, params: Any, query: Any = None, reuse: bool = False) -> Query:
        """psycopg's placeholder rules and dumpers; ``reuse`` dumps another
        parameter set into an already converted ``query`` (executemany)."""
        try:
            # psycopg's conversion only encodes it; not an executemany's
            # template, whose text the parameter sets after this one reuse
            if params is None and query is None:
                return Query(sql.encode(), None, (), None)
            query = query or self._new_query()
            if reuse:
                query.dump(params)
            elif params is not None and (len(sql) > SHORT_TEXT
                                         or sql.count("%") > FEW_PERCENT_SIGNS):
                convert_placeholders(query, sql, params)  # linear, whatever the text
            else:
                query.convert(sql, params)
        except (TypeError, OverflowError, psycopg.DataError) as exc:  # a value (NUL in text)
            raise Refusal(ErrorKind.DATA, str(exc).strip()) from None
        except Exception as exc:  # psycopg.ProgrammingError: placeholders vs params
            raise Refusal(ErrorKind.PROGRAMMING, str(exc).strip()) from None
        return Query(query.query, query.params, tuple(query.types), query.formats)

    def _statements(self, job: Job, queries: list[Query], *, batch: bool,
                    execute: bool = False) -> None:
        if not queries:  # executemany of nothing: like psycopg, nothing reaches the server
            return
        if len(queries) == 1:
            worst = classify(queries[0].sql)
            changes_schema = worst.changes_schema
            drops_plans = worst.drops_plans
        else:
            verdicts = {}
            for query in queries:  # executemany: one text, classified once
                if query.sql not in verdicts:
                    verdicts[query.sql] = classify(query.sql)
            worst = max(verdicts.values(), key=lambda verdict: verdict.kind)
            changes_schema = any(verdict.changes_schema for verdict in verdicts.values())
            drops_plans = any(verdict.drops_plans for verdict in verdicts.values())
        _check(worst, job.in_session, batch)
        job.queries = job.queries + queries if job.op == OP_BEGIN else queries
        if execute:
            job.size += _held(queries[0])
        if worst.statements > 1 and len(queries) == 1 and not queries[0].params:
            # Several statements and no parameter (None, or an empty list or
            # dict as SQLAlchemy's text() sends): the simple query protocol,
            # as psycopg takes it then.
            job.simple = queries[0].sql
        job.resets = worst.kind >= _SESSION
        job.changes_schema = changes_schema
        job.drops_plans = drops_plans
        job.shareable = (worst.kind == _PLAIN and not job.in_session
                         and job.simple is None)

    def _copy(self, job: Job, sql: str, *, from_stdin: bool) -> None:
        verdict = classify(sql)
        if verdict.kind != Kind.COPY or verdict.statements != 1 \
                or verdict.copy_from_stdin != from_stdin:
            direction = "COPY ... FROM STDIN" if from_stdin else "COPY ... TO STDOUT"
            raise Refusal(ErrorKind.PROGRAMMING,
                          f"copy() with {'data' if from_stdin else 'no data'} takes one "
                          f"{direction} statement")
        job.queries = [Query(sql.encode(), None, (), None)]


_EMPTY_ARRAY = protocol.pack([])
_BEGIN = Query(b"BEGIN", None, (), None)
_BEGINS: dict[tuple, Query] = {}


def begin_statement(characteristics: Any) -> Query:
    """``BEGIN`` with the transaction's characteristics, from values checked
    against fixed spellings (at most 4 x 3 x 3 statements, built once each)."""
    if not isinstance(characteristics, list) or len(characteristics) != 3:
        raise Refusal(ErrorKind.MESSAGE,
                      "characteristics are [isolation_level, read_only, deferrable]")
    isolation, read_only, deferrable = characteristics
    if isolation is not None and isolation not in protocol.ISOLATION_LEVELS:
        raise Refusal(ErrorKind.PROGRAMMING,
                      f"unknown isolation level {isolation!r}: expected one of "
                      f"{', '.join(protocol.ISOLATION_LEVELS)}")
    if not all(flag is None or isinstance(flag, bool) for flag in (read_only, deferrable)):
        raise Refusal(ErrorKind.MESSAGE, "read_only and deferrable are booleans or nil")
    key = (isolation, read_only, deferrable)  # hashable now: checked above
    query = _BEGINS.get(key)
    if query is not None:
        return query
    modes = []
    if isolation is not None:
        modes.append(f"ISOLATION LEVEL {isolation}")
    if read_only is not None:
        modes.append("READ ONLY" if read_only else "READ WRITE")
    if deferrable is not None:
        modes.append("DEFERRABLE" if deferrable else "NOT DEFERRABLE")
    query = _BEGINS[key] = Query(f"BEGIN {', '.join(modes)}".rstrip().encode(), None, (), None)
    return query


def _budget(body: bytes, room: int) -> protocol.DecodeBudget:
    """What a large body may decode into: BYTES_PER_CONTAINER, and ``room``
    (bytes of max_queued_bytes left besides what the request holds)."""
    return protocol.DecodeBudget(len(body) // BYTES_PER_CONTAINER, len(body), room)


def _undecodable(exc: Exception, room: int) -> Refusal:
    """The refusal of a body msgpack (or a budget's hook) gave up on."""
    why = str(exc)
    # msgpack refuses an array or a map longer than the budget's room allows
    # at its header, with this wording: the request is too big, not malformed.
    if isinstance(exc, protocol.DecodeBudgetExceeded) or "exceeds max_array_len" in why \
            or "exceeds max_map_len" in why:
        return Refusal(ErrorKind.TOO_MANY_REQUESTS,
                       f"decoded, the request would take more than the {room} bytes left of "
                       "max_queued_bytes; it was not run: send it in smaller parts, or use "
                       "copy() for bulk loads")
    return Refusal(ErrorKind.MESSAGE, f"undecodable body: {why}")


def _held(query: Query) -> int:
    """Bytes a decoded query holds, estimated."""
    params = query.params
    return QUERY_BYTES + (len(params) * PARAMETER_BYTES if params else 0)


def _check(verdict: Classification, in_session: bool, batch: bool) -> None:
    kind = verdict.kind
    if kind == _TRANSACTION:
        raise Refusal(ErrorKind.PROGRAMMING, _TRANSACTION_HINT)
    if kind == _COPY:
        raise Refusal(ErrorKind.NOT_SUPPORTED, _COPY_HINT)
    if kind == _SESSION and not (in_session or batch):
        raise Refusal(ErrorKind.SESSION_STATE_REFUSED,
                      _SESSION_HINT.format(reason=verdict.reason or "session state"))


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise Refusal(ErrorKind.MESSAGE, f"sql must be a string, got {type(value).__name__}")
    return value


def _params(value: Any) -> Any:
    if value is not None and not isinstance(value, (list, dict)):
        raise Refusal(ErrorKind.MESSAGE,
                      f"params must be a list, a dict or None, got {type(value).__name__}")
    return value
