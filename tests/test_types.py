"""What a client gets back equals what psycopg returns for the same query."""

from __future__ import annotations

import datetime as dt
import enum
import ipaddress
import uuid
from decimal import Decimal

import psycopg
import pytest

import client

UTC_PLUS_5_30 = dt.timezone(dt.timedelta(hours=5, minutes=30))

# (PostgreSQL type, a parameter of that type)
ROUND_TRIPS = [
    ("smallint", 32767),
    ("integer", -2147483648),
    ("bigint", 9223372036854775807),
    ("real", 1.5),
    ("double precision", 3.141592653589793),
    ("numeric", Decimal("12345678901234567890.123456789")),
    ("numeric", Decimal("-0.000001")),
    ("text", "héllo wörld ✓"),
    ("varchar", ""),
    ("boolean", True),
    ("boolean", False),
    ("bytea", b"\x00\x01\xffbinary"),
    ("date", dt.date(2024, 2, 29)),
    ("time", dt.time(23, 59, 59, 999999)),
    ("timetz", dt.time(12, 30, tzinfo=UTC_PLUS_5_30)),
    ("timestamp", dt.datetime(2001, 2, 3, 4, 5, 6, 7)),
    ("timestamptz", dt.datetime(2001, 2, 3, 4, 5, 6, tzinfo=UTC_PLUS_5_30)),
    ("interval", dt.timedelta(days=-3, seconds=7, microseconds=11)),
    ("uuid", uuid.UUID("12345678-1234-5678-1234-567812345678")),
    ("jsonb", {"a": [1, 2.5, None, True], "b": {"c": "d"}}),
    ("json", {"k": "v"}),
    ("integer[]", [1, 2, 3]),
    ("text[]", ["a", None, "c"]),
    ("numeric[]", [Decimal("1.1"), Decimal("2")]),
    ("date[]", [dt.date(2020, 1, 1)]),
    ("integer", None),
]


def _same(a, b) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, (dt.datetime, dt.time)):
        return a == b and a.utcoffset() == b.utcoffset() and (
            a.tzinfo == b.tzinfo or a.utcoffset() == b.utcoffset())
    if isinstance(a, Decimal) and a.is_nan():
        return b.is_nan()
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.fixture
def direct(dsn):
    with psycopg.connect(dsn, autocommit=True) as conn:
        yield conn


@pytest.mark.parametrize("pgtype,value", ROUND_TRIPS, ids=lambda v: str(v)[:20])
def test_round_trip_matches_psycopg(broker, direct, pgtype, value):
    sql = f"SELECT %s::{pgtype} AS v, pg_typeof(%s::{pgtype})::text AS t"
    param = psycopg.types.json.Jsonb(value) if pgtype in ("json", "jsonb") else value
    cursor = direct.execute(sql, [param, param])
    expected = cursor.fetchone()
    got = broker.client.execute(sql, [value, value])
    assert got.columns == ["v", "t"]
    assert _same(got.rows[0], expected), (got.rows[0], expected)
    # The column types travel too: the OIDs psycopg's description reports.
    assert got.types == [column.type_code for column in cursor.description]


def test_commands_have_no_types_and_every_statement_of_a_text_its_result(broker):
    c = broker.client
    assert c.execute("SELECT 1 WHERE false").types == [23]  # no rows, still typed
    command = c.execute("CREATE TABLE IF NOT EXISTS types_command (a int)")
    assert command.columns == [] and command.types == [] and not command.more_results
    first = c.execute("SELECT 1::int8 AS a; SELECT 'x'::text AS b, 2.5::float8 AS c; DO $$BEGIN END$$")
    assert (first.columns, first.types, first.rows) == (["a"], [20], [(1,)])
    second, third = first.more_results
    assert (second.columns, second.types, second.rows) == (["b", "c"], [25, 701], [("x", 2.5)])
    assert (third.columns, third.types, third.rowcount) == ([], [], -1)


def test_numeric_nan_and_infinity(broker, direct):
    sql = "SELECT 'NaN'::numeric, 'Infinity'::float8, '-Infinity'::numeric, %s::numeric"
    expected = direct.execute(sql, [Decimal("NaN")]).fetchone()
    got = broker.client.execute(sql, [Decimal("NaN")]).rows[0]
    assert _same(got, expected)


def test_timestamptz_keeps_the_session_zone(broker, direct):
    sql = "SELECT '2020-06-01 12:00:00+02'::timestamptz"
    (expected,) = direct.execute(sql).fetchone()
    (got,) = broker.client.execute(sql).rows[0]
    assert got == expected and got.tzinfo == expected.tzinfo


def test_json_lists_bind_with_the_wrapper(broker):
    got = broker.client.execute("SELECT %s::jsonb", [client.Json([1, {"a": 2}])]).rows
    assert got == [([1, {"a": 2}],)]


def test_other_types_come_back_as_text(broker, direct):
    sql = "SELECT '10.1.2.3/8'::inet, '[1,5)'::int4range, '(1,2)'::point"
    got = broker.client.execute(sql).rows[0]
    assert got == ("10.1.2.3/8", "[1,5)", "(1,2)")


def test_unsendable_parameter_is_a_clear_error(broker):
    with pytest.raises(client.InterfaceError, match="cannot send"):
        broker.client.execute("SELECT %s", [object()])
    assert broker.client.execute("SELECT 1").rows == [(1,)]


def test_python_enums_bind_as_in_psycopg_and_ip_addresses_are_refused(broker):
    class Color(enum.Enum):
        RED = "r"

    class Perm(enum.Flag):
        READ = 1

    assert broker.client.execute("SELECT %s::text", [Color.RED]).rows == [("RED",)]  # its name
    # Untyped text would compare as text ('10.0.0.9' > '10.0.0.10'): refused,
    # not answered wrong.  Perm(0) has no name to send (psycopg refuses it too).
    for value in (ipaddress.ip_address("10.0.0.9"), Perm(0)):
        with pytest.raises(client.InterfaceError, match="cannot send"):
            broker.client.execute("SELECT %s", [value])


def test_a_value_python_cannot_hold_is_a_data_error_and_costs_no_connection(start_broker):
    """psycopg: DataError at fetch ('timestamp too large (after year 10K)'), the
    connection and its transaction go on.  The broker used to close the server
    connection (08006) and fail every job pipelined on it."""
    broker = start_broker(max_connections=1)
    c = broker.client
    (pid,) = c.execute("SELECT pg_backend_pid()").rows[0]
    for sql in ("SELECT 'infinity'::timestamptz", "SELECT 'infinity'::date",
                "SELECT '24:00:00'::time", "SELECT '0099-01-01 BC'::date"):
        with pytest.raises(client.DataError):
            c.execute(sql)
    assert c.execute("SELECT pg_backend_pid()").rows[0] == (pid,)
    with c.transaction() as tx:
        tx.execute("SELECT 1")
        with pytest.raises(client.DataError):
            tx.execute("SELECT 'infinity'::timestamptz")
        assert tx.execute("SELECT 2").rows == [(2,)]  # the server's transaction goes on
    with c.transaction() as tx:  # a style psycopg cannot parse: it used to stop the broker
        tx.execute("SET LOCAL IntervalStyle = 'sql_standard'")
        with pytest.raises(client.NotSupportedError):
            tx.execute("SELECT '1 day 02:00'::interval")
        assert tx.execute("SELECT '1 day 02:00'::interval::text").rows == [("1 2:00:00",)]
    assert c.execute("SELECT '1 day'::interval").rows == [(dt.timedelta(days=1),)]
