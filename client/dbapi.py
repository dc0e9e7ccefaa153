"""PEP 249 (DB-API 2.0) over the broker::

    from client import dbapi
    conn = dbapi.connect()                  # POOLBROKER_ENDPOINT or the default endpoint
    cur = conn.cursor()
    cur.execute("SELECT id, name FROM users WHERE id = %s", [1])
    cur.fetchone()
    conn.commit()

A connection holds no server connection of its own.  Outside a transaction
it holds nothing at all; its transaction is a broker session pinned to one
server connection from its first statement to commit or rollback, and costs
round trips only where psycopg's would:

- the first statement of a transaction carries the BEGIN (with the
  connection's isolation level, read only and deferrable settings, built by
  the broker from checked values): one round trip, not two;
- ``commit()`` and ``rollback()`` are one round trip, none when no
  statement ran since the last one;
- in ``autocommit`` mode statements take the broker's shared, pipelined
  path (``Client.execute``), like ``client.execute()`` itself.

Values are what psycopg returns; ``cursor.description`` carries the
PostgreSQL type OID of each column as its ``type_code``.
"""

from __future__ import annotations

import datetime as _dt
import enum
import logging
import os
import sys
import threading
import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

from ._client import (
    PARTS_SAVEPOINT, Client, Params, Result, RowStream, _aborted, _aborts_transaction,
    _quietly, in_parts, quote_identifier,
)
from .errors import (
    IN_FAILED_TRANSACTION, DatabaseError, DataError, Error, IntegrityError, InterfaceError,
    InternalError, NotSupportedError, OperationalError, ProgrammingError, TransactionExpired,
    Warning,
)
from .protocol import (
    ISOLATION_LEVELS, OP_COMMIT, OP_EXECUTE, OP_EXECUTEMANY, OP_ROLLBACK,
)
from .protocol import default_endpoint

__all__ = [
    "apilevel", "threadsafety", "paramstyle", "connect", "Connection", "Cursor",
    "ServerCursor", "Column", "IsolationLevel",
    "Warning", "Error", "InterfaceError", "DatabaseError", "DataError", "OperationalError",
    "IntegrityError", "InternalError", "ProgrammingError", "NotSupportedError",
    "STRING", "BINARY", "NUMBER", "DATETIME", "ROWID",
    "Date", "Time", "Timestamp", "DateFromTicks", "TimeFromTicks", "TimestampFromTicks",
    "Binary",
]

logger = logging.getLogger("poolbroker.dbapi")

apilevel = "2.0"
threadsafety = 1
"""Threads may share the module, not connections: a transaction belongs to
the socket that opened it, and each thread has its own socket (ZeroMQ
sockets are not thread-safe), so a transaction opened in one thread cannot
be continued from another.  Use one connection per thread (a pool hands a
connection to one thread at a time, which is fine)."""
paramstyle = "pyformat"
"""``%s`` and ``%(name)s``, psycopg's placeholders, bound by the server."""

DEFAULT_ITERSIZE = 100
"""Rows a named cursor fetches per round trip while iterating, as psycopg."""


class IsolationLevel(enum.IntEnum):
    """The values of ``Connection.isolation_level``, numbered as psycopg's."""

    READ_UNCOMMITTED = 1
    READ_COMMITTED = 2
    REPEATABLE_READ = 3
    SERIALIZABLE = 4

    @property
    def sql(self) -> str:
        return ISOLATION_LEVELS[self.value - 1]


# Type objects: each compares equal to the OIDs of its PostgreSQL types (the
# same types psycopg lists for them).

class _TypeObject:
    __slots__ = ("name", "oids")

    def __init__(self, name: str, oids: Iterable[int]) -> None:
        self.name = name
        self.oids = frozenset(oids)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, int):
            return other in self.oids
        if isinstance(other, _TypeObject):
            return self is other
        return NotImplemented

    def __ne__(self, other: object) -> bool:
        equal = self.__eq__(other)
        return equal if equal is NotImplemented else not equal

    def __hash__(self) -> int:
        return hash(self.name)

    def __repr__(self) -> str:
        return f"<{self.name}: {sorted(self.oids)}>"


STRING = _TypeObject("STRING", (25, 1043, 1042))  # text, varchar, bpchar
BINARY = _TypeObject("BINARY", (17,))  # bytea
NUMBER = _TypeObject("NUMBER", (21, 23, 20, 700, 701, 1700))  # int2/4/8, float4/8, numeric
DATETIME = _TypeObject("DATETIME", (1114, 1184, 1082, 1083, 1266, 1186))
"""timestamp, timestamptz, date, time, timetz, interval"""
ROWID = _TypeObject("ROWID", (26,))  # oid

# Constructors: the types the client already sends as PostgreSQL's.
Date = _dt.date
Time = _dt.time
Timestamp = _dt.datetime


def DateFromTicks(ticks: float) -> _dt.date:  # noqa: N802 - PEP 249 name
    """The date (UTC, as psycopg's) at ``ticks`` seconds since the epoch."""
    return TimestampFromTicks(ticks).date()


def TimeFromTicks(ticks: float) -> _dt.time:  # noqa: N802 - PEP 249 name
    """The time of day (UTC, as psycopg's) at ``ticks`` seconds since the epoch."""
    return TimestampFromTicks(ticks).time()


def TimestampFromTicks(ticks: float) -> _dt.datetime:  # noqa: N802 - PEP 249 name
    """The instant ``ticks`` seconds after the epoch, aware (UTC) as psycopg's:
    it binds as timestamptz, whatever the session's time zone."""
    return _dt.datetime.fromtimestamp(ticks, _dt.timezone.utc)


def Binary(data: bytes | bytearray | memoryview) -> bytes:  # noqa: N802 - PEP 249 name
    return bytes(data)


class Column(NamedTuple):
    """One item of ``cursor.description``.  Sizes, precision, scale and
    nullability do not travel from the broker: they are None."""

    name: str
    type_code: int
    display_size: int | None = None
    internal_size: int | None = None
    precision: int | None = None
    scale: int | None = None
    null_ok: bool | None = None


# Connections to one endpoint share one Client, so a process keeps one socket
# per thread and endpoint however many connections it makes (a pool of them,
# or a connection per request): connect() costs no round trip and no socket.
_clients: dict[tuple[str, str | None], Client] = {}
_clients_lock = threading.Lock()


def _client_for(endpoint: str | None, pool: str | None) -> Client:
    if endpoint is not None and not isinstance(endpoint, str):
        raise InterfaceError(f"the endpoint must be a string, got {endpoint!r}")
    key = (endpoint or default_endpoint(), pool)
    with _clients_lock:
        shared = _clients.get(key)
        if shared is None:
            shared = _clients[key] = Client(key[0], pool=pool)
        return shared


def connect(endpoint: str | None = None, *, timeout: float | None = None,
            autocommit: bool = False, pool: str | None = None) -> Connection:
    """A connection through the broker at ``endpoint`` (``POOLBROKER_ENDPOINT``
    or the default ipc endpoint when None), to its pool named ``pool`` (its
    default pool when None).

    ``timeout`` is each request's whole budget in seconds (the client's
    default, 60 s, when None).  Nothing is sent until the first statement:
    a broker that is not there is reported then, as ``OperationalError``
    (``BrokerUnavailable``)."""
    return Connection(_client_for(endpoint, pool), timeout=timeout, autocommit=autocommit)


class Connection:
    """A DB-API connection: a transaction at a time, pinned on the broker from
    its first statement to ``commit()`` or ``rollback()``.

    Use it from one thread at a time, and only in the process that made it:
    in a forked child every method but ``close()`` raises InterfaceError, and
    ``close()`` there only forgets it (the parent's transaction is the
    parent's)."""

    Warning = Warning
    Error = Error
    InterfaceError = InterfaceError
    DatabaseError = DatabaseError
    DataError = DataError
    OperationalError = OperationalError
    IntegrityError = IntegrityError
    InternalError = InternalError
    ProgrammingError = ProgrammingError
    NotSupportedError = NotSupportedError

    def __init__(self, client: Client, *, timeout: float | None = None,
                 autocommit: bool = False) -> None:
        self._client = client
        self._timeout = timeout
        self._pid = os.getpid()
        self._closed = False
        self._autocommit = bool(autocommit)
        self._isolation_level: IsolationLevel | None = None
        self._read_only: bool | None = None
        self._deferrable: bool | None = None
        self._session: bytes | None = None  # the open transaction's token
        self._thread = 0  # the thread whose socket opened it
        # The transaction is aborted until rollback and the server cannot say
        # so: its first statement failed (the broker has rolled it back), or
        # a statement's outcome is unknown.
        self._failed = False
        self._named: weakref.WeakSet[ServerCursor] = weakref.WeakSet()  # closed with it

    # Settings

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def autocommit(self) -> bool:
        return self._autocommit

    @autocommit.setter
    def autocommit(self, value: bool) -> None:
        self._no_transaction("autocommit")
        self._autocommit = bool(value)

    @property
    def isolation_level(self) -> IsolationLevel | None:
        """The isolation level of the transactions it starts; None: the server's default."""
        return self._isolation_level

    @isolation_level.setter
    def isolation_level(self, value: IsolationLevel | int | str | None) -> None:
        self._no_transaction("isolation_level")
        self._isolation_level = _isolation_level(value)

    @property
    def read_only(self) -> bool | None:
        """Whether the transactions it starts are READ ONLY; None: the server's default."""
        return self._read_only

    @read_only.setter
    def read_only(self, value: bool | None) -> None:
        self._no_transaction("read_only")
        self._read_only = None if value is None else bool(value)

    @property
    def deferrable(self) -> bool | None:
        """Whether the transactions it starts are DEFERRABLE; None: the server's default."""
        return self._deferrable

    @deferrable.setter
    def deferrable(self, value: bool | None) -> None:
        self._no_transaction("deferrable")
        self._deferrable = None if value is None else bool(value)

    def _no_transaction(self, setting: str) -> None:
        self._check()
        if self._session is not None or self._failed:
            raise ProgrammingError(f"can't change {setting} now: a transaction is open "
                                   "(commit or roll back first)")

    # Transactions

    @property
    def in_transaction(self) -> bool:
        """A transaction is open (a statement ran since the last commit or rollback)."""
        return self._session is not None or self._failed

    def cursor(self, name: str | None = None) -> Cursor:
        """A cursor; with ``name``, a server-side cursor that streams its rows."""
        self._check()
        if name is not None:
            cursor = ServerCursor(self, name)
            self._named.add(cursor)
            return cursor
        return Cursor(self)

    def commit(self) -> None:
        """Commit the transaction: one round trip, none if no statement ran.

        As with psycopg, committing a transaction whose first statement
        failed rolls it back without an error."""
        self._end(OP_COMMIT)

    def rollback(self) -> None:
        """Roll the transaction back: one round trip, none if no statement ran."""
        self._end(OP_ROLLBACK)

    def _end(self, op: int) -> None:
        self._check()
        session = self._session
        if session is not None:
            self._check_thread()
        if self._failed:  # nothing after a statement of unknown outcome may commit
            op = OP_ROLLBACK
        self._failed = False
        if session is None:
            return
        self._session = None
        try:
            self._client._request(op, session, [], self._timeout)
        except TransactionExpired:
            if op == OP_COMMIT:
                raise  # the work is lost: the caller must know
            # Rolled back already (idle too long, its server connection lost):
            # what rollback() wants is done.

    def ping(self) -> None:
        """Raise BrokerUnavailable unless the broker answers: one round trip
        that takes no server connection (the broker watches its own)."""
        self._check()
        self._client.ping(timeout=self._timeout)

    def close(self) -> None:
        """Roll back what is open and forget the connection; idempotent.

        From any thread, as psycopg's: the broker takes the ROLLBACK from
        another thread's socket of the same process (told by the kernel).
        In a forked child it only forgets: the transaction is the parent's."""
        if self._closed:
            return
        self._closed = True
        for cursor in list(self._named):
            cursor.close()
        session, self._session = self._session, None
        if session is None or os.getpid() != self._pid:
            return
        try:
            self._client._request(OP_ROLLBACK, session, [], self._timeout)
        except Error as exc:  # the broker rolls back what it cannot reach us about
            logger.debug("rollback on close failed: %s", exc)

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: Any) -> None:
        """Commit on a clean exit, roll back on an error, then close (as psycopg)."""
        if self._closed or os.getpid() != self._pid:
            return
        try:
            if exc_type is None:
                self.commit()
            else:
                self.rollback()
        finally:
            self.close()

    def __del__(self) -> None:
        # A connection dropped with its transaction open would hold a server
        # connection until idle_transaction_timeout: give it back now (from
        # inside another request, on a connection of its own: see _request).
        if not getattr(self, "_closed", True) and self._session is not None \
                and not sys.is_finalizing():
            _quietly(self.close)

    # Running statements

    def _check(self) -> None:
        if self._closed:
            raise InterfaceError("the connection is closed")
        if os.getpid() != self._pid:
            raise InterfaceError(
                f"this connection was made in process {self._pid} and cannot be used in "
                f"process {os.getpid()} (inherited across fork): connect again in this process")

    def _check_thread(self) -> None:
        if threading.get_ident() != self._thread:
            raise InterfaceError(
                "the transaction was opened by another thread and belongs to its socket: "
                "use a connection from one thread at a time (threadsafety = 1)")

    def _characteristics(self) -> list | None:
        level, read_only, deferrable = self._isolation_level, self._read_only, self._deferrable
        if level is None and read_only is None and deferrable is None:
            return None
        return [None if level is None else level.sql, read_only, deferrable]

    def _run(self, op: int, args: list) -> Result:
        """Run OP_EXECUTE or OP_EXECUTEMANY by the cheapest path the mode allows."""
        self._check()
        client = self._client
        if self._autocommit:
            return Result._from_wire(client._request(op, None, args, self._timeout))
        if self._failed:  # what the server would answer, without asking it
            raise _aborted()
        session = self._session
        if session is not None:
            self._check_thread()
        try:
            if session is not None:
                return Result._from_wire(client._request(op, session, args, self._timeout))
            self._session, result = client._begin(self._characteristics(), op, args,
                                                  self._timeout)
        except Error as exc:
            if _aborts_transaction(exc, first=session is None):
                self._failed = True
            raise
        self._thread = threading.get_ident()
        return result

    def _execute(self, sql: str, params: Params) -> Result:
        return self._run(OP_EXECUTE, [sql, _params(params)])

    def _executemany(self, sql: str, params: list[Params]) -> Result:
        """Beyond what one request may hold, in parts, all or none: inside the
        transaction behind a savepoint, or in autocommit in one of their own."""
        parts = in_parts(params)
        if len(parts) == 1:
            return self._run(OP_EXECUTEMANY, [sql, params])
        if self._autocommit:
            self._check()
            return self._client._executemany(None, sql, params, self._timeout)
        self._run(OP_EXECUTE, [PARTS_SAVEPOINT, None])  # opens the transaction if need be
        try:
            return self._client._parts(self._session, sql, parts, self._timeout or
                                       self._client.timeout, savepoint=True)
        except Error as exc:
            if _aborts_transaction(exc, first=False):
                self._failed = True
            raise


def _isolation_level(value: IsolationLevel | int | str | None) -> IsolationLevel | None:
    if value is None or isinstance(value, IsolationLevel):
        return value
    try:
        if isinstance(value, str):
            return IsolationLevel[value.strip().upper().replace(" ", "_")]
        return IsolationLevel(value)
    except (KeyError, ValueError):
        raise ProgrammingError(
            f"invalid isolation level {value!r}: expected an IsolationLevel, 1-4, or one of "
            f"{', '.join(ISOLATION_LEVELS)}") from None


def _params(params: Any) -> Params:
    """Parameters as the wire carries them: a list or tuple, a dict, or None."""
    if params is None or isinstance(params, (list, tuple, dict)):
        return params
    if isinstance(params, Mapping):
        return dict(params)
    if isinstance(params, (str, bytes)) or not isinstance(params, Sequence):
        raise ProgrammingError(
            f"query parameters must be a sequence or a mapping, got {type(params).__name__}")
    return list(params)


Query = Any
"""A query as psycopg takes one: str, bytes (UTF-8) or a ``psycopg.sql`` composable."""


def _query_text(operation: Query) -> str:
    if isinstance(operation, str):
        return operation
    if isinstance(operation, (bytes, bytearray, memoryview)):
        return bytes(operation).decode()
    as_string = getattr(operation, "as_string", None)
    if as_string is not None:  # psycopg.sql: rendered with psycopg's default adapters
        return as_string(None)
    return operation  # the broker says what it takes


class Cursor:
    """A client-side cursor: each ``execute`` brings its whole result in one
    round trip (use ``connection.cursor(name=...)`` to stream big ones)."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.arraysize = 1
        self._closed = False
        self._reset()

    def _reset(self) -> None:
        self.description: list[Column] | None = None
        self.rowcount = -1
        self._rows: list[tuple] = []
        self._pos = 0
        self._sets: list[Result] = []  # results of the statements after the current one
        self._has_result = False

    def _show(self, result: Result) -> None:
        """Make ``result`` the current result set."""
        self._has_result = True
        self.rowcount = result.rowcount
        self._rows, self._pos = result.rows, 0
        self.description = ([Column(n, t) for n, t in zip(result.columns, result.types)]
                            if result.columns else None)

    def _check(self) -> None:
        if self._closed:
            raise InterfaceError("the cursor is closed")

    # PEP 249

    @property
    def rownumber(self) -> int | None:
        """The index of the next row in the current result set, None without one."""
        return self._pos if self.description is not None else None

    def execute(self, operation: Query, parameters: Params = None) -> Cursor:
        self._check()
        self._reset()
        result = self.connection._execute(_query_text(operation), parameters)
        self._show(result)
        self._sets = list(result.more_results)
        return self

    def executemany(self, operation: Query, seq_of_parameters: Iterable[Params]) -> None:
        """Run ``operation`` once per parameter set in one round trip; atomic
        (outside a transaction too: it runs as one)."""
        self._check()
        self._reset()
        result = self.connection._executemany(_query_text(operation),
                                              [_params(p) for p in seq_of_parameters])
        self.rowcount = result.rowcount
        self._has_result = True

    def nextset(self) -> bool | None:
        """Move to the next statement's result of a multi-statement text: True,
        or None when there is none."""
        self._check()
        if not self._sets:
            return None
        self._show(self._sets.pop(0))
        return True

    def _rows_left(self) -> list[tuple]:
        self._check()
        if self.description is None:
            raise ProgrammingError("no result available: the last operation did not "
                                   "return rows" if self._has_result else
                                   "no result available: execute a query first")
        return self._rows

    def fetchone(self) -> tuple | None:
        rows = self._rows_left()
        if self._pos >= len(rows):
            return None
        self._pos += 1
        return rows[self._pos - 1]

    def fetchmany(self, size: int | None = None) -> list[tuple]:
        rows = self._rows_left()
        end = self._pos + (self.arraysize if size is None else size)
        chunk = rows[self._pos:end]
        self._pos += len(chunk)
        return chunk

    def fetchall(self) -> list[tuple]:
        rows = self._rows_left()
        chunk = rows[self._pos:]
        self._pos = len(rows)
        return chunk

    def scroll(self, value: int, mode: str = "relative") -> None:
        rows = self._rows_left()
        if mode not in ("relative", "absolute"):
            raise ValueError(f"bad mode {mode!r}: expected 'relative' or 'absolute'")
        target = self._pos + value if mode == "relative" else value
        if not 0 <= target < len(rows):  # as psycopg: onto a row, never past the last
            raise IndexError(f"position {target} out of the result's {len(rows)} rows")
        self._pos = target

    def __iter__(self) -> Cursor:
        return self

    def __next__(self) -> tuple:
        row = self.fetchone()
        if row is None:
            raise StopIteration
        return row

    def setinputsizes(self, sizes: Any) -> None:
        """Does nothing: the server learns the types from the values."""

    def setoutputsize(self, size: int, column: int | None = None) -> None:
        """Does nothing: values arrive whole."""

    def close(self) -> None:
        self._closed = True
        self._reset()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> Cursor:
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: Any) -> None:
        self.close()


class ServerCursor(Cursor):
    """A named cursor: the query runs behind a server-side cursor (DECLARE) and
    its rows arrive ``itersize`` at a time while iterating, ``size`` at a time
    from ``fetchmany``, so a big result is never held whole.

    In a transaction it lives in the connection's transaction, like
    psycopg's (gone at commit or rollback).  In autocommit mode, where
    psycopg would refuse, it gets a pinned transaction of its own for its
    life (``client.stream()``): close it, or exhaust it, promptly."""

    def __init__(self, connection: Connection, name: str) -> None:
        quote_identifier(name)  # refuse a bad name now, not at execute
        self.name = name
        self.itersize = DEFAULT_ITERSIZE
        self._stream: RowStream | None = None
        self._declared_in: bytes | None = None  # the transaction it lives in
        super().__init__(connection)

    def _reset(self) -> None:
        super()._reset()
        self._done = False

    def execute(self, operation: Query, parameters: Params = None) -> ServerCursor:
        """Declare the cursor and fetch its first rows (so that ``description``
        is known): two round trips, the first carrying the BEGIN if needed."""
        self._check()
        self._close_stream()
        self._reset()
        conn = self.connection
        conn._check()
        stream = RowStream(conn._client, _query_text(operation), _params(parameters),
                           self.itersize, conn._timeout, name=self.name,
                           within=None if conn.autocommit else conn._execute)
        stream._open()
        self._stream, self._declared_in = stream, conn._session
        self._has_result = True
        self.rowcount = 0
        self._more(self.itersize)
        return self

    def executemany(self, operation: str, seq_of_parameters: Iterable[Params]) -> None:
        raise NotSupportedError("executemany() is not supported on a named cursor")

    def _more(self, count: int | None) -> None:
        """Fetch up to ``count`` more rows (None: all) behind those not yet read."""
        chunk = self._stream._fetch(count)
        if self.description is None:
            self.description = [Column(n, t) for n, t in zip(chunk.columns, chunk.types)]
        self._rows = self._rows[self._pos:] + chunk.rows
        self._pos = 0
        self._done = count is None or len(chunk.rows) < count
        self.rowcount += len(chunk.rows)

    def _need(self, count: int | None) -> list[tuple]:
        rows = self._rows_left()
        if self._done:
            return rows
        buffered = len(rows) - self._pos
        if count is None:
            self._more(None)
        elif buffered < count:
            self._more(max(count - buffered, self.itersize))
        return self._rows

    @property
    def rownumber(self) -> int | None:
        """Rows read so far (psycopg counts a named cursor's rows the same way)."""
        return None if self.description is None else \
            self.rowcount - (len(self._rows) - self._pos)

    def fetchone(self) -> tuple | None:
        self._need(1)
        return super().fetchone()

    def fetchmany(self, size: int | None = None) -> list[tuple]:
        self._need(self.arraysize if size is None else size)
        return super().fetchmany(size)

    def fetchall(self) -> list[tuple]:
        self._need(None)
        return super().fetchall()

    def scroll(self, value: int, mode: str = "relative") -> None:
        raise NotSupportedError("a named cursor here is NO SCROLL: it only moves forward")

    def nextset(self) -> bool | None:
        self._check()
        return None

    def _close_stream(self) -> None:
        stream, self._stream = self._stream, None
        if stream is None:
            return
        declared_in, self._declared_in = self._declared_in, None
        stream.close()  # its own transaction ends; inside the connection's, nothing is sent
        conn = self.connection
        if declared_in is not None and declared_in == conn._session and not conn._failed \
                and not conn.closed:
            # Still in the transaction that declared it: free it there, so that
            # its name can be declared again (the transaction's end drops it too).
            try:
                conn._execute(f"CLOSE {quote_identifier(self.name)}", None)
            except InternalError as exc:
                if exc.sqlstate != IN_FAILED_TRANSACTION:
                    raise
                # The transaction failed (a statement after the DECLARE): its
                # end drops the cursor; psycopg skips the CLOSE then too.

    def close(self) -> None:
        if not self._closed:
            try:
                self._close_stream()
            finally:
                super().close()

    def __del__(self) -> None:
        # In autocommit its rows come from a transaction of its own, which
        # would hold a server connection until idle_transaction_timeout.
        if getattr(self, "_stream", None) is not None and self._declared_in is None \
                and os.getpid() == self.connection._pid and not sys.is_finalizing():
            _quietly(self._close_stream)
