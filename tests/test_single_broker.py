"""One broker per endpoint, and a dead broker's statements end with it.

A second broker on a live endpoint would be a second cap; a broker killed
with SIGKILL leaves backends that run on, and that a restarted broker's
own connections would add to.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from typing import Any, Callable

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

import client
from conftest import OF_APPLICATION, BrokerProcess, ConnectionSampler, free_port, wait_until

CAP = 4
LONG = "SELECT pg_sleep(60)"


def _endpoint(kind: str) -> dict[str, Any]:
    if kind == "ipc":
        return {}  # BrokerProcess's own ipc path
    if kind == "abstract":
        return {"endpoint": f"ipc://@pb-{uuid.uuid4().hex[:12]}"}
    return {"endpoint": f"tcp://127.0.0.1:{free_port()}", "insecure_tcp": True}


@pytest.mark.parametrize("kind", ["ipc", "abstract", "tcp"])
def test_second_broker_on_a_live_endpoint_refuses_to_start(start_broker, kind):
    first = start_broker(max_connections=2, **_endpoint(kind))
    second = start_broker(wait=False, endpoint=first.endpoint, max_connections=2,
                          insecure_tcp=kind == "tcp")
    status = second.proc.wait(timeout=20)
    log = second.log()
    assert status != 0, log
    assert "Traceback" not in log
    if kind == "tcp":
        assert f"{first.endpoint} is already in use" in log
    else:
        assert f"another broker is serving {first.endpoint} (pid {first.proc.pid})" in log
    # The first never noticed.
    assert first.proc.poll() is None
    assert first.client.execute("SELECT 1").rows == [(1,)]
    assert first.stats()["pool_predecessors"] == 0


def test_stale_socket_of_a_killed_broker_is_replaced(start_broker):
    broker = start_broker(max_connections=2)
    path = broker.endpoint[len("ipc://"):]
    broker.proc.kill()
    broker.proc.wait()
    assert os.path.exists(path)  # SIGKILL leaves the socket file behind
    broker.start()
    fresh = client.Client(broker.endpoint, timeout=10)
    try:
        assert fresh.execute("SELECT 1").rows == [(1,)]
    finally:
        fresh.close()
    assert "replacing" in broker.log() and "a broker that is gone" in broker.log()


def test_a_clean_stop_removes_its_socket_file(start_broker):
    broker = start_broker(max_connections=2)
    path = broker.endpoint[len("ipc://"):]
    assert broker.stop() == 0
    assert not os.path.exists(path)  # the next broker must not take it for a crash
    broker.start()
    assert broker.client.execute("SELECT 1").rows == [(1,)]
    assert "a broker that is gone" not in broker.log()


def _running(admin: psycopg.Connection, application_name: str, sql: str) -> int:
    return admin.execute(
        f"SELECT count(*) FROM pg_stat_activity WHERE {OF_APPLICATION} AND query = %s "
        "AND state = 'active'", [application_name, sql]).fetchone()[0]


def _wait_for(condition: Callable[[], bool], timeout: float = 15.0) -> None:
    assert wait_until(condition, timeout), "timed out"


def _run_long_statements(broker: BrokerProcess, admin: psycopg.Connection,
                         n: int) -> list[threading.Thread]:
    """``n`` statements running on the server through ``broker``."""
    def run() -> None:
        c = client.Client(broker.endpoint, timeout=70)
        try:
            c.execute(LONG)
        except client.Error:
            pass  # the broker is killed under it
        finally:
            c.close()

    threads = [threading.Thread(target=run) for _ in range(n)]
    for thread in threads:
        thread.start()
    _wait_for(lambda: _running(admin, broker.application_name, LONG) == n)
    return threads


def _kill(broker: BrokerProcess, threads: list[threading.Thread]) -> None:
    broker.proc.kill()
    broker.proc.wait()
    for thread in threads:
        thread.join(timeout=15)


def _drive(endpoint: str, seconds: float, threads: int = 8) -> int:
    """Statements long enough for the pool to grow to its cap; how many ran."""
    done = []
    stop = time.monotonic() + seconds

    def run() -> None:
        c = client.Client(endpoint, timeout=15)
        try:
            while time.monotonic() < stop:
                c.execute("SELECT pg_sleep(0.02)")
                done.append(1)
        finally:
            c.close()

    workers = [threading.Thread(target=run) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return len(done)


@pytest.mark.parametrize("check_interval", [1.0, 0.0], ids=["server-check", "sweep-only"])
def test_cap_holds_across_a_broker_sigkill_and_restart(start_broker, admin, dsn,
                                                       check_interval, figures):
    # sweep-only: the killed broker's backends do not check for it, as with
    # PostgreSQL 13 or a broker from before connection_check_interval.
    broker = start_broker(max_connections=CAP, connection_check_interval=check_interval)
    threads = _run_long_statements(broker, admin, CAP)
    _kill(broker, threads)
    broker.start()  # same endpoint, same application_name
    # From the moment it answers, nothing of its predecessor's is left.
    assert _running(admin, broker.application_name, LONG) == 0
    assert broker.server_connections(admin) <= 1  # its own first connection
    with ConnectionSampler(dsn, broker.application_name) as sampler:
        ran = _drive(broker.endpoint, 2.0)
    stats = broker.stats()
    figures(f"[sigkill+restart {check_interval:g}] {ran} statements after the restart; "
            f"max server connections {sampler.maximum} of cap {CAP} "
            f"({sampler.samples} samples)")
    assert 0 < sampler.maximum <= CAP
    assert stats["pool_predecessors"] == 0
    if not check_interval:
        assert "terminated 4 server connections of a dead broker" in broker.log()


def test_live_brokers_of_one_application_on_two_endpoints_leave_each_other_alone(
        start_broker, admin):
    first = start_broker(max_connections=2)
    outcome: list[Any] = []
    thread = threading.Thread(target=lambda: outcome.append(
        first.client.execute("SELECT 1 FROM pg_sleep(2)", timeout=20).rows))
    thread.start()
    _wait_for(lambda: _running(admin, first.application_name, "SELECT 1 FROM pg_sleep(2)") == 1)
    second = start_broker(max_connections=2, application_name=first.application_name)
    assert second.client.execute("SELECT 2").rows == [(2,)]
    thread.join(timeout=20)
    assert outcome == [[(1,)]]
    assert second.stats()["pool_predecessors"] == 0
    assert "dead broker" not in second.log()


@pytest.fixture
def two_roles(admin: psycopg.Connection, dsn: str) -> tuple[str, str]:
    """DSNs of two ordinary roles: neither may terminate the other's backends."""
    dsns = []
    for role in ("pb_gone", "pb_next"):
        if not admin.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", [role]).fetchone():
            admin.execute(f"CREATE ROLE {role} LOGIN")
        dsns.append(make_conninfo(dsn, user=role))
    return dsns[0], dsns[1]


def test_backends_it_may_not_terminate_count_against_the_cap(start_broker, admin, dsn,
                                                             two_roles, figures):
    gone_dsn, next_dsn = two_roles
    old = start_broker(dsn=gone_dsn, max_connections=CAP, connection_check_interval=0)
    threads = _run_long_statements(old, admin, 2)
    _kill(old, threads)
    broker = start_broker(dsn=next_dsn, endpoint=old.endpoint,
                          application_name=old.application_name, max_connections=CAP)
    assert broker.stats()["pool_predecessors"] == 2
    assert "cannot terminate 2 server connections of a dead broker" in broker.log()
    with ConnectionSampler(dsn, broker.application_name) as sampler:
        _drive(broker.endpoint, 1.0)
        assert broker.stats()["pool_size"] <= CAP - 2
        # Once they end, the broker takes its whole cap back.
        admin.execute(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                      f"WHERE {OF_APPLICATION} AND query = %s",
                      [broker.application_name, LONG])
        _wait_for(lambda: broker.stats()["pool_predecessors"] == 0)
        _drive(broker.endpoint, 1.0)
    pool_size = broker.stats()["pool_size"]
    figures(f"[refused termination] 2 counted, pool {pool_size} after they ended; "
            f"max server connections {sampler.maximum} of cap {CAP}")
    assert sampler.maximum <= CAP
    assert pool_size == CAP


def test_requests_sent_while_it_waits_for_room_before_serving_are_served(
        start_broker, admin, two_roles):
    # A dead predecessor's connections fill the cap, so the new broker waits
    # before serving.  Clients may connect meanwhile (the handshakes do not
    # wait for the loop): their requests queue and are served once room comes.
    gone_dsn, next_dsn = two_roles
    old = start_broker(dsn=gone_dsn, max_connections=2, connection_check_interval=0)
    threads = _run_long_statements(old, admin, 2)
    _kill(old, threads)
    broker = start_broker(wait=False, dsn=next_dsn, endpoint=old.endpoint,
                          application_name=old.application_name, max_connections=2)
    assert wait_until(lambda: "waiting for them to end" in broker.log(), 10), broker.log()

    def end_them() -> None:
        time.sleep(3)
        admin.execute(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                      f"WHERE {OF_APPLICATION} AND query = %s", [broker.application_name, LONG])

    ender = threading.Thread(target=end_them)
    ender.start()
    c = client.Client(broker.endpoint, timeout=30)
    try:
        assert c.execute("SELECT 1").rows == [(1,)]
    finally:
        ender.join()
        c.close()
