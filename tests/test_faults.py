"""Faults the broker must survive: a database that restarts, goes away or
kills its connections, and clients that freeze or stop reading.

These tests restart and stop PostgreSQL, so they run against a cluster of
their own, never the session's shared one.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from typing import Any, Callable, Iterator

import psycopg
import pytest

import client
from broker.embedded import Cluster
from client import protocol
from conftest import (
    OF_APPLICATION, BrokerProcess, ConnectionSampler, broker_starter, raw_socket, throwaway_cluster,
)

CAP = 4


@pytest.fixture(scope="module")
def own_pg() -> Cluster:
    with throwaway_cluster("pb-fpg-", 5433) as cluster:
        yield cluster


@pytest.fixture
def own_broker(own_pg: Cluster) -> Iterator[Callable[..., BrokerProcess]]:
    with broker_starter(own_pg.dsn, max_connections=CAP) as start:
        yield start
    own_pg.start_if_stopped()


def _wait_until_served(c: client.Client, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            c.execute("SELECT 1", timeout=2)
            return
        except (client.OperationalError, client.PoolTimeout):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


class _Load:
    """Threads running ``SELECT %s`` through one client, recording every outcome."""

    def __init__(self, c: client.Client, threads: int) -> None:
        self._client = c
        self._stop = threading.Event()
        self.ok = 0
        self.wrong: list[Any] = []
        self.errors: list[client.Error] = []
        self._threads = [threading.Thread(target=self._run, args=(t,)) for t in range(threads)]

    def _run(self, t: int) -> None:
        n = t * 1_000_000
        while not self._stop.is_set():
            n += 1
            try:
                rows = self._client.execute("SELECT %s::int, pg_sleep(0.005)", [n], timeout=10).rows
            except client.Error as exc:
                self.errors.append(exc)
                continue
            if rows[0][0] != n:
                self.wrong.append((n, rows))
            self.ok += 1

    def __enter__(self) -> _Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()


def test_database_restart_under_load(own_pg, own_broker):
    broker = own_broker()
    c = broker.client
    with ConnectionSampler(own_pg.dsn, broker.application_name) as sampler:
        with _Load(c, threads=8) as load:
            time.sleep(0.5)
            own_pg.restart("fast")
            _wait_until_served(c)
            time.sleep(0.5)
        failures_during = len(load.errors)
        # After recovery nothing lands on a dead connection.
        for n in range(50):
            assert c.execute("SELECT %s::int", [n]).rows == [(n,)]
    assert broker.proc.poll() is None
    assert load.wrong == []
    assert load.ok > 0
    for exc in load.errors:
        # In flight: 57P01 admin_shutdown or 08006; while down: cannot connect (08001).
        assert isinstance(exc, client.OperationalError), repr(exc)
        assert exc.sqlstate, repr(exc)
    assert sampler.maximum <= CAP
    stats = broker.stats()
    assert stats["connections_lost"] >= 1
    assert stats["pool_size"] <= CAP
    print(f"\n[restart] {load.ok} answered, {failures_during} OperationalErrors, "
          f"sqlstates {sorted({e.sqlstate for e in load.errors})}, max connections "
          f"{sampler.maximum}")


def test_terminated_connection_fails_its_statement_with_sqlstate(own_pg, own_broker):
    broker = own_broker()
    c = broker.client
    outcome: list[BaseException] = []

    def sleeper() -> None:
        try:
            c.execute("SELECT pg_sleep(30)", timeout=40)
        except client.Error as exc:
            outcome.append(exc)

    thread = threading.Thread(target=sleeper)
    thread.start()
    with psycopg.connect(own_pg.dsn, autocommit=True) as admin:
        deadline = time.monotonic() + 10
        killed = 0
        while not killed and time.monotonic() < deadline:
            killed = admin.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                f"WHERE {OF_APPLICATION} AND query LIKE 'SELECT pg_sleep%%'",
                [broker.application_name]).fetchone()[0]
            time.sleep(0.05)
        thread.join(timeout=20)
        assert killed == 1
        assert len(outcome) == 1
        assert isinstance(outcome[0], client.OperationalError)
        assert outcome[0].sqlstate == "57P01"  # admin_shutdown
        for n in range(10):
            assert c.execute("SELECT %s::int", [n]).rows == [(n,)]
        assert broker.server_connections(admin) <= CAP
    assert broker.stats()["connections_lost"] == 1


def test_database_down_when_the_broker_starts(own_pg, own_broker):
    own_pg.stop("fast")
    broker = own_broker()  # starts and answers although the database is down
    c = broker.client
    with pytest.raises(client.OperationalError) as info:
        c.execute("SELECT 1", timeout=5)
    assert "cannot connect to the database" in str(info.value)
    assert info.value.sqlstate == "08001"  # not run; 08006 is a statement lost in flight
    own_pg.start()
    _wait_until_served(c)
    assert c.execute("SELECT 42").rows == [(42,)]
    assert broker.proc.poll() is None


def _hold_lock_then_continue(endpoint: str, ready: Any, resume: Any) -> str:
    c = client.Client(endpoint, timeout=10)
    try:
        with c.transaction() as tx:
            tx.execute("SELECT * FROM frozen_lock WHERE id = 1 FOR UPDATE")
            ready.set()
            resume.wait(60)
            try:
                tx.execute("SELECT 1")
            except client.BrokerUnavailable as exc:
                # Resumed, the client may find its connection dropped while it
                # was frozen: the outcome is unknown, so the client holds the
                # transaction aborted (the broker has ended it: see the stats).
                return f"lost: {exc}"
    except client.TransactionExpired as exc:
        return f"expired: {exc}"
    return "continued"


def test_frozen_client_transaction_is_ended_by_the_heartbeat(own_pg, own_broker):
    # The lease is far away: the transport heartbeat must catch the frozen peer.
    broker = own_broker(idle_transaction_timeout=600)
    with psycopg.connect(own_pg.dsn, autocommit=True) as admin:
        admin.execute("DROP TABLE IF EXISTS frozen_lock")
        admin.execute("CREATE TABLE frozen_lock (id int PRIMARY KEY, v int)")
        admin.execute("INSERT INTO frozen_lock VALUES (1, 0)")
    ctx = multiprocessing.get_context("fork")
    ready, resume, results = ctx.Event(), ctx.Event(), ctx.Queue()
    child = ctx.Process(target=lambda: results.put(
        _hold_lock_then_continue(broker.endpoint, ready, resume)))
    child.start()
    try:
        assert ready.wait(15)
        os.kill(child.pid, signal.SIGSTOP)
        c = broker.client
        # Others are served while the frozen client holds its transaction...
        for n in range(20):
            assert c.execute("SELECT %s::int", [n]).rows == [(n,)]
        # ...and its silence ends the transaction, releasing its lock.
        r = c.execute("UPDATE frozen_lock SET v = 1 WHERE id = 1", timeout=15)
        assert r.rowcount == 1
        os.kill(child.pid, signal.SIGCONT)
        resume.set()
        outcome = results.get(timeout=15)
    finally:
        os.kill(child.pid, signal.SIGCONT)
        child.join(10)
    assert outcome.startswith("lost:") or (
        outcome.startswith("expired:") and "connection was lost" in outcome), outcome
    assert broker.stats()["transactions_expired"] == 1


def test_client_that_never_reads_cannot_block_the_broker(own_broker):
    broker = own_broker()
    body = protocol.pack(["SELECT repeat('x', 20000)", None])
    with raw_socket(broker.endpoint, reads=False) as greedy:
        for request_id in range(3000):
            header = protocol.pack([request_id, protocol.OP_EXECUTE, 30_000, None])
            greedy.send_multipart([header, body])
        c = broker.client
        for n in range(200):
            assert c.execute("SELECT %s::int", [n], timeout=10).rows == [(n,)]
        stats = broker.stats()
        assert stats["replies_undeliverable"] + stats["requests_refused"] > 0
        assert broker.proc.poll() is None
