"""Failures reach the caller at once, typed: no broker, a bad endpoint, a
peer that is not a broker, a database that refuses connections."""

from __future__ import annotations

import collections
import shutil
import socket
import threading
import time
from typing import Any, Callable

import psycopg
import pytest
import zmq

import client
from client import protocol
from conftest import BrokerProcess, short_tempdir


def _free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _nowhere() -> str:
    return f"ipc:///tmp/pb-nobody-{time.monotonic_ns()}/b.sock"


def _time_failure(c: client.Client) -> tuple[client.Error, float]:
    started = time.monotonic()
    with pytest.raises(client.Error) as info:
        c.execute("SELECT 1")
    return info.value, time.monotonic() - started


# Client side: no broker


@pytest.mark.parametrize("kind", ["ipc path that does not exist", "tcp port nobody listens on",
                                  "abstract ipc name nobody bound"])
def test_absent_broker_fails_within_connect_timeout_not_the_request_timeout(kind):
    endpoint = {
        "ipc path that does not exist": _nowhere(),
        "tcp port nobody listens on": f"tcp://127.0.0.1:{_free_tcp_port()}",
        "abstract ipc name nobody bound": f"ipc://@pb-nobody-{time.monotonic_ns()}",
    }[kind]
    c = client.Client(endpoint, timeout=30, connect_timeout=0.5)  # plain: no CURVE keys
    error, elapsed = _time_failure(c)
    c.close()
    assert type(error) is client.BrokerUnavailable
    assert error.outcome_unknown is False
    assert endpoint in str(error) and "connect_timeout" in str(error)
    assert "never sent" in str(error)
    assert elapsed < 10  # the request's 30 s budget was not waited for


def test_default_connect_timeout_is_far_below_gunicorns_worker_timeout(monkeypatch):
    monkeypatch.delenv("POOLBROKER_CLIENT_CONNECT_TIMEOUT", raising=False)
    assert client.DEFAULT_CONNECT_TIMEOUT <= 5
    c = client.Client(_nowhere())  # and the 60 s default timeout
    assert c.connect_timeout == client.DEFAULT_CONNECT_TIMEOUT
    error, elapsed = _time_failure(c)
    c.close()
    assert isinstance(error, client.BrokerUnavailable)
    assert elapsed < 15  # gunicorn kills a worker after 30 s


def test_connect_timeout_from_the_environment(monkeypatch):
    monkeypatch.setenv("POOLBROKER_CLIENT_CONNECT_TIMEOUT", "0.2")
    c = client.Client(_nowhere(), timeout=30)
    assert c.connect_timeout == 0.2
    error, _ = _time_failure(c)
    c.close()
    assert "connect_timeout (0.2 s)" in str(error)


def test_request_timeout_shorter_than_connect_timeout_bounds_the_wait():
    c = client.Client(_nowhere(), timeout=0.2, connect_timeout=30)
    error, elapsed = _time_failure(c)
    c.close()
    assert isinstance(error, client.BrokerUnavailable) and not error.outcome_unknown
    assert "timeout (0.2 s)" in str(error)
    assert elapsed < 10


def test_broker_starting_within_connect_timeout_gets_the_request(dsn):
    """connect_timeout is a wait for the broker, not a refusal at the first
    failed attempt: a broker (re)started meanwhile answers."""
    broker = BrokerProcess(dsn, max_connections=1)
    c = client.Client(broker.endpoint, timeout=30, connect_timeout=25)
    outcome: list[Any] = []
    sender = threading.Thread(target=lambda: outcome.append(_rows_or_error(c)))
    try:
        sender.start()
        time.sleep(0.3)  # the request is waiting for a broker that is not there yet
        broker.start(wait=False)
        sender.join(timeout=40)
    finally:
        broker.stop()
        shutil.rmtree(broker.dir, ignore_errors=True)
    assert outcome == [[(1,)]]


def test_broker_restarted_between_requests_is_not_a_lost_request(dsn):
    """The disconnection a restart leaves on the client's monitor predates
    the next request: a slow one (read past FAST_REPLY_WAIT, when the monitor
    is looked at) is answered, not failed as in flight when the broker died."""
    broker = BrokerProcess(dsn, max_connections=1)
    c = client.Client(broker.endpoint, timeout=30)
    try:
        broker.start()
        assert c.execute("SELECT 1").rows == [(1,)]
        broker.stop()
        broker.start()
        started = time.monotonic()
        assert c.execute("SELECT pg_sleep(0.3), 2").rows[0][1] == 2
        assert time.monotonic() - started < 5
        killer = threading.Timer(0.5, broker.proc.kill)  # one in flight fails at once
        killer.start()
        started = time.monotonic()
        with pytest.raises(client.BrokerUnavailable) as info:
            c.execute("SELECT pg_sleep(20)")
        killer.join()
        assert info.value.outcome_unknown and "lost" in str(info.value)
        assert time.monotonic() - started < 5
    finally:
        broker.stop()
        shutil.rmtree(broker.dir, ignore_errors=True)


def _rows_or_error(c: client.Client) -> Any:
    try:
        return c.execute("SELECT 1").rows
    except client.Error as exc:
        return exc


# Client side: everything it raises is a client.Error


@pytest.mark.parametrize("endpoint", ["foo://x", "ipc://", "ipc://@", "ipc:///tmp/" + "x" * 120,
                                      "garbage", "tcp://", "tcp://host:port",
                                      "inproc://poolbroker"])
def test_invalid_endpoint_raises_interface_error_naming_it(endpoint):
    c = client.Client(endpoint, timeout=1)
    with pytest.raises(client.InterfaceError) as info:
        c.execute("SELECT 1")
    assert repr(endpoint) in str(info.value)
    with pytest.raises(client.InterfaceError):  # and again: nothing half made is left behind
        c.ping()


@pytest.mark.parametrize("options", [
    {"timeout": 0}, {"timeout": -1}, {"timeout": "soon"}, {"timeout": float("nan")},
    {"connect_timeout": 0}, {"connect_timeout": float("inf")}, {"endpoint": 5555},
])
def test_invalid_settings_raise_interface_error(options):
    endpoint = options.pop("endpoint", "ipc:///tmp/pb-unused/b.sock")
    with pytest.raises(client.InterfaceError):
        client.Client(endpoint, **options)


def test_invalid_per_request_timeout_raises_interface_error():
    c = client.Client("ipc:///tmp/pb-unused/b.sock")
    for timeout in (0, -1, "soon", float("nan"), float("inf")):
        with pytest.raises(client.InterfaceError):
            c.execute("SELECT 1", timeout=timeout)


def test_invalid_connect_timeout_in_the_environment_raises_interface_error(monkeypatch):
    monkeypatch.setenv("POOLBROKER_CLIENT_CONNECT_TIMEOUT", "two seconds")
    with pytest.raises(client.InterfaceError, match="POOLBROKER_CLIENT_CONNECT_TIMEOUT"):
        client.Client("ipc:///tmp/pb-unused/b.sock")


def _fake_broker(endpoint: str, reply: Callable[[int], bytes], stop: threading.Event) -> None:
    """A ROUTER that answers every request with ``reply(request_id)``: a peer
    that is not a poolbroker of this version."""
    router = zmq.Context.instance().socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(endpoint)
    try:
        while not stop.is_set():
            if router.poll(50):
                routing_id, message = router.recv_multipart()
                header, _ = protocol.unpack_first(message, 4096)
                router.send_multipart([routing_id, reply(header[0])])
    finally:
        router.close()


@pytest.mark.parametrize("reply", [
    lambda request_id: b"\xc1",  # not msgpack
    lambda request_id: protocol.pack([request_id, protocol.STATUS_OK]),  # wrong shape
    lambda request_id: protocol.pack({"id": request_id}),
    lambda request_id: protocol.pack([request_id, protocol.STATUS_ERROR, "oops"]),
], ids=["undecodable", "two fields", "a map", "error without a payload"])
def test_reply_from_a_peer_that_is_not_a_broker_raises_interface_error(reply):
    endpoint = f"ipc://{short_tempdir()}/fake.sock"
    stop = threading.Event()
    fake = threading.Thread(target=_fake_broker, args=(endpoint, reply, stop))
    fake.start()
    c = client.Client(endpoint, timeout=5)
    try:
        with pytest.raises(client.InterfaceError):
            c.execute("SELECT 1")
    finally:
        c.close()
        stop.set()
        fake.join()


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
