"""Deadlines hold everywhere: a statement whose deadline passes before the
server starts it never runs, queued or pipelined behind another client's
statement; and a burst of slow statements uses the whole cap at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Callable

import psycopg
import pytest

import client
from client import protocol
from conftest import (
    OF_APPLICATION, REPO, ConnectionSampler, raw_socket, thread_client, wait_until,
)


def _wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    assert wait_until(predicate, timeout, interval=0.01), \
        f"not true within {timeout} s: {predicate.__doc__}"


@pytest.fixture
def side_effects(admin: psycopg.Connection) -> None:
    admin.execute("DROP TABLE IF EXISTS deadline_lock, deadline_side")
    admin.execute("CREATE TABLE deadline_lock (id int PRIMARY KEY, v int NOT NULL)")
    admin.execute("INSERT INTO deadline_lock VALUES (1, 0)")
    admin.execute("CREATE TABLE deadline_side (id int PRIMARY KEY)")


class Blocker:
    """Keeps the broker's only server connection busy (or pinned) until released."""

    def __init__(self, kind: str, broker: Any, dsn: str, admin: psycopg.Connection) -> None:
        self.kind = kind
        self.broker = broker
        self.admin = admin
        self.outcome: Any = None
        self._release = threading.Event()
        self._holder: psycopg.Connection | None = None
        if kind == "row_lock":
            self._holder = psycopg.connect(dsn)  # a transaction holding the row
            self._holder.execute("SELECT v FROM deadline_lock WHERE id = 1 FOR UPDATE")
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with thread_client(self.broker.endpoint, 30) as c:
            try:
                if self.kind == "row_lock":  # waits on the row lock, on the server
                    self.outcome = c.execute("UPDATE deadline_lock SET v = v + 1 WHERE id = 1")
                elif self.kind == "pg_sleep":  # runs, on the server
                    self.outcome = c.execute("SELECT pg_sleep(2) IS NULL, 'slept'")
                else:  # a pinned transaction: the connection is leased, nothing runs
                    with c.transaction() as tx:
                        tx.execute("UPDATE deadline_lock SET v = v + 1 WHERE id = 1")
                        self._release.wait(30)
                    self.outcome = "committed"
            except client.Error as exc:
                self.outcome = exc

    def start(self) -> None:
        self._thread.start()

        def busy() -> bool:
            """the broker's connection is busy with the blocker"""
            condition = {
                "row_lock": "wait_event_type = 'Lock'",
                "pg_sleep": "query LIKE '%%pg_sleep(2)%%' AND state = 'active'",
                "pinned_transaction": "state = 'idle in transaction'",
            }[self.kind]
            return self.admin.execute(
                f"SELECT count(*) FROM pg_stat_activity WHERE {OF_APPLICATION} AND "
                + condition, [self.broker.application_name]).fetchone()[0] == 1

        _wait_for(busy)

    def release(self) -> None:
        if self._holder is not None:
            self._holder.rollback()
            self._holder.close()
        self._release.set()
        self._thread.join(30)


@pytest.mark.parametrize("blocker_kind", ["row_lock", "pg_sleep", "pinned_transaction"])
def test_a_statement_past_its_deadline_before_it_starts_is_never_run(
        start_broker, admin, dsn, side_effects, blocker_kind):
    broker = start_broker(max_connections=1)
    broker.client.execute("SELECT 1")  # the only server connection is open
    blocker = Blocker(blocker_kind, broker, dsn, admin)
    blocker.start()
    outcomes: dict[int, Any] = {}

    def insert(key: int) -> None:
        with thread_client(broker.endpoint, 15) as c:
            c.ping()  # connected first: the 0.1 s are the queue's, not the handshake's
            try:
                c.execute("INSERT INTO deadline_side VALUES (%s)", [key], timeout=0.1)
                outcomes[key] = "ok"
            except client.Error as exc:
                outcomes[key] = exc

    try:
        threads = [threading.Thread(target=insert, args=(k,)) for k in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        # Every deadline is past (answered or given up on by the client within
        # 0.1 s + its 1 s grace), and the blocker still holds the connection.
        assert blocker.outcome is None, blocker.outcome
    finally:
        blocker.release()
    # Whatever was pipelined or queued behind the blocker has had its chance to run.
    assert broker.client.execute("SELECT 1", timeout=10).rows == [(1,)]
    present = {row[0] for row in admin.execute("SELECT id FROM deadline_side")}
    refused = {k for k, v in outcomes.items() if v != "ok"}
    acknowledged = {k for k, v in outcomes.items() if v == "ok"}
    assert len(outcomes) == 16
    assert sorted(refused & present) == [], "answered with an error, yet it ran"
    assert sorted(acknowledged - present) == [], "answered ok, yet it is not there"
    # None of them could start before its deadline: all were answered with an error.
    assert acknowledged == set()
    other_errors = {k: repr(v) for k, v in outcomes.items()
                    if not isinstance(v, (client.PoolTimeout, client.QueryCanceled))}
    assert other_errors == {}, "not answered at the deadline with PoolTimeout or QueryCanceled"
    # The blocker itself ran exactly once.
    if blocker_kind == "pg_sleep":
        assert blocker.outcome.rows == [(False, "slept")]
    else:
        assert not isinstance(blocker.outcome, Exception), blocker.outcome
        assert admin.execute("SELECT v FROM deadline_lock").fetchone() == (1,)


def test_statements_pipelined_right_behind_a_blocked_one_never_run_past_their_deadline(
        start_broker, admin, dsn, side_effects):
    """The blocked statement and the others arrive together, so the others are
    sent (pipelined) or queued right behind it on the only connection."""
    broker = start_broker(max_connections=1)
    broker.client.execute("SELECT 1")
    outcomes: dict[int, Any] = {}
    blocked: list[Any] = []
    rounds, per_round = 6, 8

    def run_blocked(barrier: threading.Barrier) -> None:
        with thread_client(broker.endpoint, 30) as c:
            c.ping()
            barrier.wait()
            try:
                blocked.append(c.execute("UPDATE deadline_lock SET v = v + 1 WHERE id = 1"))
            except client.Error as exc:
                blocked.append(exc)

    def insert(key: int, barrier: threading.Barrier) -> None:
        with thread_client(broker.endpoint, 15) as c:
            c.ping()
            barrier.wait()
            spin_until = time.perf_counter() + 0.0003  # just behind the UPDATE
            while time.perf_counter() < spin_until:
                pass
            try:
                c.execute("INSERT INTO deadline_side VALUES (%s)", [key], timeout=0.2)
                outcomes[key] = "ok"
            except client.Error as exc:
                outcomes[key] = exc

    for round_ in range(rounds):
        holder = psycopg.connect(dsn)
        holder.execute("SELECT v FROM deadline_lock WHERE id = 1 FOR UPDATE")
        try:
            barrier = threading.Barrier(1 + per_round)
            blocker = threading.Thread(target=run_blocked, args=(barrier,))
            inserters = [threading.Thread(target=insert, args=(round_ * 100 + k, barrier))
                         for k in range(per_round)]
            blocker.start()
            for t in inserters:
                t.start()
            for t in inserters:
                t.join()
        finally:
            holder.rollback()
            holder.close()
        blocker.join(30)
    assert broker.client.execute("SELECT 1", timeout=10).rows == [(1,)]
    present = {row[0] for row in admin.execute("SELECT id FROM deadline_side")}
    refused = {k for k, v in outcomes.items() if v != "ok"}
    acknowledged = {k for k, v in outcomes.items() if v == "ok"}
    print(f"\n[pipelined behind a lock] {len(acknowledged)} answered ok (ran before the UPDATE), "
          f"{len(refused)} refused at their deadline")
    assert len(outcomes) == rounds * per_round
    assert sorted(refused & present) == [], "answered with an error, yet it ran"
    assert sorted(acknowledged - present) == [], "answered ok, yet it is not there"
    other_errors = {k: repr(v) for k, v in outcomes.items()
                    if v != "ok" and not isinstance(v, (client.PoolTimeout, client.QueryCanceled))}
    assert other_errors == {}, "not answered at the deadline with PoolTimeout or QueryCanceled"
    # Each blocked UPDATE ran once, and was reported as it happened.
    assert [getattr(b, "rowcount", b) for b in blocked] == [1] * rounds
    assert admin.execute("SELECT v FROM deadline_lock").fetchone() == (rounds,)


SLOW = "SELECT clock_timestamp() AS started, pg_sleep(1) IS NULL AS slept, %s::int AS k"


@pytest.mark.parametrize("cap", [4])
def test_a_burst_of_slow_statements_runs_side_by_side_up_to_the_cap(start_broker, dsn, cap):
    broker = start_broker(max_connections=cap)
    started: dict[tuple[int, int], Any] = {}
    errors: list[str] = []

    def slow(burst: int, k: int, barrier: threading.Barrier) -> None:
        with thread_client(broker.endpoint, 30) as c:
            c.ping()  # the socket is connected before the burst
            barrier.wait()
            try:
                rows = c.execute(SLOW, [k]).rows
                assert rows[0][2] == k
                started[burst, k] = rows[0][0]
            except client.Error as exc:
                errors.append(f"{type(exc).__name__}: {exc}")

    with ConnectionSampler(dsn, broker.application_name) as sampler:
        for burst in range(2):  # first on a cold pool, then on a warm one
            barrier = threading.Barrier(cap)
            threads = [threading.Thread(target=slow, args=(burst, k, barrier))
                       for k in range(cap)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
    assert errors == []
    for burst in range(2):
        starts = sorted(started[burst, k] for k in range(cap))
        spread = (starts[-1] - starts[0]).total_seconds()
        print(f"\n[burst {burst}] {cap} x pg_sleep(1) at cap {cap}: server start times "
              f"spread over {spread:.3f} s")
        # Side by side: all started within half a statement's length of each other
        # (one after another they would start 1 s apart).
        assert spread < 0.5, [s.isoformat() for s in starts]
    assert sampler.maximum == cap  # the pool grew to the cap, and never past it


def test_a_timeout_under_a_millisecond_is_a_timeout_not_a_malformed_request(broker):
    # The wire counts whole milliseconds: 0.4 ms must not travel as 0.
    with pytest.raises(client.Error) as caught:
        broker.client.execute("SELECT pg_sleep(0.1)", timeout=0.0004)
    assert not isinstance(caught.value, client.MessageError), caught.value


def test_a_request_whose_deadline_passed_while_the_broker_was_stopped_never_runs(
        start_broker, admin, side_effects):
    # Over ipc the client sends its clock with the request: time spent in the
    # transport counts, so a stalled broker does not run what nobody awaits.
    broker = start_broker(max_connections=2)
    c = client.Client(broker.endpoint, timeout=1)
    c.ping()
    broker.proc.send_signal(signal.SIGSTOP)
    try:
        with pytest.raises(client.BrokerUnavailable):
            c.execute("INSERT INTO deadline_side VALUES (1)")
        time.sleep(1.0)  # the client gave up a second ago
    finally:
        broker.proc.send_signal(signal.SIGCONT)
    _wait_for(lambda: broker.stats()["requests_abandoned"] == 1)
    assert admin.execute("SELECT count(*) FROM deadline_side").fetchone() == (0,)  # it used to run
    assert c.execute("SELECT 1").rows == [(1,)]


@pytest.mark.parametrize("sent_ago, runs", [
    (10.0, False),  # 10 s on its way, with a 5 s timeout: too late
    (-100.0, True),  # "sent" in the future: another clock (a time namespace), not counted
    (2 * 3600.0, True),  # past MAX_TRANSIT: another clock too
])
def test_a_requests_time_on_its_way_counts_against_its_timeout(broker, sent_ago, runs):
    with raw_socket(broker.endpoint) as raw:
        raw.send(protocol.pack([7, protocol.OP_EXECUTE, 5000, None, None,
                                time.monotonic() - sent_ago]) + protocol.pack(["SELECT 1", None]))
        assert raw.poll(5000)
        reply = protocol.unpack(raw.recv())
    if runs:
        assert reply[1] == protocol.STATUS_OK
    else:
        assert reply[2]["kind"] == "PoolTimeout" and "when the broker read it" in reply[2]["message"]


def _can_unshare_time() -> bool:
    try:
        return subprocess.run(["unshare", "--time", "--fork", "--monotonic", "-600", "true"],
                              capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(not _can_unshare_time(), reason="needs unshare --time (root, Linux 5.6+)")
def test_a_client_whose_clock_is_another_time_namespaces_is_served(broker):
    # Ten minutes behind (a restored container): its sent_at is not taken
    # for ten minutes in transit, because the kernel says its clock differs.
    code = ("import client; c = client.Client(%r, timeout=5); "
            "print(c.execute('SELECT 1').rows)" % broker.endpoint)
    proc = subprocess.run(["unshare", "--time", "--fork", "--monotonic", "-600",
                           sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.strip() == "[(1,)]", proc.stderr[-500:]


def test_a_statement_in_a_transaction_read_after_its_deadline_is_not_run(broker, side_effects):
    with raw_socket(broker.endpoint) as raw:
        def ask(header: list, body: list) -> list:
            raw.send(protocol.pack(header) + protocol.pack(body))
            assert raw.poll(5000)
            return protocol.unpack(raw.recv())

        token = ask([1, protocol.OP_BEGIN, 5000, None], [])[2]
        late = ask([2, protocol.OP_EXECUTE, 5000, token, None, time.monotonic() - 10],
                   ["INSERT INTO deadline_side VALUES (1)", None])
        assert ask([3, protocol.OP_EXECUTE, 5000, token, None, time.monotonic()],
                   ["SELECT count(*) FROM deadline_side", None])[2][1] == [[0]]
        ask([4, protocol.OP_COMMIT, 5000, token], [])
    assert late[2]["kind"] == "PoolTimeout" and "when the broker read it" in late[2]["message"]


def test_a_statement_that_would_end_after_its_deadline_is_refused_unrun(start_broker, admin):
    # It lately took 0.3 s on the server.  Queued 0.3 s behind another run
    # of it, a request with a 0.5 s timeout has 0.2 s left when the
    # connection frees: run, it would only be cancelled at its deadline.
    import threading

    admin.execute("DROP SEQUENCE IF EXISTS hopeless_runs")
    admin.execute("CREATE SEQUENCE hopeless_runs")
    broker = start_broker(max_connections=1)
    c = broker.client
    sql = "SELECT nextval('hopeless_runs') FROM pg_sleep(0.3)"
    c.execute(sql)
    c.execute(sql)  # the estimate: about 0.3 s
    ahead = threading.Thread(target=lambda: client.Client(broker.endpoint).execute(sql))
    ahead.start()
    assert wait_until(lambda: c.stats()["pool_active"] == 1, 2)
    with pytest.raises(client.PoolTimeout, match="too little time was left"):
        c.execute(sql, timeout=0.5)
    ahead.join()
    assert admin.execute("SELECT last_value FROM hopeless_runs").fetchone()[0] == 3
    assert c.execute(sql, timeout=5).rows == [(4,)]  # with time enough, it runs
    stats = c.stats()
    assert stats["requests_abandoned"] == 1 and stats["statements_late"] == 0


def test_an_estimate_from_one_slow_run_does_not_refuse_a_statement_for_good(broker):
    # A cold first run took 92 ms: with 100 ms timeouts, no request may be
    # refused on that estimate when it would start at once, and the runs
    # that follow set the estimate right.
    c = broker.client
    sql = "SELECT 1 FROM pg_sleep(%s)"
    c.execute(sql, [0.092])
    for _ in range(50):
        assert c.execute(sql, [0.001], timeout=0.1).rows == [(1,)]


@pytest.mark.parametrize("settings, timeout", [
    # The oldest request has waited more than half its timeout when the
    # connection frees: first come, first served would start every request
    # late under overload, so the newest (with all its time) goes first,
    # and the oldest still runs with what it has left.
    pytest.param({}, 2.0, id="timeout"),
    # With the defaults (a 60 s timeout, pool_timeout 30 s) no request waits
    # half its timeout: pool_timeout refuses it first.  A queue is backed up
    # by what its oldest request may wait, whichever bound comes first.
    pytest.param({"pool_timeout": 2}, 30, id="pool_timeout"),
])
def test_a_backed_up_queue_serves_its_newest_request_first(start_broker, settings, timeout):
    broker = start_broker(max_connections=1, **settings)
    c = broker.client
    c.execute("SELECT 1")
    started: dict[str, Any] = {}

    def run(name: str, sql: str, timeout: float) -> None:
        with thread_client(broker.endpoint, 30) as own:
            started[name] = own.execute(sql, timeout=timeout).rows[0][0]

    def waiting(n: int) -> Callable[[], bool]:
        return lambda: c.stats()["requests_waiting"] == n

    blocker = threading.Thread(target=run, args=("blocker", "SELECT pg_sleep(1.5)", 30))
    blocker.start()
    _wait_for(lambda: c.stats()["pool_active"] == 1)
    oldest = threading.Thread(target=run, args=("oldest", "SELECT clock_timestamp()", timeout))
    oldest.start()
    _wait_for(waiting(1))
    time.sleep(1.1)  # past half of its 2 s (of the bound); the blocker runs 0.4 s more
    newest = threading.Thread(target=run, args=("newest", "SELECT clock_timestamp()", timeout))
    newest.start()
    _wait_for(waiting(2))
    for t in (blocker, oldest, newest):
        t.join(10)
    assert set(started) == {"blocker", "oldest", "newest"}, started
    assert started["newest"] < started["oldest"]


def test_a_begin_in_a_backed_up_queue_is_not_overtaken_by_every_newer_request(start_broker):
    # Under adaptive LIFO the newest request is chosen; a BEGIN needs an idle
    # connection, and shareable statements arriving after it each went into
    # the connection's pipeline ahead of it, so it never became idle: the
    # transactions timed out while first come, first served ran them all.
    broker = start_broker(max_connections=1, pool_timeout=5)
    stop = time.monotonic() + 4
    outcomes: dict[str, list[int]] = {}

    def run(name: str, transaction: bool) -> None:
        done = outcomes.setdefault(name, [0, 0])
        with thread_client(broker.endpoint, 0.4) as c:
            while time.monotonic() < stop:
                try:
                    if transaction:
                        with c.transaction(timeout=0.4) as tx:
                            tx.execute("SELECT pg_sleep(0.03)")
                    else:
                        c.execute("SELECT pg_sleep(0.03)", timeout=0.4)
                    done[0] += 1
                except (client.PoolTimeout, client.QueryCanceled, client.OperationalError):
                    done[1] += 1

    threads = [threading.Thread(target=run, args=(f"plain{i}", False)) for i in range(7)]
    threads.append(threading.Thread(target=run, args=("transactions", True)))
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    ok, failed = outcomes["transactions"]
    assert ok >= 8 and failed <= ok // 4, outcomes
