"""Prometheus exposition over HTTP (``metrics_listen``), off the loop's thread.

The loop keeps plain counters and fixed-bucket histograms (``broker/stats.py``)
and takes no lock for them: recording stays a few additions on the request
path.  prometheus_client's HTTP server runs on threads of its own; a scrape
asks the loop for a snapshot through a pipe the loop polls and waits until
the loop hands one over (``SnapshotHandoff``).  The loop builds it between two
turns, from the same ``Broker.snapshot()`` as ``poolbroker stats``, so every
number of one scrape is of the same instant, and a scrape costs the loop one
snapshot, whatever its rendering costs on the HTTP thread.

Names follow pgbouncer_exporter's where they map (``pgbouncer_pools_*`` ->
``poolbroker_pools_*``, with a ``pool`` label instead of database and user);
counters end in ``_total``, durations are in seconds.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Any, Callable, Iterable
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import PlatformCollector, ProcessCollector, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.core import (
    CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from . import stats as S
from .config import ConfigError, parse_listen

logger = logging.getLogger("poolbroker.metrics")

PREFIX = "poolbroker_"
RENDER_SHARE = 0.1
"""Of the wall time, the most that rendering scrapes may take: they run on
the HTTP threads but hold the GIL the loop needs (measured, 4,000 SELECT 1
from 2 processes: 1.0 s alone, 2.5 s beside one scraper in a loop, 18.7 s
beside 16).  Scrapes are rendered one at a time, each after a pause nine
times as long as the one before took (1 s at most), and each still from a snapshot the
loop built after it asked."""
MAX_PAUSE = 1.0
"""Seconds a scrape waits for the one before at most (well inside
Prometheus's 10 s scrape timeout)."""
SCRAPE_TIMEOUT = 2.0
"""Seconds a scrape waits for the loop's snapshot; longer only while the
broker opens its first connection, before it serves (then poolbroker_up is 0)."""

POOL_GAUGES = (
    # (key of a stats.POOLS entry, metric name after poolbroker_pools_, help)
    (S.CL_ACTIVE, "client_active_connections",
     "Client sockets with a request running or a transaction open in the pool, none queued"),
    (S.CL_WAITING, "client_waiting_connections",
     "Client sockets with a request queued for a server connection of the pool"),
    (S.SV_ACTIVE, "server_active_connections",
     "Server connections running clients' statements or pinned to a transaction"),
    (S.SV_IDLE, "server_idle_connections", "Server connections idle and ready for a request"),
    (S.SV_USED, "server_used_connections",
     "Server connections idle but needing a check before use: none here (always 0)"),
    (S.SV_TESTED, "server_testing_connections",
     "Server connections being reset (ROLLBACK, DISCARD ALL) before reuse"),
    (S.SV_LOGIN, "server_login_connections", "Server connections being opened"),
    (S.MAXWAIT, "client_maxwait_seconds", "Age of the oldest request queued in the pool"),
    (S.POOL_MAX, "max_connections", "The pool's cap on server connections"),
    (S.POOL_MIN, "min_connections", "Server connections the pool keeps open"),
    (S.REQUESTS_WAITING, "client_waiting_requests", "Requests queued in the pool"),
    (S.REQUESTS_WAITING_PEAK, "client_waiting_requests_peak",
     "Most requests queued in the pool at once since start"),
    (S.POOL_ACTIVE_PEAK, "server_active_connections_peak",
     "Most server connections active at once since start"),
)
POOL_HISTOGRAMS = (
    (S.WAIT_SECONDS, "stats_client_wait_seconds",
     "Time requests waited in the queue for a server connection, those that ended in "
     "PoolTimeout included"),
    (S.STATEMENT_SECONDS, "stats_queries_duration_seconds",
     "Server time of the statements run, from the head of their connection's pipeline to "
     "their result"),
)


def counter_name(key: str) -> str:
    """``requests_num`` -> ``poolbroker_requests`` (prometheus_client adds ``_total``)."""
    return PREFIX + key.removesuffix("_num")


class SnapshotHandoff:
    """Hands the loop's snapshots to scrape threads.

    A scrape raises a generation wanted and writes a byte to a pipe; the
    loop, woken by it, builds a snapshot and publishes it.  Scrapes that
    arrive together share one snapshot; none gets one built before it asked
    (its byte was written after the previous publication)."""

    def __init__(self) -> None:
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._read_fd, False)
        os.set_blocking(self._write_fd, False)
        self._cond = threading.Condition()
        self._published = 0
        self._snapshot: dict[str, Any] | None = None
        self._closed = False

    def fileno(self) -> int:
        """What the loop polls."""
        return self._read_fd

    def ask(self, timeout: float) -> dict[str, Any] | None:
        """On a scrape's thread: a snapshot built after this call began, or
        None if the loop did not answer within ``timeout`` seconds."""
        with self._cond:
            if self._closed:
                return None
            wanted = self._published + 1
            try:
                os.write(self._write_fd, b"x")
            except BlockingIOError:
                pass  # the pipe is full: the loop has a wake-up pending already
            if not self._cond.wait_for(lambda: self._published >= wanted or self._closed,
                                       timeout):
                return None
            return self._snapshot if not self._closed else None

    def answer(self, build: Callable[[], dict[str, Any]]) -> None:
        """On the loop's thread, when the pipe is readable."""
        try:
            while os.read(self._read_fd, 4096):
                pass
        except BlockingIOError:
            pass
        snapshot = build()
        with self._cond:
            self._snapshot = snapshot
            self._published += 1
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        os.close(self._read_fd)
        os.close(self._write_fd)


class BrokerCollector(Collector):
    """The broker's metrics, from one snapshot per scrape."""

    def __init__(self, handoff: SnapshotHandoff) -> None:
        self._handoff = handoff

    def collect(self) -> Iterable[Metric]:
        snapshot = self._handoff.ask(SCRAPE_TIMEOUT)
        yield GaugeMetricFamily(PREFIX + "up", "1 when the broker's loop answered this scrape",
                                value=0 if snapshot is None else 1)
        if snapshot is None:
            logger.warning("a metrics scrape got no snapshot from the loop within %g s",
                           SCRAPE_TIMEOUT)
            return
        for key, description in (*S.COUNTERS.items(), *S.OTHER_COUNTERS.items()):
            if key in snapshot:  # the gate's: not before the broker listens
                yield CounterMetricFamily(counter_name(key), description, value=snapshot[key])
        for key, description in S.GAUGES.items():
            if key in snapshot:
                yield GaugeMetricFamily(PREFIX + key, description, value=snapshot[key])
        pools = snapshot[S.POOLS]
        for key, name, description in POOL_GAUGES:
            family = GaugeMetricFamily(f"{PREFIX}pools_{name}", description, labels=["pool"])
            for entry in pools:
                family.add_metric([entry[S.POOL_NAME]], entry[key])
            yield family
        for key, name, description in POOL_HISTOGRAMS:
            family = HistogramMetricFamily(PREFIX + name, description, labels=["pool"])
            for entry in pools:
                family.add_metric([entry[S.POOL_NAME]], *_buckets(entry[key]))
            yield family


def _buckets(histogram: dict[str, Any]) -> tuple[list[tuple[str, float]], float]:
    """Cumulative buckets (Prometheus's "le" is "less than or equal") and the sum."""
    buckets, total = [], 0
    for bound, count in zip((*histogram["le"], float("inf")), histogram["counts"]):
        total += count
        buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), total))
    return buckets, histogram["sum"]


class _Paced:
    """A WSGI app rendered one request at a time, at most ``share`` of the time."""

    def __init__(self, app: Callable, share: float) -> None:
        self._app = app
        self._factor = 1 / share - 1
        self._lock = threading.Lock()
        self._next_at = 0.0

    def __call__(self, environ: dict, start_response: Callable) -> list[bytes]:
        captured: list[tuple] = []
        with self._lock:
            pause = self._next_at - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            # Wall time, not this thread's CPU: the loop loses more than that,
            # waiting up to the interpreter's switch interval for each handover.
            started = time.monotonic()
            body = b"".join(self._app(environ, lambda *args: captured.append(args)))
            ended = time.monotonic()
            self._next_at = ended + min((ended - started) * self._factor, MAX_PAUSE)
        start_response(*captured[0])
        return [body]


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


class MetricsServer:
    """prometheus_client's HTTP server on ``metrics_listen``, with the
    broker's collector and the process's own (CPU, memory, descriptors)."""

    def __init__(self, listen: str) -> None:
        host, port = parse_listen(listen)
        self.handoff = SnapshotHandoff()
        registry = CollectorRegistry()
        registry.register(BrokerCollector(self.handoff))
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        try:
            family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]

            class Server(ThreadingWSGIServer):
                address_family = family

            self._server = make_server(host, port, _Paced(make_wsgi_app(registry), RENDER_SHARE),
                                       Server, handler_class=_Quiet)
            self._thread = threading.Thread(target=self._server.serve_forever, daemon=True,
                                            name="metrics")
            self._thread.start()
        except OSError as exc:
            self.handoff.close()
            raise ConfigError(f"cannot serve metrics on {listen}: {exc}") from None
        logger.info("metrics on http://%s:%d/metrics", f"[{host}]" if ":" in host else host,
                    port)

    def close(self) -> None:
        self.handoff.close()  # first: a scrape in progress returns at once
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
