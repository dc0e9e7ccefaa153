"""From an outcome to the bytes a client receives.

A reply is ``msgpack [request_id, status, payload]``; results are packed
while their rows are read (so their size is known), errors carry
PostgreSQL's SQLSTATE and every diagnostic field psycopg exposes.  The
error kinds are ``client.protocol.ErrorKind``: one enum on both sides.
"""

from __future__ import annotations

import logging
from typing import Any

import psycopg

from client import protocol
from client.protocol import DIAG_FIELDS, STATUS_ERROR, STATUS_OK, ErrorKind, error_payload

from .requests import Refusal

logger = logging.getLogger("poolbroker.replies")

_DBAPI_KINDS = {kind.value: kind for kind in (
    ErrorKind.QUERY_CANCELED, ErrorKind.INTEGRITY, ErrorKind.PROGRAMMING, ErrorKind.DATA,
    ErrorKind.OPERATIONAL, ErrorKind.INTERNAL, ErrorKind.NOT_SUPPORTED, ErrorKind.INTERFACE,
    ErrorKind.DATABASE)}


def ok(request_id: int, payload: Any) -> bytes:
    return protocol.pack([request_id, STATUS_OK, payload])


def ok_packed(request_id: int, packed_payload: bytes) -> bytes:
    return protocol.pack_ok_reply(request_id, packed_payload)


def error(request_id: Any, payload: dict[str, Any]) -> bytes:
    return protocol.pack([request_id, STATUS_ERROR, payload])


def refusal(request_id: Any, exc: Refusal) -> bytes:
    return error(request_id, error_payload(exc.kind, str(exc), exc.sqlstate))


def from_psycopg(exc: psycopg.Error) -> dict[str, Any]:
    """The payload of a PostgreSQL error: psycopg's class, SQLSTATE, diagnostics."""
    kind = next((_DBAPI_KINDS[c.__name__] for c in type(exc).__mro__
                 if c.__name__ in _DBAPI_KINDS), ErrorKind.DATABASE)
    diag = exc.diag
    fields = {name: getattr(diag, name, None) for name in DIAG_FIELDS}
    message = fields.get("message_primary") or str(exc).strip() or type(exc).__name__
    return error_payload(kind, message, exc.sqlstate, **fields)


def from_exception(exc: BaseException, what: str) -> dict[str, Any]:
    """The payload for whatever running ``what`` raised."""
    if isinstance(exc, psycopg.Error):
        return from_psycopg(exc)
    if isinstance(exc, Refusal):
        return error_payload(exc.kind, str(exc), exc.sqlstate)
    logger.error("unexpected error running %s", what, exc_info=exc)
    return error_payload(ErrorKind.INTERNAL, f"broker error: {exc!r}")
