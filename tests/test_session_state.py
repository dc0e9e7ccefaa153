"""No session state leaks between clients sharing a server connection."""

from __future__ import annotations

import datetime as dt

import pytest

import client

REFUSED_OUTSIDE_A_TRANSACTION = [
    "SET search_path TO nowhere",
    "set statement_timeout = 1",
    "LISTEN some_channel",
    "PREPARE p AS SELECT 1",
    "CREATE TEMP TABLE tt (n int)",
    "SELECT pg_advisory_lock(42)",
    "SELECT set_config('search_path', 'nowhere', false)",
    "SELECT 1; SET search_path TO nowhere",
    "RESET ALL",
]


@pytest.mark.parametrize("sql", REFUSED_OUTSIDE_A_TRANSACTION)
def test_session_state_is_refused_outside_a_transaction(broker, sql):
    with pytest.raises(client.SessionStateRefused) as excinfo:
        broker.client.execute(sql)
    assert "client.transaction()" in str(excinfo.value)
    assert broker.client.execute("SELECT 1").rows == [(1,)]  # still serving


def test_transaction_scoped_forms_are_allowed(broker):
    with broker.client.transaction() as tx:
        tx.execute("SET LOCAL search_path TO pg_catalog")
        tx.execute("SELECT pg_advisory_xact_lock(7)")
    assert broker.client.execute("SELECT 'set search_path; listen x'").rows == [
        ("set search_path; listen x",)]


def test_transaction_control_is_refused(broker):
    for sql in ("BEGIN", "COMMIT", "ROLLBACK", "start transaction"):
        with pytest.raises(client.ProgrammingError, match="client.transaction"):
            broker.client.execute(sql)


def test_session_state_set_in_a_transaction_is_reset(start_broker, admin):
    broker = start_broker(max_connections=1)  # everyone gets the same connection
    c = broker.client
    default_path = c.execute("SHOW search_path").rows[0][0]
    with c.transaction() as tx:
        tx.execute("SET search_path TO nowhere")
        tx.execute("CREATE TEMP TABLE tt (n int)")
        tx.execute("SELECT pg_advisory_lock(4242)")
        tx.execute("LISTEN some_channel")
        assert tx.execute("SHOW search_path").rows == [("nowhere",)]
    assert c.execute("SHOW search_path").rows == [(default_path,)]
    assert c.execute("SELECT to_regclass('pg_temp.tt')").rows == [(None,)]
    assert c.execute("SELECT count(*) FROM pg_listening_channels()").rows == [(0,)]
    locks = admin.execute(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = 4242").fetchone()
    assert locks == (0,)


def test_a_set_local_timezone_neither_sticks_to_the_connection_nor_is_ignored(start_broker):
    """psycopg loads timestamptz in the session's TimeZone of the moment; the
    broker's loaders, made once per server connection, used to keep the zone
    of the first timestamptz they read: one client's SET LOCAL then chose
    every later client's zone, or was ignored inside its own transaction."""
    broker = start_broker(max_connections=1)
    c = broker.client
    stamp = "SELECT '2020-01-01 00:00+00'::timestamptz"
    assert c.execute(stamp).rows[0][0].utcoffset() == dt.timedelta(0)
    with c.transaction() as tx:
        tx.execute("SET LOCAL timezone = 'Asia/Tokyo'")
        assert tx.execute(stamp).rows[0][0].utcoffset() == dt.timedelta(hours=9)
    assert c.execute(stamp).rows[0][0].utcoffset() == dt.timedelta(0)
