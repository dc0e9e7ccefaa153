"""Classify SQL text by what it can do to the server session.

Statements outside a transaction share connections with every other
client, so anything that outlives its transaction (``SET``, ``LISTEN``,
``PREPARE``, temp objects, session advisory locks...) must be refused or
followed by a reset.  The text is parsed with PostgreSQL's own grammar
(libpg_query, through pglast) rather than screened with regexes: quoted
identifiers (``"set_config"``), ``E''`` escapes, nested comments, dollar
quoting, ``SELECT ... INTO TEMP`` and ``pg_temp.`` names all hide session
state from a text screen, while the parse tree states it plainly.

The tree is read from libpg_query's JSON output, not from pglast's Python
nodes: that is about five times faster, and pglast builds its nodes by C
recursion that overflows the stack (a segfault, *measured*) on a chain of
some 20,000 ``+``, while the JSON writer checks its depth.  A tree deeper
than ``json`` decodes (about 450 chained operators) is classified OPAQUE.

Out of reach of any parser: whatever runs inside user code.  A function,
procedure, trigger, rule, view or column default that runs ``SET`` or
``set_config``, creates a temp table or takes a session advisory lock is
invisible here; the broker's backstop covers only what libpq reports
afterwards (parameter status and transaction status).  ``currval`` and
``lastval`` state left by ``nextval`` is not tracked at all.
"""

from __future__ import annotations

import enum
import json
import re
import threading
import time
from collections import deque
from dataclasses import dataclass, replace
from typing import Any

from pglast import ast
from pglast.parser import ParseError, parse_sql_json

CACHE_MAX_BYTES = 8 * 1024 * 1024  # memory of the cache: key texts plus ENTRY_BYTES each
ENTRY_BYTES = 256
"""What a cache entry costs besides its text (measured about 215 B: the key
object, the dict slot, the order deque's tuple): short texts count too."""
CACHE_MAX_TEXT = 64 * 1024  # longer texts are not parsed: OPAQUE
PARSE_FREE_TEXT = 1024
"""Texts up to this long are always parsed: a few milliseconds at the most
(measured, on a busy 2-core box: 2.5 ms for 400 chained '+', 0.25 ms for a
900-byte ORM query)."""
PARSE_SHARE = 0.25
PARSE_BURST = 0.5
"""Parsing longer texts never seen before may take PARSE_SHARE of the loop's
time, and PARSE_BURST seconds back to back (more than the worst 64 KiB text
takes: a list of 30,000 numbers, 0.15-0.4 s, most of it in decoding and
walking the 2.5 MB of JSON libpg_query makes of it): beyond, such a text is
not parsed, runs as one too long to parse (alone, reset after), and is not
cached, so it is parsed once there is time again.  A flood of distinct long
texts then holds the loop a quarter of the time, not all of it."""


class Kind(enum.IntEnum):
    """What a statement may do; a multi-statement text takes the max."""

    PLAIN = 0  # queries and DML that roll back whole: may share a pipeline
    UTILITY = 1  # no session effect: runs on a connection of its own
    SESSION = 2  # outlives the transaction: only inside one, reset after
    OPAQUE = 3  # can't be analysed (DO, CALL, unparsable): alone, reset after
    COPY = 4  # COPY FROM STDIN / TO STDOUT: only through the copy API
    TRANSACTION = 5  # transaction control: owned by the broker, refused


@dataclass(frozen=True, slots=True)
class Classification:
    kind: Kind
    statements: int  # statements in the text (0 if only comments/whitespace)
    copy_from_stdin: bool  # the single statement is COPY ... FROM STDIN
    reason: str  # what made it SESSION/OPAQUE/COPY/TRANSACTION; "" otherwise
    changes_schema: bool  # may change what a table looks like: prepared plans go stale
    drops_plans: bool = False  # changes what names resolve to (search_path) or drops
    # prepared statements (DEALLOCATE, DISCARD) for the rest of the session: the
    # connection's own plans must not be used, and are dropped by a reset after


# Functions whose effect outlives the transaction.  Matched case-insensitively
# on the last name component, in any schema: a user's wrapper with one of
# these names is treated like the built-in.
_SESSION_FUNCTIONS = frozenset({
    "set_config",  # a GUC for the session, unless is_local is literally true
    "pg_advisory_lock",  # session advisory locks are held past COMMIT and
    "pg_advisory_lock_shared",  # ROLLBACK, until unlocked or disconnected;
    "pg_try_advisory_lock",  # the unlock functions can release a lock that
    "pg_try_advisory_lock_shared",  # someone else (the broker included) holds
    "pg_advisory_unlock",  # on this connection
    "pg_advisory_unlock_shared",
    "pg_advisory_unlock_all",
    "setseed",  # the seed of random() is per session
    "dblink_connect",  # dblink: a named connection lasts as long as the session
    "dblink_connect_u",
    "dblink_open",  # a dblink cursor (and its remote transaction) stays open
    "pg_replication_origin_session_setup",  # binds an origin to the session
    "pg_backup_start",  # a non-exclusive backup belongs to the session
    "pg_start_backup",  # (its name before PostgreSQL 15)
    "pg_create_logical_replication_slot",  # a temporary slot lives as long
    "pg_create_physical_replication_slot",  # as the session
    "pg_copy_logical_replication_slot",  # so does a temporary copy of one
    "pg_copy_physical_replication_slot",
    "set_limit",  # pg_trgm: sets pg_trgm.similarity_threshold for the session
    # Built-ins that run SQL given as text, which no parse of the outer
    # statement sees (found by a probe: set_config inside query_to_xml).
    "query_to_xml",
    "query_to_xmlschema",
    "query_to_xml_and_xmlschema",
    "ts_stat",
    "ts_rewrite",
    "dblink",
    "dblink_exec",
})
_SET_CONFIG_PARAMS = ("setting_name", "new_value", "is_local")

_PLAIN_STATEMENTS = frozenset({"SelectStmt", "InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt"})
_SESSION_STATEMENTS = {
    "ListenStmt": "LISTEN",
    "UnlistenStmt": "UNLISTEN",
    "PrepareStmt": "PREPARE",
    "DeallocateStmt": "DEALLOCATE",
    "DiscardStmt": "DISCARD",
    "LoadStmt": "LOAD",
}
_OPAQUE_STATEMENTS = {"DoStmt": "DO block", "CallStmt": "CALL"}
_TRANSACTION_CONTROL = {  # SAVEPOINT, RELEASE and ROLLBACK TO stay UTILITY
    "TRANS_STMT_BEGIN": "BEGIN",
    "TRANS_STMT_START": "START TRANSACTION",
    "TRANS_STMT_COMMIT": "COMMIT",
    "TRANS_STMT_ROLLBACK": "ROLLBACK",
    "TRANS_STMT_PREPARE": "PREPARE TRANSACTION",
    "TRANS_STMT_COMMIT_PREPARED": "COMMIT PREPARED",
    "TRANS_STMT_ROLLBACK_PREPARED": "ROLLBACK PREPARED",
}
_CURSOR_OPT_HOLD = 0x0020  # DeclareCursorStmt.options bit for WITH HOLD
_TEMP_SCHEMA = "pg_temp"  # a prefix: also matches pg_temp_N
# String fields naming a target schema (RangeVar.schemaname is checked apart).
_SCHEMA_FIELDS = {"AlterObjectSchemaStmt": "newschema", "ImportForeignSchemaStmt": "local_schema"}
# Statements that cannot change what a table or type looks like, so cannot
# make a plan prepared on another connection return other columns (0A000,
# "cached plan must not change result type").  Anything else is treated as
# DDL: after it, every connection drops its prepared statements.
_KEEPS_SCHEMA = _PLAIN_STATEMENTS | frozenset({
    "TransactionStmt", "VariableSetStmt", "VariableShowStmt", "LockStmt", "NotifyStmt",
    "ListenStmt", "UnlistenStmt", "PrepareStmt", "ExecuteStmt", "DeallocateStmt",
    "DiscardStmt", "DeclareCursorStmt", "FetchStmt", "ClosePortalStmt", "CheckPointStmt",
    "VacuumStmt", "ConstraintsSetStmt", "CopyStmt",
    # Change rows, indexes, privileges or comments, never a result's columns:
    # common in ETL and test suites, they must not empty every connection's cache.
    "TruncateStmt", "IndexStmt", "ReindexStmt", "ClusterStmt", "RefreshMatViewStmt",
    "GrantStmt", "GrantRoleStmt", "CommentStmt",
})
_GENERIC_TYPES = frozenset({"Node", "Expr", "List"})
_EMPTY = Classification(Kind.PLAIN, 0, False, "", False)

Fields = dict[str, Any]  # one node's fields, as decoded from the JSON tree


def _typed_fields() -> dict[str, dict[str, str]]:
    """Per node type, the fields that hold a node of one fixed type.

    libpg_query's JSON wraps a node as ``{"Type": {fields}}`` only where the
    field may hold any node; a field of a fixed type (``CreateStmt.relation``
    is a RangeVar) holds the bare fields.  pglast.ast records the C types.
    """
    table: dict[str, dict[str, str]] = {}
    for name, cls in vars(ast).items():
        if isinstance(cls, type) and issubclass(cls, ast.Node) and isinstance(cls.__slots__, dict):
            fields = {field: info.c_type.removesuffix("*") for field, info in cls.__slots__.items()}
            table[name] = {field: target for field, target in fields.items()
                           if target not in _GENERIC_TYPES
                           and isinstance(getattr(ast, target, None), type)}
    return table


_TYPED_FIELDS = _typed_fields()


def _is_temp_schema(name: object) -> bool:
    return isinstance(name, str) and name.lower().startswith(_TEMP_SCHEMA)


def _name_part(node: object) -> str | None:
    """The text of a String node (one part of a qualified name), else None."""
    return node["String"].get("sval", "") if type(node) is dict and "String" in node else None


def _literal(node: Fields | None) -> str | None:
    """The text of a string literal, else None."""
    text = None if node is None else node.get("A_Const", {}).get("sval")
    return None if text is None else text.get("sval", "")


def _may_name_temp_schema(node: Fields | None) -> bool:
    """Whether a value (None: absent) might put pg_temp into search_path."""
    text = _literal(node)
    return text is None or _TEMP_SCHEMA in text.lower()


def _set_config_reason(call: Fields) -> str:
    args = call.get("args", [])
    params = dict(zip(_SET_CONFIG_PARAMS, (a for a in args if "NamedArgExpr" not in a)))
    params.update((a["NamedArgExpr"]["name"].lower(), a["NamedArgExpr"]["arg"])
                  for a in args if "NamedArgExpr" in a)
    is_local = params.get("is_local", {}).get("A_Const", {}).get("boolval")
    if is_local is None:
        return "set_config(..., <not a literal>)"
    if is_local.get("boolval") is not True:
        return "set_config(..., false)"
    # Unqualified CREATEs go to pg_temp when it comes first in search_path.
    name = _literal(params.get("setting_name"))
    if name is None or name.lower() == "search_path":
        if _may_name_temp_schema(params.get("new_value")):
            return "set_config('search_path', <may be pg_temp>, true)"
    return ""


def _variable_set(stmt: Fields) -> tuple[Kind, str]:
    if stmt.get("name") == "TRANSACTION":  # SET TRANSACTION: this transaction only
        return Kind.UTILITY, ""
    if stmt.get("is_local"):
        args = stmt.get("args", [])
        if stmt.get("name") == "search_path" and any(map(_may_name_temp_schema, args)):
            return Kind.SESSION, "SET LOCAL search_path to pg_temp"
        return Kind.UTILITY, ""
    if stmt.get("kind") == "VAR_RESET_ALL":
        return Kind.SESSION, "RESET ALL"
    if stmt.get("kind") == "VAR_RESET":
        return Kind.SESSION, "RESET (session-level)"
    return Kind.SESSION, "SET (session-level)"


def _creates(kind: str, stmt: Fields) -> bool:
    """Whether the statement may create or alter objects (is not a plain query)."""
    return kind not in _PLAIN_STATEMENTS or "intoClause" in stmt


def _own_kind(kind: str, stmt: Fields) -> tuple[Kind, str]:
    """What the statement's own type says, before looking inside it."""
    if not _creates(kind, stmt):
        return Kind.PLAIN, ""
    if kind == "TransactionStmt":
        label = _TRANSACTION_CONTROL.get(stmt.get("kind", ""))
        return (Kind.TRANSACTION, label) if label else (Kind.UTILITY, "")
    if kind == "VariableSetStmt":
        return _variable_set(stmt)
    if kind in _SESSION_STATEMENTS:
        return Kind.SESSION, _SESSION_STATEMENTS[kind]
    if kind in _OPAQUE_STATEMENTS:
        return Kind.OPAQUE, _OPAQUE_STATEMENTS[kind]
    if kind == "DeclareCursorStmt" and stmt.get("options", 0) & _CURSOR_OPT_HOLD:
        return Kind.SESSION, "DECLARE ... WITH HOLD"
    if kind == "CopyStmt" and "filename" not in stmt:  # PROGRAM also sets filename
        return Kind.COPY, "COPY FROM STDIN" if stmt.get("is_from") else "COPY TO STDOUT"
    if kind == "ExplainStmt":
        [(inner, fields)] = stmt["query"].items()
        return max((Kind.UTILITY, ""), _own_kind(inner, fields))
    return Kind.UTILITY, ""


def _nested_reason(kind: str, stmt: Fields) -> str:
    """The first session effect found anywhere inside the statement, or ""."""
    target = stmt["query"] if kind == "ExplainStmt" else {kind: stmt}
    [(target_kind, target_fields)] = target.items()
    # pg_temp names count in statements that create or alter (reading is
    # harmless); conservatively, any qualified name does, not only targets.
    check_names = _creates(target_kind, target_fields)
    stack: list[tuple[str, Any]] = [(kind, stmt)]
    while stack:
        kind, node = stack.pop()
        if type(node) is not dict or kind == "A_Const":
            continue
        if kind == "FuncCall":
            name = node["funcname"][-1]["String"]["sval"].lower()
            if name in _SESSION_FUNCTIONS:
                reason = _set_config_reason(node) if name == "set_config" else f"{name}()"
                if reason:
                    return reason
        elif kind == "RangeVar":
            if node.get("relpersistence") == "t":
                return "temporary relation"
            if check_names and _is_temp_schema(node.get("schemaname")):
                return "object in pg_temp"
        elif check_names and _is_temp_schema(node.get(_SCHEMA_FIELDS.get(kind, ""))):
            return "object in pg_temp"
        typed = _TYPED_FIELDS.get(kind, {})
        for field, value in node.items():
            if type(value) is list:
                if check_names and len(value) > 1 and _is_temp_schema(_name_part(value[0])):
                    return "object in pg_temp"  # a qualified name: function, type...
                stack.extend(pair for item in value if type(item) is dict for pair in item.items())
            elif type(value) is dict:
                if field in typed:
                    stack.append((typed[field], value))
                else:
                    stack.extend(value.items())  # {"Type": {fields}}
    return ""


def _statement_kind(stmt: Fields) -> tuple[Kind, str]:
    [(kind, fields)] = stmt.items()
    own, reason = _own_kind(kind, fields)
    if own < Kind.SESSION:
        nested = _nested_reason(kind, fields)
        if nested:
            return Kind.SESSION, nested
    return own, reason


def _changes_schema(stmt: Fields) -> bool:
    [(kind, fields)] = stmt.items()
    if kind == "ExplainStmt":  # EXPLAIN ANALYZE runs what it explains
        return _changes_schema(fields["query"])
    if kind == "SelectStmt":
        return "intoClause" in fields  # SELECT ... INTO creates a table
    return kind not in _KEEPS_SCHEMA


def _drops_plans(stmt: Fields) -> bool:
    """Whether the statement makes this connection's prepared statements
    unusable for the rest of its transaction or session: a changed
    search_path (a plan prepared under another one is replanned against
    other tables: 0A000 when their columns differ), DEALLOCATE or DISCARD
    (the names are gone: 26000)."""
    [(kind, fields)] = stmt.items()
    if kind in ("DeallocateStmt", "DiscardStmt"):
        return True
    if kind == "VariableSetStmt":
        return fields.get("name") in (None, "search_path")  # RESET ALL has no name
    stack: list[Any] = [fields]
    while stack:  # set_config('search_path', ..., true) anywhere inside
        node = stack.pop()
        if type(node) is dict:
            call = node.get("FuncCall")
            if type(call) is dict and call["funcname"][-1]["String"]["sval"].lower() \
                    == "set_config":
                args = [a for a in call.get("args", []) if "NamedArgExpr" not in a]
                name = _literal(args[0]) if args else None
                if name is None or name.lower() == "search_path":
                    return True
            stack.extend(node.values())
        elif type(node) is list:
            stack.extend(node)
    return False


def _classify_text(sql: str | bytes) -> Classification:
    try:
        text = sql.decode() if isinstance(sql, bytes) else sql
        if "\x00" in text:  # libpg_query would stop reading at the NUL
            raise ValueError("NUL character in statement text")
        statements = json.loads(parse_sql_json(text)).get("stmts", [])
    except (ParseError, ValueError) as exc:  # UnicodeError is a ValueError
        return Classification(Kind.OPAQUE, 1, False, f"cannot parse: {exc}", True, True)
    except RecursionError:
        return Classification(Kind.OPAQUE, 1, False, "cannot parse: nested too deeply", True, True)
    if not statements:
        return _EMPTY
    kinds = [_statement_kind(raw["stmt"]) for raw in statements]
    kind, reason = max(kinds, key=lambda kind_reason: kind_reason[0])  # the first of the worst
    copy = statements[0]["stmt"].get("CopyStmt", {})
    from_stdin = len(statements) == 1 and kind == Kind.COPY and bool(copy.get("is_from"))
    changes_schema = any(_changes_schema(raw["stmt"]) for raw in statements)
    drops_plans = any(_drops_plans(raw["stmt"]) for raw in statements)
    return Classification(kind, len(statements), from_stdin, reason, changes_schema,
                          drops_plans)


_TOO_LONG = Classification(Kind.OPAQUE, 1, False,
                           f"not parsed: longer than {CACHE_MAX_TEXT} characters", True, True)
_TOO_LONG_DML = replace(_TOO_LONG, changes_schema=False, drops_plans=False)
_NO_TIME = replace(_TOO_LONG, reason="not parsed: the time for parsing new long texts "
                   "was spent (a flood of them)")
_NO_TIME_DML = replace(_NO_TIME, changes_schema=False, drops_plans=False)
# A text too long to parse still says whether it is DML by its first word
# (after blanks and comments; a nested comment simply fails to match): a bulk
# INSERT must not make every connection drop its prepared statements.  It
# runs with the extended protocol, which takes one statement only.
# Linear: each alternative starts with its own character and a blank is taken
# one at a time, possessively.  (``\s+`` inside the repetition backtracked
# exponentially: 24 blanks before a word that is not DML held the loop 1.3 s,
# 40 for ever.)
_LEADING_DML = re.compile(
    r"(?:\s|--[^\n]*+(?:\n|\Z)|/\*(?:[^*/]|\*(?!/)|/(?!\*))*+\*/)*+(?:insert|update|delete)\b",
    re.IGNORECASE)
_LEADING_BYTES = 4096

# The cache evicts oldest-inserted first, by key bytes.  A hit is one dict
# lookup and writes nothing, so it takes no lock; misses insert under one.
_cache: dict[str | bytes, Classification] = {}
_order: deque[tuple[str | bytes, int]] = deque()  # (key, UTF-8 bytes), oldest first
_cache_bytes = 0
_cache_lock = threading.Lock()


def _remember(key: str | bytes, size: int, found: Classification) -> None:
    global _cache_bytes
    with _cache_lock:
        if key in _cache:
            return
        _cache[key] = found
        size += ENTRY_BYTES
        _order.append((key, size))
        _cache_bytes += size
        while _cache_bytes > CACHE_MAX_BYTES:
            old, old_size = _order.popleft()
            del _cache[old]
            _cache_bytes -= old_size


class ParseBudget:
    """A token bucket of loop time for parsing (see PARSE_SHARE).  Only the
    loop's thread classifies in the broker; elsewhere (tests) a lost update
    only misjudges the budget."""

    def __init__(self, share: float, burst: float) -> None:
        self.share = share
        self.burst = burst
        self.credit = burst
        self.at = time.perf_counter()
        self.refused = 0  # texts not parsed for want of time, since start

    def allows(self, now: float) -> bool:
        self.credit = min(self.burst, self.credit + (now - self.at) * self.share)
        self.at = now
        if self.credit > 0:
            return True
        self.refused += 1
        return False

    def spend(self, seconds: float) -> None:
        self.credit -= seconds


budget = ParseBudget(PARSE_SHARE, PARSE_BURST)


def _not_parsed(sql: str | bytes, dml: Classification, other: Classification) -> Classification:
    """What a text not parsed is: DML by its first word, else anything."""
    head = sql[:_LEADING_BYTES]
    if isinstance(head, bytes):
        head = head.decode("utf-8", "replace")
    return dml if _LEADING_DML.match(head) else other


def classify(sql: str | bytes) -> Classification:
    """Classify ``sql``; cached by its exact text (str and bytes apart)."""
    found = _cache.get(sql)
    if found is not None:
        return found
    if len(sql) > CACHE_MAX_TEXT:
        # Walking the tree of a 1 MB INSERT holds the loop for over 0.5 s:
        # a text this long is not parsed, and runs alone with a reset after.
        return _not_parsed(sql, _TOO_LONG_DML, _TOO_LONG)
    if len(sql) > PARSE_FREE_TEXT:
        start = time.perf_counter()
        if not budget.allows(start):
            return _not_parsed(sql, _NO_TIME_DML, _NO_TIME)
        found = _classify_text(sql)
        budget.spend(time.perf_counter() - start)
    else:
        found = _classify_text(sql)
    size = len(sql) if isinstance(sql, bytes) else len(sql.encode("utf-8", "surrogatepass"))
    if size <= CACHE_MAX_TEXT:  # a str may have fewer chars than UTF-8 bytes
        _remember(sql, size, found)
    return found
