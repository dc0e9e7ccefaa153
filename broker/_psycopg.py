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
