"""No client ever sees another's session state, and what a client is told
is what happened: dirty transactions and batches in a row at cap 1, a
deadline landing on the reset, and session state or transaction control
hidden in any syntax outside a transaction."""

from __future__ import annotations

import re
import shutil
import sys
import threading
import time
from typing import Any

import psycopg
import pytest

import client
from conftest import OF_APPLICATION, BrokerProcess, thread_client

IDLE_IN_TRANSACTION = (f"SELECT count(*) FROM pg_stat_activity WHERE {OF_APPLICATION} "
                       "AND state IN ('idle in transaction', 'idle in transaction (aborted)')")



# Run through the broker at max_connections=1, so on the connection every
# earlier statement used.  Each yields one value; `clean` is what it must be.
SESSION_PROBES: list[tuple[str, str]] = [
    ("search_path", "SHOW search_path"),
    ("TimeZone", "SHOW TimeZone"),
    ("DateStyle", "SHOW DateStyle"),
    ("app.x", "SELECT coalesce(current_setting('app.x', true), '')"),
    ("app.tenant", "SELECT coalesce(current_setting('app.tenant', true), '')"),
    ("role", "SELECT current_user = session_user"),
    ("listening", "SELECT count(*) FROM pg_listening_channels()"),
    ("prepared by others",
     "SELECT count(*) FROM pg_prepared_statements WHERE NOT starts_with(name, '_pb_')"),
    ("advisory locks",
     "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()"),
    ("temp relations", "SELECT count(*) FROM pg_class WHERE relnamespace = pg_my_temp_schema()"),
    ("held cursors", "SELECT count(*) FROM pg_cursors WHERE is_holdable"),
]


def _idle_in_transaction(admin: psycopg.Connection, broker: BrokerProcess,
                         settle: float = 3.0) -> int:
    """The broker's server connections idle inside a transaction, once settled
    (a connection the broker has just closed may linger a moment)."""
    deadline = time.monotonic() + settle
    while True:
        count = admin.execute(IDLE_IN_TRANSACTION, [broker.application_name]).fetchone()[0]
        if count == 0 or time.monotonic() > deadline:
            return count
        time.sleep(0.02)


class CapOneBroker:
    """A broker at max_connections=1 shared by a module's tests, replaced as
    soon as one leaves its session dirty, so one leak fails one test."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.broker: BrokerProcess | None = None
        self.clean: dict[str, Any] = {}

    def get(self) -> BrokerProcess:
        if self.broker is None:
            self.broker = BrokerProcess(self.dsn, max_connections=1,
                                        idle_transaction_timeout=2).start()
            c = self.broker.client
            # The fresh connection's own values are the clean ones.
            self.clean = {name: c.execute(sql, timeout=10).rows[0][0]
                          for name, sql in SESSION_PROBES}
            self.clean.update({"app.x": "", "app.tenant": "", "role": True, "listening": 0,
                               "prepared by others": 0, "advisory locks": 0,
                               "temp relations": 0, "held cursors": 0})
        return self.broker

    def problems(self, admin: psycopg.Connection) -> list[str]:
        """What differs from a clean session on the broker's one connection."""
        broker = self.get()
        found = []
        try:
            for name, sql in SESSION_PROBES:
                value = broker.client.execute(sql, timeout=10).rows[0][0]
                if value != self.clean[name]:
                    found.append(f"{name} = {value!r} (clean: {self.clean[name]!r})")
        except client.Error as exc:
            found.append(f"probe failed: {type(exc).__name__}: {exc}")
        in_transaction = _idle_in_transaction(admin, broker)
        if in_transaction:
            found.append(f"{in_transaction} server connection(s) idle in a transaction")
        return found

    def discard(self) -> None:
        if self.broker is not None:
            self.broker.stop()
            shutil.rmtree(self.broker.dir, ignore_errors=True)
            self.broker = None


@pytest.fixture(scope="module")
def cap_one(dsn: str) -> CapOneBroker:
    holder = CapOneBroker(dsn)
    yield holder
    holder.discard()


@pytest.fixture
def shared(cap_one: CapOneBroker, admin: psycopg.Connection) -> CapOneBroker:
    cap_one.get()
    yield cap_one
    if cap_one.problems(admin):  # the test failed on it: the next one starts afresh
        cap_one.discard()


@pytest.fixture
def other(shared: CapOneBroker) -> client.Client:
    """Another client of the shared broker: the next one to get its only connection."""
    with thread_client(shared.broker.endpoint, 15) as c:
        yield c


def _assert_clean(shared: CapOneBroker, admin: psycopg.Connection, after: str) -> None:
    problems = shared.problems(admin)
    assert problems == [], f"after {after!r} the next client sees: {problems}"


@pytest.fixture
def tenant_rows(admin: psycopg.Connection) -> None:
    admin.execute("DROP TABLE IF EXISTS tenant_rows")
    admin.execute("CREATE TABLE tenant_rows (n int PRIMARY KEY, tenant text NOT NULL)")


def _committed(admin: psycopg.Connection) -> dict[int, str]:
    return dict(admin.execute("SELECT n, tenant FROM tenant_rows").fetchall())


def _next_client_sees(other: client.Client, temp_table: str) -> list[str]:
    """What another client, on the same (only) server connection, sees of the last one."""
    try:
        seen = []
        setting = other.execute("SELECT current_setting('app.tenant', true)").rows[0][0]
        if setting not in ("", None):
            seen.append(f"app.tenant={setting!r}")
        if other.execute(f"SELECT to_regclass('pg_temp.{temp_table}')").rows != [(None,)]:
            seen.append(f"temp table {temp_table}")
        temp = other.execute("SELECT count(*) FROM pg_class "
                             "WHERE relnamespace = pg_my_temp_schema()").rows[0][0]
        if temp:
            seen.append(f"{temp} temp relations")
        return seen
    except client.Error as exc:
        return [f"an error: {type(exc).__name__}: {exc}"]


# Dirty transactions and batches in a row


DIRTY_ROUNDS = 24


def test_dirty_transactions_in_a_row_at_cap_1_are_truthful_and_never_leak(
        shared, admin, tenant_rows, other):
    c = shared.get().client
    told: dict[int, bool] = {}
    leaks: list[str] = []
    for n in range(DIRTY_ROUNDS):
        try:
            with c.transaction(timeout=10) as tx:
                tx.execute("SELECT set_config('app.tenant', %s, false)", [f"t{n}"])
                if n % 2:
                    tx.execute("CREATE TEMP TABLE tt (n int)")
                    tx.execute("INSERT INTO tt VALUES (%s)", [n])
                tx.execute("INSERT INTO tenant_rows VALUES (%s, current_setting('app.tenant'))",
                           [n])
                assert tx.execute("SELECT current_setting('app.tenant')").rows == [(f"t{n}",)]
            told[n] = True
        except client.Error as exc:
            told[n] = False
            leaks.append(f"round {n}: {type(exc).__name__}: {exc}")
        leaks += [f"after round {n} the next client sees {x}"
                  for x in _next_client_sees(other, "tt")]
    committed = _committed(admin)
    assert {n for n, ok in told.items() if ok} == set(committed), "told committed != committed"
    assert committed == {n: f"t{n}" for n in committed}
    assert leaks == []
    assert len(committed) == DIRTY_ROUNDS  # nothing here had a reason to fail
    _assert_clean(shared, admin, "dirty transactions")


def test_dirty_batches_in_a_row_at_cap_1_are_truthful_and_never_leak(
        shared, admin, tenant_rows, other):
    c = shared.get().client
    told: dict[int, bool] = {}
    leaks: list[str] = []
    for n in range(DIRTY_ROUNDS):
        statements: list[Any] = [("SELECT set_config('app.tenant', %s, false)", [f"t{n}"])]
        if n % 2:
            statements.append("CREATE TEMP TABLE tt (n int)")
        statements += [
            ("INSERT INTO tenant_rows VALUES (%s, current_setting('app.tenant'))", [n]),
            "SELECT current_setting('app.tenant')",
        ]
        try:
            results = c.batch(statements, timeout=10)
            told[n] = True
            assert results[0].rows == [(f"t{n}",)] and results[-1].rows == [(f"t{n}",)]
        except client.Error as exc:
            told[n] = False
            leaks.append(f"round {n}: {type(exc).__name__}: {exc}")
        leaks += [f"after round {n} the next client sees {x}"
                  for x in _next_client_sees(other, "tt")]
    committed = _committed(admin)
    assert {n for n, ok in told.items() if ok} == set(committed), "told committed != committed"
    assert leaks == []
    assert len(committed) == DIRTY_ROUNDS
    _assert_clean(shared, admin, "dirty batches")


# A deadline landing during the reset


SHORT_TIMEOUTS = [0.001, 0.002, 0.003, 0.005, 0.01, 0.02, 0.05]

# Thirty more temp tables make the reset (DISCARD ALL drops them) take a while.
MANY_TEMP_TABLES = ("DO $$BEGIN FOR i IN 1..30 LOOP "
                    "EXECUTE format('CREATE TEMP TABLE tt_many_%s (n int)', i); END LOOP; END$$")


def _outcome(exc: BaseException | None) -> str:
    if exc is None:
        return "committed"
    if isinstance(exc, client.BrokerUnavailable) and exc.outcome_unknown:
        return "unknown"
    return "failed"


def test_a_deadline_landing_on_the_reset_of_a_dirty_transaction_is_truthful(
        shared, admin, tenant_rows, other):
    c = shared.get().client
    told: dict[int, str] = {}
    leaks: list[str] = []
    n = 0
    for _ in range(3):
        for short in SHORT_TIMEOUTS:
            n += 1
            # BEGIN gets the same short timeout: retry until it gets in.
            for _attempt in range(50):
                tx = c.transaction(timeout=short)
                try:
                    tx.__enter__()
                    break
                except client.OperationalError:  # PoolTimeout, QueryCanceled...
                    continue
            else:
                continue  # never got a connection in time: nothing to check this round
            try:
                tx.execute("CREATE TEMP TABLE tt_deadline (n int)", timeout=10)
                tx.execute(MANY_TEMP_TABLES, timeout=10)
                tx.execute("SELECT set_config('app.tenant', 'deadline', false)", timeout=10)
                tx.execute("INSERT INTO tenant_rows VALUES (%s, 'deadline')", [n], timeout=10)
            except client.Error as exc:  # e.g. tt_deadline left over from an earlier round
                leaks.append(f"round {n}: in the transaction: {type(exc).__name__}: {exc}")
                tx.__exit__(*sys.exc_info())
                continue
            try:
                tx.__exit__(None, None, None)  # COMMIT, with `short` as its deadline
                told[n] = _outcome(None)
            except client.Error as exc:
                told[n] = _outcome(exc)
            leaks += [f"after round {n} ({short} s, told {told[n]}) the next client sees {x}"
                      for x in _next_client_sees(other, "tt_deadline")]
    assert told, "no transaction ever began"
    committed = set(_committed(admin))
    lies = [(k, v) for k, v in told.items()
            if (v == "committed" and k not in committed) or (v == "failed" and k in committed)]
    counts = {o: sum(v == o for v in told.values()) for o in ("committed", "failed", "unknown")}
    print(f"\n[deadline on reset] outcomes: {counts}")
    assert lies == [], f"told the opposite of what happened: {lies}"
    assert leaks == []
    _assert_clean(shared, admin, "transactions whose COMMIT had a short deadline")


def test_a_deadline_landing_on_the_reset_of_a_dirty_batch_is_truthful(
        shared, admin, tenant_rows, other):
    c = shared.get().client
    told: dict[int, str] = {}
    leaks: list[str] = []
    n = 0
    for _ in range(3):
        for short in SHORT_TIMEOUTS:
            n += 1
            try:
                c.batch(["CREATE TEMP TABLE tt_deadline (n int)", MANY_TEMP_TABLES,
                         "SELECT set_config('app.tenant', 'deadline', false)",
                         ("INSERT INTO tenant_rows VALUES (%s, 'deadline')", [n])],
                        timeout=short)
                told[n] = _outcome(None)
            except client.Error as exc:
                told[n] = _outcome(exc)
            leaks += [f"after round {n} ({short} s, told {told[n]}) the next client sees {x}"
                      for x in _next_client_sees(other, "tt_deadline")]
    committed = set(_committed(admin))
    lies = [(k, v) for k, v in told.items()
            if (v == "committed" and k not in committed) or (v == "failed" and k in committed)]
    counts = {o: sum(v == o for v in told.values()) for o in ("committed", "failed", "unknown")}
    print(f"\n[deadline on a batch's reset] outcomes: {counts}")
    assert lies == [], f"told the opposite of what happened: {lies}"
    assert leaks == []
    _assert_clean(shared, admin, "batches with a short deadline")


# Hidden session state and transaction control, outside a transaction

STATE = "refused: session state"
TXN = "refused: transaction control"
RUNS = "runs, then reset"
EITHER = "runs or refused, then reset"

VECTORS: list[tuple[str, str]] = [
    # set_config(..., false) by any spelling
    ("SELECT set_config('app.x', 'leak', false)", STATE),
    ('SELECT "set_config"(\'app.x\', \'leak\', false)', STATE),
    ("SELECT pg_catalog.set_config('app.x', 'leak', false)", STATE),
    ('SELECT "pg_catalog"."set_config"(\'app.x\', \'leak\', false)', STATE),
    ('SeLeCt "set_config"(\'search_path\', \'x\', false)', STATE),
    ("SELECT SET_CONFIG('app.x', 'leak', FALSE)", STATE),
    ("SELECT set_config('app.x', 'leak', 1 = 0)", STATE),
    ("SELECT set_config(k, v, false) FROM (VALUES ('app.x', 'leak')) AS s(k, v)", STATE),
    ("SELECT * FROM set_config('app.x', 'leak', false)", STATE),
    ("WITH s AS (SELECT set_config('app.x', 'leak', false)) SELECT * FROM s", STATE),
    ("SELECT 1 WHERE set_config('app.x', 'leak', false) IS NOT NULL", STATE),
    ("VALUES (set_config('app.x', 'leak', false))", STATE),
    ("EXPLAIN ANALYZE SELECT set_config('app.x', 'leak', false)", STATE),
    ("SELECT 1; SELECT set_config('app.x', 'leak', false)", STATE),
    ("SELECT E'\\''; SELECT set_config('app.x', 'leak', false)", STATE),
    ("SELECT set_config('TimeZone', 'Asia/Tokyo', false)", STATE),
    # SET and RESET
    ("SET search_path TO nowhere", STATE),
    ("set /* comment */ search_path = nowhere", STATE),
    ("SET SESSION search_path TO nowhere", STATE),
    ("SET TIME ZONE 'Asia/Tokyo'", STATE),
    ("SET ROLE NONE", STATE),
    ("RESET search_path", STATE),
    ("SELECT 1; SET app.x = 'leak'", STATE),
    # LISTEN, PREPARE, DEALLOCATE, cursors WITH HOLD, DISCARD, LOAD
    ("LISTEN leak_channel", STATE),
    ('LISTEN "Leak Channel"', STATE),
    ("/* comment */ listen leak_channel", STATE),
    ("PREPARE leak AS SELECT 1", STATE),
    ('prepare "Leak"(int) AS SELECT $1', STATE),
    ("DEALLOCATE ALL", STATE),
    ("DECLARE leak_cursor CURSOR WITH HOLD FOR SELECT 1", STATE),
    ("DISCARD ALL", STATE),
    ("DISCARD TEMP", STATE),
    ("LOAD 'auto_explain'", STATE),
    # temporary objects by any syntax
    ("CREATE TEMP TABLE tt (n int)", STATE),
    ("CREATE TEMPORARY TABLE tt (n int)", STATE),
    ("create local temp table tt (n int)", STATE),
    ("CREATE GLOBAL TEMPORARY TABLE tt (n int)", STATE),
    ("CREATE /* comment */ TEMP TABLE tt (n int)", STATE),
    ("CREATE TEMP TABLE tt AS SELECT 1 AS n", STATE),
    ("CREATE TABLE pg_temp.tt (n int)", STATE),
    ('CREATE TABLE "pg_temp".tt (n int)', STATE),
    ("CREATE TABLE pg_temp.tt AS SELECT 1 AS n", STATE),
    ("SELECT 1 AS n INTO TEMP tt", STATE),
    ("SELECT 1 AS n INTO TEMPORARY TABLE tt", STATE),
    ("WITH x AS (SELECT 1 AS n) SELECT * INTO TEMP tt FROM x", STATE),
    ("CREATE TEMP VIEW tv AS SELECT 1 AS n", STATE),
    ("CREATE VIEW pg_temp.tv AS SELECT 1 AS n", STATE),
    ("CREATE TEMP SEQUENCE ts", STATE),
    ("CREATE FUNCTION pg_temp.leak() RETURNS int LANGUAGE sql AS 'SELECT 1'", STATE),
    ("EXPLAIN ANALYZE CREATE TEMP TABLE tt AS SELECT 1 AS n", STATE),
    # session advisory locks
    ("SELECT pg_advisory_lock(42)", STATE),
    ('SELECT "pg_advisory_lock"(42)', STATE),
    ("SELECT pg_catalog.pg_try_advisory_lock(42)", STATE),
    ("SELECT pg_advisory_lock_shared(42)", STATE),
    ("SELECT pg_try_advisory_lock_shared(1, 2)", STATE),
    ("SELECT count(*) FROM (SELECT pg_advisory_lock(42)) s", STATE),
    # transaction control by any spelling
    ("BEGIN", TXN),
    ("begin work", TXN),
    ("  \n\tBegin Transaction", TXN),
    ("START TRANSACTION ISOLATION LEVEL SERIALIZABLE", TXN),
    ("COMMIT", TXN),
    ("END", TXN),
    ("ABORT", TXN),
    ("ROLLBACK", TXN),
    ("select 1; begin", TXN),
    ("SELECT 1;BEGIN", TXN),
    ("SELECT 1;; BEGIN", TXN),
    ("BEGIN; SELECT 1", TXN),
    ("SELECT E'\\''; BEGIN", TXN),
    ("SELECT e'\\\\'; BEGIN", TXN),
    ("SELECT 'it''s'; BEGIN", TXN),
    ("SELECT $$'$$; BEGIN", TXN),
    ("SELECT $q$;'$q$; START TRANSACTION", TXN),
    ('SELECT 1 AS "a""b"; BEGIN', TXN),
    ("/* comment */ BEGIN", TXN),
    ("/* nested /* comment */ ; */ BEGIN", TXN),
    ("-- comment\nBEGIN", TXN),
    ("SELECT 1 /* ; */; BEGIN", TXN),
    ("SELECT 1; COMMIT; BEGIN", TXN),
    # DO blocks run outside a transaction, and the connection is reset after
    ("DO $$BEGIN PERFORM set_config('app.x', 'leak', false); END$$", RUNS),
    ("DO $$BEGIN SET search_path TO nowhere; END$$", RUNS),
    ("DO $$BEGIN CREATE TEMP TABLE tt (n int); END$$", RUNS),
    ("DO $$BEGIN PERFORM pg_advisory_lock(42); END$$", RUNS),
    ("DO $$BEGIN EXECUTE 'LISTEN leak_channel'; END$$", RUNS),
    ("DO $$BEGIN EXECUTE 'PREPARE leak AS SELECT 1'; END$$", RUNS),
    ("DO $do$BEGIN EXECUTE 'SET TimeZone = ' || quote_literal('Asia/Tokyo'); END$do$", RUNS),
    # what no parser sees: a user function changing a parameter PostgreSQL reports
    ("SELECT isolation_leak_timezone()", EITHER),
    ("SELECT isolation_leak_datestyle()", EITHER),
    # look like session state or transaction control, are not: must run
    ("SELECT 'SET search_path TO x; BEGIN; LISTEN y'", RUNS),
    ("SELECT E'\\'; BEGIN'", RUNS),
    ("SELECT $$ ; BEGIN $$", RUNS),
    ("SELECT 1 -- BEGIN", RUNS),
    ("SELECT s.set_config FROM (VALUES ('v')) AS s(set_config)", RUNS),
    ('SELECT "begin" FROM (SELECT 1 AS "begin") s', RUNS),
    ("SELECT set_config('app.x', 'transaction only', true)", RUNS),
    ("SELECT pg_advisory_xact_lock(7)", RUNS),
    ("SELECT count(*) FROM pg_prepared_statements", RUNS),
    ("DO $$BEGIN PERFORM 1; END$$", RUNS),
    ("SET LOCAL search_path TO nowhere", RUNS),
]


@pytest.fixture(scope="module")
def leaky_functions(dsn: str) -> None:
    """User functions that change a reported parameter (TimeZone, DateStyle)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE OR REPLACE FUNCTION isolation_leak_timezone() RETURNS int "
                     "LANGUAGE plpgsql AS $$BEGIN SET TimeZone = 'Asia/Tokyo'; RETURN 1; END$$")
        conn.execute("CREATE OR REPLACE FUNCTION isolation_leak_datestyle() RETURNS int "
                     "LANGUAGE plpgsql AS "
                     "$$BEGIN PERFORM set_config('DateStyle', 'SQL, DMY', false); RETURN 1; END$$")


@pytest.mark.parametrize("sql, expected", VECTORS, ids=[
    f"{i:03d}-" + re.sub(r"\W+", "_", sql).strip("_")[:48] for i, (sql, _) in enumerate(VECTORS)])
def test_hidden_session_state_or_transaction_control_outside_a_transaction(
        shared, admin, leaky_functions, sql, expected):
    c = shared.get().client
    outcome: BaseException | None = None
    try:
        c.execute(sql, timeout=10)
    except client.Error as exc:
        outcome = exc
    if expected == STATE:
        assert isinstance(outcome, client.SessionStateRefused), f"{sql!r}: {outcome!r}"
    elif expected == TXN:
        assert isinstance(outcome, client.ProgrammingError), f"{sql!r}: {outcome!r}"
    elif expected == RUNS:
        assert outcome is None, f"{sql!r}: {outcome!r}"
    else:
        assert outcome is None or isinstance(outcome, client.NotSupportedError), (
            f"{sql!r}: {outcome!r}")
    _assert_clean(shared, admin, sql)
    # And the only connection serves a plain statement at once.
    assert c.execute("SELECT %s::int", [7], timeout=10).rows == [(7,)]


def test_session_state_inside_a_transaction_is_allowed_and_reset_after(shared, admin):
    c = shared.get().client
    with c.transaction(timeout=10) as tx:
        for sql in ("SET search_path TO nowhere", "SELECT set_config('app.x', 'leak', false)",
                    "LISTEN leak_channel", "PREPARE leak AS SELECT 1",
                    "DECLARE leak_cursor CURSOR WITH HOLD FOR SELECT 1",
                    "CREATE TEMP TABLE tt (n int)", "SELECT pg_advisory_lock(42)",
                    "SET TimeZone = 'Asia/Tokyo'", "SET ROLE NONE"):
            tx.execute(sql)
        assert tx.execute("SHOW search_path").rows == [("nowhere",)]
    _assert_clean(shared, admin, "a transaction full of session state")
    c.batch(["SET search_path TO nowhere", "SELECT pg_advisory_lock(42)",
             "CREATE TEMP TABLE tt (n int)", "LISTEN leak_channel"], timeout=10)
    _assert_clean(shared, admin, "a batch full of session state")


# Hidden BEGINs while others write: no acknowledged write is lost

HIDDEN_BEGINS = [sql for sql, kind in VECTORS if kind == TXN and "COMMIT" not in sql
                 and sql.strip().upper() not in ("END", "ABORT", "ROLLBACK")]


def test_hidden_transaction_control_never_loses_an_acknowledged_write(start_broker, admin):
    admin.execute("DROP TABLE IF EXISTS acknowledged")
    admin.execute("CREATE TABLE acknowledged (id int PRIMARY KEY)")
    broker = start_broker(max_connections=1)  # every client shares one server connection
    acknowledged: list[int] = []
    failed: list[str] = []
    not_refused: list[str] = []

    def writer(w: int) -> None:
        with thread_client(broker.endpoint, 10) as c:
            for i in range(60):
                key = w * 1000 + i
                try:
                    c.execute("INSERT INTO acknowledged VALUES (%s)", [key])
                    acknowledged.append(key)
                except client.Error as exc:
                    failed.append(f"{key}: {type(exc).__name__}: {exc}")

    def attacker() -> None:
        with thread_client(broker.endpoint, 10) as c:
            for _ in range(3):
                for sql in HIDDEN_BEGINS:
                    try:
                        c.execute(sql)
                        not_refused.append(sql)
                    except client.ProgrammingError:
                        pass
                    except client.Error as exc:
                        not_refused.append(f"{sql!r}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(3)]
    threads.append(threading.Thread(target=attacker))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    broker.client.execute("SELECT 1")
    present = {row[0] for row in admin.execute("SELECT id FROM acknowledged")}
    lost = sorted(set(acknowledged) - present)
    assert lost == [], f"{len(lost)} acknowledged writes are not in the table"
    assert _idle_in_transaction(admin, broker) == 0
    assert not_refused == []
    assert failed == []
    assert len(acknowledged) == 180
