"""SIGTERM under load: stop taking work, finish what runs, lose nothing."""

from __future__ import annotations

import signal
import threading
import time
from typing import Any

import client
from client import protocol
from conftest import OF_APPLICATION, run_in_processes, wait_until

WRITERS = 6


def _write_until_the_broker_is_gone(endpoint: str, writer: int) -> dict[str, list[int]]:
    """Insert unique ids three ways; sort each by what the client was told."""
    c = client.Client(endpoint, timeout=5)
    acked: list[int] = []
    refused: list[int] = []  # the broker said it did not run (or rolled it back)
    unknown: list[int] = []  # the request was sent, no answer came
    next_id = writer * 1_000_000
    refused_by_broker = False
    started = time.monotonic()
    while not refused_by_broker and time.monotonic() - started < 60:
        next_id += 2
        ids = [next_id, next_id + 1]
        kind = next_id % 3
        try:
            if kind == 0:
                c.execute("INSERT INTO shutdown_writes VALUES (%s), (%s)", ids)
            elif kind == 1:
                c.batch([("INSERT INTO shutdown_writes VALUES (%s)", [i]) for i in ids])
            else:
                with c.transaction() as tx:
                    tx.execute("INSERT INTO shutdown_writes VALUES (%s)", [ids[0]])
                    tx.execute("SELECT pg_sleep(0.02)")
                    tx.execute("INSERT INTO shutdown_writes VALUES (%s)", [ids[1]])
        except client.BrokerUnavailable as exc:
            (unknown if exc.outcome_unknown else refused).extend(ids)
            refused_by_broker = not exc.outcome_unknown  # shutting down, or gone
            continue
        except client.TransactionExpired:
            refused.extend(ids)
            continue
        acked.extend(ids)
    return {"acked": acked, "refused": refused, "unknown": unknown}


def test_sigterm_under_load_loses_no_acknowledged_write(start_broker, admin):
    admin.execute("DROP TABLE IF EXISTS shutdown_writes")
    admin.execute("CREATE TABLE shutdown_writes (id bigint PRIMARY KEY)")
    broker = start_broker(max_connections=4, drain_timeout=10)
    results: list[dict[str, list[int]]] = []
    load = threading.Thread(target=lambda: results.extend(run_in_processes(
        _write_until_the_broker_is_gone, [(broker.endpoint, w) for w in range(WRITERS)])))
    load.start()
    deadline = time.monotonic() + 20
    while admin.execute("SELECT count(*) FROM shutdown_writes").fetchone()[0] < 200:
        assert time.monotonic() < deadline, broker.log()
        time.sleep(0.05)
    broker.proc.send_signal(signal.SIGTERM)
    assert broker.proc.wait(timeout=30) == 0
    load.join(timeout=120)
    assert len(results) == WRITERS
    stored = {row[0] for row in admin.execute("SELECT id FROM shutdown_writes")}
    acked = {i for r in results for i in r["acked"]}
    refused = {i for r in results for i in r["refused"]}
    unknown = {i for r in results for i in r["unknown"]}
    print(f"\n[shutdown] {len(acked)} writes acknowledged, {len(refused)} refused, "
          f"{len(unknown)} unknown; {len(stored)} stored")
    assert acked <= stored  # nothing acknowledged was lost
    assert not refused & stored  # nothing reported as not run was stored
    assert stored <= acked | unknown  # no phantom writes
    assert "shutting down" in broker.log() and "stopped" in broker.log()
    with admin.cursor() as cur:
        left = cur.execute(f"SELECT count(*) FROM pg_stat_activity WHERE {OF_APPLICATION}",
                           [broker.application_name]).fetchone()[0]
    assert left == 0


def test_a_transaction_in_progress_finishes_during_a_graceful_stop(start_broker, admin):
    # An executemany in parts runs inside a transaction of its own: SIGTERM
    # in its middle lets it finish (within drain_timeout) rather than fail it.
    admin.execute("DROP TABLE IF EXISTS drained_parts")
    admin.execute("CREATE TABLE drained_parts (n int)")
    broker = start_broker(max_connections=2, drain_timeout=30)
    rows = [[n] for n in range(protocol.MAX_STATEMENTS + 100)]  # two parts: SIGTERM in the first
    outcome: list[Any] = []

    def bulk() -> None:
        try:
            outcome.append(broker.client.executemany(
                "INSERT INTO drained_parts SELECT %s FROM pg_sleep(0.0001)", rows,
                timeout=60).rowcount)
        except client.Error as exc:
            outcome.append(exc)

    worker = threading.Thread(target=bulk)
    worker.start()
    assert wait_until(lambda: broker.stats()["sessions_active"] == 1, 10)
    broker.proc.send_signal(signal.SIGTERM)
    worker.join()
    assert broker.proc.wait(timeout=40) == 0
    assert outcome == [len(rows)]
    assert admin.execute("SELECT count(*) FROM drained_parts").fetchone()[0] == len(rows)
