"""The cap holds across forks; queueing limits answer with the documented errors."""

from __future__ import annotations

from typing import Any

import threading
import time

import psycopg
import pytest
import zmq
from psycopg_pool import ConnectionPool

import client
from client import protocol
from conftest import ConnectionSampler, run_in_processes

CAP = 4
PROCESSES = 24
ITERATIONS = 12


@pytest.fixture
def cap_tables(admin: psycopg.Connection) -> None:
    admin.execute("DROP TABLE IF EXISTS cap_log, cap_counter")
    admin.execute("CREATE TABLE cap_log (worker int, n int PRIMARY KEY)")
    admin.execute("CREATE TABLE cap_counter (id int PRIMARY KEY, value int NOT NULL)")
    admin.execute("INSERT INTO cap_counter VALUES (1, 0), (2, 0)")


def _mixed_work(run: Any, key_base: int) -> int:
    """Reads, writes, a pinned transaction and a batch; returns operations done."""
    for i in range(ITERATIONS):
        key = key_base + i
        rows = run.execute("SELECT %s::int * 2, %s::text", [key, f"k{key}"]).rows
        assert rows == [(key * 2, f"k{key}")], rows
        run.execute("INSERT INTO cap_log (worker, n) VALUES (%s, %s)", [key_base, key])
        with run.transaction() as tx:
            (value,) = tx.execute("SELECT value FROM cap_counter WHERE id = 1 FOR UPDATE").rows[0]
            tx.execute("UPDATE cap_counter SET value = %s WHERE id = 1", [value + 1])
        results = run.batch([
            ("UPDATE cap_counter SET value = value + 1 WHERE id = 2", None),
            ("SELECT count(*) FROM cap_log WHERE n = %s", [key]),
        ])
        assert results[1].rows == [(1,)]
    return ITERATIONS


def _broker_worker(worker: int, threads: int) -> int:
    # The module-level client was configured (and used) by the parent
    # before the fork: the child must not reuse any of that state.
    done = []

    def thread_main(t: int) -> None:
        done.append(_mixed_work(client, worker * 10_000 + t * 1_000))

    pool = [threading.Thread(target=thread_main, args=(t,)) for t in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    if len(done) != threads:
        raise AssertionError(f"{threads - len(done)} threads failed")
    return sum(done)


def test_cap_holds_across_forked_processes(broker, dsn, admin, cap_tables, figures):
    client.configure(broker.endpoint, timeout=60)
    client.execute("SELECT 1")  # the parent's socket exists before the fork
    threads = [1 + (w % 3) for w in range(PROCESSES)]  # 1, 2 or 3 threads each
    with ConnectionSampler(dsn, broker.application_name) as sampler:
        done = run_in_processes(_broker_worker, [(w, threads[w]) for w in range(PROCESSES)])
    total = sum(threads) * ITERATIONS
    assert sum(done) == total
    assert admin.execute("SELECT count(*) FROM cap_log").fetchone()[0] == total
    counters = dict(admin.execute("SELECT id, value FROM cap_counter").fetchall())
    assert counters == {1: total, 2: total}
    figures(f"[cap] {PROCESSES} processes, {sum(threads)} threads, {total * 5} requests: "
            f"max server connections seen {sampler.maximum} in {sampler.samples} samples "
            f"(cap {CAP})")
    assert 0 < sampler.maximum <= CAP
    assert client.execute("SELECT 1").rows == [(1,)]  # the parent still works


class _PoolAdapter:
    """The same calls as the client, on a psycopg_pool of this process."""

    def __init__(self, pool: ConnectionPool) -> None:
        self._pool = pool

    def execute(self, sql, params=None):
        with self._pool.connection() as conn:
            cur = conn.execute(sql, params)
            return _Rows(cur.fetchall() if cur.description else [])

    def batch(self, statements):
        with self._pool.connection() as conn, conn.transaction():
            return [_Rows(c.fetchall() if c.description else [])
                    for c in (conn.execute(s, p) for s, p in statements)]

    def transaction(self):
        return _PoolTransaction(self._pool)


class _Rows:
    def __init__(self, rows):
        self.rows = rows


class _PoolTransaction:
    def __init__(self, pool):
        self._pool = pool

    def __enter__(self):
        self._cm = self._pool.connection()
        self._conn = self._cm.__enter__()
        return self

    def execute(self, sql, params=None):
        cur = self._conn.execute(sql, params)
        return _Rows(cur.fetchall() if cur.description else [])

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)


def _pool_worker(dsn: str, application_name: str, worker: int, threads: int) -> int:
    with ConnectionPool(dsn, min_size=1, max_size=CAP, open=True,
                        kwargs={"application_name": application_name}) as pool:
        adapter = _PoolAdapter(pool)
        done = []
        pool_threads = [threading.Thread(target=lambda t=t: done.append(
            _mixed_work(adapter, worker * 10_000 + t * 1_000))) for t in range(threads)]
        for t in pool_threads:
            t.start()
        for t in pool_threads:
            t.join()
        return sum(done)


def test_per_process_pools_exceed_the_cap(dsn, cap_tables, figures):
    """Why the broker exists: per-process pools of max_size 4 add up."""
    application_name = "pbtest-psycopg-pool"
    threads = [1 + (w % 3) for w in range(PROCESSES)]
    with ConnectionSampler(dsn, application_name) as sampler:
        run_in_processes(_pool_worker, [(dsn, application_name, w, threads[w])
                                        for w in range(PROCESSES)])
    figures(f"[cap] psycopg_pool(max_size={CAP}) in each of {PROCESSES} processes: "
            f"max server connections seen {sampler.maximum}")
    assert sampler.maximum > CAP


def _hold_transaction(c: client.Client, release: threading.Event, started: threading.Event,
                      errors: list) -> None:
    try:
        with c.transaction() as tx:
            tx.execute("SELECT 1")
            started.set()
            release.wait(10)
    except client.Error as exc:
        errors.append(exc)
        started.set()


@pytest.fixture
def one_connection_held(start_broker):
    """A broker capped at one connection, that connection pinned by a transaction."""
    def make(**settings):
        broker = start_broker(max_connections=1, **settings)
        release, started, errors = threading.Event(), threading.Event(), []
        holder = threading.Thread(target=_hold_transaction,
                                  args=(broker.client, release, started, errors))
        holder.start()
        assert started.wait(10), broker.log()
        assert not errors, f"{errors}\n{broker.log()}"
        return broker, release, holder
    return make


def test_pool_timeout_when_every_connection_is_busy(one_connection_held):
    broker, release, holder = one_connection_held(pool_timeout=0.5)
    with pytest.raises(client.PoolTimeout) as excinfo:
        broker.client.execute("SELECT 1", timeout=10)
    assert "pool_timeout=0.5" in str(excinfo.value)
    assert "not run" in str(excinfo.value)
    release.set()
    holder.join()
    assert broker.client.execute("SELECT 2").rows == [(2,)]
    assert broker.stats()["requests_timeouts"] == 1


def test_max_waiting_refuses_at_once(one_connection_held):
    broker, release, holder = one_connection_held(max_waiting=2)
    outcomes = []
    waiters = [threading.Thread(target=lambda: outcomes.append(
        broker.client.execute("SELECT 1", timeout=10).rows)) for _ in range(2)]
    for w in waiters:
        w.start()
    deadline = time.monotonic() + 10
    while broker.stats()["requests_waiting"] < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(client.TooManyRequests) as excinfo:
        broker.client.execute("SELECT 1")
    assert "max_waiting=2" in str(excinfo.value)
    release.set()
    holder.join()
    for w in waiters:
        w.join()
    assert outcomes == [[(1,)], [(1,)]]


def test_abandoned_request_is_never_executed(one_connection_held, admin):
    admin.execute("DROP TABLE IF EXISTS side_effect")
    admin.execute("CREATE TABLE side_effect (n int)")
    broker, release, holder = one_connection_held()
    with pytest.raises(client.PoolTimeout) as excinfo:
        broker.client.execute("INSERT INTO side_effect VALUES (1)", timeout=0.3)
    # Refused unrun either way: at the deadline, or just before it when the
    # housekeeping tick finds too little left to run the statement in.
    assert "deadline passed" in str(excinfo.value) or "too little time was left" in str(
        excinfo.value)
    release.set()
    holder.join()
    broker.client.execute("SELECT 1")  # the connection is free and used again
    time.sleep(0.2)
    assert admin.execute("SELECT count(*) FROM side_effect").fetchone()[0] == 0
    assert broker.stats()["requests_abandoned"] == 1


def test_broker_down_raises_broker_unavailable():
    c = client.Client("ipc:///tmp/pb-nobody-here/b.sock", timeout=0.3)
    started = time.monotonic()
    with pytest.raises(client.BrokerUnavailable) as excinfo:
        c.execute("SELECT 1")
    assert time.monotonic() - started < 5
    assert excinfo.value.outcome_unknown is False
    assert "never sent" in str(excinfo.value)


def test_per_client_request_limit(start_broker):
    broker = start_broker(max_connections=2, max_client_requests=5)
    socket = zmq.Context.instance().socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(broker.endpoint)
    try:
        body = protocol.pack(["SELECT pg_sleep(0.3)", None])
        for request_id in range(20):
            socket.send_multipart([protocol.pack([request_id, protocol.OP_EXECUTE, 20_000, None]),
                                   body])
        # Another client is not held back by this one's limit.
        assert broker.client.execute("SELECT 1").rows == [(1,)]
        kinds = []
        for _ in range(20):
            assert socket.poll(20_000)
            _, status, payload = protocol.unpack(socket.recv())
            kinds.append("ok" if status == protocol.STATUS_OK else payload["kind"])
    finally:
        socket.close()
    assert kinds.count("ok") == 5
    assert kinds.count("TooManyRequests") == 15
    assert broker.stats()["clients_active"] == 0
