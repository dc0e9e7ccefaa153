"""Exceptions raised by the client: PEP 249 classes plus the broker's own.

PostgreSQL errors arrive with the class psycopg chose for their SQLSTATE
(``IntegrityError`` for 23xxx, ``ProgrammingError`` for 42xxx...) and
carry ``sqlstate`` and ``diag`` like psycopg's exceptions do.
"""

from __future__ import annotations

from typing import Any

from .protocol import DIAG_FIELDS as _DIAG_FIELDS
from .protocol import ErrorKind



IN_FAILED_TRANSACTION = "25P02"
"""What a statement gets in an aborted transaction, from the server or
from the client when only the client knows (see ``_aborts_transaction``)."""


class Diagnostic:
    """The error fields PostgreSQL reported, named as in ``psycopg.errors.Diagnostic``."""

    __slots__ = ("sqlstate", *_DIAG_FIELDS)

    def __init__(self, fields: dict[str, Any]) -> None:
        for name in self.__slots__:
            setattr(self, name, fields.get(name))

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{n}={getattr(self, n)!r}" for n in self.__slots__ if getattr(self, n)
        )
        return f"Diagnostic({shown})"


class Warning(Exception):  # noqa: A001 - PEP 249 name
    pass


class Error(Exception):
    """Base of every error the client raises."""

    def __init__(self, message: str = "", *, sqlstate: str | None = None,
                 diag: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.diag = Diagnostic({**(diag or {}), "sqlstate": sqlstate})

    @property
    def detail(self) -> str | None:
        return self.diag.message_detail

    @property
    def hint(self) -> str | None:
        return self.diag.message_hint

    @property
    def constraint_name(self) -> str | None:
        return self.diag.constraint_name


class InterfaceError(Error):
    """The client was misused (bad arguments, a value it cannot send)."""


class DatabaseError(Error):
    pass


class DataError(DatabaseError):
    pass


class OperationalError(DatabaseError):
    pass


class IntegrityError(DatabaseError):
    pass


class InternalError(DatabaseError):
    pass


class ProgrammingError(DatabaseError):
    pass


class NotSupportedError(DatabaseError):
    pass


class QueryCanceled(OperationalError):
    """The statement was cancelled on the server (57014): timeout or cancel."""


class PoolTimeout(OperationalError):
    """No server connection became free within ``pool_timeout``; not run."""


class TooManyRequests(OperationalError):
    """The broker's queue already held ``max_waiting`` requests; not run."""


class BrokerUnavailable(OperationalError):
    """No answer from the broker: none connected within ``connect_timeout``,
    the connection was lost, the transport failed, or no reply came within
    the request's timeout.

    ``outcome_unknown`` is True when the request was handed to the
    transport: the statement may or may not have run.  False means it
    was never sent.
    """

    def __init__(self, message: str = "", *, outcome_unknown: bool = False) -> None:
        super().__init__(message)
        self.outcome_unknown = outcome_unknown


class TransactionExpired(OperationalError):
    """The broker rolled the transaction back (idle too long, or unknown)."""


class SessionStateRefused(NotSupportedError):
    """A statement that changes session state was sent outside a transaction.

    On a shared connection it would leak to other clients; run it inside
    ``client.transaction()`` (the connection is reset afterwards) or use
    the transaction-scoped form (``SET LOCAL``, ``pg_advisory_xact_lock``).
    """


class ResultTooLarge(OperationalError):
    """The result exceeded the broker's ``max_result_bytes`` (SQLSTATE 54000).

    The broker stopped reading it and cancelled the statement; fetch big
    results in pieces with ``client.stream()``.
    """


class MessageError(InterfaceError):
    """The broker could not decode or accept the request."""


_BY_NAME: dict[str, type[Error]] = {kind.value: globals()[kind.value] for kind in ErrorKind}


def from_payload(payload: Any) -> Error:
    """Build the exception a STATUS_ERROR reply describes."""
    if not isinstance(payload, dict):  # not from a poolbroker of this version
        return InterfaceError(f"malformed error reply from the broker: {payload!r:.200}")
    kind = payload.get("kind", "")
    cls = _BY_NAME.get(kind, DatabaseError) if isinstance(kind, str) else DatabaseError
    message = payload.get("message") or "unknown error"
    # As psycopg's text of a server error: its DETAIL and HINT lines follow.
    if detail := payload.get("message_detail"):
        message += f"\nDETAIL:  {detail}"
    if hint := payload.get("message_hint"):
        message += f"\nHINT:  {hint}"
    if cls is BrokerUnavailable:
        return BrokerUnavailable(message, outcome_unknown=bool(payload.get("outcome_unknown")))
    return cls(message, sqlstate=payload.get("sqlstate"), diag=payload)
