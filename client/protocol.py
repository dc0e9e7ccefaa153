"""The wire format shared by the broker and its clients.

A request is a DEALER message of one frame holding two msgpack values
back to back (``pack_request``)::

    header = [request_id, op, timeout_ms, session]
          or [request_id, op, timeout_ms, session, pool]
    body   = [args...]                  (op specific, see OP_* below)

``pool`` names the pool (a ``[pools.NAME]`` table of the broker's
settings) the request runs on; without it, or nil, the default pool's.  A
request in a transaction (``session`` set) runs on the transaction's.

One frame, not two: each frame costs both ends a ZeroMQ message (a bare
pyzmq loop at 32 processes on two cores: 30 us of client CPU a request).  The broker
still takes the header and the body as two frames, as clients before
protocol 2 send them.  It decodes the small header first (``unpack_first``
finds where it ends) and the body only once the header is valid.  A reply
is one frame::

    msgpack [request_id, status, payload]

``status`` is STATUS_OK (payload is the op's result) or STATUS_ERROR
(payload is an error dict, see ``error_payload``).

Values that msgpack cannot carry natively travel as ext types so that a
client sees exactly what psycopg returned on the broker side.
"""

from __future__ import annotations

import datetime as _dt
import decimal
import enum
import threading
import uuid
from typing import Any
from zoneinfo import ZoneInfo

import msgpack

PROTOCOL_VERSION = 2
"""2: a request is one frame (1: two, still accepted)."""

# Operations.  Body layouts (RESULT is described below):
OP_EXECUTE = 1  # [sql, params]            -> RESULT
OP_EXECUTEMANY = 2  # [sql, seq_of_params] -> RESULT
OP_BEGIN = 3  # [] or [characteristics, op, body]: see BEGIN below
OP_COMMIT = 4  # []                         -> None
OP_ROLLBACK = 5  # []                       -> None
OP_BATCH = 6  # [[[sql, params], ...]]      -> [RESULT, ...]
OP_STATS = 7  # []                          -> {name: number}
OP_PING = 8  # []                           -> None
OP_COPY_FROM = 9  # [sql or None, data, end] -> None, then at the end RESULT
OP_COPY_TO = 10  # [sql or None, max_bytes] -> [data, done]
OP_CONTROL = 11  # [command]                -> the command's answer (see CONTROL below)

MAX_STATEMENTS = 4096
"""Statements in one executemany or batch request.  The broker works on a
request whole, about 14 us a statement, while every other client waits:
this bounds that to some 60 ms.  The client runs a longer executemany as
several requests inside one transaction."""
MAX_PARAMETERS = 65_536
"""Parameters in one executemany or batch request, all statements together:
wide rows cost the loop by the value, not the statement (4,096 rows of 200
values held other clients 0.6 s).  The client's parts respect it too."""

# RESULT is ``[columns, rows, rowcount, types]``: ``columns`` the names (nil
# for a command), ``rows`` a list of arrays, ``rowcount`` as psycopg reports
# it, ``types`` the columns' PostgreSQL type OIDs (nil for a command).  A
# text that ran as several statements (the simple query protocol) appends a
# fifth item, the RESULTs of the statements after the first.  A client also
# accepts the three-item form of brokers before types travelled.
#
# BEGIN: ``[]`` opens a transaction and answers its token (bytes).
# ``[characteristics, op, body]`` opens it with ``characteristics``
# (``[isolation_level, read_only, deferrable]``, each nil for the server's
# default; isolation_level one of ISOLATION_LEVELS) and, when ``op`` is
# OP_EXECUTE or OP_EXECUTEMANY, runs that op's ``body`` (its msgpack bytes,
# as it would travel alone) as the transaction's first statement, in the
# same round trip: the answer is then ``[token, RESULT]``.  With ``op`` nil
# (``body`` nil) the answer is the token alone.  The broker builds the BEGIN
# statement itself from these validated values, never from client text.  If
# the first statement fails the transaction is rolled back at once and the
# error is the answer: there is no token to end.

# CONTROL: ``poolbroker ctl``.  Only the broker's own uid over ipc, or over
# tcp a CURVE key of ``curve_admin_clients``, may send it; anyone else gets
# ProgrammingError, SQLSTATE 42501.  ``command`` is one of CONTROL_COMMANDS;
# "stats" and "pools" answer what OP_STATS does, "reload" answers
# ``{"applied": {name: value}, "restart_needed": [name], "problems": [line]}``,
# the others nil.

CONTROL_COMMANDS = ("stats", "pools", "reload", "pause", "resume", "reconnect", "drain")

ISOLATION_LEVELS = ("READ UNCOMMITTED", "READ COMMITTED", "REPEATABLE READ", "SERIALIZABLE")

OP_NAMES = {
    OP_EXECUTE: "execute",
    OP_EXECUTEMANY: "executemany",
    OP_BEGIN: "begin",
    OP_COMMIT: "commit",
    OP_ROLLBACK: "rollback",
    OP_BATCH: "batch",
    OP_STATS: "stats",
    OP_PING: "ping",
    OP_COPY_FROM: "copy_from",
    OP_COPY_TO: "copy_to",
    OP_CONTROL: "control",
}

STATUS_OK = 0
STATUS_ERROR = 1


class ErrorKind(enum.StrEnum):
    """The ``kind`` of an error payload: the name of the client's exception class."""

    INTERFACE = "InterfaceError"
    DATABASE = "DatabaseError"
    DATA = "DataError"
    OPERATIONAL = "OperationalError"
    INTEGRITY = "IntegrityError"
    INTERNAL = "InternalError"
    PROGRAMMING = "ProgrammingError"
    NOT_SUPPORTED = "NotSupportedError"
    QUERY_CANCELED = "QueryCanceled"
    POOL_TIMEOUT = "PoolTimeout"
    TOO_MANY_REQUESTS = "TooManyRequests"
    BROKER_UNAVAILABLE = "BrokerUnavailable"
    TRANSACTION_EXPIRED = "TransactionExpired"
    SESSION_STATE_REFUSED = "SessionStateRefused"
    MESSAGE = "MessageError"
    RESULT_TOO_LARGE = "ResultTooLarge"

PROBE_REQUEST_ID = -1
"""The request id of a reply nobody asked for: the broker sends one now and
then to each client holding a transaction, to learn (ROUTER_MANDATORY)
whether its connection is still up.  Clients ignore it."""

HEADER_FIELDS = 4
"""Fields of a header without a pool name; with one, a fifth (nil when only
the sixth is sent); over ipc, a sixth: the client's ``time.monotonic()`` as
it sent the request, so that its timeout counts the time the request spent
in the transport (host-wide, that clock is the broker's too)."""

# Ext type codes.
EXT_DECIMAL = 1  # str(Decimal), NaN and signs included
EXT_DATE = 2  # ISO format
EXT_TIME = 3  # ISO format, offset included for timetz
EXT_DATETIME = 4  # [ISO format with offset, zone key or None]
EXT_TIMEDELTA = 5  # [days, seconds, microseconds]
EXT_UUID = 6  # 16 bytes
EXT_JSON = 7  # msgpack of the document: a parameter to bind as jsonb

# psycopg's Diagnostic fields carried in error payloads, by their psycopg names.
DIAG_FIELDS = (
    "severity", "severity_nonlocalized", "message_primary", "message_detail",
    "message_hint", "statement_position", "internal_position", "internal_query",
    "context", "schema_name", "table_name", "column_name", "datatype_name",
    "constraint_name", "source_file", "source_line", "source_function",
)
"""psycopg's Diagnostic fields an error reply carries (its sqlstate travels beside them)."""

# The most a single message may unpack to; the broker also sets MAXMSGSIZE.
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


class Json:
    """Wrap a dict or list so it binds as a jsonb parameter.

    Plain dicts already bind as jsonb; plain lists bind as PostgreSQL
    arrays, so wrap a list (or a scalar) when the column is json/jsonb.
    """

    __slots__ = ("obj",)

    def __init__(self, obj: Any) -> None:
        self.obj = obj

    def __repr__(self) -> str:
        return f"Json({self.obj!r})"


def _encode_ext(obj: Any) -> msgpack.ExtType | list | str:
    # datetime is a subclass of date: test it first.
    if isinstance(obj, _dt.datetime):
        tz = obj.tzinfo
        key = tz.key if isinstance(tz, ZoneInfo) else None
        return msgpack.ExtType(EXT_DATETIME, _pack([obj.isoformat(), key]))
    if isinstance(obj, decimal.Decimal):
        return msgpack.ExtType(EXT_DECIMAL, str(obj).encode())
    if isinstance(obj, _dt.date):
        return msgpack.ExtType(EXT_DATE, obj.isoformat().encode())
    if isinstance(obj, _dt.time):
        return msgpack.ExtType(EXT_TIME, obj.isoformat().encode())
    if isinstance(obj, _dt.timedelta):
        return msgpack.ExtType(
            EXT_TIMEDELTA, _pack([obj.days, obj.seconds, obj.microseconds])
        )
    if isinstance(obj, uuid.UUID):
        return msgpack.ExtType(EXT_UUID, obj.bytes)
    if isinstance(obj, Json):
        return msgpack.ExtType(EXT_JSON, _pack(obj.obj))
    if isinstance(obj, (tuple, set, frozenset)):
        return list(obj)
    if isinstance(obj, int):  # beyond msgpack's 64 bits: numeric, as psycopg binds it
        return msgpack.ExtType(EXT_DECIMAL, str(obj).encode())
    if isinstance(obj, enum.Enum) and obj.name is not None:  # as psycopg dumps one
        return obj.name
    raise TypeError(f"cannot send a value of type {type(obj).__name__}: {obj!r}")


def _plain(data: bytes, budget: DecodeBudget | None = None) -> Any:
    """An ext payload: plain msgpack, no ext types inside.  Decoding nested
    ext payloads recursively would let ~200 levels in a 700-byte message
    overrun the C stack (msgpack uses about 40 KB of it per level).
    Within ``budget`` (the message's) when one is given."""
    hooks = {} if budget is None else budget.hooks()
    hooks["ext_hook"] = _no_nested_ext
    return msgpack.unpackb(data, raw=False, **hooks)


SMALL_PAYLOAD = 256
"""Bytes a datetime's or a timedelta's payload may take (they take under 100):
nothing bigger is decoded for them."""


def _small(data: bytes) -> Any:
    if len(data) > SMALL_PAYLOAD:
        raise ValueError(f"a payload of {len(data)} bytes (at most {SMALL_PAYLOAD})")
    return _plain(data)


def _no_nested_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"ext type {code} inside an ext payload")


def _decode_datetime(data: bytes) -> _dt.datetime:
    text, key = _small(data)
    value = _dt.datetime.fromisoformat(text)
    if key is not None:
        value = value.astimezone(ZoneInfo(key))
    return value


def _decode_timedelta(data: bytes) -> _dt.timedelta:
    days, seconds, micro = _small(data)
    return _dt.timedelta(days=days, seconds=seconds, microseconds=micro)


def _json_from_wire(data: bytes) -> Json:
    return Json(_plain(data))


_EXT_DECODERS = {
    EXT_DECIMAL: lambda data: decimal.Decimal(data.decode()),
    EXT_DATE: lambda data: _dt.date.fromisoformat(data.decode()),
    EXT_TIME: lambda data: _dt.time.fromisoformat(data.decode()),
    EXT_DATETIME: _decode_datetime,
    EXT_TIMEDELTA: _decode_timedelta,
    EXT_UUID: lambda data: uuid.UUID(bytes=data),
    EXT_JSON: _json_from_wire,
}


def _decode_ext(code: int, data: bytes) -> Any:
    try:
        decoder = _EXT_DECODERS[code]
    except KeyError:
        raise ValueError(f"unknown ext type {code}") from None
    try:
        return decoder(data)
    except Exception as exc:  # decimal, zoneinfo and the rest raise their own types
        raise ValueError(f"invalid payload for ext type {code}: {exc!r}") from None


# msgpack's Packer starts with a 256 KiB buffer; allocating that for every
# small message showed in the broker's profile.  Buffers grow as needed.
_SMALL_BUFFER = 4096


def _packer(autoreset: bool = True) -> msgpack.Packer:
    return msgpack.Packer(default=_encode_ext, use_bin_type=True, autoreset=autoreset,
                          buf_size=_SMALL_BUFFER)


def _pack(obj: Any) -> bytes:
    return _packer().pack(obj)


ITEM_BYTES = 256
"""What an item of an array or a map is estimated to cost the broker before
its request runs: decoded, a slot and a small object (40 bytes), and dumped
by psycopg for the server, which builds a token per item (measured: 180 to
350 bytes a moment per item, for ints, floats, short strings, pairs)."""
CONTAINER_BYTES = 128
"""What an array or a map costs besides its items (an empty list: 56 bytes)."""
EXT_BYTES = 256
"""What an ext value costs, decoded and dumped (a Decimal alone: 104 bytes)."""


class DecodeBudgetExceeded(ValueError):
    """Decoded, the message would take more memory than its budget allows."""


class DecodeBudget:
    """What a large message may decode into, checked as msgpack builds it.

    An empty array is one byte on the wire and 56 in memory, an ext value a
    few bytes and a Python object, and a Json one holds a document of its
    own: a body of them would take far more memory decoded than its size.
    Two bounds: arrays, maps and ext values (``containers``, by count: past
    it the message is malformed), and ``room``, bytes of memory estimated
    (CONTAINER_BYTES, ITEM_BYTES, EXT_BYTES): past it DecodeBudgetExceeded.
    msgpack calls the hooks as it builds each one, and refuses an array
    whose header announces more items than ``room`` has space for before
    building it, so decoding stops as soon as either is spent."""

    __slots__ = ("left", "granted", "size", "room", "max_items")

    def __init__(self, containers: int, size: int, room: int) -> None:
        self.left = self.granted = containers
        self.size = size  # of the message, for the error
        self.room = room
        self.max_items = max(room // ITEM_BYTES, 1)

    def grant(self, containers: int) -> None:
        """Allow ``containers`` more (ones the caller accounts for otherwise)."""
        self.left += containers
        self.granted += containers

    def count(self, container: Any) -> Any:
        self._take(CONTAINER_BYTES + ITEM_BYTES * len(container))
        return container

    def _take(self, nbytes: int) -> None:
        self.left -= 1
        if self.left < 0:
            raise ValueError(f"more than {self.granted} arrays and maps (ext values "
                             f"included) for a message of {self.size} bytes")
        self.room -= nbytes
        if self.room < 0:
            raise DecodeBudgetExceeded("decoded, it would take more memory than is left")

    def ext(self, code: int, data: bytes) -> Any:
        self._take(EXT_BYTES)
        if code == EXT_JSON:  # its document's arrays and maps count too
            return Json(_plain(data, self))
        return _decode_ext(code, data)

    def hooks(self) -> dict[str, Any]:
        """msgpack's keyword arguments that apply the budget."""
        return {"ext_hook": self.ext, "list_hook": self.count, "object_hook": self.count,
                "max_array_len": self.max_items, "max_map_len": self.max_items // 2}


def unpacker(data: bytes, budget: DecodeBudget | None = None) -> msgpack.Unpacker:
    """A streaming reader over ``data``: a large message is decoded one item
    at a time, so its decoded form never has to exist whole; within
    ``budget`` when one is given."""
    hooks = budget.hooks() if budget is not None else {"ext_hook": _decode_ext}
    reader = msgpack.Unpacker(raw=False, max_buffer_size=len(data) or 1, **hooks)
    reader.feed(data)
    return reader


def unpack_within(data: bytes, budget: DecodeBudget) -> Any:
    """``unpack`` within ``budget``."""
    return msgpack.unpackb(data, raw=False, **budget.hooks())


def pack(obj: Any) -> bytes:
    """Serialize a message, encoding non-native values as ext types."""
    return _pack(obj)


_reused = threading.local()
REUSED_PACKER_BYTES = 1 << 20
"""A reused packer whose buffer grew past this (a large result) is dropped."""


def _reused_packer() -> msgpack.Packer:
    """This thread's packer for the functions below (the broker's replies),
    emptied: making a Packer for every piece of every reply cost more than
    packing it.  Each function takes what it packed before calling another."""
    try:
        packer = _reused.packer
    except AttributeError:
        packer = _reused.packer = _packer(autoreset=False)
    packer.reset()
    return packer


def pack_rows(rows: list) -> bytes:
    """Rows as consecutive msgpack arrays, to splice into ``pack_result``."""
    packer = _reused_packer()
    for row in rows:
        packer.pack(row)
    packed = packer.bytes()
    if len(packed) > REUSED_PACKER_BYTES:
        del _reused.packer  # its buffer stays as large as the largest use
    return packed


def pack_result(columns: list[str] | None, packed_rows: list[bytes], row_count: int,
                rowcount: int, types: list[int] | None = None,
                more: list[bytes] | None = None) -> bytes:
    """``pack([columns, rows, rowcount, types])`` (a RESULT) from rows packed
    beforehand (so that their size was known while they were read); with
    ``more`` (RESULTs packed beforehand), their list as a fifth item."""
    packer = _reused_packer()
    packer.pack_array_header(5 if more else 4)
    packer.pack(columns)
    packer.pack_array_header(row_count)
    head = packer.bytes()
    packer.reset()
    packer.pack(rowcount)
    packer.pack(types)
    tail = packer.bytes()
    if more:
        return b"".join((head, *packed_rows, tail, pack_list(more)))
    return b"".join((head, *packed_rows, tail))


EMPTY_RESULT = [None, [], 0, None]
"""The RESULT of a statement that never reached the server (executemany of nothing)."""


def pack_list(packed_items: list[bytes]) -> bytes:
    """``pack(list)`` of items packed beforehand."""
    packer = _reused_packer()
    packer.pack_array_header(len(packed_items))
    return b"".join((packer.bytes(), *packed_items))


def pack_ok_reply(request_id: int, packed_payload: bytes) -> bytes:
    """``pack([request_id, STATUS_OK, payload])`` with the payload packed beforehand."""
    packer = _reused_packer()
    packer.pack_array_header(3)
    packer.pack(request_id)
    packer.pack(STATUS_OK)
    return packer.bytes() + packed_payload


def request_packer() -> msgpack.Packer:
    """A Packer for ``pack_request``, to keep and reuse from one thread
    (making one costs more than packing a small request)."""
    return _packer()


def pack_request(packer: msgpack.Packer, request_id: int, op: int, timeout_ms: int | None,
                 session: bytes | None, body: Any, pool: str | None = None,
                 sent_at: float | None = None) -> bytes:
    """A request's one frame: its header, then its body."""
    if sent_at is not None:
        header = [request_id, op, timeout_ms, session, pool, sent_at]
    elif pool is not None:
        header = [request_id, op, timeout_ms, session, pool]
    else:
        header = [request_id, op, timeout_ms, session]
    return packer.pack(header) + packer.pack(body)


def unpack_first(data: bytes | memoryview, max_bytes: int) -> tuple[Any, int]:
    """The first msgpack value in ``data`` and the offset where it ends,
    reading at most its first ``max_bytes``; ValueError (or a subclass) if
    there is none.  Ext values come back undecoded, as msgpack.ExtType."""
    # unpackb, not an Unpacker: an Unpacker embeds a 40 KB stack that is
    # zeroed each time one is made, for every request.  unpackb hands what
    # follows the first value over in ExtraData.
    window = data[:max_bytes]
    try:
        return msgpack.unpackb(window), len(window)
    except msgpack.ExtraData as extra:
        return extra.unpacked, len(window) - len(extra.extra)
    except ValueError as exc:
        if "incomplete" not in str(exc):
            raise
        raise ValueError(f"no whole value within {len(window)} bytes") from None


def unpack(data: bytes, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> Any:
    """Deserialize a message; raises ValueError (or a subclass) if malformed."""
    # unpackb bounds every declared length by len(data), so a hostile
    # header cannot make it allocate more than the message itself.
    if len(data) > max_bytes:
        raise ValueError(f"message of {len(data)} bytes exceeds the limit of {max_bytes}")
    return msgpack.unpackb(data, ext_hook=_decode_ext, raw=False)


def error_payload(
    kind: str, message: str, sqlstate: str | None = None, **diag: Any
) -> dict[str, Any]:
    """The payload of a STATUS_ERROR reply.

    ``kind`` names the client exception class (``IntegrityError``,
    ``PoolTimeout``...); ``diag`` carries psycopg's Diagnostic fields by
    their psycopg names (``message_detail``, ``constraint_name``...).
    """
    payload = {"kind": kind, "message": message, "sqlstate": sqlstate}
    payload.update({k: v for k, v in diag.items() if v is not None})
    return payload


def default_endpoint() -> str:
    """``POOLBROKER_ENDPOINT``, else an ipc socket in a 0700 per-user directory."""
    import os

    endpoint = os.environ.get("POOLBROKER_ENDPOINT")
    if endpoint:
        return endpoint
    return f"ipc:///tmp/poolbroker-{os.getuid()}/broker.sock"
