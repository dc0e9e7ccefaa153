"""The client's ipc transport: ZMTP spoken from the worker's own thread
(client/_zmtp.py), against the broker's own (broker/zmtp.py)."""

from __future__ import annotations

import faulthandler
import gc
import os
import random
import signal
import socket
import threading
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


def test_a_timeout_of_weeks_waits_like_any_other(broker):
    # poll() takes at most 2**31 - 1 ms (24.8 days): a longer wait goes in steps.
    c = client.Client(broker.endpoint, timeout=30 * 86400, connect_timeout=30 * 86400)
    assert c.execute("SELECT pg_sleep(0.1), 1").rows == [("", 1)]
    with c.transaction() as tx:
        assert tx.execute("SELECT 2").rows == [(2,)]
    assert c.execute("SELECT 3").rows == [(3,)]


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


def test_threads_that_end_without_closing_leave_no_connection_behind(broker):
    c = client.Client(broker.endpoint, timeout=5)
    c.execute("SELECT 1")
    baseline = broker.stats()["clients_connected"]

    def one() -> None:
        c.execute("SELECT 1")
        time.sleep(_zmtp.KEEPALIVE_INTERVAL + 0.3)  # seen by the keep-alive thread

    for _ in range(2):
        threads = [threading.Thread(target=one) for _ in range(40)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    time.sleep(_zmtp.KEEPALIVE_INTERVAL + 0.3)  # one more tick of the keep-alive thread
    gc.collect()
    assert wait_until(lambda: broker.stats()["clients_connected"] == baseline, 3), \
        broker.stats()["clients_connected"]


def test_the_keep_alive_thread_outlives_a_failure(broker, caplog):
    class Failing:
        def keep_alive(self) -> None:
            raise RuntimeError("a connection that cannot be kept alive")

    failing = Failing()
    c = client.Client(broker.endpoint, timeout=5)
    c.execute("SELECT 1")  # the keep-alive thread runs
    _zmtp._dealers.add(failing)
    try:
        with c.transaction() as tx:
            tx.execute("SELECT 1")
            time.sleep(HEARTBEAT_TIMEOUT + 1.5)  # the others' keep-alive goes on
            assert tx.execute("SELECT 2").rows == [(2,)]
    finally:
        _zmtp._dealers.discard(failing)
    assert "keeping a connection to the broker alive failed" in caplog.text


class _Interrupt(Exception):
    pass


def _interrupt(*_: object) -> None:
    raise _Interrupt


@pytest.mark.parametrize("request_bytes,reply_bytes", [(10, 300_000), (2_000_000, 10)])
def test_an_interrupted_request_leaves_the_next_ones_right(broker, request_bytes, reply_bytes):
    """An interrupt (a signal handler's exception) may land in the middle
    of a frame being sent or read: the connection is then closed, never
    left out of step with the next request's reply."""
    c = client.Client(broker.endpoint, timeout=10)
    payload = "p" * request_bytes
    previous = signal.signal(signal.SIGALRM, _interrupt)
    rng = random.Random(7)
    interrupted = 0
    try:
        for n in range(150):
            try:
                signal.setitimer(signal.ITIMER_REAL, rng.uniform(1e-4, 3e-3))
                c.execute("SELECT length(%s), repeat('q', %s)", [payload, reply_bytes])
            except _Interrupt:
                interrupted += 1
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            assert c.execute("SELECT %s::int", [n]).rows == [(n,)]
    finally:
        signal.signal(signal.SIGALRM, previous)
    assert interrupted > 10


def test_a_request_made_during_another_on_the_same_thread_goes_apart(broker):
    """A signal handler's request (or a finalizer's, run by a garbage
    collection) while the thread's own awaits its reply: both answered."""
    c = client.Client(broker.endpoint, timeout=10)
    c.execute("SELECT 1")
    nested = []
    previous = signal.signal(signal.SIGALRM,
                             lambda *_: nested.append(c.execute("SELECT 2").rows))
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        assert c.execute("SELECT 1 FROM pg_sleep(0.6)").rows == [(1,)]
    finally:
        signal.signal(signal.SIGALRM, previous)
    assert nested == [[(2,)]]
    assert c._stale_replies == 0


def test_an_interrupt_while_waiting_for_a_reply_keeps_the_connection(broker):
    """Nothing was read: the connection, and the transaction its thread
    holds on it, stay (an interrupt inside a frame closes it, above)."""
    c = client.Client(broker.endpoint, timeout=10)
    previous = signal.signal(signal.SIGALRM, _interrupt)
    try:
        with c.transaction() as tx:
            tx.execute("CREATE TEMP TABLE kept (v int)")
            for delay in (0.01, 0.2):  # in the first blocking recv(), then in poll()
                signal.setitimer(signal.ITIMER_REAL, delay)
                with pytest.raises(_Interrupt):
                    c.execute("SELECT pg_sleep(0.4)")
            time.sleep(1.5)  # the broker would have seen a closed connection by now
            tx.execute("INSERT INTO kept VALUES (1)")
            assert tx.execute("SELECT v FROM kept").rows == [(1,)]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_a_long_nested_request_does_not_starve_the_outer_connection(broker):
    """The outer request's connection is neither read nor written while a
    signal handler's request runs: the keep-alive thread answers for it."""
    c = client.Client(broker.endpoint, timeout=15)
    previous = signal.signal(signal.SIGALRM,
                             lambda *_: c.execute("SELECT pg_sleep(%s)", [HEARTBEAT_TIMEOUT + 1.5]))
    try:
        with c.transaction() as tx:
            signal.setitimer(signal.ITIMER_REAL, 0.1)
            assert tx.execute("SELECT 7 FROM pg_sleep(0.3)").rows == [(7,)]
            assert tx.execute("SELECT 8").rows == [(8,)]
    finally:
        signal.signal(signal.SIGALRM, previous)


def test_requests_from_signal_handlers_while_connections_are_made_never_hang(broker):
    faulthandler.dump_traceback_later(60, exit=True)  # a hang fails loudly
    c = client.Client(broker.endpoint, timeout=5)
    answers = []
    previous = signal.signal(signal.SIGALRM,
                             lambda *_: answers.append(c.execute("SELECT 2").rows))
    rng = random.Random(3)
    try:
        for _ in range(100):
            c.close()  # the next request makes (and registers) a connection
            signal.setitimer(signal.ITIMER_REAL, rng.uniform(1e-5, 6e-4))
            assert c.execute("SELECT 1").rows == [(1,)]
            signal.setitimer(signal.ITIMER_REAL, 0)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        faulthandler.cancel_dump_traceback_later()
    assert answers and all(rows == [(2,)] for rows in answers)


def test_a_finalizers_request_on_the_keep_alive_thread_never_hangs_it(broker, monkeypatch):
    """A garbage collection may run on the keep-alive thread, and its
    finalizers' requests (a dropped connection's rollback) with it, while
    that thread holds a connection's lock: they go on connections of their
    own, and the keep-alive goes on."""
    c = client.Client(broker.endpoint, timeout=5)
    answers = []
    drain = _zmtp.Dealer._drain

    def drain_and_finalize(self: _zmtp.Dealer) -> None:
        if len(answers) < 6:
            answers.append(c.execute("SELECT 5").rows)
        drain(self)

    monkeypatch.setattr(_zmtp.Dealer, "_drain", drain_and_finalize)
    with c.transaction() as tx:
        tx.execute("SELECT 1")
        time.sleep(HEARTBEAT_TIMEOUT + 1.5)
        assert tx.execute("SELECT 2").rows == [(2,)]
    assert len(answers) >= 3 and all(rows == [(5,)] for rows in answers)


def test_the_client_speaks_to_a_libzmq_router_too():
    """A broker of an older release serves ipc with libzmq's ROUTER (and
    so would one with CURVE): the client's own ZMTP handshake and framing
    work against it as against the broker's."""
    import zmq

    from client import protocol
    from conftest import short_tempdir

    endpoint = f"ipc://{short_tempdir()}/router.sock"
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(endpoint)
    answered = []
    done = threading.Event()

    def serve() -> None:
        while not done.is_set():
            if not router.poll(50):
                continue
            routing_id, message = router.recv_multipart()
            request_id = protocol.unpack_first(message, 4096)[0][0]
            answered.append(request_id)
            router.send_multipart([routing_id, protocol.pack([request_id, protocol.STATUS_OK,
                                                              None])])

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        c = client.Client(endpoint, timeout=5)
        c.ping()
        c.ping()
        assert type(c._local.owned).__name__ == "_DirectSocket" and len(answered) == 2
        c.close()
    finally:
        done.set()
        server.join()
        router.close(linger=0)
        ctx.term()
