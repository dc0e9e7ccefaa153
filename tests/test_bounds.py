"""Bounded under hostile load: however many clients connect and whatever
they send, the broker stays up, within its settings, and serves."""

from __future__ import annotations

import os
import resource
import signal
import threading
import time

import msgpack
import pytest
import zmq

import client
from client import protocol
from conftest import memory_kb, raw_socket, thread_client, wait_until

PING = [protocol.pack([1, protocol.OP_PING, 10_000, None]), protocol.pack([])]


def _hold_sockets(endpoint: str, count: int, ready_w: int) -> None:
    """A process holding ``count`` client sockets, each answered once, until killed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    ctx = zmq.Context()
    ctx.set(zmq.MAX_SOCKETS, count + 16)
    sockets = []
    for _ in range(count):
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(endpoint)
        s.send_multipart(PING)
        sockets.append(s)
    answered = 0
    deadline = time.monotonic() + 60
    pending = set(range(count))
    while pending and time.monotonic() < deadline:
        for i in list(pending):
            if sockets[i].poll(0):
                sockets[i].recv_multipart()
                pending.discard(i)
                answered += 1
        time.sleep(0.01)
    os.write(ready_w, f"{answered}\n".encode())
    time.sleep(600)


def _start_holders(endpoint: str, processes: int, per_process: int) -> tuple[list[int], int]:
    pids, answered = [], 0
    ready_r, ready_w = os.pipe()
    for _ in range(processes):
        pid = os.fork()
        if pid == 0:
            try:
                _hold_sockets(endpoint, per_process, ready_w)
            finally:
                os._exit(0)
        pids.append(pid)
    with os.fdopen(ready_r) as ready:
        for _ in range(processes):
            answered += int(ready.readline())
    os.close(ready_w)
    return pids, answered


def _kill(pids: list[int]) -> None:
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    for pid in pids:
        os.waitpid(pid, 0)


def _wait_for(predicate, timeout: float = 20.0) -> bool:
    return wait_until(predicate, timeout, interval=0.1)


def test_thousands_of_clients_under_a_1024_open_files_limit_then_a_reconnect_storm(
        start_broker):
    # Started with the common default soft limit: the broker raises it to the
    # hard limit, so 5,000 client sockets fit (or, on a machine whose hard limit
    # is lower, the ones beyond max_clients are turned away and retry).
    broker = start_broker(max_connections=4, open_files=1024)
    c = broker.client
    assert c.execute("SELECT 1").rows == [(1,)]
    clients_max = broker.stats()["clients_max"]
    expected = min(5000, clients_max - 1)
    pids, answered = _start_holders(broker.endpoint, 5, 1000)
    try:
        assert answered >= expected
        stats = broker.stats()
        assert stats["clients_connected"] == min(5001, clients_max)
        # The server connections it opens now have descriptors above 1023.
        assert c.execute("SELECT 2").rows == [(2,)]
        with c.transaction() as tx:
            assert tx.execute("SELECT 3").rows == [(3,)]
    finally:
        _kill(pids)
    # A reconnect storm: 5,000 sockets gone at once, 5,000 new ones at once.
    pids, answered = _start_holders(broker.endpoint, 5, 1000)
    try:
        assert answered >= expected
        assert broker.proc.poll() is None
        assert c.execute("SELECT 4").rows == [(4,)]
    finally:
        _kill(pids)
    assert _wait_for(lambda: broker.stats()["clients_connected"] == 1), broker.stats()
    print(f"\n[clients] 2 x 5,000 sockets; max_clients {clients_max}; "
          f"broker RSS {memory_kb(broker.proc.pid)['VmHWM'] // 1024} MB peak")


def test_sockets_beyond_max_clients_are_turned_away_and_get_in_as_others_leave(start_broker):
    broker = start_broker(max_connections=2, max_clients=20)
    c = broker.client
    assert c.execute("SELECT 1").rows == [(1,)]  # this socket holds one place
    ctx = zmq.Context()
    sockets = []
    try:
        for _ in range(40):
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(broker.endpoint)
            sockets.append(s)
            time.sleep(0.005)
        assert _wait_for(lambda: broker.stats()["clients_refused"] > 0, 5)
        for s in sockets:
            s.send_multipart(PING)
        time.sleep(2)
        in_now = [s for s in sockets if s.poll(0) and s.recv_multipart()]
        assert len(in_now) == 19  # besides this test's client; none of the others
        stats = broker.stats()
        assert stats["clients_connected"] <= 20
        assert "refusing new client sockets" in broker.log()
        assert c.execute("SELECT 2").rows == [(2,)]  # those inside are served throughout
        # Those inside leave: as many of the others get in on their next retry.
        outside = [s for s in sockets if s not in in_now]
        for s in in_now + outside[:len(outside) - len(in_now)]:
            s.close()
        waiting = outside[len(outside) - len(in_now):]
        for s in waiting:
            s.send_multipart(PING)
        served = sum(1 for s in waiting if s.poll(5000) and s.recv_multipart())
        assert served == len(waiting)
    finally:
        for s in sockets:
            s.close()
        ctx.term()


def test_queued_request_bytes_are_bounded_and_released(start_broker, admin):
    limit = 32 * 1024 * 1024
    broker = start_broker(max_connections=1, max_queued_bytes=limit, pool_timeout=30)
    c = broker.client
    c.execute("SELECT 1")
    big = "x" * (4 * 1024 * 1024)
    before = memory_kb(broker.proc.pid)["VmRSS"]
    with client.Client(broker.endpoint, timeout=30).transaction() as holder:
        holder.execute("SELECT 1")  # the only connection is pinned: requests queue
        ctx = zmq.Context()
        s = ctx.socket(zmq.DEALER)
        s.connect(broker.endpoint)
        for i in range(24):  # 96 MiB offered, 4 MiB each
            s.send_multipart([protocol.pack([i, protocol.OP_EXECUTE, 30_000, None]),
                              protocol.pack(["SELECT length(%s)", [big]])])
        kinds = {}
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and \
                sum(kinds.values()) + broker.stats()["requests_waiting"] < 24:
            while s.poll(100):
                reply = protocol.unpack(s.recv())
                kinds[reply[2]["kind"]] = kinds.get(reply[2]["kind"], 0) + 1
        stats = broker.stats()
        print(f"\n[queued bytes] {kinds}, {stats['requests_waiting']} waiting, "
              f"{stats['queued_bytes']:,} bytes held")
        peak = memory_kb(broker.proc.pid)["VmRSS"]
        assert stats["queued_bytes"] <= limit
        assert kinds.get("TooManyRequests", 0) >= 24 - limit // len(big)
        assert (peak - before) < 2 * limit // 1024, (before, peak)
    # The queued ones ran once the connection was free; nothing is held after.
    answered = sum(kinds.values())
    while answered < 24 and s.poll(10_000):
        s.recv()
        answered += 1
    assert answered == 24
    assert _wait_for(lambda: broker.stats()["queued_bytes"] == 0, 5)
    after = memory_kb(broker.proc.pid)["VmRSS"]
    print(f"RSS before {before // 1024} MB, peak {peak // 1024} MB, after {after // 1024} MB")
    assert after - before < (peak - before) / 2 + 8 * 1024, (before, peak, after)  # released
    s.close()
    ctx.term()


def test_a_huge_executemany_is_refused_while_decoding_not_after(start_broker):
    limit = 2 * 1024 * 1024
    broker = start_broker(max_connections=1, max_queued_bytes=limit)
    c = broker.client
    c.execute("SELECT 1")
    before = memory_kb(broker.proc.pid)["VmRSS"]
    # 0.8 MB on the wire; once decoded and dumped, 4,096 sets of 200 values
    # hold some 4.5 MB.
    rows = [[list(range(100, 300))]] * protocol.MAX_STATEMENTS
    assert len(msgpack.packb(rows)) < limit
    with pytest.raises(client.TooManyRequests, match="max_queued_bytes"):
        c.executemany("SELECT cardinality(%s::int[])", rows, timeout=30)
    grown = memory_kb(broker.proc.pid)["VmHWM"] - before
    assert grown < 4 * limit // 1024, grown
    assert c.execute("SELECT 2").rows == [(2,)]
    assert broker.stats()["queued_bytes"] == 0


@pytest.mark.parametrize("op", ["executemany", "batch"])
def test_a_request_of_more_than_max_statements_is_refused_at_its_header(start_broker, op):
    broker = start_broker(max_connections=1)
    count = protocol.MAX_STATEMENTS + 1
    if op == "executemany":
        body = ["SELECT %s", [[1]] * count]
        header = [1, protocol.OP_EXECUTEMANY, 10_000, None]
    else:
        body = [[["SELECT 1", None]] * count]
        header = [1, protocol.OP_BATCH, 10_000, None]
    with raw_socket(broker.endpoint) as s:
        s.send_multipart([protocol.pack(header), protocol.pack(body)])
        assert s.poll(10_000)
        request_id, status, payload = protocol.unpack(s.recv())
    assert status != protocol.STATUS_OK
    assert f"holds {count} statements, more than the {protocol.MAX_STATEMENTS}" in str(payload)
    assert broker.client.execute("SELECT 2").rows == [(2,)]


def test_an_executemany_of_more_than_max_statements_runs_in_parts_in_one_transaction(
        start_broker):
    broker = start_broker(max_connections=2)
    c = broker.client
    c.execute("DROP TABLE IF EXISTS bulk")
    c.execute("CREATE TABLE bulk (n int PRIMARY KEY)")
    rows = [[n] for n in range(3 * protocol.MAX_STATEMENTS + 5)]
    pings: list[float] = []
    stop = threading.Event()

    def ping() -> None:  # another client, timed while the parts run
        with thread_client(broker.endpoint, timeout=30) as other:
            while not stop.is_set():
                started = time.monotonic()
                other.ping()
                pings.append(time.monotonic() - started)

    pinger = threading.Thread(target=ping)
    pinger.start()
    try:
        assert c.executemany("INSERT INTO bulk VALUES (%s)", rows).rowcount == len(rows)
    finally:
        stop.set()
        pinger.join()
    print(f"\n[executemany in parts] {len(rows)} rows; another client's pings meanwhile: "
          f"{len(pings)}, slowest {max(pings) * 1000:.0f} ms")
    assert c.execute("SELECT count(*) FROM bulk").rows == [(len(rows),)]
    # Atomic as one request was: a failure in the last part undoes the first.
    with pytest.raises(client.IntegrityError):
        c.executemany("INSERT INTO bulk VALUES (%s)",
                      [[n] for n in range(-protocol.MAX_STATEMENTS - 1, 0)] + [[0]])
    assert c.execute("SELECT count(*) FROM bulk WHERE n < 0").rows == [(0,)]
    # And through the DB-API, in its transaction and in autocommit.
    from client import dbapi

    conn = dbapi.connect(broker.endpoint)
    cur = conn.cursor()
    cur.executemany("DELETE FROM bulk WHERE n = %s", rows[:protocol.MAX_STATEMENTS + 1])
    assert cur.rowcount == protocol.MAX_STATEMENTS + 1
    conn.rollback()
    conn.autocommit = True
    cur.executemany("DELETE FROM bulk WHERE n = %s", rows)
    assert cur.rowcount == len(rows)
    conn.close()
    assert c.execute("SELECT count(*) FROM bulk").rows == [(0,)]


@pytest.mark.parametrize("failure", ["unsendable value", "wrong arity", "SQL error"])
@pytest.mark.parametrize("api", ["transaction()", "dbapi"])
def test_an_executemany_in_parts_inside_a_transaction_is_all_or_nothing(start_broker, api,
                                                                        failure):
    # A failure in a later part: a server error aborts the transaction; one
    # refused unrun (no SQLSTATE) leaves it going, so the parts that ran are
    # undone (a savepoint), as a refused executemany of one request leaves nothing.
    broker = start_broker(max_connections=1)
    c = broker.client
    c.execute("DROP TABLE IF EXISTS parts")
    c.execute("CREATE TABLE parts (n int PRIMARY KEY)")
    last = {"unsendable value": [object()], "wrong arity": [1, 2], "SQL error": [0]}[failure]
    rows = [[n] for n in range(protocol.MAX_STATEMENTS)] + [last]
    if api == "transaction()":
        with c.transaction() as tx:
            with pytest.raises(client.Error):
                tx.executemany("INSERT INTO parts VALUES (%s)", rows)
            if failure != "SQL error":  # the transaction goes on, without the parts
                tx.execute("INSERT INTO parts VALUES (-1)")
    else:
        from client import dbapi

        conn = dbapi.connect(broker.endpoint)
        with pytest.raises(dbapi.Error):
            conn.cursor().executemany("INSERT INTO parts VALUES (%s)", rows)
        if failure == "SQL error":
            conn.rollback()
        else:
            conn.cursor().execute("INSERT INTO parts VALUES (-1)")
            conn.commit()
        conn.close()
    kept = [] if failure == "SQL error" else [(-1,)]
    assert c.execute("SELECT n FROM parts").rows == kept


def test_one_timeout_bounds_an_executemany_in_parts(start_broker):
    broker = start_broker(max_connections=1)
    c = broker.client
    c.execute("DROP TABLE IF EXISTS slow_parts")
    c.execute("CREATE TABLE slow_parts (n int)")
    rows = [[n] for n in range(3 * protocol.MAX_STATEMENTS)]  # ~2 s a part
    with pytest.raises(client.Error) as caught:
        c.executemany("INSERT INTO slow_parts SELECT %s FROM pg_sleep(0.0005)", rows, timeout=3)
    print(f"\n[executemany timeout] {type(caught.value).__name__}: {caught.value}")
    assert c.execute("SELECT count(*) FROM slow_parts").rows == [(0,)]


def test_wide_rows_are_split_by_parameters_too(start_broker):
    broker = start_broker(max_connections=1)
    width = 100  # 4,096 rows of 100 values: 6.25 times MAX_PARAMETERS
    sql = "SELECT " + " + ".join(["%s::int"] * width)
    with raw_socket(broker.endpoint) as s:
        s.send_multipart([protocol.pack([1, protocol.OP_EXECUTEMANY, 10_000, None]),
                          protocol.pack([sql, [[1] * width] * protocol.MAX_STATEMENTS])])
        assert s.poll(10_000)
        _, status, payload = protocol.unpack(s.recv())
    assert status != protocol.STATUS_OK
    assert f"more than {protocol.MAX_PARAMETERS} parameters" in str(payload)
    result = broker.client.executemany(sql, [[1] * width] * protocol.MAX_STATEMENTS)
    assert result.rowcount == protocol.MAX_STATEMENTS


def test_a_client_that_never_reads_holds_a_bounded_amount_of_the_brokers_memory(start_broker):
    # A result of 1 MB, asked for 2,000 times by a socket that reads nothing:
    # the broker keeps at most max_client_requests + 16 replies for it.
    broker = start_broker(max_connections=2, max_client_requests=10)
    c = broker.client
    c.execute("SELECT 1")
    before = memory_kb(broker.proc.pid)["VmRSS"]
    body = protocol.pack(["SELECT repeat('x', 1000000)", None])
    with raw_socket(broker.endpoint, reads=False) as greedy:
        for request_id in range(2000):
            greedy.send_multipart([protocol.pack([request_id, protocol.OP_EXECUTE, 60_000, None]),
                                   body])
            if request_id % 100 == 0:
                time.sleep(0.05)  # let the broker answer: replies pile up, not requests
        assert _wait_for(lambda: broker.stats()["clients_active"] <= 1, 30)
        stats = broker.stats()
        grown_mb = (memory_kb(broker.proc.pid)["VmHWM"] - before) / 1024
        print(f"\n[never reads] {stats['replies_undeliverable']} replies dropped, "
              f"{stats['requests_refused']} requests refused; broker peak RSS +{grown_mb:.0f} MB")
        assert stats["replies_undeliverable"] + stats["requests_refused"] >= 2000 - 26
        assert grown_mb < 120, grown_mb  # (10 + 16) x 1 MB queued, plus the one being read
        assert c.execute("SELECT 2").rows == [(2,)]


def test_a_body_of_empty_arrays_is_refused_while_decoding(start_broker):
    broker = start_broker(max_connections=1)
    c = broker.client
    c.execute("SELECT 1")
    before = memory_kb(broker.proc.pid)["VmHWM"]
    flood = b"\x92" + protocol.pack("SELECT %s") + b"\x91\xdd" + (4_000_000).to_bytes(4, "big") \
        + b"\x90" * 4_000_000  # [sql, [[[], [], ... 4 million]]]
    with raw_socket(broker.endpoint) as s:
        s.send_multipart([protocol.pack([1, protocol.OP_EXECUTE, 10_000, None]), flood])
        assert s.poll(10_000)
        reply = protocol.unpack(s.recv())
        # Refused at the array's header: 4 million items, decoded and dumped
        # (256 B each, estimated), would take more than max_queued_bytes.
        assert reply[2]["kind"] == "TooManyRequests" and "max_queued_bytes" in reply[2]["message"]
    grown_mb = (memory_kb(broker.proc.pid)["VmHWM"] - before) / 1024
    assert grown_mb < 4 * 30, grown_mb  # 4 MB on the wire: before, +99 MB
    # A real 2-D array parameter decodes and runs: 200,000 pairs, about 170 MB
    # decoded and dumped (1,000,000 pairs took +700 MB: now refused at this
    # max_queued_bytes, 256 MiB).
    pairs = [[i % 100, i % 7] for i in range(200_000)]
    assert c.execute("SELECT cardinality(%s::int[])", [pairs]).rows == [(400_000,)]


def test_ext_types_nested_in_ext_payloads_are_refused_not_a_crash(start_broker):
    # 200 Json ext types, each the payload of the next: 700-odd bytes that,
    # decoded recursively, overran the C stack (SIGSEGV).
    payload = protocol.pack(None)
    for _ in range(200):
        payload = msgpack.packb(msgpack.ExtType(protocol.EXT_JSON, payload))
    broker = start_broker(max_connections=1)
    with raw_socket(broker.endpoint) as s:
        s.send_multipart([b"\x94\x01\x01\xcd\x27\x10" + payload, protocol.pack(["SELECT 1", None])])
        s.send_multipart([protocol.pack([2, protocol.OP_EXECUTE, 10_000, None]),
                          b"\x92" + protocol.pack("SELECT %s") + b"\x91" + payload])
        kinds = [protocol.unpack(s.recv())[2]["kind"] for _ in range(2) if s.poll(10_000)]
    assert kinds == ["MessageError", "MessageError"]
    assert broker.proc.poll() is None
    assert broker.client.execute("SELECT 1").rows == [(1,)]


def test_copy_out_chunks_never_exceed_max_result_bytes_whatever_the_client_asks(start_broker):
    broker = start_broker(max_connections=1, max_result_bytes=1024 * 1024)
    with raw_socket(broker.endpoint) as s:
        s.send_multipart([protocol.pack([1, protocol.OP_BEGIN, 10_000, None]), protocol.pack([])])
        token = protocol.unpack(s.recv())[2]
        s.send_multipart([protocol.pack([2, protocol.OP_COPY_TO, 10_000, token]),
                          protocol.pack(["COPY (SELECT repeat('x', 100) FROM "
                                         "generate_series(1, 100000)) TO STDOUT", 2 ** 62])])
        assert s.poll(10_000)
        reply = protocol.unpack(s.recv())
        assert reply[1] == protocol.STATUS_OK, reply
        data, done = reply[2]
        assert not done and len(data) <= 1024 * 1024 + 256 * 1024
