"""The broker's log: text or JSON lines, request fields, and rate limits.

A request-level event (a slow statement, a PoolTimeout, a transaction
rolled back by the broker) is logged with :func:`request_fields` as its
``extra``: the client's pid (over ipc, from the kernel; 0 over tcp), the
pool, the duration in milliseconds and the SQLSTATE where there is one.
The text format appends them as ``key=value``; the JSON format makes them
keys of the line's object.  Events a client can cause in bulk go through
a :class:`LogBudget`, so that no client can flood the log.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

REQUEST_FIELDS = ("client_pid", "pool", "duration_ms", "sqlstate")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
SQL_SHOWN = 1000
"""Characters of a statement's text a log line shows at most."""


def request_fields(client_pid: int, pool: str, duration: float | None = None,
                   sqlstate: str | None = None) -> dict[str, Any]:
    """The ``extra`` of a request-level event (``duration`` in seconds)."""
    return {"client_pid": client_pid, "pool": pool,
            "duration_ms": None if duration is None else round(duration * 1000, 3),
            "sqlstate": sqlstate}


def shown_sql(sql: bytes | str) -> str:
    """A statement's text for a log line: decoded, on one line, cut short."""
    text = sql.decode("utf-8", "replace") if isinstance(sql, bytes) else sql
    text = " ".join(text.split())
    return text if len(text) <= SQL_SHOWN else text[:SQL_SHOWN] + "..."


class TextFormatter(logging.Formatter):
    """``TEXT_FORMAT``, then the request fields a record carries."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = [f"{name}={value}" for name in REQUEST_FIELDS
                  if (value := getattr(record, name, None)) is not None]
        return f"{line} [{' '.join(fields)}]" if fields else line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the request
    fields a record carries, and the exception if any."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in REQUEST_FIELDS:
            if (value := getattr(record, name, None)) is not None:
                line[name] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def configure(level: str, log_format: str) -> None:
    """The root logger's one handler, on stderr (supervisord keeps it)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


class LogBudget:
    """At most ``per_second`` lines a second of one kind of event; the next
    line allowed says how many were left out meanwhile."""

    __slots__ = ("_interval", "_next_at", "left_out")

    def __init__(self, per_second: float) -> None:
        self._interval = 1.0 / per_second
        self._next_at = 0.0
        self.left_out = 0

    def allow(self) -> str | None:
        """None: leave this one out; else a suffix for the line (maybe empty)."""
        now = time.monotonic()
        if now < self._next_at:
            self.left_out += 1
            return None
        self._next_at = now + self._interval
        left_out, self.left_out = self.left_out, 0
        return f" ({left_out} more since the last report)" if left_out else ""
