"""Pinned transactions: commit, rollback, owners that die or forget them."""

from __future__ import annotations

import os
import signal
import threading
import time

import psycopg
import pytest

import client
from client import protocol
from conftest import OF_APPLICATION, wait_until


@pytest.fixture
def accounts(admin: psycopg.Connection) -> None:
    admin.execute("DROP TABLE IF EXISTS accounts")
    admin.execute("CREATE TABLE accounts (id int PRIMARY KEY, balance int NOT NULL)")
    admin.execute("INSERT INTO accounts VALUES (1, 100), (2, 100)")


def _balances(admin: psycopg.Connection) -> dict[int, int]:
    return dict(admin.execute("SELECT id, balance FROM accounts").fetchall())


def test_commit_on_clean_exit_rollback_on_error(broker, admin, accounts):
    c = broker.client
    with c.transaction() as tx:
        tx.execute("UPDATE accounts SET balance = balance - 10 WHERE id = 1")
        tx.execute("UPDATE accounts SET balance = balance + 10 WHERE id = 2")
    assert _balances(admin) == {1: 90, 2: 110}
    with pytest.raises(ZeroDivisionError):
        with c.transaction() as tx:
            tx.execute("UPDATE accounts SET balance = 0 WHERE id = 1")
            raise ZeroDivisionError
    assert _balances(admin) == {1: 90, 2: 110}
    with pytest.raises(client.IntegrityError):
        with c.transaction() as tx:
            tx.execute("UPDATE accounts SET balance = 0 WHERE id = 1")
            tx.execute("INSERT INTO accounts VALUES (2, 0)")
    assert _balances(admin) == {1: 90, 2: 110}
    assert broker.stats()["sessions_active"] == 0


def test_batch_is_atomic(broker, admin, accounts):
    results = broker.client.batch([
        ("UPDATE accounts SET balance = balance - %s WHERE id = 1", [5]),
        ("UPDATE accounts SET balance = balance + %s WHERE id = 2", [5]),
        "SELECT sum(balance) FROM accounts",
    ])
    assert [r.rowcount for r in results[:2]] == [1, 1]
    assert results[2].rows == [(200,)]
    with pytest.raises(client.IntegrityError):
        broker.client.batch([
            "UPDATE accounts SET balance = 0 WHERE id = 1",
            "INSERT INTO accounts VALUES (1, 0)",
        ])
    assert _balances(admin) == {1: 95, 2: 105}


def test_executemany_is_atomic(broker, admin, accounts):
    result = broker.client.executemany("INSERT INTO accounts VALUES (%s, %s)", [(3, 1), (4, 1)])
    assert result.rowcount == 2
    with pytest.raises(client.IntegrityError):
        broker.client.executemany("INSERT INTO accounts VALUES (%s, %s)", [(5, 1), (1, 1)])
    assert sorted(_balances(admin)) == [1, 2, 3, 4]


def _lock_row_then_wait(endpoint: str, ready_w: int) -> None:
    c = client.Client(endpoint, timeout=30)
    with c.transaction() as tx:
        tx.execute("UPDATE accounts SET balance = -1 WHERE id = 1")
        os.write(ready_w, b"x")
        time.sleep(60)


def test_killed_worker_releases_its_lock_within_2s(broker, admin, accounts):
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the worker: holds a row lock in a pinned transaction
        try:
            _lock_row_then_wait(broker.endpoint, ready_w)
        finally:
            os._exit(0)
    assert os.read(ready_r, 1) == b"x"
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    started = time.monotonic()
    # The request's own deadline is the 2 s promise: past it, the broker cancels.
    result = broker.client.execute("UPDATE accounts SET balance = balance + 1 WHERE id = 1",
                                   timeout=2.0)
    waited = time.monotonic() - started
    assert result.rowcount == 1
    assert _balances(admin)[1] == 101  # the killed transaction was rolled back
    stats = broker.stats()
    assert stats["sessions_active"] == 0
    assert stats["transactions_expired"] == 1
    assert stats["pool_available"] == stats["pool_size"]
    print(f"lock obtained {waited:.2f} s after SIGKILL")


def _pin_the_only_connection_then_queue_writes(endpoint: str, ready_w: int) -> None:
    import zmq

    socket = zmq.Context().socket(zmq.DEALER)
    socket.connect(endpoint)
    token = _raw_request(socket, protocol.OP_BEGIN, None, [])[2]
    _raw_request(socket, protocol.OP_EXECUTE, token, ["SELECT 1", None])
    for n in range(3):  # queued behind the pinned connection, with a minute to wait
        socket.send_multipart([
            protocol.pack([100 + n, protocol.OP_EXECUTE, 60_000, None]),
            protocol.pack(["UPDATE accounts SET balance = balance + 1000 WHERE id = 2", None])])
    os.write(ready_w, b"x")
    time.sleep(60)


def test_writes_queued_by_a_killed_worker_are_dropped_not_run(start_broker, admin, accounts):
    broker = start_broker(max_connections=1, pool_timeout=60)
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            _pin_the_only_connection_then_queue_writes(broker.endpoint, ready_w)
        finally:
            os._exit(0)
    assert os.read(ready_r, 1) == b"x"
    deadline = time.monotonic() + 5
    while broker.stats()["requests_waiting"] < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    # Nobody waits for those writes any more: once the broker sees the owner
    # gone, its transaction is rolled back and its queue dropped.
    assert broker.client.execute("SELECT 1", timeout=5).rows == [(1,)]
    time.sleep(0.3)
    assert _balances(admin) == {1: 100, 2: 100}
    stats = broker.stats()
    assert stats["requests_dropped"] == 3
    assert stats["sessions_active"] == 0 and stats["requests_waiting"] == 0


@pytest.mark.parametrize("op", ["execute", "batch"])
def test_a_write_queued_by_a_killed_worker_outside_a_transaction_is_dropped(
        start_broker, admin, accounts, op):
    # A gunicorn worker killed while its autocommit write waits for the
    # connection another client holds: nobody waits for the write any more.
    broker = start_broker(max_connections=1, pool_timeout=60)
    holder = client.Client(broker.endpoint, timeout=60)
    with holder.transaction() as tx:
        tx.execute("SELECT 1")  # the only connection, pinned
        pid = os.fork()
        if pid == 0:
            try:
                worker = client.Client(broker.endpoint, timeout=60)
                sql = "UPDATE accounts SET balance = balance + 1000 WHERE id = 2"
                worker.execute(sql) if op == "execute" else worker.batch([sql])
            finally:
                os._exit(0)
        assert wait_until(lambda: broker.stats()["requests_waiting"] == 1, 5)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        assert wait_until(lambda: broker.stats()["requests_dropped"] == 1, 2)
    time.sleep(0.3)
    assert _balances(admin) == {1: 100, 2: 100}  # it used to run once the connection was free


def test_a_killed_workers_running_batch_is_cancelled_and_frees_its_lock(start_broker, admin,
                                                                         accounts):
    # As a killed worker's transaction (above): its batch, running outside
    # any transaction of its own, would otherwise run to its end or its
    # client's deadline, holding its row lock and a server connection.
    broker = start_broker(max_connections=2)
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            worker = client.Client(broker.endpoint, timeout=60)
            worker.ping()
            os.write(ready_w, b"x")
            worker.batch(["UPDATE accounts SET balance = -1 WHERE id = 1", "SELECT pg_sleep(30)"])
        finally:
            os._exit(0)
    assert os.read(ready_r, 1) == b"x"
    assert wait_until(lambda: broker.stats()["pool_active"] == 1, 5)
    time.sleep(0.3)  # the batch holds the row lock, sleeping
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    result = broker.client.execute("UPDATE accounts SET balance = balance + 1 WHERE id = 1",
                                   timeout=3.0)
    assert result.rowcount == 1
    assert _balances(admin)[1] == 101  # the batch was rolled back whole
    assert broker.stats()["requests_cancelled"] == 1


def test_idle_transaction_is_rolled_back(start_broker, admin, accounts):
    broker = start_broker(max_connections=2, idle_transaction_timeout=0.3)
    with pytest.raises(client.TransactionExpired) as excinfo:
        with broker.client.transaction() as tx:
            tx.execute("UPDATE accounts SET balance = 0 WHERE id = 1")
            time.sleep(1.0)
            tx.execute("UPDATE accounts SET balance = 0 WHERE id = 2")
    assert "idle_transaction_timeout" in str(excinfo.value)
    assert _balances(admin) == {1: 100, 2: 100}
    assert broker.client.execute("UPDATE accounts SET balance = 7 WHERE id = 1").rowcount == 1


def _raw_request(socket, op: int, session: bytes | None, body: list) -> list:
    socket.send_multipart([protocol.pack([1, op, 5000, session]), protocol.pack(body)])
    assert socket.poll(5000)
    return protocol.unpack(socket.recv())


def test_other_clients_cannot_use_a_transaction(broker, accounts):
    import zmq

    with broker.client.transaction() as tx:
        tx.execute("SELECT 1")
        stolen = tx._session
        other = zmq.Context.instance().socket(zmq.DEALER)
        other.connect(broker.endpoint)
        try:
            for token in (stolen, b"\x00" * 16, os.urandom(16)):
                reply = _raw_request(other, protocol.OP_EXECUTE, token,
                                     ["UPDATE accounts SET balance = 0", None])
                assert reply[1] == protocol.STATUS_ERROR
                assert reply[2]["kind"] == "TransactionExpired"
        finally:
            other.close(linger=0)
        # A thread of the same process is another client too.
        errors = []
        thread = threading.Thread(target=lambda: errors.append(
            pytest.raises(client.TransactionExpired, tx.execute, "SELECT 1")))
        thread.start()
        thread.join()
        assert len(errors) == 1
        assert tx.execute("SELECT 2").rows == [(2,)]


def test_another_thread_cannot_open_a_transaction_it_did_not_enter(broker, admin, accounts):
    """Before its first statement the transaction exists only in the client:
    a thread that did not enter it must not open it on its own socket."""
    with broker.client.transaction() as tx:
        errors = []
        thread = threading.Thread(target=lambda: errors.append(pytest.raises(
            client.TransactionExpired, tx.execute,
            "UPDATE accounts SET balance = 0 WHERE id = 1")))
        thread.start()
        thread.join()
        assert len(errors) == 1
        tx.execute("UPDATE accounts SET balance = 1 WHERE id = 2")
    assert _balances(admin) == {1: 100, 2: 1}
    assert broker.stats()["sessions_active"] == 0


def test_terminated_idle_connections_are_replaced(start_broker, admin):
    broker = start_broker(max_connections=2)
    c = broker.client
    with c.transaction() as tx:  # two connections open: one pinned, one free
        tx.execute("SELECT 1")
        c.execute("SELECT 1")
    killed = admin.execute(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
        f"WHERE {OF_APPLICATION}", [broker.application_name]).fetchone()[0]
    assert killed == 2
    time.sleep(0.2)
    # Never sent to a dead connection: found dead on hand-out, run on a new one.
    for n in range(4):
        assert c.execute("SELECT %s::int", [n]).rows == [(n,)]
    assert broker.stats()["connections_lost"] >= 1


def test_executemany_of_parameter_sets_none_runs_its_statement_each_time(broker, admin, accounts):
    # A parameter set of None runs the text as it is, as psycopg does: every
    # one of them, not the first alone (the others once went as empty queries).
    result = broker.client.executemany("INSERT INTO accounts VALUES (7, 1)", [None])
    assert result.rowcount == 1
    result = broker.client.executemany(
        "UPDATE accounts SET balance = balance + 1 WHERE id = 7", [None, None, None])
    assert _balances(admin)[7] == 4
    assert result.rowcount == 3


def test_a_transaction_sends_its_begin_with_its_first_statement(broker, admin, accounts):
    """One round trip fewer; a block that runs nothing asks the broker nothing."""
    def requests() -> int:
        return broker.stats()["requests_num"]  # counts the stats request too

    start = requests()
    with broker.client.transaction():
        pass
    assert requests() - start == 1
    start = requests()
    with broker.client.transaction() as tx:
        tx.execute("UPDATE accounts SET balance = 0 WHERE id = 1")
        assert tx.execute("SELECT balance FROM accounts WHERE id = 1").rows == [(0,)]
    assert requests() - start == 3 + 1  # BEGIN with the UPDATE, the SELECT, COMMIT
    assert _balances(admin) == {1: 0, 2: 100}


@pytest.mark.parametrize("before", [[], ["SELECT 1"]], ids=["first", "second"])
def test_statements_after_a_failed_one_fail_as_in_an_aborted_transaction(
        broker, admin, accounts, before):
    """The first statement's failure ends the transaction on the broker at
    once; what follows must fail as the server fails it after a later one."""
    with broker.client.transaction() as tx:
        for sql in before:
            tx.execute(sql)
        with pytest.raises(client.IntegrityError):
            tx.execute("INSERT INTO accounts VALUES (1, 0)")
        with pytest.raises(client.InternalError) as aborted:
            tx.execute("UPDATE accounts SET balance = 0 WHERE id = 2")
        assert aborted.value.sqlstate == "25P02"
        with pytest.raises(client.InternalError):
            tx.executemany("UPDATE accounts SET balance = %s WHERE id = 2", [[1], [2]])
    assert _balances(admin) == {1: 100, 2: 100}
    assert broker.stats()["sessions_active"] == 0


def _sleeping(admin: psycopg.Connection) -> bool:
    return admin.execute("SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
                         "AND query LIKE '%%pg_sleep(1)%%' AND pid <> pg_backend_pid()"
                         ).fetchone()[0] > 0


@pytest.mark.parametrize("api", ["transaction", "dbapi"])
@pytest.mark.parametrize("how", ["stalled", "restarted"])
def test_a_statement_of_unknown_outcome_leaves_the_block_all_or_nothing(
        start_broker, admin, accounts, how, api):
    """The first statement (it carries the BEGIN) is sent and no answer
    comes: it may have run, so what the block runs after it must not commit
    without it.  (Found by a review: the block committed its second half.)"""
    from client import dbapi

    broker = start_broker(idle_transaction_timeout=3)
    timeout = 1 if how == "stalled" else 5

    def disturb() -> None:
        assert wait_until(lambda: _sleeping(admin), 5)
        if how == "stalled":  # the broker lives on; its answer comes too late
            os.kill(broker.proc.pid, signal.SIGSTOP)
            time.sleep(2.5)  # past the request's timeout (1 s) and its grace
            os.kill(broker.proc.pid, signal.SIGCONT)
        else:  # the broker dies under the statement and is started again
            broker.proc.kill()
            broker.proc.wait()
            broker.start()

    first = "UPDATE accounts SET balance = balance - 50 WHERE id = 1; SELECT pg_sleep(1)"
    second = "UPDATE accounts SET balance = balance + 50 WHERE id = 2"
    disturber = threading.Thread(target=disturb)
    try:
        if api == "transaction":
            with client.Client(broker.endpoint, timeout=5).transaction() as tx:
                disturber.start()
                with pytest.raises(client.BrokerUnavailable) as unknown:
                    tx.execute(first, timeout=timeout)
                disturber.join()
                tx.execute(second)
        else:
            conn = dbapi.connect(broker.endpoint, timeout=timeout)
            disturber.start()
            with pytest.raises(client.BrokerUnavailable) as unknown:
                conn.cursor().execute(first)
            disturber.join()
            conn.cursor().execute(second)
            conn.commit()
    except client.Error:
        pass  # the block may fail; it must not commit half of itself
    assert unknown.value.outcome_unknown
    disturber.join()
    assert wait_until(lambda: broker.stats()["sessions_active"] == 0, 6)
    assert _balances(admin) in ({1: 100, 2: 100}, {1: 50, 2: 150})


def test_a_later_executemany_of_unknown_outcome_leaves_the_block_all_or_nothing(
        start_broker, admin, accounts):
    """As above, for an executemany after the first statement: it takes its
    own path to the broker (in parts when it is long).  (Found by a review.)"""
    broker = start_broker(idle_transaction_timeout=3)

    def stall() -> None:
        assert wait_until(lambda: _sleeping(admin), 5)
        os.kill(broker.proc.pid, signal.SIGSTOP)
        time.sleep(2.5)  # past the request's timeout (1 s) and its grace
        os.kill(broker.proc.pid, signal.SIGCONT)

    staller = threading.Thread(target=stall)
    try:
        with client.Client(broker.endpoint, timeout=5).transaction() as tx:
            tx.execute("UPDATE accounts SET balance = balance + 50 WHERE id = 2")
            staller.start()
            with pytest.raises(client.BrokerUnavailable) as unknown:
                tx.executemany("UPDATE accounts SET balance = balance - %s "
                               "FROM (SELECT pg_sleep(1)) AS s WHERE id = 1", [[50]], timeout=1)
            assert unknown.value.outcome_unknown
            staller.join()
            with pytest.raises(client.InternalError):
                tx.execute("UPDATE accounts SET balance = balance + 1 WHERE id = 2")
    except client.Error:
        pass  # the block may fail; it must not commit half of itself
    staller.join()
    assert wait_until(lambda: broker.stats()["sessions_active"] == 0, 6)
    assert _balances(admin) in ({1: 100, 2: 100}, {1: 50, 2: 150})
