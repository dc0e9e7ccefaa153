"""Broker settings, declared once: the fields of :class:`Settings`.

Each field is one setting, declared with :func:`setting`: its type (the
annotation), its default, a help line and any further explanation.  All the
rest is derived from that declaration:

- its key in the ``[poolbroker]`` table of the TOML file is the field's name;
- its environment variable is ``POOLBROKER_<NAME>``;
- its ``serve`` flag is ``--<name-with-dashes>`` (a bool: ``--name``/``--no-name``),
  listed by ``poolbroker serve --help`` with its default and variable;
- values are checked against the type: strictly in TOML (``"4"`` is not an
  int, ``true`` is not one either; an int is a fine float), parsed from text in
  the environment and on the command line;
- ``etc/poolbroker.toml`` and README's settings table (``broker.settings_docs``).

Precedence: command-line flag > environment > TOML file > default.  Every
problem found is reported, one line each, in one :class:`ConfigError`.

To add a setting, see :class:`Settings`.
"""

from __future__ import annotations

import argparse
import difflib
import ipaddress
import json
import math
import os
import re
import tomllib
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Callable, Literal, get_args, get_origin, get_type_hints

from psycopg.conninfo import conninfo_to_dict

from client.protocol import DEFAULT_MAX_MESSAGE_BYTES, default_endpoint

from .predecessors import MARK, MARK_BYTES
from .redact import Redactor

NAMEDATALEN = 64
"""PostgreSQL truncates application_name to NAMEDATALEN - 1 bytes."""
APPLICATION_NAME_MAX = NAMEDATALEN - 1 - MARK_BYTES

TABLE = "poolbroker"
"""The TOML table that holds the settings."""
POOLS_TABLE = "pools"
"""The TOML table whose tables are named pools (``[pools.reports]``)."""
_NOT_A_SETTING = "not a setting"
"""Marks a field that no setting() declares: the pools, a pool's name."""
POOL_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,62}")
DEFAULT_POOL = "default"
"""The pool of the broker's own ``dsn``: the one requests without a pool name use."""
ENV_PREFIX = "POOLBROKER_"

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
LogFormat = Literal["text", "json"]


class ConfigError(ValueError):
    """One or more problems with the settings, one line each."""

    def __init__(self, *problems: str) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class Spec:
    """One setting as the loader and the documents see it."""

    name: str
    kind: Any
    """The resolved annotation: str, int, float, bool, tuple[int, ...] or a Literal."""
    default: Any
    """The value, or MISSING when a factory computes it at start."""
    help: str
    doc: str
    example: Any
    shown: str
    minimum: float
    check: Callable[[Any], str | None] | None
    live: bool
    """Whether a reload (SIGHUP, ``poolbroker ctl reload``) applies a new value;
    otherwise a change is logged and the old value kept until a restart."""

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def shown_default(self) -> str:
        """The default as the documents write it."""
        if self.shown:
            return self.shown
        return toml_literal(self.default if self.example is None else self.example)

    def parse(self, value: Any, where: str, from_text: bool) -> Any:
        """``value`` as this setting's type, or a one-line ConfigError naming ``where``.

        Text (the environment, flags) is parsed; any other value (TOML, Python)
        must have the declared type already, but for an int where a float is.
        """
        try:
            result = _convert(self.kind, value, from_text)
        except ValueError:
            given = repr(value) if from_text else _describe(value)
            raise ConfigError(f"{where} must be {_expected(self.kind)}, not {given}") from None
        if isinstance(result, (int, float)) and not isinstance(result, bool) \
                and result < self.minimum:
            raise ConfigError(f"{where} must be at least {self.minimum:g}, not {result!r}")
        problem = self.check(result) if self.check else None
        if problem:
            raise ConfigError(f"{where} {problem}, not {result!r}")
        return result


def setting(default: Any = MISSING, *, help: str, doc: str = "",
            factory: Callable[[], Any] | None = None, example: Any = None, shown: str = "",
            minimum: float = 0, check: Callable[[Any], str | None] | None = None,
            live: bool = False) -> Any:
    """Declare a field of :class:`Settings`.

    ``help``: one line, a phrase (``--help`` shows it alone); ``doc``: sentences
    the documents add after it.  ``factory`` replaces ``default`` when the default
    is computed at start; ``example`` is then the value the documents show, and
    ``shown`` words a default that no value says (``"required"``).  ``minimum``
    bounds a number; ``check`` returns what is wrong with a value ("must be ..."),
    or None.  ``live``: the broker reads the value each time it uses it (or
    applies a new one on reload), so a reload may change it; say so only then.
    """
    metadata = {Spec: dict(help=help, doc=doc, example=example, shown=shown, minimum=minimum,
                           check=check, live=live)}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def _never_or_a_second(seconds: float) -> str | None:
    # Less would reopen connections as fast as they open: a typo, not a policy.
    return None if seconds == 0 or seconds >= 1 else "must be 0 (never) or at least 1 second"


def _application_name_problem(name: str) -> str | None:
    if name.isascii() and name.isprintable() and MARK not in name \
            and len(name) <= APPLICATION_NAME_MAX:
        return None
    return (f"must be printable ASCII without {MARK!r}, at most {APPLICATION_NAME_MAX} "
            f"characters (the broker appends its mark and PostgreSQL keeps "
            f"{NAMEDATALEN - 1} bytes)")


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Every setting of the broker, each declared once.

    To add one, add a field here and nothing else in this module::

        max_idle: float = setting(
            600.0, help="seconds a connection above the minimum may idle before it closes",
            doc="Further sentences for etc/poolbroker.toml and the README.")

    Its TOML key, ``POOLBROKER_MAX_IDLE``, ``--max-idle``, its ``--help`` line
    and its type check follow.  Then run ``make docs``: it rewrites
    etc/poolbroker.toml and README's table, which tests/test_config.py holds
    to the declaration.  Types understood: str, int, float (an int is accepted),
    bool, tuple[int, ...] and a ``Literal`` of strings (the choices; see
    ``log_level``).  ``minimum=`` bounds a number (default 0), ``check=``
    refuses other values of one setting; a check across settings goes in
    ``_Merge.cross_check``.  A field declared without :func:`setting` fails
    at import.
    """

    dsn: str = setting(
        "", shown="required", example="host=/var/run/postgresql dbname=app user=app",
        help="libpq connection string of the database",
        doc="Better kept in the environment than in a file: it may hold a password.")

    endpoint: str = setting(
        factory=default_endpoint, example="ipc:///tmp/poolbroker-<uid>/broker.sock",
        help="ZeroMQ endpoint the broker binds",
        doc="An ipc socket's directory is created 0700 and refused if others can enter "
            "it. One broker per endpoint: `<socket>.lock` beside an ipc socket holds the "
            "claim.")

    max_connections: int = setting(
        10, minimum=1, live=True,
        help="hard cap on server connections, across every client process and thread",
        doc="A dead predecessor's connections count too, while they last. One opens at "
            "start, the others as needed.")

    min_connections: int = setting(
        1, live=True,
        help="server connections opened at start and kept open",
        doc="Reopened when lost (with the reconnect backoff), never closed for idling. "
            "At most `max_connections`.")

    max_idle: float = setting(
        600.0, live=True, check=_never_or_a_second,
        help="seconds a connection above `min_connections` may sit unused before it "
             "is closed (0: never)")

    max_lifetime: float = setting(
        3600.0, live=True, check=_never_or_a_second,
        help="seconds after which a connection is replaced (0: never)",
        doc="Less up to 10% at random, so that connections opened together do not all go "
            "at once; one in use is closed when it next becomes idle, never during a "
            "transaction or a statement.")

    pool_timeout: float = setting(
        30.0, live=True,
        help="seconds a request may wait for a connection before `PoolTimeout`")

    max_waiting: int = setting(
        10_000, live=True,
        help="queued requests beyond which new ones fail at once with "
             "`TooManyRequests`")

    idle_transaction_timeout: float = setting(
        60.0, live=True,
        help="seconds a transaction may sit idle between statements before the "
             "broker rolls it back (0: never)",
        doc="Server connections also get `idle_in_transaction_session_timeout` at twice "
            "this: a backstop, not the mechanism.")

    drain_timeout: float = setting(
        10.0, live=True,
        help="seconds SIGTERM waits for running statements and open transactions "
             "before cancelling them",
        doc="New requests, and new transactions, are refused at once meanwhile; a "
            "transaction in progress goes on (its connection closes at the deadline, which "
            "rolls it back).")

    max_message_bytes: int = setting(
        DEFAULT_MAX_MESSAGE_BYTES,
        help="largest request accepted, in bytes; the transport drops larger ones")

    max_result_bytes: int = setting(
        DEFAULT_MAX_MESSAGE_BYTES,
        help="largest result, in bytes as packed for the client (0: no limit)",
        doc="A larger one fails with `ResultTooLarge` while its rows are read, so the "
            "broker never holds more; use `client.stream()` for big results. With 0, "
            "results are read whole, with no bound on the broker's memory.")

    max_client_requests: int = setting(
        100, live=True,
        help="requests one client socket (one thread of one process) may have "
             "waiting or running at once",
        doc="More fail at once with `TooManyRequests`.")

    max_queued_bytes: int = setting(
        256 * 1024 * 1024, live=True,
        help="bytes of requests waiting or running at once, over every client",
        doc="Each request counts its size as received plus an estimate of its decoded "
            "statements (256 B) and parameters (64 B each). One that would pass the limit "
            "fails with `TooManyRequests`, checked before decoding and while an "
            "`executemany` or a batch is decoded, one parameter set at a time; decoding "
            "any body over 64 KiB also counts 256 B for each item of its arrays and maps, "
            "as they are built (see *Bounds*).")

    max_clients: int = setting(
        0, help="client sockets connected at once (0: sized from the open-files limit)",
        doc="A socket accepted beyond it is shut down at once (logged, counted in "
            "`clients_refused`) and its client retries until others leave. 0 means 3/4 "
            "of the open-files limit (raised to its hard limit at start) minus 64 minus 3 "
            "per server connection.")

    allowed_uids: tuple[int, ...] = setting(
        (), live=True,
        help="over ipc, uids besides the broker's own whose processes may send requests",
        doc="A TOML list; comma-separated in the environment and on the command line. "
            "A connection from any other uid is refused at the handshake, before a frame "
            "is read (`clients_denied`). A reload that drops a uid closes its connections "
            "still open; with CURVE (libzmq's ROUTER), their messages are dropped "
            "unanswered instead (`messages_rejected`). "
            "This also protects abstract endpoints (`ipc://@name`), which have no "
            "directory.")

    query_timeout: float = setting(
        0.0, live=True,
        help="seconds a statement may run before it is cancelled on the server with "
             "`QueryCanceled` (0: no limit)",
        doc="The client's own timeout applies besides.")

    application_name: str = setting(
        "poolbroker", check=_application_name_problem,
        help="application_name of the server connections, as `pg_stat_activity` shows it",
        doc="The broker appends its mark `~<hash of host and endpoint>.<pid>` (say "
            "`poolbroker~3f2a9c1e.4242`; match `split_part(application_name, '~', 1)`), by "
            "which a restarted broker finds the connections of one that died. Printable "
            f"ASCII without `~`, at most {APPLICATION_NAME_MAX} characters.")

    connection_check_interval: float = setting(
        1.0, live=True,
        help="seconds between the server's checks, even mid-statement, that the broker "
             "is still connected (0: off)",
        doc="PostgreSQL's `client_connection_check_interval`: a dead broker's statements "
            "end with it. PostgreSQL 14 and later; set 0 for older servers.")

    connect_timeout: float = setting(
        10.0, live=True,
        help="seconds to wait for one server connection to PostgreSQL to open",
        doc="Not the client's setting of the same name, which is for reaching the broker.")

    curve_secret_key_file: str = setting(
        "", help="the broker's secret CURVE certificate; a `tcp://` endpoint needs it",
        doc="Make it with `poolbroker keygen DIR NAME`; give `curve_allowed_clients` too. "
            "Clients set `POOLBROKER_CURVE_SERVER_KEY` (the broker's public certificate) "
            "and `POOLBROKER_CURVE_CLIENT_CERT` (their own secret one).")

    curve_allowed_clients: str = setting(
        "", live=True,
        help="directory of the public certificates of the clients allowed in over tcp",
        doc="One file per client; SIGHUP re-reads it.")

    curve_admin_clients: str = setting(
        "", live=True,
        help="directory of the public certificates of the operators whose `poolbroker ctl` "
             "is obeyed over tcp",
        doc="They get in as clients too. Empty: every control command is refused over tcp. "
            "SIGHUP re-reads it.")

    insecure_tcp: bool = setting(
        False, help="allow a plain-text `tcp://` endpoint without CURVE, on a network you "
                    "trust")

    metrics_listen: str = setting(
        "",
        help="where to serve Prometheus metrics over HTTP: HOST:PORT, [IPV6]:PORT or a bare "
             "PORT for 127.0.0.1 (empty: no metrics endpoint)",
        doc="A loopback address unless `metrics_allow_remote` is set.")

    metrics_allow_remote: bool = setting(
        False, help="allow `metrics_listen` on an address other than loopback",
        doc="The endpoint has neither authentication nor TLS, and every scrape costs the "
            "broker's loop a snapshot.")

    log_level: LogLevel = setting(
        "INFO", live=True, help="least severe level of the messages logged")

    log_format: LogFormat = setting(
        "text", live=True, help="how log lines are written: text, or json (one object per line)",
        doc="Request-level events (a slow statement, a PoolTimeout, a transaction rolled "
            "back by the broker) carry the client's pid (over ipc; 0 over tcp), the pool, "
            "the duration in milliseconds and the SQLSTATE where there is one: appended as "
            "`[client_pid=... pool=... duration_ms=...]` in text, as keys in JSON. Each kind "
            "is logged 20 times a second at most; the next line counts the rest.")

    log_slow_statements: float = setting(
        0.0, live=True,
        help="seconds of server time from which a statement is logged, with its text "
             "(0: none)",
        doc="Its first 1,000 characters, at INFO. The time is the statement's on its "
            "server connection, as the statement-time histogram counts it.")

    pools: tuple[PoolSettings, ...] = field(default=(), metadata={_NOT_A_SETTING: True})
    """The ``[pools.NAME]`` tables: TOML only (no variable, no flag)."""

    @property
    def all_dsns(self) -> tuple[str, ...]:
        """Every connection string: the default pool's and each named pool's."""
        return (self.dsn, *(pool.dsn for pool in self.pools))


@dataclass(frozen=True, kw_only=True)
class PoolSettings:
    """One ``[pools.NAME]`` table: another database, or user, whose connections
    count against the global ``max_connections`` with the default pool's.
    Declared like :class:`Settings` (the TOML keys are the field names)."""

    name: str = field(default="", metadata={_NOT_A_SETTING: True})

    dsn: str = setting(
        "", shown="required", example="host=/var/run/postgresql dbname=reports user=reports",
        help="libpq connection string of this pool's database")

    max_connections: int = setting(
        0, live=True, help="this pool's own cap on server connections (0: the global "
                "`max_connections`)",
        doc="The pools together never hold more than the global `max_connections`.")

    min_connections: int = setting(
        0, live=True, help="this pool's connections opened at start and kept open",
        doc="The default pool's is the global `min_connections`.")


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _convert(kind: Any, value: Any, from_text: bool) -> Any:
    """``value`` as ``kind``, or ValueError."""
    if from_text and not isinstance(value, str):
        raise ValueError(value)
    if kind is str:
        if isinstance(value, str):
            return value
    elif kind is bool:
        if from_text and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        if isinstance(value, bool):
            return value
    elif kind is int:
        if from_text:
            return int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is float:
        if from_text:
            number = float(value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        else:
            raise ValueError(value)
        if math.isfinite(number):
            return number
    elif get_origin(kind) is tuple:  # tuple[int, ...]: uids
        items = [int(x) for x in value.split(",") if x.strip()] if from_text else value
        if isinstance(items, (list, tuple)) and all(
                isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in items):
            return tuple(items)
    elif get_origin(kind) is Literal:  # choices, matched whatever their case
        if isinstance(value, str):
            for choice in get_args(kind):
                if value.strip().upper() == choice.upper():
                    return choice
    raise ValueError(value)


def _expected(kind: Any) -> str:
    if get_origin(kind) is Literal:
        return "one of " + ", ".join(get_args(kind))
    if get_origin(kind) is tuple:
        return "a list of non-negative integers"
    expected = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}
    if kind not in expected:
        raise TypeError(f"settings of type {kind} are not supported")
    return expected[kind]


def _describe(value: Any) -> str:
    """A value read from TOML, by its TOML type: what the error says was given."""
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, (str, int, float)):
        kind = "string" if isinstance(value, str) else \
            "integer" if isinstance(value, int) else "float"
        return f"the {kind} {toml_literal(value)}"
    if isinstance(value, (list, tuple)) and all(isinstance(x, (str, int, float)) for x in value):
        return f"the array {toml_literal(value)}"
    if isinstance(value, (list, tuple)):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return f"the {type(value).__name__} {value}"  # TOML's dates and times


def toml_literal(value: Any) -> str:
    """``value`` written as TOML (the documents' defaults)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(map(toml_literal, value)) + "]"
    return repr(value)


def _specs(cls: type) -> dict[str, Spec]:
    kinds = get_type_hints(cls)
    specs = {}
    for f in fields(cls):
        if f.metadata.get(_NOT_A_SETTING):
            continue
        declared = f.metadata.get(Spec)
        if declared is None:  # say so at import: its flag, variable and docs would be missing
            raise TypeError(f"{cls.__name__}.{f.name} is not declared with setting(...)")
        if f.default is MISSING and declared["example"] is None and not declared["shown"]:
            raise TypeError(f"{cls.__name__}.{f.name}: a computed default needs an example "
                            "to show")
        _expected(kinds[f.name])  # TypeError for a type the loader cannot check
        specs[f.name] = Spec(f.name, kinds[f.name], f.default, **declared)
    return specs


SPECS: dict[str, Spec] = _specs(Settings)
"""Every setting by name, in declaration order."""
POOL_SPECS: dict[str, Spec] = _specs(PoolSettings)
"""The keys of a ``[pools.NAME]`` table."""


METRICS_DEFAULT_HOST = "127.0.0.1"


def parse_listen(text: str) -> tuple[str, int]:
    """(host, port) of a metrics_listen value; ConfigError if malformed."""
    text = text.strip()
    if text.isdigit():
        host, port = METRICS_DEFAULT_HOST, text
    elif text.startswith("["):  # [v6 address]:port
        host, _, port = text[1:].partition("]:")
    else:
        host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"metrics_listen must be HOST:PORT, [IPV6]:PORT or PORT "
                          f"(1-65535), got {text!r}")
    return host, int(port)


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine's loopback interface, without DNS:
    any other name may resolve to a public address."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


class _Merge:
    """Values of the sources, each over the ones before it, and what was wrong."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}
        self.problems: list[str] = []
        self.invalid: set[str] = set()
        self.pools: list[PoolSettings] = []

    def take(self, spec: Spec, value: Any, where: str, from_text: bool) -> None:
        try:
            self.values[spec.name] = spec.parse(value, where, from_text)
        except ConfigError as exc:
            self.problems.extend(exc.problems)
            self.invalid.add(spec.name)

    def read_file(self, path: str) -> None:
        """The ``[poolbroker]`` table of a TOML file; anything else in it is an error."""
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            self.problems.append(f"cannot read {path}: {exc}")
            return
        for key, value in data.items():
            if key == TABLE:
                continue
            if key == POOLS_TABLE:
                self.read_pools(path, value)
                continue
            if key in SPECS:
                self.problems.append(f"{path}: {key} is outside the [{TABLE}] table")
            elif isinstance(value, dict):
                self.problems.append(f"{path}: unknown table [{key}]"
                                     + _did_you_mean(key, [TABLE]))
            else:
                self.problems.append(f"{path}: unknown key {key!r} outside the [{TABLE}] table")
        table = data.get(TABLE)
        if not isinstance(table, dict):
            self.problems.append(f"{path}: no [{TABLE}] table: settings go under a "
                                 f"[{TABLE}] line")
            return
        for name, value in table.items():
            if name in SPECS:
                self.take(SPECS[name], value, f"{path}: {name}", from_text=False)
            else:
                self.problems.append(f"{path}: unknown setting {name!r}"
                                     + _did_you_mean(name, list(SPECS)))

    def read_pools(self, path: str, tables: Any) -> None:
        """``[pools.NAME]`` tables, each a :class:`PoolSettings`."""
        if not isinstance(tables, dict) or not all(isinstance(t, dict) for t in tables.values()):
            self.problems.append(f"{path}: [{POOLS_TABLE}] holds one table per pool: "
                                 f"[{POOLS_TABLE}.NAME] with dsn = ...")
            return
        for name, table in tables.items():
            where = f"{path}: {POOLS_TABLE}.{name}"
            if not POOL_NAME.fullmatch(name) or name == DEFAULT_POOL:
                self.problems.append(
                    f"{where}: a pool's name is 1-63 letters, digits, '_', '.' or '-' "
                    f"(not starting with '.' or '-'), and not {DEFAULT_POOL!r}, the name of "
                    "the pool of the main dsn")
                continue
            values: dict[str, Any] = {}
            for key, value in table.items():
                spec = POOL_SPECS.get(key)
                if spec is None:
                    self.problems.append(f"{where}: unknown setting {key!r}"
                                         + _did_you_mean(key, list(POOL_SPECS)))
                    continue
                try:
                    values[key] = spec.parse(value, f"{where}.{key}", from_text=False)
                except ConfigError as exc:
                    self.problems.extend(exc.problems)
            pool = PoolSettings(name=name, **values)
            if not pool.dsn:
                self.problems.append(f"{where}: no dsn: each pool needs its database's")
            else:
                self._check_dsn(pool.dsn, f"{where}.dsn")
            self.pools.append(pool)

    def _check_pools(self, s: Settings) -> None:
        if self.invalid & {"max_connections", "min_connections"}:
            return
        for pool in s.pools:
            if pool.max_connections > s.max_connections:
                self.problems.append(
                    f"{POOLS_TABLE}.{pool.name}.max_connections ({pool.max_connections}) "
                    f"must not exceed max_connections ({s.max_connections}), the cap of "
                    "every pool together")
            if pool.max_connections and pool.min_connections > pool.max_connections:
                self.problems.append(
                    f"{POOLS_TABLE}.{pool.name}.min_connections ({pool.min_connections}) must "
                    f"not exceed its max_connections ({pool.max_connections})")
        warm = (s.min_connections if s.dsn else 0) + sum(p.min_connections for p in s.pools)
        if s.pools and warm > s.max_connections:
            self.problems.append(
                f"the pools' min_connections add up to {warm}, more than max_connections "
                f"({s.max_connections})")

    def _check_dsn(self, dsn: str, where: str) -> None:
        try:
            conninfo_to_dict(dsn)
        except Exception as exc:
            message = Redactor(dsn)(str(exc).strip())
            self.problems.append(f"{where} is not a valid libpq connection string: {message}")

    def cross_check(self, s: Settings) -> None:
        """Checks that span settings; each is skipped when a value it reads was
        invalid (already reported)."""
        if not self.invalid & {"min_connections", "max_connections"} \
                and s.min_connections > s.max_connections:
            self.problems.append(f"min_connections ({s.min_connections}) must not exceed "
                                 f"max_connections ({s.max_connections})")
        if not self.invalid & {"curve_secret_key_file", "curve_allowed_clients"} \
                and bool(s.curve_secret_key_file) != bool(s.curve_allowed_clients):
            self.problems.append(
                "CURVE needs both curve_secret_key_file and curve_allowed_clients")
        if s.curve_admin_clients and not s.curve_secret_key_file:
            self.problems.append("curve_admin_clients needs CURVE (curve_secret_key_file)")
        if s.metrics_listen and "metrics_listen" not in self.invalid:
            try:
                host, _ = parse_listen(s.metrics_listen)
            except ConfigError as exc:
                self.problems.extend(exc.problems)
            else:
                if not is_loopback(host) and not s.metrics_allow_remote:
                    self.problems.append(
                        f"metrics_listen {s.metrics_listen!r} is not a loopback address: the "
                        "metrics endpoint has no authentication nor TLS. Keep it on 127.0.0.1 "
                        "(scrape through a proxy or tunnel), or set metrics_allow_remote = "
                        "true on a network you trust")
        self._check_pools(s)
        if "dsn" in self.invalid:
            return
        if s.dsn:
            self._check_dsn(s.dsn, "dsn")
        elif not s.pools:
            self.problems.append(
                "no database: give --dsn, POOLBROKER_DSN or dsn in the config file (or "
                f"[{POOLS_TABLE}.NAME] tables)")


def load(config_file: str | None = None, overrides: dict[str, Any] | None = None,
         environ: dict[str, str] | None = None) -> Settings:
    """Merge the sources: ``overrides`` (command-line values, None = not given;
    text is parsed as in the environment) > ``environ`` (default: os.environ;
    an empty variable counts as unset) > ``config_file`` > defaults.

    Raises ConfigError with every problem found, whatever source it is in.
    """
    environ = os.environ if environ is None else environ
    merge = _Merge()
    if config_file:
        merge.read_file(config_file)
    for spec in SPECS.values():
        if environ.get(spec.env):
            merge.take(spec, environ[spec.env], spec.env, from_text=True)
    for name, value in (overrides or {}).items():
        if name not in SPECS:
            raise TypeError(f"load() got an override for no setting: {name!r}")
        if value is not None:
            merge.take(SPECS[name], value, SPECS[name].flag, from_text=isinstance(value, str))
    settings = Settings(**merge.values, pools=tuple(merge.pools))
    merge.cross_check(settings)
    if merge.problems:
        raise ConfigError(*merge.problems)
    return settings


def add_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per setting, not parsed by argparse: :func:`load` parses them
    with the environment's rules, so every bad value is reported at once."""
    group = parser.add_argument_group(
        "settings", f"each also {ENV_PREFIX}<NAME> in the environment and <name> in the "
                    f"[{TABLE}] table of --config; a flag beats the environment, which "
                    "beats the file")
    for spec in SPECS.values():
        default = spec.shown or f"default: {spec.shown_default}"
        text = plain(f"{spec.help} [{default}; env {spec.env}]")
        text = text.replace("%", "%%")  # argparse formats help with %
        if spec.kind is bool:
            group.add_argument(spec.flag, dest=spec.name, default=None, help=text,
                               action=argparse.BooleanOptionalAction)
        else:
            group.add_argument(spec.flag, dest=spec.name, default=None, help=text,
                               metavar=_metavar(spec.kind))


def _metavar(kind: Any) -> str:
    if get_origin(kind) is Literal:
        return "{" + ",".join(get_args(kind)) + "}"
    if get_origin(kind) is tuple:
        return "N,N,..."
    return {str: "TEXT", int: "N", float: "N"}[kind]


def flag_values(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given as flags (None where not), for :func:`load`."""
    return {name: getattr(args, name) for name in SPECS}


def plain(text: str) -> str:
    """Markdown's code spans dropped, for a terminal or a TOML comment."""
    return text.replace("`", "")
