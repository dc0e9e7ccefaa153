"""Logs an operator can use: JSON lines, request-level events with the
client's pid, the pool, the duration and the SQLSTATE, slow statements."""

from __future__ import annotations

import json
import os

import pytest

import client
from client import protocol
from conftest import raw_socket, wait_until


def _events(broker, message: str) -> list[dict]:
    lines = [json.loads(line) for line in broker.log().splitlines()]
    return [line for line in lines if line["message"].startswith(message)]


def test_json_lines_carry_the_request_fields(start_broker):
    broker = start_broker(max_connections=1, log_format="json", log_slow_statements=0.05,
                          idle_transaction_timeout=1.0)
    c = broker.client
    c.execute("SELECT pg_sleep(0.1)")
    with pytest.raises(client.DataError):
        c.execute("SELECT 1 / (SELECT 0 FROM pg_sleep(0.1))")
    with pytest.raises(client.TransactionExpired):  # at its COMMIT
        with c.transaction() as tx:  # it holds the only connection, then idles out
            tx.execute("SELECT 1")
            with pytest.raises(client.PoolTimeout):
                c.execute("SELECT 2", timeout=0.3)
            assert wait_until(lambda: _events(broker, "rolling back a transaction"), 5)
    # Every line is one JSON object (the broker's own and every library's).
    slow = _events(broker, "slow statement")
    assert [event["sqlstate"] if "sqlstate" in event else None for event in slow] \
        == [None, "22012"]
    assert all(event["client_pid"] == os.getpid() and event["pool"] == "default"
               and event["duration_ms"] >= 100 for event in slow)
    assert "pg_sleep(0.1)" in slow[0]["message"]
    (timeout,) = _events(broker, "PoolTimeout")
    assert timeout["client_pid"] == os.getpid() and timeout["duration_ms"] >= 250
    (rollback,) = _events(broker, "rolling back a transaction")
    assert rollback["client_pid"] == os.getpid() and rollback["pool"] == "default"
    assert "idle for more than 1 s" in rollback["message"]


def test_text_lines_append_the_request_fields(start_broker):
    broker = start_broker(max_connections=1, log_slow_statements=0.05)
    broker.client.execute("SELECT pg_sleep(0.06)")
    assert wait_until(lambda: "slow statement" in broker.log(), 5)
    (line,) = [line for line in broker.log().splitlines() if "slow statement" in line]
    assert f"[client_pid={os.getpid()} pool=default duration_ms=" in line


def test_request_events_are_logged_within_a_budget(start_broker):
    # A client that makes a PoolTimeout a thousand times cannot write a
    # thousand lines: 20 a second, then a count of the rest.
    broker = start_broker(max_connections=1, max_client_requests=2000)
    with broker.client.transaction() as tx:
        tx.execute("SELECT 1")
        with raw_socket(broker.endpoint) as s:
            for request_id in range(1000):
                s.send_multipart([protocol.pack([request_id, protocol.OP_EXECUTE, 1, None]),
                                  protocol.pack(["SELECT 2", None])])
            for _ in range(1000):
                assert s.poll(10_000)
                assert protocol.unpack(s.recv())[2]["kind"] == "PoolTimeout"
    lines = [line for line in broker.log().splitlines() if "PoolTimeout:" in line]
    print(f"\n[log budget] 1,000 PoolTimeouts: {len(lines)} lines")
    assert len(lines) <= 25
    with broker.client.transaction() as tx:
        tx.execute("SELECT 1")
        with pytest.raises(client.PoolTimeout):
            broker.client.execute("SELECT 2", timeout=0.1)
    assert "more since the last report" in broker.log()  # the next line counts the rest


def test_a_reload_switches_the_log_format(start_broker):
    import signal

    broker = start_broker(max_connections=1, log_slow_statements=0.05)
    broker.config.write_text(broker.config.read_text() + 'log_format = "json"\n')
    broker.proc.send_signal(signal.SIGHUP)
    assert wait_until(lambda: "applied log_format='json'" in broker.log(), 5)
    broker.client.execute("SELECT pg_sleep(0.06)")
    assert wait_until(lambda: broker.log().rstrip().endswith("}"), 5)
    last = json.loads(broker.log().splitlines()[-1])
    assert last["message"].startswith("slow statement") and last["pool"] == "default"
