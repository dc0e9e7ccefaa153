"""Keep the database password out of logs, stats and error messages.

libpq echoes pieces of a malformed connection string in its errors, and a
log line or a client-facing message may quote the DSN; every text the
broker emits that could carry it passes through a ``Redactor``.
"""

from __future__ import annotations

import json
import logging
import re

from psycopg.conninfo import conninfo_to_dict

MASK = "********"

# For connection strings libpq cannot parse: key=value and URI forms.
_KEYWORD_PASSWORD = re.compile(r"password\s*=\s*('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)
_URI_PASSWORD = re.compile(r"://[^:/@\s]*:([^@\s]+)@")


def dsn_secrets(dsn: str) -> list[str]:
    """The password of ``dsn`` (and its raw spellings), longest first."""
    found: set[str] = set()
    try:
        password = conninfo_to_dict(dsn).get("password")
        if password:
            found.add(str(password))
    except Exception:  # a malformed DSN still may hold a password
        pass
    for pattern in (_KEYWORD_PASSWORD, _URI_PASSWORD):
        for match in pattern.finditer(dsn):
            raw = match.group(1)
            found.add(raw)
            found.add(raw.strip("'"))
    # As a message may show it once escaped: repr(), JSON (the JSON log
    # lines), a TOML string (poolbroker config); the escaping of the
    # escaped, for a repr() of a DSN in a JSON line.
    for secret in list(found):
        for escaped in (repr(secret)[1:-1], json.dumps(secret)[1:-1]):
            found.update((escaped, json.dumps(escaped)[1:-1]))
    return sorted((s for s in found if s), key=len, reverse=True)


class Redactor:
    """Replaces the DSNs' passwords with a mask in any text."""

    def __init__(self, *dsns: str) -> None:
        found = {secret for dsn in dsns for secret in dsn_secrets(dsn)}
        self._secrets = sorted(found, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, MASK)
        return text

    def install(self, logger: logging.Logger | None = None) -> None:
        """Redact every record the handlers of ``logger`` (default: root) format."""
        for handler in (logger or logging.getLogger()).handlers:
            handler.setFormatter(_RedactingFormatter(handler.formatter, self))


class _RedactingFormatter(logging.Formatter):
    def __init__(self, inner: logging.Formatter | None, redact: Redactor) -> None:
        super().__init__()
        self._inner = inner or logging.Formatter()
        self._redact = redact

    def format(self, record: logging.LogRecord) -> str:
        return self._redact(self._inner.format(record))
