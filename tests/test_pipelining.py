"""Autocommit statements from different clients share a connection's
pipeline, each ended by its own Sync: each one commits or fails alone, a
slow one holds up nobody, and a cancel never costs another client its
statement."""

from __future__ import annotations

import threading
import time

import client
from conftest import run_in_processes

ROUNDS = 150


def _mixed_load(endpoint: str, worker: int) -> dict[str, int]:
    c = client.Client(endpoint, timeout=30)
    seen = {"ok": 0, "division_by_zero": 0, "unique_violation": 0, "inserted": 0}
    for n in range(ROUNDS):
        kind = n % 5
        if kind == 0:
            try:
                c.execute("SELECT 1 / %s::int", [0])
                raise AssertionError("division by zero succeeded")
            except client.DataError as exc:
                assert exc.sqlstate == "22012", exc
                seen["division_by_zero"] += 1
        elif kind == 1:
            c.execute("INSERT INTO pipelined VALUES (%s)", [worker * ROUNDS + n])
            seen["inserted"] += 1
        elif kind == 2:
            try:
                c.execute("INSERT INTO pipelined VALUES (%s)", [worker * ROUNDS + n - 1])
                raise AssertionError("duplicate key accepted")
            except client.IntegrityError as exc:
                assert exc.sqlstate == "23505", exc
                seen["unique_violation"] += 1
        else:
            token = f"{worker}-{n}"
            assert c.execute("SELECT %s::text, %s::int", [token, n]).rows == [(token, n)]
            seen["ok"] += 1
    return seen


def test_pipelined_statements_commit_or_fail_alone(start_broker, admin):
    admin.execute("DROP TABLE IF EXISTS pipelined")
    admin.execute("CREATE TABLE pipelined (id int PRIMARY KEY)")
    broker = start_broker(max_connections=1)
    workers = 6
    results = run_in_processes(_mixed_load, [(broker.endpoint, w) for w in range(workers)])
    inserted = sum(r["inserted"] for r in results)
    assert sum(r["unique_violation"] for r in results) == inserted
    assert admin.execute("SELECT count(*) FROM pipelined").fetchone()[0] == inserted
    stats = broker.stats()
    assert stats["requests_pipelined"] > 0, stats  # they did share the connection
    assert stats["pool_size"] == 1
    print(f"\n[pipelining] {workers * ROUNDS} requests on 1 connection, "
          f"{stats['requests_pipelined']} sent behind others; every error its own")


def test_a_slow_statement_does_not_hold_up_others(start_broker, admin):
    broker = start_broker(max_connections=2)
    slow_done = threading.Event()
    finished_while_slow: list[bool] = []

    def slow() -> None:
        broker.client.execute("SELECT pg_sleep(2)")
        slow_done.set()

    def quick(worker: int) -> None:
        c = client.Client(broker.endpoint, timeout=15)
        for n in range(25):
            assert c.execute("SELECT %s::int", [n]).rows == [(n,)]
            finished_while_slow.append(not slow_done.is_set())

    slow_thread = threading.Thread(target=slow)
    slow_thread.start()
    while not admin.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
            "AND query = 'SELECT pg_sleep(2)'").fetchone()[0]:
        pass  # until the sleep runs on one of the two connections
    time.sleep(0.05)  # and has run longer than PIPELINE_STALL
    quick_threads = [threading.Thread(target=quick, args=(w,)) for w in range(4)]
    for t in quick_threads:
        t.start()
    for t in quick_threads:
        t.join()
    slow_thread.join()
    assert len(finished_while_slow) == 100
    assert all(finished_while_slow), "quick statements waited behind the slow one"


def test_a_cancel_meant_for_one_statement_never_fails_another(start_broker):
    broker = start_broker(max_connections=1)
    other = client.Client(broker.endpoint, timeout=15)
    outcomes: dict[str, list] = {"first": [], "behind": []}

    def run(name: str, c: client.Client, sql: str, timeout: float | None) -> None:
        try:
            outcomes[name].append(c.execute(sql, timeout=timeout).rows)
        except (client.QueryCanceled, client.PoolTimeout) as exc:
            # PoolTimeout: "behind" took the one connection first, and
            # "first" waited past its deadline in the queue.
            outcomes[name].append(exc)

    for _ in range(6):
        # The first statement ends about when its deadline passes, so the
        # cancel the broker sends then reaches the server after it ended,
        # while the statement pipelined behind it runs.
        first = threading.Thread(target=run, args=(
            "first", broker.client, "SELECT pg_sleep(0.05)", 0.05))
        behind = threading.Thread(target=run, args=(
            "behind", other, "SELECT pg_sleep(0.2), 'behind'", None))
        first.start()
        behind.start()
        first.join()
        behind.join()
    hit = [o for o in outcomes["behind"] if isinstance(o, Exception)]
    assert hit == [], "a statement failed for a cancel meant for another"
    assert [rows[0][1] for rows in outcomes["behind"]] == ["behind"] * 6
    stats = broker.stats()
    assert stats["requests_pipelined"] > 0
    cancelled = sum(isinstance(o, client.QueryCanceled) for o in outcomes["first"])
    print(f"\n[cancel race] first statements cancelled at their deadline: {cancelled} of 6; "
          f"cancels sent {stats['requests_cancelled']}; statements hit by another's "
          f"cancel and rerun: {stats['requests_rerun']}")
