"""Broker settings: command-line flag > environment > TOML file > default."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import tomllib
from dataclasses import dataclass, fields
from typing import Any

from psycopg.conninfo import conninfo_to_dict

from client.protocol import DEFAULT_MAX_MESSAGE_BYTES, default_endpoint

from .predecessors import MARK, MARK_BYTES
from .redact import Redactor

NAMEDATALEN = 64
"""PostgreSQL truncates application_name to NAMEDATALEN - 1 bytes."""
APPLICATION_NAME_MAX = NAMEDATALEN - 1 - MARK_BYTES


class ConfigError(ValueError):
    pass


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Every setting, with its default.  ``etc/poolbroker.toml`` documents them."""

    dsn: str = ""
    """libpq connection string of the database (env POOLBROKER_DSN)."""
    endpoint: str = dataclasses.field(default_factory=default_endpoint)
    """ZeroMQ endpoint to bind (env POOLBROKER_ENDPOINT)."""
    max_connections: int = 10
    """Hard cap on server connections, opened lazily (env POOLBROKER_MAX_CONNECTIONS)."""
    pool_timeout: float = 30.0
    """Seconds a request may wait for a connection before PoolTimeout."""
    max_waiting: int = 10_000
    """Queued requests beyond which new ones fail at once with TooManyRequests."""
    idle_transaction_timeout: float = 60.0
    """Seconds a pinned transaction may sit idle before it is rolled back."""
    drain_timeout: float = 10.0
    """Seconds SIGTERM waits for in-flight statements before closing."""
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    """Largest request the broker accepts."""
    max_result_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    """Largest reply (rows, packed) the broker builds; larger results fail.
    0 lifts the limit: results are read whole, with no bound on memory."""
    max_client_requests: int = 100
    """Requests one client socket may have queued or running at once."""
    max_queued_bytes: int = 256 * 1024 * 1024
    """Bytes of requests (as received, plus their decoded parameters) waiting or
    running at once, over every client; beyond it new ones fail with TooManyRequests."""
    max_clients: int = 0
    """Client sockets connected at once; beyond it the broker stops accepting
    until some leave.  0: sized from the open-files limit."""
    allowed_uids: tuple = ()
    """Over ipc, the uids besides the broker's own whose processes may send requests."""
    query_timeout: float = 0.0
    """Seconds a statement may run before it is cancelled on the server (0: no limit)."""
    application_name: str = "poolbroker"
    """application_name of server connections; the broker appends its mark
    (``~<host and endpoint hash>.<pid>``) to tell its connections from others'."""
    connection_check_interval: float = 1.0
    """Seconds between the server's checks that the broker is still connected,
    even mid-statement (client_connection_check_interval; PostgreSQL 14+, 0: off)."""
    connect_timeout: float = 10.0
    """Seconds to wait for one server connection to open."""
    curve_secret_key_file: str = ""
    """The broker's CURVE certificate (``poolbroker keygen``), required for tcp."""
    curve_allowed_clients: str = ""
    """Directory of the public certificates of the clients allowed in over tcp."""
    insecure_tcp: bool = False
    """Allow a plain-text tcp endpoint without CURVE, on a network you trust."""
    metrics_listen: str = ""
    """Where to serve Prometheus metrics over HTTP, ``HOST:PORT`` (``[::1]:PORT``
    for IPv6) or a bare ``PORT`` for 127.0.0.1; empty: no metrics endpoint.
    A loopback address unless metrics_allow_remote is set."""
    metrics_allow_remote: bool = False
    """Allow metrics_listen on an address other than loopback: the endpoint has
    neither authentication nor TLS, and every scrape costs the broker's loop a
    snapshot."""
    log_level: str = "INFO"


_ENV = {
    "dsn": "POOLBROKER_DSN",
    "endpoint": "POOLBROKER_ENDPOINT",
    "max_connections": "POOLBROKER_MAX_CONNECTIONS",
}


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


def _coerce(name: str, kind: Any, value: Any, origin: str) -> Any:
    try:
        if kind == "tuple":  # a TOML list, or a comma-separated string
            items = value.split(",") if isinstance(value, str) else value
            if not isinstance(items, (list, tuple)):
                raise TypeError(value)
            result = tuple(int(item) for item in items if str(item).strip())
            if any(item < 0 for item in result):
                raise ValueError(value)
            return result
        if kind in (bool, "bool"):
            if isinstance(value, str):
                if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError(value)
                result = value.lower() in ("1", "true", "yes")
            else:
                result = bool(value)
            return result
        if kind in (int, "int"):
            result = int(value)
        elif kind in (float, "float"):
            result = float(value)
        else:
            result = str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{origin}: {name} must be {kind}, got {value!r}") from None
    if isinstance(result, (int, float)) and result < 0:
        raise ConfigError(f"{origin}: {name} must not be negative, got {value!r}")
    return result


def load(config_file: str | None = None, overrides: dict[str, Any] | None = None,
         environ: dict[str, str] | None = None) -> Settings:
    """Merge the sources; ``overrides`` are command-line values (None = not given)."""
    environ = os.environ if environ is None else environ
    known = {f.name: f.type for f in fields(Settings)}
    values: dict[str, Any] = {}
    if config_file:
        try:
            with open(config_file, "rb") as f:
                data = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read {config_file}: {exc}") from None
        data = data.get("poolbroker", data)
        for name, value in data.items():
            if name not in known:
                raise ConfigError(f"{config_file}: unknown setting {name!r}")
            values[name] = _coerce(name, known[name], value, config_file)
    for name, var in _ENV.items():
        if environ.get(var):
            values[name] = _coerce(name, known[name], environ[var], var)
    for name, value in (overrides or {}).items():
        if value is not None:
            values[name] = _coerce(name, known[name], value, f"--{name.replace('_', '-')}")
    settings = Settings(**values)
    if settings.max_connections < 1:
        raise ConfigError("max_connections must be at least 1")
    if bool(settings.curve_secret_key_file) != bool(settings.curve_allowed_clients):
        raise ConfigError("CURVE needs both curve_secret_key_file and curve_allowed_clients")
    name = settings.application_name
    if not (name.isascii() and name.isprintable()) or MARK in name \
            or len(name) > APPLICATION_NAME_MAX:
        raise ConfigError(
            f"application_name must be printable ASCII without {MARK!r}, at most "
            f"{APPLICATION_NAME_MAX} characters (the broker appends its mark and PostgreSQL "
            f"keeps {NAMEDATALEN - 1} bytes), got {name!r}")
    if settings.metrics_listen:
        host, _ = parse_listen(settings.metrics_listen)
        if not is_loopback(host) and not settings.metrics_allow_remote:
            raise ConfigError(
                f"metrics_listen {settings.metrics_listen!r} is not a loopback address: the "
                "metrics endpoint has no authentication nor TLS. Keep it on 127.0.0.1 (scrape "
                "through a proxy or tunnel), or set metrics_allow_remote = true on a network "
                "you trust")
    if not settings.dsn:
        raise ConfigError("no database: give --dsn, POOLBROKER_DSN or dsn in the config file")
    try:
        conninfo_to_dict(settings.dsn)
    except Exception as exc:
        message = Redactor(settings.dsn)(str(exc).strip())
        raise ConfigError(f"dsn is not a valid libpq connection string: {message}") from None
    return settings
