"""Every use of psycopg's private API or of libpq through ctypes, in one place.

The broker drives libpq itself (pipeline mode, chunked rows, its own
placeholder conversion) through psycopg's ``pq`` wrapper.  What psycopg
does not export is reached here, gated on the versions we test, so that a
psycopg upgrade breaks one module loudly instead of the loop quietly.
"""

from __future__ import annotations

import ctypes
from types import SimpleNamespace
from typing import Any

import psycopg
from psycopg import adapt, pq
from psycopg.adapt import AdaptersMap

TESTED_PSYCOPG = ((3, 3),)
"""psycopg minor versions whose private names below we rely on (pyproject pins them)."""

_version = tuple(int(part) for part in psycopg.__version__.split(".")[:2])
if _version not in TESTED_PSYCOPG:
    raise ImportError(
        f"poolbroker is tested with psycopg {', '.join('%d.%d' % v for v in TESTED_PSYCOPG)}, "
        f"found {psycopg.__version__}: it uses psycopg internals (broker/_psycopg.py)")

from psycopg._queries import PostgresQuery  # noqa: E402  psycopg's placeholder rules

CHUNKED_ROWS = pq.version() >= 170000
"""PQsetChunkedRowsMode exists (libpq 17): big results are read in chunks."""


def placeholder_query(adapters: AdaptersMap) -> Any:
    """A factory of ``PostgresQuery`` objects converting psycopg placeholders
    (``%s``, ``%(name)s``) to ``$n`` and dumping parameters with ``adapters``,
    without a connection (server connections all use UTF-8)."""
    transformer = adapt.Transformer(SimpleNamespace(adapters=adapters, connection=None))
    return lambda: PostgresQuery(transformer)


MAX_PERCENT_SIGNS = 1 << 17
"""``%`` signs one statement text with parameters may hold: room for
PostgreSQL's 65,535 parameters and as many ``%%``.  A longer run of them is
refused before any conversion: psycopg spends about 5 us a placeholder."""

_PERCENT, _OPEN, _NEWLINE = b"%(\n"
_STAND_INS = bytes(c for c in range(1, 32) if c not in b"\t\n\r")


def convert_placeholders(query: Any, sql: str, params: Any) -> None:
    """``query.convert(sql, params)`` (a ``PostgresQuery``) in time linear in
    the text, whatever it holds.

    psycopg's own conversion is quadratic twice over: each ``%%`` merges all
    the text before it into the next fragment (16,000 of them: 88 ms), and
    each ``%(`` that does not open a ``%(name)s`` scans to the end of the
    text (16,000: 3.3 s; 1 MB of them: about an hour).  So the text is read
    once here by psycopg's placeholder rules (``%(name)`` and one character,
    or ``%`` and one character, a newline excepted): a ``%(`` that opens no
    name is refused at once, as psycopg would refuse it, and each ``%%`` goes
    to psycopg as one byte the text does not hold, made ``%`` again after."""
    text = sql.encode()  # what psycopg does: server connections speak UTF-8
    signs = text.count(b"%")
    if signs > MAX_PERCENT_SIGNS:
        raise psycopg.ProgrammingError(
            f"the statement holds {signs} '%' signs, more than the {MAX_PERCENT_SIGNS} "
            "a statement can need (PostgreSQL takes at most 65535 parameters)")
    text, stand_in = _stand_in_doubled_percents(text)
    query.convert(text, params)
    if stand_in:
        query.query = query.query.replace(stand_in, b"%")


def _stand_in_doubled_percents(text: bytes) -> tuple[bytes, bytes]:
    """(``text`` with each ``%%`` placeholder match replaced by one byte it
    does not otherwise hold, that byte or b"" if none was)."""
    pieces: list[bytes] = []
    stand_in = b""
    end = len(text)
    start = pos = 0
    close = -1  # the first ')' after some point, searched again only once passed
    while (at := text.find(b"%", pos)) >= 0 and at + 1 < end:
        follower = text[at + 1]
        if follower == _OPEN:
            if close < at + 2:
                close = text.find(b")", at + 2)
                if close < 0:
                    close = end
            if at + 2 < close < end - 1 and text[close + 1] != _NEWLINE:
                pos = close + 2  # %(name) and its format character
                continue
            raise psycopg.ProgrammingError(
                "incomplete placeholder: '%('; if you want to use '%' as an operator "
                "you can double it up, i.e. use '%%'")
        if follower == _PERCENT:
            if not stand_in:
                stand_in = next((bytes((c,)) for c in _STAND_INS if c not in text), b"")
                if not stand_in:
                    raise psycopg.ProgrammingError(
                        "the statement holds every control character and '%%'")
            pieces += (text[start:at], stand_in)
            start = at + 2
        pos = at + 1 if follower == _NEWLINE else at + 2  # '%' then a newline: no match
    if not pieces:
        return text, b""
    pieces.append(text[start:])
    return b"".join(pieces), stand_in


def _libpq_send_pipeline_sync() -> Any:
    """libpq 17's PQsendPipelineSync, which psycopg does not wrap: a Sync
    that is not flushed at once, so the loop sends all it queued on a
    connection in one write.  None where it is missing."""
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


def send_sync(pgconn: pq.PGconn) -> None:
    """Queue a Sync; without PQsendPipelineSync it is flushed at once."""
    if _SEND_PIPELINE_SYNC is None:
        pgconn.pipeline_sync()
    elif not _SEND_PIPELINE_SYNC(pgconn.pgconn_ptr):
        raise psycopg.OperationalError(pgconn.get_error_message().decode(errors="replace"))
