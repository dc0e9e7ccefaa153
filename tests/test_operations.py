"""The broker as operators run it: supervisord, gunicorn, the CLI."""

from __future__ import annotations

import configparser
import http.client
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

import client
from conftest import (
    BIN, OF_APPLICATION, REPO, ConnectionSampler, Supervisord, free_port, stop_process,
)

CAP = 4


class Supervised(Supervisord):
    """etc/supervisord.conf, its broker on a test endpoint and application_name."""

    def __init__(self, dsn: str) -> None:
        self.application_name = f"pbtest-sup-{uuid.uuid4().hex[:8]}"
        super().__init__(REPO / "etc" / "supervisord.conf", {**os.environ, "POOLBROKER_DSN": dsn},
                         edit=self._edit)
        self.client = client.Client(self.endpoint, timeout=10)

    def _edit(self, parser: configparser.RawConfigParser, d: str) -> None:
        self.endpoint = f"ipc://{d}/b.sock"
        toml = Path(d, "poolbroker.toml")
        toml.write_text((REPO / "etc" / "poolbroker.toml").read_text() +
                        f'\napplication_name = "{self.application_name}"\n'
                        f"max_connections = {CAP}\n")
        program = parser["program:poolbroker"]
        assert program["stopsignal"] == "TERM"
        assert int(program["stopwaitsecs"]) > 10  # longer than the default drain_timeout
        program["command"] = (f"{sys.executable} -m broker.cli serve --config {toml} "
                              f"--endpoint {self.endpoint}")
        program["directory"] = str(REPO)

    def broker_pid(self) -> int:
        return self.pid("poolbroker")

    def wait_broker(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.client.ping(timeout=0.5)
                return
            except client.BrokerUnavailable:
                time.sleep(0.1)
        raise AssertionError(f"broker not up:\n{self.log('poolbroker')}")

    def close(self) -> None:
        self.client.close()
        super().close()


@pytest.fixture
def supervised(dsn):
    sup = Supervised(dsn)
    sup.wait_broker()
    yield sup
    sup.close()


class Gunicorn:
    def __init__(self, endpoint: str, worker_class: str, workers: int, threads: int) -> None:
        self.port = free_port()
        env = {**os.environ, "POOLBROKER_ENDPOINT": endpoint,
               "GUNICORN_BIND": f"127.0.0.1:{self.port}", "GUNICORN_WORKERS": str(workers),
               "GUNICORN_THREADS": str(threads), "GUNICORN_WORKER_CLASS": worker_class,
               "GUNICORN_PRELOAD": "1"}
        self.proc = subprocess.Popen(
            [str(BIN / "gunicorn"), "-c", str(REPO / "etc" / "gunicorn.conf.py"),
             "--chdir", str(REPO / "tests"), "--log-level", "warning", "wsgi_app:app"],
            env=env, cwd=REPO)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if self.get(1) == "2":
                    return
            except OSError:
                time.sleep(0.1)
        raise AssertionError("gunicorn did not answer")

    def get(self, n: int, conn: http.client.HTTPConnection | None = None) -> str:
        own = conn is None
        conn = conn or http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request("GET", f"/?n={n}")
            response = conn.getresponse()
            body = response.read().decode()
            assert response.status == 200, body
            return body
        finally:
            if own:
                conn.close()

    def load(self, concurrency: int, per_connection: int) -> list[str]:
        failures: list[str] = []

        def run(offset: int) -> None:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            try:
                for i in range(per_connection):
                    n = offset * 1000 + i
                    body = self.get(n, conn)
                    if body != str(n + 1):
                        failures.append(f"n={n}: {body!r}")
            except Exception as exc:  # any failure counts against the run
                failures.append(repr(exc))
            finally:
                conn.close()

        threads = [threading.Thread(target=run, args=(c,)) for c in range(concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return failures

    def close(self) -> None:
        stop_process(self.proc, timeout=30)


@pytest.mark.parametrize("worker_class,workers,threads,concurrency,per_connection", [
    ("gthread", 4, 4, 64, 32),
    ("sync", 4, 1, 8, 25),
])
def test_gunicorn_behind_supervisord(supervised, dsn, worker_class, workers, threads,
                                     concurrency, per_connection, figures):
    app = Gunicorn(supervised.endpoint, worker_class, workers, threads)
    try:
        with ConnectionSampler(dsn, supervised.application_name) as sampler:
            failures = app.load(concurrency, per_connection)
    finally:
        app.close()
    total = concurrency * per_connection
    figures(f"[gunicorn {worker_class}] {total} requests from {concurrency} connections, "
            f"{len(failures)} failed; max server connections {sampler.maximum} (cap {CAP})")
    assert failures == []
    assert 0 < sampler.maximum <= CAP


def _worker_after_restart(endpoint: str, go: Any, results: Any) -> None:
    worker = client.Client(endpoint, timeout=10)
    worker.execute("SELECT 1")  # connected before the crash
    go.wait(60)
    results.put(worker.execute("SELECT 2").rows)


def test_broker_killed_under_supervisord(supervised, admin):
    admin.execute("DROP TABLE IF EXISTS crash_writes")
    admin.execute("CREATE TABLE crash_writes (id int PRIMARY KEY)")
    c = supervised.client
    ctx = multiprocessing.get_context("fork")
    go, results = ctx.Event(), ctx.Queue()
    worker = ctx.Process(target=_worker_after_restart, args=(supervised.endpoint, go, results))
    worker.start()
    in_flight: list[BaseException] = []

    def long_statement() -> None:
        try:
            c.execute("SELECT pg_sleep(20)", timeout=30)
        except client.Error as exc:
            in_flight.append(exc)

    first = supervised.broker_pid()
    with pytest.raises(client.TransactionExpired):
        with c.transaction() as tx:
            tx.execute("INSERT INTO crash_writes VALUES (1)")
            thread = threading.Thread(target=long_statement)
            thread.start()
            while not admin.execute(
                    f"SELECT count(*) FROM pg_stat_activity WHERE {OF_APPLICATION} "
                    "AND query = 'SELECT pg_sleep(20)'",
                    [supervised.application_name]).fetchone()[0]:
                time.sleep(0.02)
            os.kill(first, signal.SIGKILL)
            thread.join(timeout=10)
            # The statement in flight fails now, not at its deadline, and
            # says it may have run.
            assert len(in_flight) == 1
            assert isinstance(in_flight[0], client.BrokerUnavailable)
            assert in_flight[0].outcome_unknown
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and supervised.broker_pid() in (0, first):
                time.sleep(0.1)
            supervised.wait_broker()
            # The transaction is never continued on another connection.
            tx.execute("INSERT INTO crash_writes VALUES (2)")
    assert admin.execute("SELECT count(*) FROM crash_writes").fetchone()[0] == 0
    # Workers recover on their next call, without being restarted.
    assert c.execute("SELECT 1").rows == [(1,)]
    go.set()
    assert results.get(timeout=20) == [(2,)]
    worker.join(10)


def test_supervisorctl_stop_drains_and_exits_cleanly(supervised):
    supervised.client.execute("SELECT 1")
    out = supervised.ctl("stop", "poolbroker")
    assert "stopped" in out
    status = supervised.ctl("status", "poolbroker")
    assert "STOPPED" in status
    assert "stopped" in supervised.log("poolbroker")
    with pytest.raises(client.BrokerUnavailable) as info:
        supervised.client.execute("SELECT 1", timeout=0.3)
    assert not info.value.outcome_unknown  # nothing was sent


def test_stats_command(broker):
    broker.client.execute("SELECT 1")
    out = subprocess.run([str(BIN / "poolbroker"), "stats", "--endpoint", broker.endpoint],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "requests_num" in out.stdout and "pool_max" in out.stdout
    assert "password" not in out.stdout
