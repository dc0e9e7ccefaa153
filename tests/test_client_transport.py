"""The client's ipc transport: ZMTP spoken from the worker's own thread
(client/_zmtp.py), against the broker's libzmq ROUTER."""

from __future__ import annotations

import os
import socket
import time

import pytest

import client
from client import _zmtp
from conftest import wait_until

HEARTBEAT_TIMEOUT = 3.0  # the broker's: a peer silent this long after a PING is dropped


def test_ipc_requests_go_without_libzmq(broker):
    c = client.Client(broker.endpoint, timeout=5)
    assert c.execute("SELECT 1").rows == [(1,)]
    assert type(c._local.owned).__name__ == "_DirectSocket"


def test_idle_clients_and_transactions_outlive_the_transport_heartbeat(broker):
    """Nothing of the worker's thread runs while it does other work: the
    keep-alive thread answers the broker's heartbeats, so an idle client
    keeps its connection and an idle transaction its server connection."""
    idle, busy = (client.Client(broker.endpoint, timeout=5) for _ in range(2))
    idle.execute("SELECT 1")
    busy.execute("SELECT 1")
    before = broker.stats()["clients_connected"]
    with busy.transaction() as tx:
        tx.execute("CREATE TEMP TABLE held (v int)")
        time.sleep(HEARTBEAT_TIMEOUT + 1.5)
        tx.execute("INSERT INTO held VALUES (1)")
        assert tx.execute("SELECT v FROM held").rows == [(1,)]
    stats = broker.stats()
    assert stats["transactions_expired"] == 0
    assert stats["clients_connected"] == before  # nobody was dropped and came back
    assert idle.execute("SELECT 2").rows == [(2,)]


def test_a_broker_restarted_while_the_client_was_idle_is_reconnected_to(start_broker):
    broker = start_broker(max_connections=1)
    c = client.Client(broker.endpoint, timeout=5)
    assert c.execute("SELECT 1").rows == [(1,)]
    broker.stop()
    broker.start()
    # The old connection is gone: the request goes, unsent until then, on a new one.
    assert c.execute("SELECT 2").rows == [(2,)]


def test_a_connection_lost_in_flight_is_reported_at_once(start_broker):
    broker = start_broker(max_connections=1)
    c = client.Client(broker.endpoint, timeout=30)
    c.execute("SELECT 1")
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:
        time.sleep(0.5)
        os.kill(broker.proc.pid, 9)
        os._exit(0)
    with pytest.raises(client.BrokerUnavailable) as caught:
        c.execute("SELECT pg_sleep(20)")
    os.waitpid(pid, 0)
    assert caught.value.outcome_unknown
    assert "lost while the request was in flight" in str(caught.value)
    assert time.monotonic() - started < 5


def test_a_forked_child_closes_its_copy_of_the_parents_connection(broker):
    """The child's copy would hold the parent's connection open after the
    parent closed it: the broker would not see that client leave."""
    c = client.Client(broker.endpoint, timeout=5)
    c.execute("SELECT 1")
    connected = broker.stats()["clients_connected"]
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        os.write(write, b"x")
        time.sleep(3)  # alive, holding whatever it inherited
        os._exit(0)
    os.close(write)
    try:
        assert os.read(read, 1) == b"x"
        c.close()
        assert wait_until(lambda: broker.stats()["clients_connected"] == connected - 1, 2)
    finally:
        os.waitpid(pid, 0)
        os.close(read)


@pytest.mark.parametrize("size", [200, 300, 70_000, 3_000_000])
def test_messages_of_every_frame_size_cross(broker, size):
    """ZMTP frames: a one-byte size up to 255, an eight-byte one beyond;
    a reply larger than one read."""
    c = client.Client(broker.endpoint, timeout=10)
    text = "x" * size
    assert c.execute("SELECT %s::text", [text]).rows == [(text,)]
    assert c.execute("SELECT length(%s::text)", [text]).rows == [(size,)]


def test_a_peer_that_is_not_a_broker_is_never_sent_the_request(tmp_path):
    """A unix socket whose listener speaks something else: refused at the
    handshake, retried until connect_timeout, never sent."""
    directory = f"/tmp/pb-{os.getpid()}-{time.monotonic_ns() % 10**6}"
    os.mkdir(directory, 0o700)
    path = f"{directory}/b.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen()
    try:
        c = client.Client(f"ipc://{path}", timeout=5, connect_timeout=0.5)
        with pytest.raises(client.BrokerUnavailable) as caught:
            # Accepted by the kernel, never answered: the handshake times out.
            c.execute("SELECT 1")
        assert not caught.value.outcome_unknown
        assert "never sent" in str(caught.value)
    finally:
        listener.close()
        os.unlink(path)
        os.rmdir(directory)


def test_the_endpoint_names_its_unix_socket():
    assert _zmtp.address("ipc:///run/pb/b.sock") == "/run/pb/b.sock"
    assert _zmtp.address("ipc://@poolbroker") == "\0poolbroker"
