"""The broker's ipc transport: ZMTP spoken by the loop itself
(broker/zmtp.py), for the client's own transport and libzmq's DEALER alike.
Hostile peers here speak to the unix socket by hand."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

import pytest
import zmq

import client
from client import _zmtp, protocol
from client.protocol import OP_EXECUTE, OP_PING
from conftest import memory_kb, raw_socket, wait_until

HEARTBEAT_TIMEOUT = 3.0


def _connect(endpoint: str, *, handshake: bool = True) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.connect(_zmtp.address(endpoint))
    if handshake:
        sock.sendall(_zmtp.GREETING + _zmtp.command(b"\x05READY" + _zmtp.socket_type(b"DEALER")))
        greeting = _recv_exactly(sock, _zmtp.GREETING_BYTES)
        assert _zmtp.null_greeting(greeting)
        ready = _frame(sock)
        assert ready[0] & _zmtp.COMMAND and b"ROUTER" in ready[1]
    return sock


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def _frame(sock: socket.socket) -> tuple[int, bytes]:
    flags, size = _recv_exactly(sock, 2)
    if flags & _zmtp.LONG:
        size = int.from_bytes(bytes([size]) + _recv_exactly(sock, 7), "big")
    return flags, _recv_exactly(sock, size)


def _message(body: bytes, flags: int = 0) -> bytes:
    if len(body) < 256:
        return bytes((flags, len(body))) + body
    return bytes((flags | _zmtp.LONG,)) + len(body).to_bytes(8, "big") + body


def _request(request_id: int, op: int, args: list | None) -> bytes:
    return protocol.pack([request_id, op, 5000, None]) + protocol.pack(args)


def _reply(sock: socket.socket) -> list:
    """The next reply, skipping heartbeat PINGs."""
    while True:
        flags, body = _frame(sock)
        if not flags & _zmtp.COMMAND:
            return protocol.unpack(body)


def _closed_by_broker(sock: socket.socket, within: float) -> bool:
    """Whether the broker closes ``sock`` within ``within`` seconds (what
    comes meanwhile, PINGs, is read and dropped)."""
    deadline = time.monotonic() + within
    try:
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            if not sock.recv(65536):
                return True
    except (TimeoutError, socket.timeout):
        return False
    except ConnectionResetError:
        return True
    return False


def test_ipc_is_served_by_the_loop_itself(broker):
    """No libzmq ROUTER over ipc: the broker's greeting is its own, and
    it speaks to the client's transport and to a libzmq DEALER alike."""
    sock = _connect(broker.endpoint)
    sock.sendall(_message(_request(7, OP_EXECUTE, ["SELECT 41 + 1", None])))
    request_id, status, payload = _reply(sock)
    assert (request_id, status, payload[1]) == (7, protocol.STATUS_OK, [[42]])
    with raw_socket(broker.endpoint) as dealer:
        dealer.send(_request(8, OP_PING, None))
        assert dealer.poll(5000)
        assert protocol.unpack(dealer.recv())[:2] == [8, protocol.STATUS_OK]
    assert client.Client(broker.endpoint, timeout=5).execute("SELECT 1").rows == [(1,)]


def test_a_silent_connection_is_dropped_after_the_heartbeat_timeout(broker):
    """PINGs go to a peer that says nothing; silent for HEARTBEAT_TIMEOUT,
    handshake or not, it is dropped (its transactions end with it)."""
    greeted = _connect(broker.endpoint)
    mute = _connect(broker.endpoint, handshake=False)
    time.sleep(HEARTBEAT_TIMEOUT - 1)
    flags, body = _frame(greeted)
    assert flags & _zmtp.COMMAND and body.startswith(b"\x04PING")
    assert _closed_by_broker(greeted, 4) and _closed_by_broker(mute, 4)


def test_a_peer_answering_pings_stays(broker):
    sock = _connect(broker.endpoint)
    end = time.monotonic() + HEARTBEAT_TIMEOUT + 2
    while time.monotonic() < end:
        sock.settimeout(max(0.01, end - time.monotonic()))
        try:
            flags, body = _frame(sock)
        except (TimeoutError, socket.timeout):
            break
        assert body.startswith(b"\x04PING")
        sock.sendall(_zmtp.command(b"\x04PONG"))
    sock.settimeout(5)
    sock.sendall(_message(_request(1, OP_PING, None)))
    assert _reply(sock)[:2] == [1, protocol.STATUS_OK]


@pytest.mark.parametrize("garbage", [
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",  # not ZMTP
    b"\xff" + bytes(8) + b"\x7f\x02\x00" + bytes(52),  # ZMTP 2
    b"\xff" + bytes(8) + b"\x7f\x03\x01" + b"PLAIN".ljust(20, b"\0") + bytes(32),  # PLAIN
])
def test_a_peer_that_does_not_speak_zmtp_3_null_is_dropped(broker, garbage):
    sock = _connect(broker.endpoint, handshake=False)
    sock.sendall(garbage)
    assert _closed_by_broker(sock, 2)
    assert client.Client(broker.endpoint, timeout=5).execute("SELECT 1").rows == [(1,)]


@pytest.mark.parametrize("frame", [
    b"\x02" + (1 << 40).to_bytes(8, "big"),  # a frame over max_message_bytes, announced
    b"\x40\x01x",  # reserved flag bits
    _zmtp.command(b"\x05READY" + _zmtp.socket_type(b"PUB")),  # a second READY, of a PUB
    # A command of 60 KB (7,500 tiny properties): refused at its header, never parsed.
    b"\x06" + (60_000).to_bytes(8, "big") + b"\x05READY" + b"\x00\x00\x00\x00\x00" * 12_000,
])
def test_a_peer_breaking_the_framing_is_dropped(broker, frame):
    sock = _connect(broker.endpoint)
    try:
        sock.sendall(frame)
    except (BrokenPipeError, ConnectionResetError):
        pass  # dropped at the frame's header
    else:
        assert _closed_by_broker(sock, 2)
    assert client.Client(broker.endpoint, timeout=5).execute("SELECT 1").rows == [(1,)]


def test_a_message_before_the_handshake_ends_the_connection(broker):
    sock = _connect(broker.endpoint, handshake=False)
    sock.sendall(_zmtp.GREETING + _message(_request(1, OP_PING, None)))
    assert _closed_by_broker(sock, 2)


def test_a_request_of_many_frames_is_refused_clearly(broker):
    sock = _connect(broker.endpoint)
    sock.sendall(b"".join(_message(b"x", _zmtp.MORE) for _ in range(1000)) + _message(b"x"))
    _, status, payload = _reply(sock)
    assert status != protocol.STATUS_OK and "got more" in str(payload)
    sock.sendall(_message(_request(2, OP_PING, None)))
    assert _reply(sock)[:2] == [2, protocol.STATUS_OK]


def test_a_request_split_into_single_bytes_is_served(broker):
    sock = _connect(broker.endpoint, handshake=False)
    data = (_zmtp.GREETING + _zmtp.command(b"\x05READY" + _zmtp.socket_type(b"DEALER"))
            + _message(_request(3, OP_EXECUTE, ["SELECT %s::text", ["y" * 300]])))
    for i in range(len(data)):
        sock.send(data[i:i + 1])
    assert _zmtp.null_greeting(_recv_exactly(sock, _zmtp.GREETING_BYTES))
    assert _frame(sock)[0] & _zmtp.COMMAND  # READY
    request_id, status, payload = _reply(sock)
    assert (request_id, status, payload[1]) == (3, protocol.STATUS_OK, [["y" * 300]])


def test_a_client_that_never_reads_loses_its_replies_not_the_broker(broker):
    """Replies queue up to max_client_requests (+ 16) for a client that
    does not read; past that they are undeliverable, and the others are
    served meanwhile."""
    sock = _connect(broker.endpoint)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    big = _message(_request(0, OP_EXECUTE, ["SELECT repeat('z', 200000)", None]))
    before = broker.stats()["replies_undeliverable"]
    for _ in range(2):  # each time max_client_requests: the first are queued by the next
        sock.sendall(big * 100)
        time.sleep(1)
    assert wait_until(lambda: broker.stats()["replies_undeliverable"] > before, 10)
    assert client.Client(broker.endpoint, timeout=5).execute("SELECT 1").rows == [(1,)]
    sock.close()


def test_many_connections_at_once_are_all_accepted(broker):
    socks = [_connect(broker.endpoint) for _ in range(300)]
    for n, sock in enumerate(socks):
        sock.sendall(_message(_request(n, OP_PING, None)))
    assert [_reply(sock)[0] for sock in socks] == list(range(300))
    assert broker.stats()["clients_connected"] >= 300
    for sock in socks:
        sock.close()
    assert wait_until(lambda: broker.stats()["clients_connected"] < 300, 5)


def test_a_libzmq_client_with_heartbeats_of_its_own_is_answered(broker):
    """A libzmq DEALER that PINGs the broker gets its PONGs: it keeps the
    connection (libzmq drops one whose PINGs go unanswered)."""
    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.setsockopt(zmq.HEARTBEAT_IVL, 200)
    dealer.setsockopt(zmq.HEARTBEAT_TIMEOUT, 600)
    monitor = dealer.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    try:
        dealer.connect(broker.endpoint)
        dealer.send(_request(1, OP_PING, None))
        assert dealer.poll(5000) and protocol.unpack(dealer.recv())[0] == 1
        assert not monitor.poll(2000)  # no disconnection
        dealer.send(_request(2, OP_PING, None))
        assert dealer.poll(5000) and protocol.unpack(dealer.recv())[0] == 2
    finally:
        monitor.close(linger=0)
        dealer.close(linger=0)
        ctx.term()


def test_pings_from_a_peer_that_never_reads_queue_no_pongs(broker):
    """A PONG is not queued behind output the peer does not take: a flood
    of PINGs cannot grow the broker's memory."""
    sock = _connect(broker.endpoint)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    before = memory_kb(broker.proc.pid)["VmRSS"]
    ping = _zmtp.command(b"\x04PING\x00\x00" + b"c" * 16) * 4096
    for _ in range(500):  # 45 MB of PINGs: each PONG would be 22 bytes
        sock.sendall(ping)
    assert client.Client(broker.endpoint, timeout=5).execute("SELECT 1").rows == [(1,)]
    assert memory_kb(broker.proc.pid)["VmRSS"] - before < 16 * 1024
    sock.close()


def test_pipelined_requests_under_max_client_requests_all_get_their_replies(broker):
    """Replies are counted whole in a client's queue, however the socket
    took them in parts: 90 large ones, read late, all arrive."""
    sock = _connect(broker.endpoint)
    for n in range(90):
        sock.sendall(_message(_request(n, OP_EXECUTE, ["SELECT repeat('r', 70000)", None])))
    time.sleep(1.5)
    assert sorted(_reply(sock)[0] for _ in range(90)) == list(range(90))
    assert broker.stats()["replies_undeliverable"] == 0


def test_a_multipart_message_over_max_message_bytes_in_all_drops_the_connection(start_broker):
    """Frames are held until the message's last: their sum is bounded."""
    broker = start_broker(max_connections=2, max_message_bytes=1_000_000)
    sock = _connect(broker.endpoint)
    part = b"m" * 600_000  # each frame under the limit, the message over it
    try:
        sock.sendall(_message(part, _zmtp.MORE) + _message(part, _zmtp.MORE))
    except (BrokenPipeError, ConnectionResetError):
        pass  # dropped while the rest was on its way
    else:
        assert _closed_by_broker(sock, 2)
    assert client.Client(broker.endpoint, timeout=5).execute("SELECT 1").rows == [(1,)]


def test_idle_transactions_outlive_a_loop_stalled_for_seconds(broker):
    """No PING left while the loop was stalled, so none went unanswered:
    an idle libzmq DEALER (no heartbeat of its own) keeps its transaction."""
    with raw_socket(broker.endpoint) as dealer:
        dealer.send(_request(1, protocol.OP_BEGIN, []))
        assert dealer.poll(5000)
        _, status, token = protocol.unpack(dealer.recv())
        assert status == protocol.STATUS_OK
        os.kill(broker.proc.pid, signal.SIGSTOP)
        try:
            time.sleep(HEARTBEAT_TIMEOUT + 1)
        finally:
            os.kill(broker.proc.pid, signal.SIGCONT)
        time.sleep(2)
        dealer.send(protocol.pack([2, OP_EXECUTE, 5000, token])
                    + protocol.pack(["SELECT 5", None]))
        assert dealer.poll(5000)
        request_id, status, payload = protocol.unpack(dealer.recv())
        assert (request_id, status, payload[1]) == (2, protocol.STATUS_OK, [[5]])


def test_pipelined_requests_beyond_a_turns_share_are_all_answered(broker):
    """A connection's frames are handled a share at a time (FRAMES_PER_TURN),
    the rest kept for the next turns: none lost, none stuck, others served."""
    sock = _connect(broker.endpoint)
    replies: list[int] = []
    # Read as they come: more than max_client_requests (+16) unread would
    # be undeliverable, as over libzmq.
    reader = threading.Thread(target=lambda: replies.extend(_reply(sock)[0] for _ in range(100)))
    reader.start()
    sock.sendall(b"".join(_message(_request(n, OP_PING, None)) for n in range(100)))
    assert client.Client(broker.endpoint, timeout=5).execute("SELECT 1").rows == [(1,)]
    reader.join(30)
    assert sorted(replies) == list(range(100))

