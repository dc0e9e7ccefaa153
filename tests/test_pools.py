"""Several pools, one global cap: each ``[pools.NAME]`` table reaches its own
database with its own cap and queue, the pools together never hold more
than ``max_connections``, and none starves while that cap binds."""

from __future__ import annotations

import threading
import time

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

import client
from broker.pool import DEMAND_GRACE
from client import dbapi
from conftest import ConnectionSampler, Load, wait_until

REPORTS = "pbtest_reports"
SLOW = "SELECT pg_backend_pid() FROM pg_sleep(0.003)"


@pytest.fixture(scope="module")
def reports_dsn(pg) -> str:
    """A second database of the test cluster, for a second pool."""
    with psycopg.connect(pg.dsn, autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [REPORTS]).fetchone():
            conn.execute(f"CREATE DATABASE {REPORTS}")
    return make_conninfo(pg.dsn, dbname=REPORTS)


@pytest.fixture(scope="module")
def third_dsn(pg) -> str:
    with psycopg.connect(pg.dsn, autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = 'pbtest_third'").fetchone():
            conn.execute("CREATE DATABASE pbtest_third")
    return make_conninfo(pg.dsn, dbname="pbtest_third")


def _size(broker, pool: str) -> int:
    entry = next(e for e in broker.stats()["pools"] if e["pool"] == pool)
    return entry["sv_active"] + entry["sv_idle"] + entry["sv_login"] + entry["sv_tested"]


def _database_of(dsn: str) -> str:
    return conninfo_to_dict(dsn).get("dbname") or conninfo_to_dict(dsn).get("user") or ""


def test_each_pool_reaches_its_own_database(start_broker, dsn, reports_dsn):
    broker = start_broker(max_connections=4, pools={"reports": {"dsn": reports_dsn}})
    reports = client.Client(broker.endpoint, timeout=15, pool="reports")
    default = broker.client.execute("SELECT current_database()").rows[0][0]
    assert reports.execute("SELECT current_database()").rows == [(REPORTS,)]
    assert default != REPORTS
    with reports.transaction() as tx:
        assert tx.execute("SELECT current_database()").rows == [(REPORTS,)]
    conn = dbapi.connect(broker.endpoint, pool="reports")
    cur = conn.cursor()
    cur.execute("SELECT current_database()")
    assert cur.fetchall() == [(REPORTS,)]
    conn.close()
    sa = pytest.importorskip("sqlalchemy")
    engine = sa.create_engine(f"postgresql+poolbroker:///reports?endpoint={broker.endpoint}")
    with engine.connect() as connection:
        assert connection.scalar(sa.text("SELECT current_database()")) == REPORTS
    # The second pool's first connection, on the same server, left the first's alone.
    assert "terminated" not in broker.log()
    pools = {entry["pool"]: entry for entry in broker.stats()["pools"]}
    assert set(pools) == {"default", "reports"}
    assert pools["reports"]["pool_max"] == 4


def test_an_unknown_pool_is_an_error_that_names_the_pools(start_broker, reports_dsn):
    broker = start_broker(max_connections=2, pools={"reports": {"dsn": reports_dsn}})
    with pytest.raises(client.OperationalError) as caught:
        client.Client(broker.endpoint, timeout=5, pool="report").execute("SELECT 1")
    assert caught.value.sqlstate == "3D000"
    assert "no pool named 'report'" in str(caught.value)
    assert "'default', 'reports'" in str(caught.value)


def test_pools_without_a_default_dsn_need_a_name(start_broker, reports_dsn):
    broker = start_broker(dsn="", max_connections=2, pools={"reports": {"dsn": reports_dsn}})
    with pytest.raises(client.OperationalError, match="no default pool"):
        broker.client.execute("SELECT 1")
    assert client.Client(broker.endpoint, timeout=5, pool="reports") \
        .execute("SELECT current_database()").rows == [(REPORTS,)]


def test_caps_hold_per_pool_and_across_pools_under_load(start_broker, dsn, reports_dsn):
    broker = start_broker(max_connections=4, min_connections=0,
                          pools={"reports": {"dsn": reports_dsn, "max_connections": 2}})
    with ConnectionSampler(dsn, broker.application_name) as sampler:
        loads = [Load(broker.endpoint, 6, 3.0, sql=SLOW),
                 Load(broker.endpoint, 6, 3.0, sql=SLOW, pool="reports")]
        results = [load.finish() for load in loads]
    for done, errors, _ in results:
        assert errors == [] and done > 100, (done, errors[:3])
    print(f"\n[pools under load] {sampler.samples} samples: at most {sampler.maximum} "
          f"connections in all, by database {sampler.maximum_by_database}; requests "
          f"{[done for done, _, _ in results]}")
    assert sampler.maximum <= 4
    assert sampler.maximum_by_database.get(REPORTS, 0) <= 2
    assert sampler.maximum_by_database.get(REPORTS, 0) >= 1  # both were served
    assert sampler.maximum_by_database.get(_database_of(dsn), 0) >= 1


def test_no_pool_starves_while_the_global_cap_binds(start_broker, dsn, reports_dsn):
    # The default pool may take the whole cap, and does under its load;
    # reports, busy later, gets its share (1 of 2) and is served throughout.
    broker = start_broker(max_connections=2, min_connections=0, pool_timeout=10,
                          pools={"reports": {"dsn": reports_dsn}})
    busy = Load(broker.endpoint, 6, 4.0, sql=SLOW)
    assert wait_until(lambda: _size(broker, "default") == 2, 10)  # the whole cap
    with ConnectionSampler(dsn, broker.application_name) as sampler:
        reports = Load(broker.endpoint, 2, 2.5, sql=SLOW, pool="reports")
        (done, errors, _), (busy_done, busy_errors, _) = reports.finish(), busy.finish()
    print(f"\n[starvation] reports {done} requests, default {busy_done}; at most "
          f"{sampler.maximum} connections, by database {sampler.maximum_by_database}")
    assert errors == [] and busy_errors == [], (errors[:3], busy_errors[:3])
    assert done > 50 and busy_done > 50
    assert sampler.maximum <= 2
    assert broker.stats()["connections_recycled"] >= 1  # one made way for reports


def test_a_reload_resizes_pools_live_and_names_what_needs_a_restart(start_broker, reports_dsn):
    import signal

    broker = start_broker(max_connections=4, pools={"reports": {"dsn": reports_dsn}})
    text = broker.config.read_text()
    resized = text.replace("[pools.reports]\n", "[pools.reports]\nmax_connections = 1\n")
    broker.config.write_text(resized + '[pools.etl]\ndsn = "dbname=etl"\n')
    broker.proc.send_signal(signal.SIGHUP)
    assert wait_until(lambda: "only applied at a restart" in broker.log(), 5), broker.log()[-800:]
    pools = {entry["pool"]: entry for entry in broker.stats()["pools"]}
    assert set(pools) == {"default", "reports"} and pools["reports"]["pool_max"] == 4
    broker.config.write_text(resized)
    broker.proc.send_signal(signal.SIGHUP)
    assert wait_until(lambda: next(e for e in broker.stats()["pools"]
                                   if e["pool"] == "reports")["pool_max"] == 1, 5)
    # The same through poolbroker ctl: its answer names the sizes (a DSN
    # there crashed the broker: not packable, and a password in the log).
    broker.config.write_text(text.replace("[pools.reports]\n",
                                          "[pools.reports]\nmax_connections = 2\n"))
    answer = broker.client.control("reload")
    assert answer["applied"] == {"pools": {"reports": {"max_connections": 2,
                                                       "min_connections": 0}}}
    assert broker.client.execute("SELECT 1").rows == [(1,)]


def test_a_pool_whose_database_is_missing_takes_nothing_from_a_healthy_one(start_broker, dsn):
    # Its requests fail at once with the server's reason; it is no starved
    # pool for the rebalancing to serve with the healthy pool's connections.
    missing = make_conninfo(dsn, dbname="pbtest_no_such_database")
    broker = start_broker(max_connections=2, min_connections=0,
                          pools={"gone": {"dsn": missing}})
    load = Load(broker.endpoint, 4, 3.0, sql=SLOW)
    gone = client.Client(broker.endpoint, timeout=5, pool="gone")
    failures = 0
    deadline = time.monotonic() + 2.5
    while time.monotonic() < deadline:
        with pytest.raises(client.OperationalError) as caught:
            gone.execute("SELECT 1")
        assert caught.value.sqlstate == "3D000"
        failures += 1
        time.sleep(0.05)
    done, errors, _ = load.finish()
    assert errors == [] and done > 50 and failures > 10
    assert broker.stats()["connections_recycled"] == 0


def test_a_pool_used_now_and_then_keeps_its_connection_between_requests(start_broker,
                                                                       reports_dsn):
    # Cap 2, the default pool busy: a request on reports every 0.4 s must not
    # take a connection from the default pool each time, to give it back
    # as soon as reports is idle (a close and an open a request).
    broker = start_broker(max_connections=2, pools={"reports": {"dsn": reports_dsn}})
    load = Load(broker.endpoint, 4, 3.5, sql=SLOW, transaction_every=10**9)
    time.sleep(0.5)
    reports = client.Client(broker.endpoint, timeout=10, pool="reports")
    before = broker.stats()["connections_recycled"]
    for _ in range(6):
        assert reports.execute("SELECT 1").rows == [(1,)]
        time.sleep(0.4)
    recycled = broker.stats()["connections_recycled"] - before
    done, errors, _ = load.finish()
    assert errors == [] and recycled <= 2, recycled


def test_a_starved_pool_gets_an_idle_connection_before_a_transactions(start_broker,
                                                                      reports_dsn, third_dsn):
    # Cap 4: three long transactions on the default pool, one idle connection
    # of a pool with no work: reports gets that one, not a transaction's.
    broker = start_broker(max_connections=4, max_idle=0, pool_timeout=3,
                          pools={"reports": {"dsn": reports_dsn}, "third": {"dsn": third_dsn}})
    client.Client(broker.endpoint, timeout=5, pool="third").execute("SELECT 1")

    def long_transaction() -> None:
        with client.Client(broker.endpoint, timeout=30).transaction() as tx:
            tx.execute("SELECT pg_sleep(4)")

    holders = [threading.Thread(target=long_transaction) for _ in range(3)]
    for holder in holders:
        holder.start()
    try:
        assert wait_until(lambda: broker.stats()["sessions_active"] == 3, 5)
        time.sleep(DEMAND_GRACE)  # third's request is no longer recent work
        reports = client.Client(broker.endpoint, timeout=10, pool="reports")
        assert reports.execute("SELECT current_database()").rows == [(REPORTS,)]
    finally:
        for holder in holders:
            holder.join()
