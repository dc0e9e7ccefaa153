"""poolbroker's client: what workers import.  Needs pyzmq and msgpack only.

    import client
    r = client.execute("SELECT id, name FROM t WHERE id = %s", [1])
    with client.transaction() as tx:
        tx.execute("UPDATE t SET name = %s WHERE id = %s", ["x", 1])
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any

from ._client import (
    DEFAULT_CHUNK_ROWS, DEFAULT_CONNECT_TIMEOUT, DEFAULT_TIMEOUT, Client, CopyOut, Params, Result,
    RowStream, Transaction,
)
from .errors import (
    BrokerUnavailable, DatabaseError, DataError, Diagnostic, Error, IntegrityError,
    InterfaceError, InternalError, MessageError, NotSupportedError, OperationalError,
    PoolTimeout, ProgrammingError, QueryCanceled, ResultTooLarge, SessionStateRefused,
    TooManyRequests, TransactionExpired, Warning,
)
from .protocol import Json

__all__ = [
    "Client", "Result", "Transaction", "RowStream", "Json", "DEFAULT_TIMEOUT",
    "DEFAULT_CONNECT_TIMEOUT",
    "configure", "execute", "executemany", "batch", "transaction", "stats",
    "Error", "Warning", "InterfaceError", "DatabaseError", "DataError",
    "OperationalError", "IntegrityError", "InternalError", "ProgrammingError",
    "NotSupportedError", "QueryCanceled", "PoolTimeout", "TooManyRequests",
    "BrokerUnavailable", "TransactionExpired", "SessionStateRefused",
    "MessageError", "ResultTooLarge", "Diagnostic", "stream", "copy", "CopyOut",
]

_default: Client | None = None
_default_lock = threading.Lock()


def configure(endpoint: str | None = None, timeout: float | None = None, *,
              connect_timeout: float | None = None) -> Client:
    """Set the endpoint and timeouts used by the module-level functions.

    Optional: without it the first call uses ``POOLBROKER_ENDPOINT`` or the
    default ipc endpoint, a 60 s timeout, and ``POOLBROKER_CLIENT_CONNECT_TIMEOUT``
    or a 2 s connect timeout.
    """
    global _default
    with _default_lock:
        _default = Client(endpoint, timeout=timeout, connect_timeout=connect_timeout)
        return _default


def _client() -> Client:
    default = _default
    if default is None:
        with _default_lock:
            if _default is None:
                globals()["_default"] = Client()
            default = _default
    return default  # type: ignore[return-value]


def execute(sql: str, params: Params = None, *, timeout: float | None = None) -> Result:
    return _client().execute(sql, params, timeout=timeout)


def executemany(sql: str, seq_of_params: Iterable[Params], *,
                timeout: float | None = None) -> Result:
    return _client().executemany(sql, seq_of_params, timeout=timeout)


def batch(statements: Iterable[Any], *, timeout: float | None = None) -> list[Result]:
    return _client().batch(statements, timeout=timeout)


def transaction(*, timeout: float | None = None) -> Transaction:
    return _client().transaction(timeout=timeout)


def stream(sql: str, params: Params = None, *, chunk_rows: int = DEFAULT_CHUNK_ROWS,
           timeout: float | None = None) -> RowStream:
    return _client().stream(sql, params, chunk_rows=chunk_rows, timeout=timeout)


def copy(sql: str, data: Iterable[Any] | None = None, *,
         timeout: float | None = None) -> Result | CopyOut:
    return _client().copy(sql, data, timeout=timeout)


def stats(*, timeout: float | None = None) -> dict[str, Any]:
    return _client().stats(timeout=timeout)
