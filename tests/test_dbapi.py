"""client.dbapi, the PEP 249 module: transactions on the broker's cheapest
paths, psycopg's values and type codes, named cursors, fork and threads.

Round trips are counted by the broker itself (``requests_num``), so the
figures are what crossed the wire, not what the client meant to send.
"""

from __future__ import annotations

import datetime as dt
import gc
import os
import threading
import time
import uuid
from decimal import Decimal
from typing import Callable

import psycopg
import pytest
import zmq

import client
from client import dbapi, protocol
from conftest import wait_until


@pytest.fixture
def items(admin: psycopg.Connection) -> None:
    admin.execute("DROP TABLE IF EXISTS items")
    admin.execute("CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL, qty int)")
    admin.execute("INSERT INTO items SELECT g, 'item ' || g, g FROM generate_series(1, 50) g")


@pytest.fixture
def conn(broker):
    connection = dbapi.connect(broker.endpoint, timeout=15)
    yield connection
    connection.close()


def round_trips(broker, action: Callable[[], object]) -> int:
    """Requests the broker received while ``action`` ran."""
    before = broker.stats()["requests_num"]
    action()
    return broker.stats()["requests_num"] - before - 1  # the second stats() counts itself


def _names(admin: psycopg.Connection) -> dict[int, str]:
    return dict(admin.execute("SELECT id, name FROM items WHERE id <= 3 OR id > 50"))


# Transactions and what they cost

def test_orm_operations_take_one_round_trip_each_and_the_table_says_so(broker, items):
    """get by primary key, update, commit: what an ORM session does most."""
    conn = dbapi.connect(broker.endpoint, timeout=15)
    cur = conn.cursor()
    get = lambda: cur.execute("SELECT id, name, qty FROM items WHERE id = %(pk)s", {"pk": 7})
    update = lambda: cur.execute("UPDATE items SET qty = qty + 1 WHERE id = %(pk)s", {"pk": 7})
    table = {"transaction": [round_trips(broker, get), round_trips(broker, update),
                             round_trips(broker, conn.commit)]}
    assert cur.rowcount == 1
    conn.autocommit = True
    table["autocommit"] = [round_trips(broker, get), round_trips(broker, update),
                           round_trips(broker, conn.commit)]

    # What a shim over client.transaction() costs: the same, its BEGIN goes
    # with the first statement too.
    tx = broker.client.transaction()
    table["shim"] = [
        round_trips(broker, lambda: (tx.__enter__(), tx.execute(
            "SELECT id, name, qty FROM items WHERE id = %(pk)s", {"pk": 7}))),
        round_trips(broker, lambda: tx.execute(
            "UPDATE items SET qty = qty + 1 WHERE id = %(pk)s", {"pk": 7})),
        round_trips(broker, lambda: tx.__exit__(None, None, None))]
    conn.autocommit = False
    empty = {"transaction": round_trips(broker, lambda: (conn.commit(), conn.rollback())),
             "shim": round_trips(broker, lambda: (tx.__enter__(), tx.__exit__(None, None, None)))}
    print("\nround trips   get by pk  update  commit  total  nothing run")
    for mode, trips in table.items():
        print(f"{mode:<12}  {trips[0]:>9}  {trips[1]:>6}  {trips[2]:>6}  {sum(trips):>5}"
              f"  {empty.get(mode, 0):>11}")
    assert table == {"transaction": [1, 1, 1], "autocommit": [1, 1, 0], "shim": [1, 1, 1]}
    assert empty == {"transaction": 0, "shim": 0}
    conn.close()


def test_first_statement_carries_the_begin_with_the_connections_characteristics(conn):
    cur = conn.cursor()
    show = ("SELECT current_setting('transaction_isolation'), "
            "current_setting('transaction_read_only'), current_setting('transaction_deferrable')")
    assert cur.execute(show).fetchone() == ("read committed", "off", "off")
    conn.rollback()
    conn.isolation_level = dbapi.IsolationLevel.SERIALIZABLE
    conn.read_only = True
    conn.deferrable = True
    assert cur.execute(show).fetchone() == ("serializable", "on", "on")
    with pytest.raises(dbapi.ProgrammingError, match="can't change isolation_level now"):
        conn.isolation_level = "read committed"
    with pytest.raises(dbapi.ProgrammingError, match="can't change read_only now"):
        conn.read_only = False
    with pytest.raises(dbapi.ProgrammingError, match="can't change autocommit now"):
        conn.autocommit = True
    conn.rollback()
    conn.isolation_level = "repeatable read"
    conn.read_only = False
    conn.deferrable = None
    assert cur.execute(show).fetchone() == ("repeatable read", "off", "off")
    conn.commit()
    with pytest.raises(dbapi.ProgrammingError, match="invalid isolation level"):
        conn.isolation_level = "SERIALIZABLE; DROP TABLE items"


def test_begin_characteristics_are_values_the_broker_checks_never_sql(broker, items):
    """A client that skips client.dbapi and forges the BEGIN's characteristics
    gets a refusal, and nothing runs."""
    socket = zmq.Context.instance().socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(broker.endpoint)
    first = protocol.pack(["DELETE FROM items", None])

    def begin(request_id: int, body: list) -> list:
        socket.send_multipart([protocol.pack([request_id, protocol.OP_BEGIN, 5000, None]),
                               protocol.pack(body)])
        assert socket.poll(10_000)
        return protocol.unpack(socket.recv())

    try:
        for n, body in enumerate([
            [["SERIALIZABLE; DROP TABLE items", None, None], protocol.OP_EXECUTE, first],
            [["SERIALIZABLE", "yes", None], protocol.OP_EXECUTE, first],
            [["SERIALIZABLE", None], protocol.OP_EXECUTE, first],
            [[None, None, None], protocol.OP_BATCH, first],
            [None, protocol.OP_EXECUTE, "DELETE FROM items"],
            [None, protocol.OP_EXECUTE, protocol.pack(["COMMIT", None])],
        ]):
            reply = begin(n, body)
            assert reply[1] == protocol.STATUS_ERROR, body
            assert reply[2]["kind"] in ("ProgrammingError", "MessageError"), reply
        refused = begin(98, [[None, True, None], protocol.OP_EXECUTE, first])
        assert (refused[1], refused[2]["sqlstate"]) == (protocol.STATUS_ERROR, "25006")
        ok, (token, result) = begin(99, [["SERIALIZABLE", True, True], protocol.OP_EXECUTE,
                                         protocol.pack(["SHOW transaction_isolation", None])])[1:]
        assert ok == protocol.STATUS_OK and result[:4] == [
            ["transaction_isolation"], [["serializable"]], 1, [25]]
        socket.send_multipart([protocol.pack([100, protocol.OP_ROLLBACK, 5000, token]), b"\x90"])
        assert socket.poll(10_000) and protocol.unpack(socket.recv())[1] == protocol.STATUS_OK
    finally:
        socket.close()
    assert broker.client.execute("SELECT count(*) FROM items").rows == [(50,)]
    assert broker.stats()["sessions_active"] == 0


def test_a_read_only_transaction_refuses_writes_and_frees_its_connection(broker, conn, items):
    conn.read_only = True
    with pytest.raises(dbapi.InternalError) as failed:  # psycopg: ReadOnlySqlTransaction
        conn.cursor().execute("DELETE FROM items")
    assert failed.value.sqlstate == "25006"
    assert broker.stats()["sessions_active"] == 0  # the broker rolled it back at once
    conn.rollback()
    assert broker.client.execute("SELECT count(*) FROM items").rows == [(50,)]


def test_commit_makes_work_visible_and_rollback_or_close_drops_it(broker, admin, items):
    conn = dbapi.connect(broker.endpoint, timeout=15)
    cur = conn.cursor()
    cur.execute("UPDATE items SET name = 'committed' WHERE id = 1")
    assert _names(admin)[1] == "item 1"  # not yet
    conn.commit()
    assert _names(admin)[1] == "committed"
    cur.execute("UPDATE items SET name = 'rolled back' WHERE id = 2")
    conn.rollback()
    cur.execute("UPDATE items SET name = 'closed' WHERE id = 3")
    assert broker.stats()["sessions_active"] == 1
    conn.close()
    assert broker.stats()["sessions_active"] == 0
    assert _names(admin) == {1: "committed", 2: "item 2", 3: "item 3"}
    conn.close()  # idempotent, as psycopg's
    with pytest.raises(dbapi.InterfaceError, match="closed"):
        cur.execute("SELECT 1")
    with pytest.raises(dbapi.InterfaceError, match="closed"):
        conn.commit()


def test_context_manager_commits_on_success_and_rolls_back_on_error(broker, admin, items):
    with dbapi.connect(broker.endpoint) as conn:
        conn.cursor().execute("UPDATE items SET name = 'kept' WHERE id = 1")
    assert conn.closed and _names(admin)[1] == "kept"
    with pytest.raises(ZeroDivisionError):
        with dbapi.connect(broker.endpoint) as conn:
            conn.cursor().execute("UPDATE items SET name = 'dropped' WHERE id = 2")
            1 / 0
    assert _names(admin)[2] == "item 2"


def test_a_failed_first_statement_aborts_the_transaction_as_psycopg_does(broker, conn, items):
    cur = conn.cursor()
    with pytest.raises(dbapi.ProgrammingError) as failed:
        cur.execute("SELECT no_such_column FROM items")
    assert failed.value.sqlstate == "42703"
    assert broker.stats()["sessions_active"] == 0  # its server connection is free already
    assert conn.in_transaction
    # Until rollback, statements fail as psycopg's do (InFailedSqlTransaction),
    # without asking the broker.
    trips = round_trips(broker, lambda: pytest.raises(dbapi.InternalError, cur.execute, "SELECT 1"))
    assert trips == 0
    assert round_trips(broker, conn.rollback) == 0
    assert cur.execute("SELECT 1").fetchall() == [(1,)]
    conn.commit()


def test_a_failed_later_statement_aborts_until_rollback(broker, conn, admin, items):
    cur = conn.cursor()
    cur.execute("UPDATE items SET name = 'lost' WHERE id = 1")
    with pytest.raises(dbapi.IntegrityError):
        cur.execute("INSERT INTO items VALUES (2, 'duplicate', 0)")
    with pytest.raises(dbapi.InternalError) as aborted:
        cur.execute("SELECT 1")
    assert aborted.value.sqlstate == "25P02"
    conn.commit()  # as with psycopg, committing a failed transaction rolls it back
    assert _names(admin)[1] == "item 1"
    assert broker.stats()["sessions_active"] == 0


def test_a_refused_statement_opens_no_transaction(broker, conn):
    with pytest.raises(dbapi.ProgrammingError):  # placeholders without parameters
        conn.cursor().execute("SELECT %s, %s", [1])
    assert not conn.in_transaction
    assert broker.stats()["sessions_active"] == 0
    conn.autocommit = True  # allowed: nothing is open


def test_autocommit_takes_the_shared_path(broker, admin, items):
    conn = dbapi.connect(broker.endpoint, autocommit=True)
    cur = conn.cursor()
    cur.execute("UPDATE items SET name = 'at once' WHERE id = 1")
    assert _names(admin)[1] == "at once"  # no commit needed
    assert broker.stats()["sessions_active"] == 0
    assert not conn.in_transaction
    # Session state stays refused on the shared path (see README).
    with pytest.raises(client.SessionStateRefused):
        cur.execute("SET search_path = nowhere")
    cur.executemany("INSERT INTO items VALUES (%s, %s, 0)", [(51, "a"), (52, "b")])
    assert cur.rowcount == 2
    with pytest.raises(dbapi.IntegrityError):  # executemany is atomic, even here
        cur.executemany("INSERT INTO items VALUES (%s, %s, 0)", [(53, "c"), (51, "dup")])
    assert sorted(_names(admin)) == [1, 2, 3, 51, 52]
    conn.close()


def test_session_state_is_allowed_inside_a_transaction_and_reset_after(broker, conn):
    cur = conn.cursor()
    cur.execute("SET search_path = nowhere")  # carried by the BEGIN
    assert cur.execute("SHOW search_path").fetchone() == ("nowhere",)
    conn.commit()
    for _ in range(4):  # whichever connection the pool hands out
        assert broker.client.execute("SHOW search_path").rows == [('"$user", public',)]


# Cursors

def test_values_and_type_codes_are_psycopgs(conn, admin):
    sql = ("SELECT 1::int2 AS a, 2::int4, 3::int8, 1.5::float4, 2.5::float8, 1.25::numeric, "
           "'t'::text, 'v'::varchar, 'c'::char, '\\x00ff'::bytea, true, "
           "'2024-02-29'::date, '12:30'::time, '12:30+02'::timetz, "
           "'2001-02-03 04:05:06'::timestamp, '2001-02-03 04:05:06+05:30'::timestamptz, "
           "'1 day'::interval, '12345678-1234-5678-1234-567812345678'::uuid, "
           "'{\"a\": [1]}'::jsonb, ARRAY[1, 2], 42::oid, NULL::text")
    cur = conn.cursor()
    cur.execute(sql)
    expected = admin.execute(sql)
    assert cur.fetchall() == expected.fetchall()
    assert [c.type_code for c in cur.description] == [c.type_code for c in expected.description]
    assert [c.name for c in cur.description] == [c.name for c in expected.description]
    assert all(len(c) == 7 for c in cur.description)
    codes = [c.type_code for c in cur.description]
    objects = [dbapi.NUMBER] * 6 + [dbapi.STRING] * 3 + [dbapi.BINARY, None] + \
        [dbapi.DATETIME] * 6 + [None] * 3 + [dbapi.ROWID, dbapi.STRING]
    for code, type_object in zip(codes, objects):
        for other in (dbapi.STRING, dbapi.BINARY, dbapi.NUMBER, dbapi.DATETIME, dbapi.ROWID):
            assert (code == other) == (other is type_object), (code, other)
            assert (other == code) == (other is type_object)
            assert (other != code) != (other is type_object)


def test_parameters_of_every_constructor_bind(conn):
    cur = conn.cursor()
    values = [dbapi.Date(2002, 12, 25), dbapi.Time(13, 45, 30),
              dbapi.Timestamp(2002, 12, 25, 13, 45, 30), dbapi.Binary(b"\x00x"),
              dbapi.TimestampFromTicks(0), Decimal("1.5"), uuid.UUID(int=1)]
    cur.execute("SELECT %s, %s, %s, %s, %s, %s, %s", values)
    assert cur.fetchone() == tuple(values)
    assert dbapi.TimestampFromTicks(0) == dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
    assert dbapi.DateFromTicks(0) in (dt.date(1969, 12, 31), dt.date(1970, 1, 1))
    assert isinstance(dbapi.TimeFromTicks(0), dt.time)


def test_fetch_methods_iteration_rownumber_and_scroll(conn, items):
    cur = conn.cursor()
    assert cur.rownumber is None and cur.arraysize == 1
    with pytest.raises(dbapi.ProgrammingError):
        cur.fetchone()
    cur.execute("SELECT id FROM items WHERE id <= 6 ORDER BY id")
    assert cur.rowcount == 6
    assert cur.fetchone() == (1,) and cur.rownumber == 1
    assert cur.fetchmany() == [(2,)]
    cur.arraysize = 2
    assert cur.fetchmany() == [(3,), (4,)]
    cur.scroll(-1)
    assert list(cur) == [(4,), (5,), (6,)]
    assert cur.fetchone() is None and cur.fetchmany(3) == [] and cur.fetchall() == []
    cur.scroll(0, "absolute")
    assert cur.fetchall()[0] == (1,)
    with pytest.raises(IndexError):
        cur.scroll(10)
    cur.execute("UPDATE items SET qty = 0 WHERE id <= 6")
    assert cur.description is None and cur.rowcount == 6 and cur.rownumber is None
    with pytest.raises(dbapi.ProgrammingError, match="did not return rows"):
        cur.fetchall()
    cur.setinputsizes([10])
    cur.setoutputsize(100, 0)
    cur.close()
    with pytest.raises(dbapi.InterfaceError, match="cursor is closed"):
        cur.execute("SELECT 1")


def test_nextset_walks_the_statements_of_a_multi_statement_text(broker, conn, items):
    cur = conn.cursor()
    text = "SELECT count(*) FROM items; UPDATE items SET qty = 1 WHERE id < 3; SELECT 'done'"
    for autocommit in (False, True):  # carried by the BEGIN, then on the shared path
        conn.autocommit = autocommit
        cur.execute(text)
        assert cur.fetchall() == [(50,)] and cur.rowcount == 1
        assert cur.nextset() is True
        assert cur.description is None and cur.rowcount == 2
        assert cur.nextset() is True
        assert cur.fetchall() == [("done",)] and cur.description[0].type_code == 25
        assert cur.nextset() is None
        assert conn.in_transaction != autocommit
        if not autocommit:
            conn.rollback()
    cur.execute("SELECT 1")
    assert cur.nextset() is None


def test_executemany_in_a_transaction(broker, conn, admin, items):
    cur = conn.cursor()
    cur.executemany("INSERT INTO items VALUES (%(id)s, %(name)s, 0)",
                    [{"id": 60, "name": "x"}, {"id": 61, "name": "y"}])
    assert cur.rowcount == 2 and cur.description is None
    cur.executemany("UPDATE items SET qty = 9 WHERE id = %s", [])  # nothing: no statement
    assert cur.rowcount == 0
    assert 60 not in _names(admin)
    conn.commit()
    assert _names(admin)[61] == "y"


# Named cursors

def test_named_cursor_streams_inside_the_connections_transaction(broker, conn, admin, items):
    cur = conn.cursor()
    cur.execute("INSERT INTO items SELECT g, 'new', 0 FROM generate_series(51, 250) g")
    named = conn.cursor("big")
    named.itersize = 64
    trips = round_trips(broker, lambda: named.execute(
        "SELECT id, name FROM items WHERE id > %s ORDER BY id", [0]))
    assert trips == 2  # DECLARE, then the first rows (so description is known)
    assert [(c.name, c.type_code) for c in named.description] == [("id", 23), ("name", 25)]
    assert named.fetchone() == (1, "item 1")
    assert len(named.fetchmany(100)) == 100
    rest = list(named)  # sees the transaction's own uncommitted rows
    assert len(rest) == 149 and rest[-1] == (250, "new")
    assert named.fetchall() == [] and named.rownumber == 250
    named.close()
    # The name is free again in the same transaction; after rollback it is gone.
    named = conn.cursor("big")
    named.execute("SELECT 1")
    assert named.fetchall() == [(1,)]
    conn.rollback()
    named.close()  # nothing to close on the server: the rollback dropped it
    assert admin.execute("SELECT count(*) FROM items").fetchone() == (50,)
    assert broker.stats()["sessions_active"] == 0


def test_closing_a_named_cursor_in_a_failed_transaction_is_quiet(conn, items):
    # As psycopg's: the transaction's end drops it.  The CLOSE used to fail
    # with 25P02, and SQLAlchemy logged an error closing a yield_per cursor.
    named = conn.cursor("streaming")
    named.itersize = 10
    named.execute("SELECT id FROM items ORDER BY id")
    assert named.fetchone() == (1,)
    with pytest.raises(dbapi.DataError):
        conn.cursor().execute("SELECT 1 / 0")
    named.close()
    conn.rollback()


def test_named_cursor_in_autocommit_pins_a_transaction_only_while_it_streams(broker, items):
    conn = dbapi.connect(broker.endpoint, autocommit=True)
    named = conn.cursor('odd "name"')
    named.itersize = 10
    named.execute("SELECT id FROM items ORDER BY id")
    assert broker.stats()["sessions_active"] == 1
    assert sum(1 for _ in named) == 50
    assert broker.stats()["sessions_active"] == 0  # exhausted: its transaction ended
    named.execute("SELECT id FROM items")
    assert named.fetchmany(3) == [(1,), (2,), (3,)]
    named.close()
    assert broker.stats()["sessions_active"] == 0
    conn.close()


# Processes and threads

def test_a_connection_inherited_across_fork_fails_in_the_child_and_spares_the_parent(
        broker, admin, items):
    conn = dbapi.connect(broker.endpoint, timeout=15)
    cur = conn.cursor()
    cur.execute("UPDATE items SET name = 'parent' WHERE id = 1")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: the parent's connection is not its own
        code = 1
        try:
            try:
                cur.execute("UPDATE items SET name = 'child' WHERE id = 1")
            except dbapi.InterfaceError as exc:
                code = 0 if "inherited across fork" in str(exc) else 2
            for end in (conn.commit, conn.rollback):
                try:
                    end()
                    code = 3
                except dbapi.InterfaceError:
                    pass
            conn.close()  # forgets it, sends nothing
            del conn, cur
            fresh = dbapi.connect(broker.endpoint, timeout=15)
            if fresh.cursor().execute("SELECT 7").fetchone() != (7,):
                code = 4
            fresh.close()
        finally:
            os.write(write, bytes([code]))
            os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(read, 1) == b"\x00"
    cur.execute("UPDATE items SET qty = -1 WHERE id = 1")  # the transaction lives on
    conn.commit()
    assert admin.execute("SELECT name, qty FROM items WHERE id = 1").fetchone() == ("parent", -1)
    assert broker.stats()["sessions_active"] == 0


def test_a_transaction_belongs_to_the_thread_that_opened_it(broker, conn, admin, items):
    cur = conn.cursor()
    cur.execute("UPDATE items SET name = 'main' WHERE id = 1")
    errors = []

    def other() -> None:
        try:
            cur.execute("UPDATE items SET name = 'other' WHERE id = 1")
        except dbapi.InterfaceError as exc:
            errors.append(exc)

    thread = threading.Thread(target=other)
    thread.start()
    thread.join()
    assert len(errors) == 1 and "another thread" in str(errors[0])
    conn.commit()
    assert _names(admin)[1] == "main"
    # Between transactions a connection may move to another thread (as a pool does).
    thread = threading.Thread(target=lambda: cur.execute("SELECT 1") and conn.commit())
    thread.start()
    thread.join()
    assert not conn.in_transaction


def test_module_globals_and_exceptions(conn):
    assert (dbapi.apilevel, dbapi.threadsafety, dbapi.paramstyle) == ("2.0", 1, "pyformat")
    for name in ("Warning", "Error", "InterfaceError", "DatabaseError", "DataError",
                 "OperationalError", "IntegrityError", "InternalError", "ProgrammingError",
                 "NotSupportedError"):
        assert getattr(conn, name) is getattr(dbapi, name) is getattr(client, name)
    assert issubclass(client.BrokerUnavailable, dbapi.OperationalError)


def test_a_broker_that_is_not_there_is_reported_at_the_first_statement(tmp_path):
    conn = dbapi.connect("ipc:///tmp/pb-nowhere/b.sock", timeout=1)  # costs nothing yet
    with pytest.raises(dbapi.OperationalError) as failed:
        conn.cursor().execute("SELECT 1")
    assert isinstance(failed.value, client.BrokerUnavailable)
    assert not conn.in_transaction
    conn.close()


def test_rollback_to_savepoint_recovers_a_transaction_as_in_psycopg(broker, admin, items, dsn):
    """After an error the server holds the transaction aborted, and a
    ROLLBACK TO SAVEPOINT recovers it (SQLAlchemy's begin_nested() relies on
    it): the client must not refuse it on the server's behalf."""
    def run(connection, integrity_error: type) -> list:
        cur = connection.cursor()
        cur.execute("UPDATE items SET qty = 0 WHERE id = 1")
        cur.execute("SAVEPOINT before_insert")
        with pytest.raises(integrity_error):
            cur.execute("INSERT INTO items VALUES (2, 'again', 0)")
        cur.execute("ROLLBACK TO SAVEPOINT before_insert")
        cur.execute("UPDATE items SET qty = 0 WHERE id = 3")
        connection.commit()
        rows = admin.execute("SELECT id, qty FROM items WHERE id <= 3 ORDER BY id").fetchall()
        admin.execute("UPDATE items SET qty = id WHERE id <= 3")
        return rows

    with psycopg.connect(dsn) as direct:
        assert run(direct, psycopg.IntegrityError) == [(1, 0), (2, 2), (3, 0)]
    connection = dbapi.connect(broker.endpoint, timeout=15)
    try:
        assert run(connection, dbapi.IntegrityError) == [(1, 0), (2, 2), (3, 0)]
    finally:
        connection.close()


# Where psycopg (same database) or PEP 249 says what to do: each test found a
# difference in a review against psycopg, and failed before its fix.
@pytest.mark.parametrize("sql", ["SELECT 'infinity'::date", "SELECT 'infinity'::timestamptz",
                                 "SELECT '24:00'::time"])
def test_a_value_psycopg_cannot_load_is_a_data_error_as_in_psycopg(conn, dsn, sql):
    with psycopg.connect(dsn) as direct:
        with pytest.raises(psycopg.DataError):
            direct.execute(sql).fetchall()
    with pytest.raises(dbapi.DataError):  # was OperationalError 08006 "connection lost"
        conn.cursor().execute(sql)


def test_a_value_psycopg_cannot_load_leaves_the_transaction_usable(conn, dsn, items):
    """psycopg raises DataError while loading the row: the server's
    transaction is untouched and goes on (the broker used to drop the
    server connection, and the transaction's earlier work with it)."""
    cur = conn.cursor()
    cur.execute("UPDATE items SET name = 'kept' WHERE id = 1")
    with pytest.raises(dbapi.DataError):
        cur.execute("SELECT 'infinity'::date")
    cur.execute("SELECT name FROM items WHERE id = 1")
    assert cur.fetchall() == [("kept",)]
    conn.rollback()


def test_a_first_statement_whose_value_cannot_load_leaves_the_transaction_aborted(
        conn, admin, items):
    """The broker rolls back a transaction whose first statement failed; the
    error must say so (a SQLSTATE), or the statements after it would run in
    a new transaction and commit without the first (they used to)."""
    cur = conn.cursor()
    with pytest.raises(dbapi.DataError) as failed:
        cur.execute("UPDATE items SET qty = 0 WHERE id = 1 RETURNING 'infinity'::date")
    assert failed.value.sqlstate == "22000"
    with pytest.raises(dbapi.InternalError) as aborted:
        cur.execute("UPDATE items SET qty = 0 WHERE id = 2")
    assert aborted.value.sqlstate == "25P02"
    conn.commit()  # rolls back, as after any failed first statement
    assert admin.execute("SELECT count(*) FROM items WHERE qty = 0").fetchone() == (0,)


def test_a_value_psycopg_cannot_load_does_not_cost_a_server_connection(start_broker):
    """One server connection: the same backend answers before and after
    (had it been dropped, every statement pipelined on it would fail too)."""
    broker = start_broker(max_connections=1, min_connections=1)
    conn = dbapi.connect(broker.endpoint, timeout=15, autocommit=True)
    cur = conn.cursor()
    before = cur.execute("SELECT pg_backend_pid()").fetchone()
    with pytest.raises(dbapi.Error):
        cur.execute("SELECT 'infinity'::date")
    assert cur.execute("SELECT pg_backend_pid()").fetchone() == before
    conn.close()


def test_a_nul_in_a_text_parameter_is_a_data_error_as_in_psycopg(conn, dsn):
    with psycopg.connect(dsn) as direct:
        with pytest.raises(psycopg.DataError):
            direct.execute("SELECT %s", ["a\x00b"])
    with pytest.raises(dbapi.DataError):
        conn.cursor().execute("SELECT %s", ["a\x00b"])


def test_integers_beyond_64_bits_bind_as_numeric_as_in_psycopg(conn, dsn):
    big = [2 ** 70, -(2 ** 70)]
    with psycopg.connect(dsn) as direct:
        expected = direct.execute("SELECT %s, %s", big).fetchone()
    assert conn.cursor().execute("SELECT %s, %s", big).fetchone() == expected


def test_psycopg_sql_composables_and_bytes_are_accepted_as_queries(conn):
    """A drop-in for psycopg-style code meets psycopg.sql and bytes queries."""
    from psycopg import sql
    cur = conn.cursor()
    query = sql.SQL("SELECT {} AS {}").format(sql.Literal(1), sql.Identifier("x"))
    assert cur.execute(query).fetchall() == [(1,)]
    assert cur.execute(sql.SQL("SELECT %s"), [2]).fetchall() == [(2,)]
    assert cur.execute(b"SELECT 3").fetchall() == [(3,)]


def test_next_on_a_cursor_as_in_psycopg(conn):
    """PEP 249's iteration extension: __iter__ returns self, next() works."""
    cur = conn.cursor()
    cur.execute("SELECT generate_series(1, 3)")
    assert iter(cur) is cur
    assert next(cur) == (1,)
    assert cur.fetchone() == (2,)


def test_closing_a_connection_from_another_thread_rolls_its_transaction_back(
        broker, items, admin):
    """As psycopg's: the broker takes the ROLLBACK from another thread's
    socket of the same process (it used to keep the server connection
    pinned until idle_transaction_timeout)."""
    conn = dbapi.connect(broker.endpoint, timeout=15)
    conn.cursor().execute("UPDATE items SET qty = 0 WHERE id = 1")
    assert broker.stats()["sessions_active"] == 1
    errors: list[Exception] = []

    def close() -> None:
        try:
            conn.close()
        except dbapi.Error as exc:
            errors.append(exc)

    thread = threading.Thread(target=close)
    thread.start()
    thread.join()
    assert not errors and conn.closed
    assert broker.stats()["sessions_active"] == 0
    assert admin.execute("SELECT qty FROM items WHERE id = 1").fetchone() == (1,)


def test_closing_a_connection_ends_its_named_cursors_in_autocommit(broker, items):
    conn = dbapi.connect(broker.endpoint, timeout=15, autocommit=True)
    named = conn.cursor("pending")
    named.execute("SELECT generate_series(1, 1000)")  # more than itersize
    assert named.fetchone() is not None
    assert broker.stats()["sessions_active"] == 1
    conn.close()  # it used to stay open, and to fetch from a closed connection
    assert broker.stats()["sessions_active"] == 0
    with pytest.raises(dbapi.Error):
        named.fetchall()


def test_a_dropped_named_cursor_in_autocommit_frees_its_transaction(broker, items):
    conn = dbapi.connect(broker.endpoint, timeout=15, autocommit=True)
    named = conn.cursor("dropped")
    named.execute("SELECT generate_series(1, 1000)")  # more than itersize
    assert named.fetchone() == (1,)
    assert broker.stats()["sessions_active"] == 1
    del named
    gc.collect()
    assert broker.stats()["sessions_active"] == 0  # not at idle_transaction_timeout
    conn.close()


def test_error_diag_has_sqlstate_as_in_psycopg(conn, items):
    with pytest.raises(dbapi.IntegrityError) as failed:
        conn.cursor().execute("INSERT INTO items VALUES (1, 'dup', 0)")
    assert failed.value.diag.sqlstate == "23505"
    assert failed.value.diag.severity_nonlocalized == "ERROR"


def test_error_text_carries_the_detail_as_psycopgs(conn, dsn, items):
    with psycopg.connect(dsn) as direct, pytest.raises(psycopg.IntegrityError) as expected:
        direct.execute("INSERT INTO items VALUES (1, 'dup', 0)")
    with pytest.raises(dbapi.IntegrityError) as failed:
        conn.cursor().execute("INSERT INTO items VALUES (1, 'dup', 0)")
    assert "Key (id)=(1) already exists" in str(expected.value)
    assert "Key (id)=(1) already exists" in str(failed.value)


def test_scroll_past_the_last_row_raises_index_error_as_in_psycopg(conn):
    cur = conn.cursor()
    cur.execute("SELECT generate_series(1, 5)")
    cur.fetchmany(4)
    with pytest.raises(IndexError):
        cur.scroll(1)
    with pytest.raises(IndexError):
        cur.scroll(5, "absolute")


def test_date_and_time_from_ticks_agree_with_timestamp_from_ticks(monkeypatch):
    """psycopg: DateFromTicks(t) == TimestampFromTicks(t).date(), in UTC."""
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        ticks = 1_700_017_200  # 03:00 UTC, 22:00 the day before in New York
        stamp = dbapi.TimestampFromTicks(ticks)
        assert dbapi.DateFromTicks(ticks) == stamp.date() == psycopg.DateFromTicks(ticks)
        assert dbapi.TimeFromTicks(ticks) == stamp.time() == psycopg.TimeFromTicks(ticks)
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
    assert isinstance(stamp, dt.datetime)


def test_a_connection_collected_during_a_request_does_not_swallow_its_reply(broker):
    """A dropped connection in a reference cycle is finalized at whatever
    allocation runs the garbage collector: in the middle of another
    request's wait, its ROLLBACK would read that request's reply as stale
    and the request fail at its timeout.  It waits for the reply now."""
    outer = dbapi.connect(broker.endpoint, timeout=3, autocommit=True)
    cur = outer.cursor()
    cur.execute("SELECT 1")
    dropped = dbapi.connect(broker.endpoint, timeout=3)
    dropped.cursor().execute("SELECT 1")  # a transaction, on this thread's socket
    dropped.cycle = dropped
    del dropped
    owned = outer._client._local.owned
    recv, fired = owned.recv, []

    def collect_then_recv(*args, **kwargs):
        if not fired:  # once the reply is in: the worst moment
            fired.append(True)
            time.sleep(0.3)
            gc.collect()
        return recv(*args, **kwargs)

    owned.recv = collect_then_recv
    try:
        cur.execute("SELECT pg_sleep(0.1), 42")
        assert cur.fetchall() == [("", 42)]
    finally:
        owned.recv = recv
        outer.close()
    assert wait_until(lambda: broker.stats()["sessions_active"] == 0, 2)  # rolled back after
