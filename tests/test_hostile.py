"""Hostile input that costs the broker more than its size: bodies that decode
into far more memory than they take, statement texts whose conversion or
screening is worse than linear, COPY data sent faster than the server reads
it, floods of small requests.  Each test checks the broker answers, keeps
serving others, and stays within a bound on memory."""

from __future__ import annotations

import threading
import time

import psycopg
import pytest
import zmq

import client
from client import protocol
from conftest import OF_APPLICATION, ConnectionSampler, memory_kb, raw_socket, wait_until

MB = 1024 * 1024


def _request(socket: zmq.Socket, op: int, body: bytes, request_id: int = 1,
             token: bytes | None = None, timeout: float = 20.0) -> list:
    """Send one raw request and return its reply (the test fails without one)."""
    socket.send_multipart([protocol.pack([request_id, op, int(timeout * 1000), token]), body])
    assert socket.poll(int(timeout * 1000)), "no reply: the broker's loop is stuck"
    return protocol.unpack(socket.recv())


def _array(count: int) -> bytes:
    """A msgpack array header of ``count`` items (array 32)."""
    return b"\xdd" + count.to_bytes(4, "big")


def _ext32(code: int, payload: bytes) -> bytes:
    return b"\xc9" + len(payload).to_bytes(4, "big") + bytes((code,)) + payload


SQL = protocol.pack("SELECT %s::text IS NULL")
FLOOD = 4_000_000
FLAT = _array(FLOOD) + b"\x90" * FLOOD  # 4 million empty arrays in one
NESTED = _array(FLOOD // 1000) + (_array(1000) + b"\x90" * 1000) * (FLOOD // 1000)
NEGATIVE = _array(FLOOD // 1000) + (_array(1000) + b"\xe0" * 1000) * (FLOOD // 1000)  # -32
WIDE = _array(FLOOD // 3000) + (_array(1000) + b"\xa2\xc4\x80" * 1000) * (FLOOD // 3000)  # 'Ā'
TOO_BIG, MALFORMED = "TooManyRequests", "MessageError"


def _execute(param: bytes) -> bytes:
    return b"\x92" + SQL + b"\x91" + param  # [sql, [param]]


# Decode amplification: every operation's body is decoded within a budget:
# arrays and maps at least 3 bytes each on average, and an estimate of what
# the decoded and dumped items take within what is left of max_queued_bytes.


@pytest.mark.parametrize("op, body, kind", [
    # executemany [sql, [[param]]]: one parameter set holding 4 million empty arrays
    (protocol.OP_EXECUTEMANY, b"\x92" + SQL + b"\x91\x91" + FLAT, TOO_BIG),
    # batch [[[sql, [param]]]]: one item, a 4,000 x 1,000 array of -32 (32 B each decoded)
    (protocol.OP_BATCH, b"\x91\x91\x92" + SQL + b"\x91" + NEGATIVE, TOO_BIG),
    # a 4,000 x 1,000 array of 'Ā' (80 B each decoded)
    (protocol.OP_EXECUTE, _execute(WIDE), TOO_BIG),
    # a Json ext value whose document is 4,000 arrays of 1,000 empty arrays
    (protocol.OP_EXECUTE, _execute(_ext32(protocol.EXT_JSON, NESTED)), TOO_BIG),
    # a datetime ext value whose payload is the flood
    (protocol.OP_EXECUTE, _execute(_ext32(protocol.EXT_DATETIME, FLAT)), MALFORMED),
    # 1.3 million ext values of 3 bytes (Decimal('1'): 104 bytes each decoded)
    (protocol.OP_EXECUTE, _execute(_array(FLOOD // 3) + b"\xd4\x01\x31" * (FLOOD // 3)),
     TOO_BIG),
], ids=["executemany", "batch", "short-strings", "json-ext", "datetime-ext", "ext-values"])
def test_every_operation_decodes_a_large_body_within_a_budget(start_broker, op, body, kind):
    broker = start_broker(max_connections=1)
    c = broker.client
    c.execute("SELECT 1")
    before = memory_kb(broker.proc.pid)["VmHWM"]
    with raw_socket(broker.endpoint) as s:
        reply = _request(s, op, body)
    assert reply[1] == protocol.STATUS_ERROR and reply[2]["kind"] == kind, reply
    grown_mb = (memory_kb(broker.proc.pid)["VmHWM"] - before) / 1024
    print(f"\n[decode] {reply[2]['message'][:60]}; peak RSS +{grown_mb:.0f} MB "
          f"for {len(body) / MB:.0f} MB")
    assert grown_mb < 4 * 30, grown_mb  # before: +300 MB to +1 GB for 4 MB bodies like these
    assert broker.stats()["queued_bytes"] == 0
    assert c.execute("SELECT 2").rows == [(2,)]


def test_large_bodies_of_real_parameters_still_decode(broker):
    c = broker.client
    pairs = [[i % 1000, i % 7] for i in range(100_000)]  # 3-5 bytes an array
    rows = c.executemany("SELECT cardinality(%s::int[])", [[pairs], [pairs[:10]]])
    assert rows.rowcount == 2
    [first, second] = c.batch([("SELECT cardinality(%s::int[])", [pairs]),
                               ("SELECT %s::jsonb -> 0", [client.Json(pairs[:50_000])])])
    assert first.rows == [(200_000,)] and second.rows == [([0, 0],)]


# Statement texts: conversion and screening linear in their length


@pytest.mark.parametrize("sql, params, kind", [
    ("SELECT 1 " + "%%" * 500_000, [], "ProgrammingError"),  # too many for any statement
    ("SELECT 1 " + "%(" * 60_000, [], "ProgrammingError"),  # 60,000 names never closed
    ("SELECT 1 %(" + "x" * 2_000_000, [], "ProgrammingError"),  # one, 2 MB from the end
    ("SELECT %s, '" + "%%" * 60_000 + "'", [7], None),  # runs: 60,000 literal '%'
    ("SELECT %(a)s, '" + "%%" * 30_000 + "%(a)s" * 20_000 + "'", {"a": 7}, None),
], ids=["escapes-beyond-the-cap", "open-names", "open-name-far-from-the-end",
        "escapes-within-the-cap", "names-and-escapes"])
def test_placeholder_conversion_is_linear_in_the_text(broker, sql, params, kind):
    # psycopg's own conversion is quadratic in %% and in unclosed %(: the
    # second case held the loop for about 15 minutes before.
    c = broker.client
    if kind is None:
        row = c.execute(sql, params, timeout=20).rows[0]
        assert row[0] == 7 and set(row[1]) <= {"%", "$", "1"} and row[1].count("%") >= 30_000
    else:
        with pytest.raises(getattr(client, kind)):
            c.execute(sql, params, timeout=20)
    assert c.execute("SELECT 2").rows == [(2,)]


def test_blanks_before_a_text_too_long_to_parse_cost_nothing(broker):
    # The DML screen of texts over 64 KiB backtracked exponentially on
    # leading blanks: 24 cost 1.3 s of the loop, 40 hung it for good.
    c = broker.client
    for blanks in (" " * 64, "\n \t" * 100):
        sql = blanks + "SELECT 1 /* " + "x" * 70_000 + " */"
        assert c.execute(sql, timeout=20).rows == [(1,)]
    assert broker.proc.poll() is None


def test_a_flood_of_distinct_long_texts_holds_the_loop_a_share_of_the_time(start_broker):
    # Each text is new and ~60 KiB of numbers: 0.15-0.4 s of parsing apiece
    # (libpg_query's JSON of it is 2.5 MB).  Past the parsing budget they
    # run unparsed (alone, reset after), and the loop keeps answering others:
    # before, one ping waited 7.8 s and a SELECT 1 21 s under this flood.
    broker = start_broker(max_connections=2)
    c = broker.client
    c.execute("SELECT 1")
    numbers = ",".join(str(i % 10) for i in range(29_000))
    stop = threading.Event()
    answered: list[int] = []

    def flood(seed: int) -> None:
        sent = got = 0
        with raw_socket(broker.endpoint) as s:
            while not stop.is_set() or got < sent:
                while not stop.is_set() and sent - got < 20:
                    s.send_multipart([
                        protocol.pack([sent, protocol.OP_EXECUTE, 60_000, None]),
                        protocol.pack([f"SELECT nosuch, {numbers} -- {seed} {sent}", None])])
                    sent += 1
                if s.poll(100):
                    s.recv()
                    got += 1
        answered.append(got)

    floods = [threading.Thread(target=flood, args=(n,)) for n in range(2)]
    for t in floods:
        t.start()
    served = 0
    try:
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            c.ping(timeout=10)
            assert c.execute("SELECT %s::int", [served], timeout=30).rows == [(served,)]
            served += 1
    finally:
        stop.set()
        for t in floods:
            t.join(60)
    stats = broker.stats()
    print(f"\n[parse flood] {sum(answered)} long texts answered, "
          f"{stats['statements_unparsed']} of them not parsed; {served} requests served meanwhile")
    assert len(answered) == 2 and stats["statements_unparsed"] > 0
    assert broker.proc.poll() is None


# COPY FROM STDIN: no faster than the server reads, and never left half done


@pytest.fixture
def copy_table(admin: psycopg.Connection) -> str:
    admin.execute("DROP TABLE IF EXISTS hostile_copy")
    admin.execute("CREATE TABLE hostile_copy (id int PRIMARY KEY, pad text)")
    return "hostile_copy"


def test_copy_data_comes_no_faster_than_the_server_reads_it(start_broker, admin, dsn,
                                                            copy_table):
    broker = start_broker(max_connections=2)
    c = broker.client
    c.execute("SELECT 1")
    pad = "x" * 100_000
    offered = []

    def chunks():  # 64 chunks of 1 MB, 10 rows each
        for n in range(64):
            offered.append(n)
            yield "".join(f"{n * 10 + i}\t{pad}\n" for i in range(10))

    result: list = []
    before = memory_kb(broker.proc.pid)["VmHWM"]
    # An uncommitted row 5: the COPY waits on the unique index at its sixth
    # row, and the server reads no more of its data meanwhile.
    with psycopg.connect(dsn) as blocker:
        blocker.execute("INSERT INTO hostile_copy VALUES (5, 'first')")
        copier = threading.Thread(target=lambda: result.append(
            c.copy("COPY hostile_copy FROM STDIN", chunks(), timeout=60)))
        copier.start()
        assert wait_until(lambda: admin.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND query LIKE 'COPY hostile_copy%'").fetchone()[0] == 1, 10)
        time.sleep(1.5)  # the client may push what the broker takes
        held = len(offered)
        grown_mb = (memory_kb(broker.proc.pid)["VmHWM"] - before) / 1024
        assert c.execute("SELECT 2").rows == [(2,)]  # others served meanwhile
        blocker.rollback()
    copier.join(60)
    print(f"\n[copy in] {held} of 64 chunks of 1 MB offered while the server waited; "
          f"broker peak RSS +{grown_mb:.1f} MB")
    assert held <= 3, held  # the client waits for the server, not for the broker's memory
    assert grown_mb < 16, grown_mb
    assert result and result[0].rowcount == 640
    assert admin.execute("SELECT count(*) FROM hostile_copy").fetchone()[0] == 640


def test_a_copy_abandoned_mid_way_gives_its_connection_back(start_broker, admin, dsn,
                                                            copy_table):
    broker = start_broker(max_connections=1, idle_transaction_timeout=1)
    c = broker.client
    c.execute("SELECT 1")
    resume = threading.Event()
    outcome: list = []

    def stalled():  # one chunk, then the client stops sending (without dying)
        yield "1\tone\n"
        yield "2\t" + "y" * (300 * 1024) + "\n"  # past a chunk: the first is sent
        resume.wait(30)
        yield "3\tthree\n"

    def copy() -> None:
        try:
            client.Client(broker.endpoint, timeout=20).copy(
                "COPY hostile_copy FROM STDIN", stalled())
            outcome.append("copied")
        except client.Error as exc:
            outcome.append(exc)

    copier = threading.Thread(target=copy)
    with ConnectionSampler(dsn, broker.application_name) as sampler:
        copier.start()
        assert wait_until(lambda: admin.execute(
            f"SELECT count(*) FROM pg_stat_activity WHERE {OF_APPLICATION} "
            "AND query LIKE 'COPY hostile_copy%%'", [broker.application_name]
        ).fetchone()[0] == 1, 10)
        # The only connection is in the COPY: this waits for idle_transaction_timeout.
        assert c.execute("SELECT 2", timeout=10).rows == [(2,)]
        resume.set()
        copier.join(30)
    assert len(outcome) == 1 and isinstance(outcome[0], client.TransactionExpired), outcome
    assert sampler.maximum <= 1
    assert admin.execute("SELECT count(*) FROM hostile_copy").fetchone()[0] == 0
    assert c.execute("SELECT 3").rows == [(3,)]


# Floods of small requests


def test_floods_of_pings_and_stats_from_sockets_that_never_read(start_broker):
    broker = start_broker(max_connections=2, max_client_requests=10)
    c = broker.client
    c.execute("SELECT 1")
    before = memory_kb(broker.proc.pid)["VmHWM"]
    ctx = zmq.Context()
    sockets = []
    empty = protocol.pack([])
    try:
        for _ in range(64):
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.RCVHWM, 1)
            s.setsockopt(zmq.RCVBUF, 4096)
            s.connect(broker.endpoint)
            sockets.append(s)
        for n in range(2_000):
            for i, s in enumerate(sockets):
                op = protocol.OP_STATS if (n + i) % 2 else protocol.OP_PING
                try:
                    s.send_multipart([protocol.pack([n, op, 10_000, None]), empty],
                                     zmq.NOBLOCK)
                except zmq.Again:
                    pass  # the broker stopped reading this socket: what a flood gets
            if n % 200 == 0:
                assert c.execute("SELECT %s::int", [n], timeout=10).rows == [(n,)]
        stats = broker.stats()
        grown_mb = (memory_kb(broker.proc.pid)["VmHWM"] - before) / 1024
        print(f"\n[flood] 64 sockets x 2,000 pings and stats, never read: "
              f"{stats['replies_undeliverable']} replies dropped; peak RSS +{grown_mb:.0f} MB")
        assert stats["replies_undeliverable"] > 0
        assert grown_mb < 64, grown_mb
        assert broker.proc.poll() is None
    finally:
        for s in sockets:
            s.close(0)
        ctx.term()
