"""Pool sizing: min_connections kept warm, max_idle shrinks the pool back to
it, max_lifetime recycles connections under load without failing a request
or touching an open transaction; the cap holds throughout."""

from __future__ import annotations

import os
import signal
import threading
import time

import client
from broker.pool import BACKEND_EXIT_WAIT
from conftest import OF_APPLICATION, ConnectionSampler, Load, backend_pids, thread_client, wait_until

LIFETIME = 1.5
"""max_lifetime in the recycling test: each connection goes within it (less up
to 10%), so one held open over twice that has outlived its lifetime."""


def test_min_connections_open_at_start_and_come_back_after_terminate(start_broker, admin):
    broker = start_broker(min_connections=3, max_connections=5)
    app = broker.application_name
    # Nothing has been asked of the database yet: the broker opens them itself.
    assert wait_until(lambda: len(backend_pids(admin, app)) == 3, 10), backend_pids(admin, app)
    before = backend_pids(admin, app)
    killed = admin.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                           f"WHERE {OF_APPLICATION}", [app]).fetchone()[0]
    assert killed == 3
    # Reopened without a request to need them.
    assert wait_until(lambda: (pids := backend_pids(admin, app)) and len(pids) == 3
                      and pids.isdisjoint(before), 10), (before, backend_pids(admin, app))
    # The server lists a backend before the broker has taken it over.
    assert wait_until(lambda: broker.stats()["connections_num"] == 6, 5), {
        k: v for k, v in broker.stats().items() if k.startswith(("connections", "pool_"))}
    stats = broker.stats()
    assert stats["pool_min"] == 3
    assert stats["connections_lost"] == 3
    assert broker.client.execute("SELECT 1").rows == [(1,)]
    assert len(backend_pids(admin, app)) == 3


def test_idle_connections_above_the_minimum_close_after_max_idle(start_broker, dsn, admin):
    max_idle = 1.0
    broker = start_broker(min_connections=1, max_connections=4, max_idle=max_idle)
    app = broker.application_name
    assert wait_until(lambda: len(backend_pids(admin, app)) == 1, 10)
    barrier = threading.Barrier(4)
    errors: list[str] = []

    def slow() -> None:
        with thread_client(broker.endpoint, 30) as c:
            c.ping()  # connected before the burst
            barrier.wait()
            try:
                c.execute("SELECT pg_sleep(0.3)")
            except client.Error as exc:
                errors.append(repr(exc))

    start = time.monotonic()
    with ConnectionSampler(dsn, app) as sampler:
        threads = [threading.Thread(target=slow) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []
    assert sampler.maximum == 4  # four slow statements side by side: the pool grew to the cap
    assert wait_until(lambda: len(backend_pids(admin, app)) < 4, 10)
    # None went before max_idle: each statement ended 0.3 s after start at the earliest.
    assert time.monotonic() - start >= 0.3 + max_idle
    assert wait_until(lambda: len(backend_pids(admin, app)) == 1, 10)
    stats = broker.stats()
    assert stats["connections_closed_idle"] == 3
    assert stats["connections_lost"] == 0
    # The minimum stays, however long it idles.
    time.sleep(max_idle * 1.5)
    assert len(backend_pids(admin, app)) == 1
    assert broker.stats()["connections_closed_idle"] == 3


def test_max_lifetime_recycles_every_connection_under_load_but_not_an_open_transaction(
        start_broker, dsn, admin):
    cap = 3
    broker = start_broker(min_connections=2, max_connections=cap, max_lifetime=LIFETIME)
    app = broker.application_name
    assert wait_until(lambda: len(backend_pids(admin, app)) == 2, 10)
    first = backend_pids(admin, app)
    load_seconds = 2 * LIFETIME + 1.5
    with ConnectionSampler(dsn, app) as sampler:
        load = Load(broker.endpoint, 4, load_seconds)
        # A transaction held open over twice the lifetime, beside the load.
        c = broker.client
        held_since = time.monotonic()
        with c.transaction() as tx:
            (held_pid,) = tx.execute("SELECT pg_backend_pid()").rows[0]
            while time.monotonic() - held_since < 2 * LIFETIME:
                time.sleep(0.2)
                assert tx.execute("SELECT pg_backend_pid()").rows == [(held_pid,)]
            assert held_pid in backend_pids(admin, app)
        # Once it ends, the connection goes: it is past its lifetime.
        assert wait_until(lambda: held_pid not in backend_pids(admin, app), 5)
        answered, errors, seen = load.finish()
    assert len(load.results) == 4
    stats = broker.stats()
    print(f"\n{answered} requests over {load_seconds:.1f} s at max_lifetime {LIFETIME} s: "
          f"{len(errors)} failed, {stats['connections_recycled']} connections recycled, "
          f"{len(seen)} backends served, {stats['requests_pipelined']} requests pipelined, "
          f"at most {sampler.maximum} connections sampled (cap {cap})")
    assert errors == []
    assert answered > 0
    assert stats["requests_pipelined"] > 0  # recycled with jobs pipelined behind others
    # Every connection of the start was replaced, and their replacements too.
    assert backend_pids(admin, app).isdisjoint(first | {held_pid})
    assert stats["connections_recycled"] >= len(first) + 1
    assert len(seen) > cap
    assert stats["connections_lost"] == 0
    assert sampler.maximum <= cap


def test_a_closed_connection_counts_against_the_cap_until_its_backend_exits(
        start_broker, dsn, admin):
    # Both connections are recycled while their backends are stopped, so they
    # cannot exit: their replacements must wait for them, not overlap them.
    broker = start_broker(min_connections=2, max_connections=2, max_lifetime=1.0)
    app = broker.application_name
    assert wait_until(lambda: len(backend_pids(admin, app)) == 2, 10)
    first = backend_pids(admin, app)
    for pid in first:
        os.kill(pid, signal.SIGSTOP)
    try:
        assert wait_until(lambda: broker.stats()["connections_recycled"] == 2, 5)
        with ConnectionSampler(dsn, app) as sampler:
            time.sleep(BACKEND_EXIT_WAIT / 2)  # within the wait for their backends
        assert backend_pids(admin, app) == first
        assert sampler.maximum == 2
    finally:
        for pid in first:
            os.kill(pid, signal.SIGCONT)
    # Once they have exited, the replacements open.
    assert wait_until(lambda: (pids := backend_pids(admin, app)) and len(pids) == 2
                      and pids.isdisjoint(first), 10), (first, backend_pids(admin, app))
    assert broker.client.execute("SELECT 1").rows == [(1,)]
    assert "not ended by the server" not in broker.log()
