"""PostgreSQL errors arrive precise and well classified; bad input is answered."""

from __future__ import annotations

import random
import threading
import time

import msgpack
import psycopg
import pytest
import zmq

import client
from client import protocol
from conftest import OF_APPLICATION


@pytest.fixture
def items(admin: psycopg.Connection) -> None:
    admin.execute("DROP TABLE IF EXISTS items")
    admin.execute("CREATE TABLE items (id int PRIMARY KEY, qty int CHECK (qty >= 0))")
    admin.execute("INSERT INTO items VALUES (1, 1)")


@pytest.mark.parametrize("sql,cls,sqlstate", [
    ("INSERT INTO items VALUES (1, 1)", client.IntegrityError, "23505"),
    ("UPDATE items SET qty = -1", client.IntegrityError, "23514"),
    ("SELECT * FROM no_such_table", client.ProgrammingError, "42P01"),
    ("SELEC 1", client.ProgrammingError, "42601"),
    ("SELECT 1/0", client.DataError, "22012"),
    ("SELECT 'x'::int", client.DataError, "22P02"),
])
def test_errors_keep_sqlstate_and_class(broker, items, sql, cls, sqlstate):
    with pytest.raises(cls) as excinfo:
        broker.client.execute(sql)
    assert excinfo.value.sqlstate == sqlstate
    assert isinstance(excinfo.value, client.DatabaseError)
    assert broker.client.execute("SELECT 1").rows == [(1,)]


def test_diagnostics_reach_the_client(broker, items):
    with pytest.raises(client.IntegrityError) as excinfo:
        broker.client.execute("INSERT INTO items VALUES (1, 5)")
    error = excinfo.value
    assert str(error) == ('duplicate key value violates unique constraint "items_pkey"\n'
                          "DETAIL:  Key (id)=(1) already exists.")  # as psycopg's
    assert error.detail == "Key (id)=(1) already exists."
    assert error.constraint_name == "items_pkey"
    assert error.diag.table_name == "items"
    with pytest.raises(client.ProgrammingError) as excinfo:
        broker.client.execute("SELECT no_such_column FROM items")
    assert excinfo.value.diag.statement_position == "8"


def test_request_timeout_cancels_on_the_server(broker, admin):
    started = time.monotonic()
    with pytest.raises(client.QueryCanceled) as excinfo:
        broker.client.execute("SELECT pg_sleep(30)", timeout=0.5)
    assert excinfo.value.sqlstate == "57014"
    assert time.monotonic() - started < 10
    assert broker.client.execute("SELECT 1").rows == [(1,)]
    running = admin.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep(30)%%' "
        "AND state = 'active'").fetchone()[0]
    assert running == 0


def test_query_timeout_cancels_on_the_server(start_broker, admin):
    broker = start_broker(max_connections=1, query_timeout=0.3)
    c = broker.client
    with pytest.raises(client.QueryCanceled) as excinfo:
        c.execute("SELECT pg_sleep(30)", timeout=20)
    assert excinfo.value.sqlstate == "57014"
    assert "query_timeout" in str(excinfo.value)
    with pytest.raises(client.QueryCanceled):
        with c.transaction() as tx:
            tx.execute("SELECT pg_sleep(30)", timeout=20)
    # The only connection is free again, and nothing is left running.
    assert c.execute("SELECT 1").rows == [(1,)]
    running = admin.execute(
        f"SELECT count(*) FROM pg_stat_activity WHERE {OF_APPLICATION} "
        "AND state = 'active'", [broker.application_name]).fetchone()[0]
    assert running == 0
    assert broker.stats()["requests_cancelled"] == 2


def test_a_cancel_never_hits_the_next_statement(start_broker):
    """Statements timing out around their deadline share one connection with
    quick ones; a cancel sent late must not cancel whatever runs next."""
    broker = start_broker(max_connections=1)
    c = broker.client
    stop = threading.Event()
    quick_failures: list[Exception] = []

    def quick() -> None:
        while not stop.is_set():
            try:
                c.execute("SELECT 1", timeout=10)
            except client.Error as exc:
                quick_failures.append(exc)

    thread = threading.Thread(target=quick)
    thread.start()
    rng = random.Random(7)
    cancelled = 0
    try:
        for _ in range(40):
            try:
                c.execute("SELECT pg_sleep(%s)", [rng.uniform(0.0, 0.1)], timeout=0.05)
            except client.QueryCanceled:
                cancelled += 1
            except client.PoolTimeout:
                pass
    finally:
        stop.set()
        thread.join()
    assert quick_failures == []
    assert cancelled > 0


def test_statement_timeout_inside_a_transaction(broker):
    with pytest.raises(client.QueryCanceled):
        with broker.client.transaction() as tx:
            tx.execute("SET LOCAL statement_timeout = '50ms'")
            tx.execute("SELECT pg_sleep(5)")
    assert broker.client.execute("SELECT 1").rows == [(1,)]


@pytest.fixture
def raw(broker):
    socket = zmq.Context.instance().socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(broker.endpoint)
    yield socket
    socket.close()


def _reply(socket) -> list:
    assert socket.poll(5000), "no reply"
    return protocol.unpack(socket.recv())


def _header(op=protocol.OP_EXECUTE, request_id=7, timeout_ms=5000, session=None) -> bytes:
    return protocol.pack([request_id, op, timeout_ms, session])


def _ext_body(code: int, data: bytes) -> bytes:
    return msgpack.packb(["SELECT %s", [msgpack.ExtType(code, data)]])


MALFORMED = [
    ([b"one frame only"], "header must be"),  # one frame is the header, then the body
    ([_header(), protocol.pack([]), b"a third"], "expected 1 frame"),
    ([_header() + b"extra", protocol.pack([])], "extra data"),
    ([b"\x94\xc5\x13\x88" + b"x" * 5000], "undecodable header"),  # not within 4 KiB
    ([_header(op=protocol.OP_EXECUTE) + b"\xc1"], ""),  # one frame, a bad body
    ([_header(op=protocol.OP_EXECUTE) + protocol.pack(["SELECT 1"])], "takes 2 arguments"),
    ([b"\xc1\xc1\xc1", b""], "undecodable header"),
    ([protocol.pack({"not": "a list"}), b""], "header must be"),
    ([protocol.pack([1, 2]), b""], "header must be"),
    ([protocol.pack(["id", 1, 1000, None]), b""], "must be integers"),
    ([_header(op=99), protocol.pack([])], "unknown operation"),
    ([_header(timeout_ms=-5), protocol.pack([])], "timeout_ms"),
    ([_header(session="text"), protocol.pack([])], "session must be bytes"),
    ([protocol.pack([7, protocol.OP_EXECUTE, 5000, None, None, "now"]), b""], "sent_at"),
    ([protocol.pack([7, protocol.OP_EXECUTE, None, None, None, True]), b""], "sent_at"),
    ([protocol.pack([7, protocol.OP_EXECUTE, 5000, None, None, 1.0, 0]), b""], "header must be"),
    ([_header(), b"\xc1"], ""),
    ([_header(), protocol.pack(["SELECT 1"])], "takes 2 arguments"),
    ([_header(), protocol.pack([42, None])], "sql must be a string"),
    ([_header(), protocol.pack(["SELECT %s", 5])], "params must be"),
    ([_header(), protocol.pack(["SELECT %s", []])], ""),
    ([_header(op=protocol.OP_BATCH), protocol.pack([[]])], "non-empty list"),
    ([_header(op=protocol.OP_COMMIT), protocol.pack([])], "needs a transaction"),
    ([_header(), b"\xd4\x63\x00"], "unknown ext type"),
    ([_header(), b"\x91" * 5000 + b"\xc0"], ""),
    # Found by the fuzz test: ext payloads whose decoders raise other than ValueError.
    ([_header(), _ext_body(protocol.EXT_DECIMAL, b"not a number")], "ext type 1"),
    ([_header(), _ext_body(protocol.EXT_DATETIME, protocol.pack(["2020-01-01T00:00", "No/Zone"]))],
     "ext type 4"),
    ([_header(), _ext_body(protocol.EXT_DATETIME, b"\xc1")], "ext type 4"),
    ([_header(), _ext_body(protocol.EXT_TIMEDELTA, protocol.pack([1, 2]))], "ext type 5"),
    ([_header(), _ext_body(protocol.EXT_TIMEDELTA, protocol.pack([2**63 - 1, 0, 0]))], "ext type 5"),
    ([_header(), _ext_body(protocol.EXT_UUID, b"short")], "ext type 6"),
]


@pytest.mark.parametrize("frames,message", MALFORMED, ids=range(len(MALFORMED)))
def test_malformed_requests_are_answered(broker, raw, frames, message):
    raw.send_multipart(frames)
    reply = _reply(raw)
    assert reply[1] == protocol.STATUS_ERROR
    assert message in reply[2]["message"]
    assert reply[2]["kind"] in ("MessageError", "DataError", "ProgrammingError", "InterfaceError")
    assert broker.client.execute("SELECT 1").rows == [(1,)]


def test_a_request_in_one_frame_or_two_is_answered_alike(broker, raw):
    body = protocol.pack(["SELECT %s::int", [7]])
    raw.send_multipart([_header(request_id=1), body])  # as clients before protocol 2 send it
    raw.send(_header(request_id=2) + body)
    replies = sorted([_reply(raw), _reply(raw)])
    assert [reply[0] for reply in replies] == [1, 2]
    assert replies[0][1:] == replies[1][1:] == [protocol.STATUS_OK, [["int4"], [[7]], 1, [23]]]


def test_oversized_message_is_dropped_and_the_broker_serves_on(start_broker):
    broker = start_broker(max_connections=2, max_message_bytes=1024 * 1024)
    socket = zmq.Context.instance().socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(broker.endpoint)
    socket.send_multipart([_header(), protocol.pack(["SELECT %s", ["x" * 2_000_000]])])
    assert not socket.poll(500)  # the transport drops the peer; nothing to answer
    socket.close()
    assert broker.client.execute("SELECT 1").rows == [(1,)]
    assert broker.proc.poll() is None
