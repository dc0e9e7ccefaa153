"""Failures reach the caller at once, typed: a database that refuses
connections; and no failure where there should be none."""

from __future__ import annotations

import collections
import threading
import time
from typing import Any

import psycopg
import pytest

import client


def _rows_or_error(c: client.Client) -> Any:
    try:
        return c.execute("SELECT 1").rows
    except client.Error as exc:
        return exc


# Client side


def test_many_short_lived_thread_clients_without_close(broker):
    """Each thread's socket is left to the garbage collector when the thread
    ends: their monitors' names must never collide with a new socket's.
    (pyzmq named a monitor after its socket's descriptor, reused while the
    old name was still bound: a few "Address already in use" per thousand.)"""
    failures: list[BaseException] = []

    def one_shot(n: int) -> None:
        try:
            c = client.Client(broker.endpoint, timeout=10)
            assert c.execute("SELECT %s::int", [n]).rows == [(n,)]
        except BaseException as exc:  # noqa: BLE001 - any failure is the finding
            failures.append(exc)

    running: collections.deque[threading.Thread] = collections.deque()
    for n in range(5000):
        thread = threading.Thread(target=one_shot, args=(n,))
        thread.start()
        running.append(thread)
        if len(running) >= 16:  # threads end while others start, as in a server
            running.popleft().join()
    for thread in running:
        thread.join()
    assert failures == []


# Broker side: a database that refuses connections


@pytest.fixture
def refused_role(admin: psycopg.Connection) -> str:
    """A role with CONNECTION LIMIT 0: the server refuses it every
    connection (53300), a full database as far as the broker can tell.
    Superusers ignore such limits, hence a role of its own."""
    admin.execute("DROP ROLE IF EXISTS pb_full")
    admin.execute("CREATE ROLE pb_full LOGIN CONNECTION LIMIT 0")
    yield "pb_full"
    admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                  "WHERE usename = 'pb_full'")
    admin.execute("DROP ROLE IF EXISTS pb_full")


def _fail_repeatedly(c: client.Client, seconds: float) -> list[tuple[client.Error, float]]:
    """Failures of requests sent for ``seconds``, and how long each took: long
    enough for the broker's connect backoff to grow past a second."""
    failures = []
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        started = time.monotonic()
        with pytest.raises(client.OperationalError) as info:
            c.execute("SELECT 1", timeout=15)
        failures.append((info.value, time.monotonic() - started))
        time.sleep(0.05)
    return failures


# refused_role comes first: its role is dropped after the brokers using it stopped.
def test_full_database_fails_waiting_clients_at_once_with_53300(refused_role, start_broker, dsn,
                                                                 admin):
    broker = start_broker(dsn=f"{dsn} user={refused_role}", max_connections=4)
    c = broker.client
    # Several clients at once: the queue is failed, not only its head.
    burst: list[Any] = []
    threads = [threading.Thread(target=lambda: burst.append(_rows_or_error(c)))
               for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(burst) == 6 and all(isinstance(e, client.OperationalError) for e in burst)
    failures = _fail_repeatedly(c, 4.0)
    for error, took in failures:
        assert error.sqlstate == "53300", error  # too_many_connections, not a generic 08006
        assert "too many connections" in str(error)
        assert took < 1.0, f"{took:.2f} s: the connect backoff delayed the error"
    assert broker.stats()["connections_errors"] >= 2
    # Failing fast does not stop the broker from trying: room made, served.
    admin.execute(f"ALTER ROLE {refused_role} CONNECTION LIMIT -1")
    deadline = time.monotonic() + 15
    while True:
        try:
            assert c.execute("SELECT 42").rows == [(42,)]
            break
        except client.OperationalError:
            assert time.monotonic() < deadline, "not served after the database made room"
            time.sleep(0.1)


def test_missing_database_fails_every_request_at_once_with_3d000(start_broker, dsn):
    broker = start_broker(dsn=f"{dsn} dbname=pb_no_such_database", max_connections=2)
    for error, took in _fail_repeatedly(broker.client, 3.0):
        assert error.sqlstate == "3D000", error  # invalid_catalog_name
        assert "cannot connect to the database" in str(error)
        assert took < 1.0, f"{took:.2f} s: the connect backoff delayed the error"


def test_requests_wait_for_a_live_connection_while_the_database_refuses_more(
        refused_role, start_broker, dsn, admin):
    admin.execute(f"ALTER ROLE {refused_role} CONNECTION LIMIT 1")
    broker = start_broker(dsn=f"{dsn} user={refused_role}", max_connections=4)
    c = broker.client
    outcome: list[Any] = []
    with c.transaction() as tx:  # holds the one connection the server allows
        tx.execute("SELECT 1")
        waiter = threading.Thread(target=lambda: outcome.append(_rows_or_error(c)))
        waiter.start()
        time.sleep(1.0)  # the broker tries to open more, and is refused
        assert outcome == []  # still waiting for the live connection
    waiter.join(timeout=15)
    assert outcome == [[(1,)]]
    assert broker.stats()["connections_errors"] >= 1
