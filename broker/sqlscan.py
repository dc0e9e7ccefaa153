"""Classify SQL text by what it does to the session, without a parser.

Statements run outside a transaction share connections with every other
client, so anything that outlives the statement (``SET``, ``LISTEN``,
temp tables, session advisory locks, ``PREPARE``...) would leak.  The
scanner strips literals, quoted identifiers and comments, splits on
``;`` and looks at leading keywords and a few function names.
"""

from __future__ import annotations

import re
from enum import IntEnum
from functools import lru_cache


class Kind(IntEnum):
    PLAIN = 0
    SESSION_STATE = 1  # leaks past the statement: refuse, or reset after
    TRANSACTION_CONTROL = 2  # BEGIN/COMMIT/ROLLBACK: the broker owns these


_SESSION_FUNCTIONS = re.compile(
    r"\b(pg_advisory_lock|pg_advisory_lock_shared|pg_try_advisory_lock"
    r"|pg_try_advisory_lock_shared|set_config|dblink_connect)\s*\(",
    re.IGNORECASE,
)
_WORD = re.compile(r"[a-z_]+")
_DOLLAR_TAG = re.compile(r"\$([A-Za-z_][A-Za-z_0-9]*)?\$")


def _code_segments(sql: str) -> list[str]:
    """The statements of ``sql``, lower-cased, with literals and comments blanked."""
    out: list[str] = []
    current: list[str] = []
    i, n = 0, len(sql)
    while i < n:
        c = sql[i]
        if c == "'" or c == '"':
            end = i + 1
            while end < n:
                if sql[end] == c:
                    if end + 1 < n and sql[end + 1] == c:
                        end += 2
                        continue
                    break
                end += 1
            current.append(" ")
            i = end + 1
        elif c == "-" and sql.startswith("--", i):
            end = sql.find("\n", i)
            i = n if end < 0 else end + 1
            current.append(" ")
        elif c == "/" and sql.startswith("/*", i):
            depth, i = 1, i + 2
            while i < n and depth:
                if sql.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif sql.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    i += 1
            current.append(" ")
        elif c == "$" and (m := _DOLLAR_TAG.match(sql, i)):
            end = sql.find(m.group(0), m.end())
            i = n if end < 0 else end + len(m.group(0))
            current.append(" ")
        elif c == ";":
            out.append("".join(current))
            current = []
            i += 1
        else:
            current.append(c)
            i += 1
    out.append("".join(current))
    return [s.lower() for s in out if s.strip()]


def _classify_statement(code: str) -> Kind:
    words = _WORD.findall(code[:200])
    if not words:
        return Kind.PLAIN
    first = words[0]
    second = words[1] if len(words) > 1 else ""
    if first in ("begin", "start", "commit", "end", "abort"):
        return Kind.TRANSACTION_CONTROL
    if first == "rollback" and second not in ("to",):
        return Kind.TRANSACTION_CONTROL
    if first == "prepare" and second == "transaction":
        return Kind.TRANSACTION_CONTROL
    if first == "set" and second not in ("local", "transaction", "constraints"):
        return Kind.SESSION_STATE
    if first in ("reset", "listen", "prepare", "deallocate", "load"):
        return Kind.SESSION_STATE
    if first == "declare" and "with hold" in " ".join(words[:8]):
        return Kind.SESSION_STATE
    if first == "create" and ("temp" in words[1:4] or "temporary" in words[1:4]):
        return Kind.SESSION_STATE
    if _SESSION_FUNCTIONS.search(code):
        return Kind.SESSION_STATE
    return Kind.PLAIN


@lru_cache(maxsize=4096)
def single_statement(sql: str) -> bool:
    """Exactly one statement, and not COPY: what the loop can run directly."""
    if ";" in sql:
        return False
    segments = _code_segments(sql)
    if len(segments) != 1:
        return False
    words = _WORD.findall(segments[0][:40])
    return bool(words) and words[0] != "copy"


@lru_cache(maxsize=4096)
def classify(sql: str) -> Kind:
    """The most disruptive kind among the statements in ``sql``."""
    return max((_classify_statement(s) for s in _code_segments(sql)), default=Kind.PLAIN)


_ROLLED_BACK_WHOLE = frozenset(("select", "insert", "update", "delete", "with", "values",
                                "table", "merge"))


@lru_cache(maxsize=4096)
def shareable(sql: str) -> bool:
    """Whether the statement may share a connection's pipeline with other
    clients' statements.  A cancel meant for the statement ahead can land on
    it; these kinds then roll back whole and are rerun.  VACUUM, CALL, DO,
    CREATE INDEX CONCURRENTLY and the like may commit part of their work,
    so they only run on a connection of their own."""
    segments = _code_segments(sql)
    words = _WORD.findall(segments[0][:40]) if segments else []
    return bool(words) and words[0] in _ROLLED_BACK_WHOLE
