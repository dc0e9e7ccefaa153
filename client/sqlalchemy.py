"""SQLAlchemy dialect ``postgresql+poolbroker``: SQLAlchemy over ``client.dbapi``::

    engine = create_engine("postgresql+poolbroker://")          # POOLBROKER_ENDPOINT
    engine = create_engine("postgresql+poolbroker://?endpoint=ipc:///run/pb.sock&timeout=5")

The database is the one the broker serves: host, port, user and password in
the URL are ignored (the broker's DSN decides them); a database names one
of the broker's pools (``postgresql+poolbroker:///reports``), none its
default pool.

Values arrive as psycopg returns them (the broker decodes with psycopg), so
the dialect types are the psycopg dialect's, except where that dialect
reaches into the psycopg module itself (JSON wrappers, ranges).

SQLAlchemy's own pool defaults to NullPool: see ``get_pool_class``.
"""

from __future__ import annotations

import logging
from types import ModuleType
from typing import Any

from sqlalchemy import pool, util
from sqlalchemy.dialects.postgresql import JSON, JSONB
from sqlalchemy.dialects.postgresql import ranges
from sqlalchemy.dialects.postgresql._psycopg_common import (
    _PGDialect_common_psycopg, _PGExecutionContext_common_psycopg,
)
from sqlalchemy.dialects.postgresql.psycopg import (
    PGCompiler_psycopg, PGDialect_psycopg, PGIdentifierPreparer_psycopg,
)
from sqlalchemy.engine.url import URL
from sqlalchemy.sql import sqltypes

from . import dbapi as _dbapi
from .errors import BrokerUnavailable, TransactionExpired

__all__ = ["BrokerPool", "PoolbrokerDialect"]

logger = logging.getLogger("poolbroker.sqlalchemy")

# SQLSTATE classes and codes that mean the server connection is gone.
_DISCONNECT_CLASS = "08"  # connection exception
_DISCONNECT_CODES = frozenset({"57P01", "57P02", "57P03"})  # admin/crash shutdown, cannot connect


class _JSON(JSON):
    """Bound as JSON text (SQLAlchemy's serializer, cast to json by the
    compiler); results are already decoded by psycopg on the broker, so
    decoding them again would fail on a dict."""

    render_bind_cast = True

    def result_processor(self, dialect: Any, coltype: Any) -> None:
        return None


class _JSONB(JSONB):
    render_bind_cast = True

    def result_processor(self, dialect: Any, coltype: Any) -> None:
        return None


def _colspecs() -> dict[Any, Any]:
    """The psycopg dialect's type map, minus what needs the psycopg module
    in the application process (Json wrappers, Range objects, which do not
    travel over the wire)."""
    specs = {
        key: value for key, value in PGDialect_psycopg.colspecs.items()
        if key not in (ranges.AbstractSingleRange, ranges.AbstractMultiRange)
    }
    specs.update({JSON: _JSON, sqltypes.JSON: _JSON, JSONB: _JSONB})
    return specs


class BrokerPool(pool.NullPool):
    """NullPool that accepts QueuePool's sizing arguments and ignores them,
    so that ``create_engine(url, pool_size=5, max_overflow=10,
    pool_timeout=30)`` keeps working when only the URL changes (plain
    NullPool makes create_engine raise TypeError on them).  The cap is the
    broker's ``max_connections``, its wait the broker's ``pool_timeout``."""

    def __init__(self, creator: Any, pool_size: int | None = None,
                 max_overflow: int | None = None, timeout: float | None = None,
                 use_lifo: bool | None = None, **kw: Any) -> None:
        ignored = {name: value for name, value in (
            ("pool_size", pool_size), ("max_overflow", max_overflow), ("pool_timeout", timeout),
            ("pool_use_lifo", use_lifo)) if value is not None}
        if ignored:
            logger.info("postgresql+poolbroker: %s ignored: the broker is the pool "
                        "(its max_connections is the cap)", ", ".join(sorted(ignored)))
        super().__init__(creator, **kw)


class PoolbrokerExecutionContext(_PGExecutionContext_common_psycopg):
    """Server-side cursors are the dbapi's named cursors, as psycopg's
    (``connection.cursor(name)``): they stream through the broker."""


class PoolbrokerDialect(_PGDialect_common_psycopg):
    """PostgreSQL through a poolbroker broker (``client.dbapi``)."""

    name = "postgresql"
    driver = "poolbroker"

    supports_statement_cache = True
    supports_server_side_cursors = True
    default_paramstyle = "pyformat"
    # executemany is one atomic round trip whose rowcount is the total.
    supports_sane_multi_rowcount = True
    # INSERT .. VALUES (..), (..) RETURNING in batches: executemany itself
    # returns no rows, so RETURNING over many rows must take this path.
    use_insertmanyvalues = True
    # Ranges and hstore are not carried by the wire format.
    _has_native_hstore = False

    execution_ctx_cls = PoolbrokerExecutionContext
    statement_compiler = PGCompiler_psycopg  # bind casts: untyped binds fail in reflection
    preparer = PGIdentifierPreparer_psycopg

    colspecs = _colspecs()

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("use_native_hstore", False)
        super().__init__(**kwargs)
        # The server's default isolation level, asked once (see get_isolation_level).
        self._server_isolation_level: str | None = None

    @classmethod
    def import_dbapi(cls) -> ModuleType:
        return _dbapi

    @classmethod
    def get_pool_class(cls, url: URL) -> type[pool.Pool]:
        """NullPool (``BrokerPool``): the broker is the pool.

        A dbapi connection costs nothing to make (``connect()`` sends
        nothing and shares the process's socket) and holds no server
        connection outside a transaction, so keeping some in a QueuePool
        saves nothing, while ``pool_size``/``max_overflow`` would suggest
        a cap they do not enforce.  NullPool also keeps no connection
        objects across fork.  The cap is the broker's ``max_connections``."""
        return BrokerPool

    def create_connect_args(self, url: URL) -> tuple[list[Any], dict[str, Any]]:
        """``endpoint`` and ``timeout`` from the query string; the database
        (``postgresql+poolbroker:///reports``) names the broker's pool, none
        its default pool.  Host, port, user and password are the broker's
        business (each pool's dsn), and ignored."""
        query = dict(url.query)
        unknown = set(query) - {"endpoint", "timeout"}
        if unknown:
            raise ValueError(f"postgresql+poolbroker: unknown URL parameters {sorted(unknown)}: "
                             "only endpoint and timeout are understood")
        params: dict[str, Any] = {}
        if "endpoint" in query:
            params["endpoint"] = str(query["endpoint"])
        if "timeout" in query:
            params["timeout"] = float(query["timeout"])
        if url.database:
            params["pool"] = url.database
        return [], params

    # Isolation: applied per transaction by the broker (BEGIN ISOLATION
    # LEVEL ...), never SET SESSION CHARACTERISTICS, which is session state
    # the broker refuses.

    _isolation_lookup = {
        "READ COMMITTED": _dbapi.IsolationLevel.READ_COMMITTED,
        "READ UNCOMMITTED": _dbapi.IsolationLevel.READ_UNCOMMITTED,
        "REPEATABLE READ": _dbapi.IsolationLevel.REPEATABLE_READ,
        "SERIALIZABLE": _dbapi.IsolationLevel.SERIALIZABLE,
    }

    def set_isolation_level(self, dbapi_connection: _dbapi.Connection, level: str) -> None:
        if level == "AUTOCOMMIT":
            dbapi_connection.autocommit = True  # the broker's shared, pipelined path
            dbapi_connection.isolation_level = None
        else:
            dbapi_connection.autocommit = False
            dbapi_connection.isolation_level = self._isolation_lookup[level]

    def get_isolation_level(self, dbapi_connection: _dbapi.Connection) -> str:
        """What the connection's next transaction gets, without a round trip
        once the server's default is known."""
        if dbapi_connection.autocommit:
            return "AUTOCOMMIT"
        level = dbapi_connection.isolation_level
        if level is not None:
            return level.sql
        return self._server_default_isolation(dbapi_connection)

    def get_default_isolation_level(self, dbapi_conn: _dbapi.Connection) -> str:
        return self._server_default_isolation(dbapi_conn)

    def _server_default_isolation(self, dbapi_connection: _dbapi.Connection) -> str:
        """``default_transaction_isolation`` as the broker's connections
        have it, asked once on the shared path (no transaction opened)."""
        if self._server_isolation_level is None:
            if dbapi_connection.in_transaction:
                # Inside a transaction SHOW answers for it, which may have
                # been started at another level: do not cache that.
                return _show_isolation(dbapi_connection)
            autocommit = dbapi_connection.autocommit  # an AUTOCOMMIT engine's, say
            dbapi_connection.autocommit = True
            try:
                self._server_isolation_level = _show_isolation(dbapi_connection)
            finally:
                dbapi_connection.autocommit = autocommit
        return self._server_isolation_level

    def _do_autocommit(self, connection: _dbapi.Connection, value: bool) -> None:
        connection.autocommit = value

    def detect_autocommit_setting(self, dbapi_connection: _dbapi.Connection) -> bool:
        return bool(dbapi_connection.autocommit)

    def set_readonly(self, connection: _dbapi.Connection, value: bool) -> None:
        connection.read_only = value

    def get_readonly(self, connection: _dbapi.Connection) -> bool:
        return bool(connection.read_only)

    def set_deferrable(self, connection: _dbapi.Connection, value: bool) -> None:
        connection.deferrable = value

    def get_deferrable(self, connection: _dbapi.Connection) -> bool:
        return bool(connection.deferrable)

    # Liveness

    def do_ping(self, dbapi_connection: _dbapi.Connection) -> bool:
        """Ask the broker, not PostgreSQL: the broker replaces lost server
        connections itself, so the only thing a client connection can lose
        is the broker.  It takes no server connection."""
        dbapi_connection.ping()
        return True

    def is_disconnect(self, e: Exception, connection: Any, cursor: Any) -> bool:
        if isinstance(e, (BrokerUnavailable, TransactionExpired)):
            # No broker, or the broker lost the transaction's server
            # connection (or expired it): this connection's transaction is
            # gone, and a new dbapi connection costs nothing.
            return True
        if isinstance(e, _dbapi.InterfaceError) and connection is not None \
                and getattr(connection, "closed", False):
            return True
        sqlstate = getattr(e, "sqlstate", None)
        if isinstance(e, _dbapi.OperationalError) and sqlstate:
            return sqlstate.startswith(_DISCONNECT_CLASS) or sqlstate in _DISCONNECT_CODES
        return False

    def on_connect(self) -> Any:
        # Only the engine's isolation level, if any: the psycopg dialect's
        # notice handler has nothing to hook here.
        if self.isolation_level is None:
            return None
        level = self.isolation_level

        def set_level(conn: _dbapi.Connection) -> None:
            self.set_isolation_level(conn, level)

        return set_level

    def do_begin_twophase(self, connection: Any, xid: Any) -> None:
        raise NotImplementedError("two-phase commit is not supported through the broker")

    @util.memoized_property
    def _dialect_specific_select_one(self) -> str:
        return "SELECT 1"


def _show_isolation(dbapi_connection: _dbapi.Connection) -> str:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("SHOW transaction_isolation")
        return str(cursor.fetchone()[0]).upper()
    finally:
        cursor.close()


dialect = PoolbrokerDialect
