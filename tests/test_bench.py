"""poolbroker bench runs every target and reports honestly; figures belong to
the bench itself, so these tests check behaviour, never speed."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import psycopg
import pytest

from broker import bench
from conftest import REPO

CAP = 2


def bench_command(dsn: str, *args: str) -> subprocess.CompletedProcess:
    """``poolbroker bench`` on the test database, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "broker.cli", "bench", "--dsn", dsn, *args],
                          capture_output=True, text=True, timeout=300, cwd=REPO)


def test_bench_runs_every_target_within_the_cap(dsn, tmp_path):
    out = tmp_path / "bench.json"
    result = bench_command(dsn, "--workloads", "select1,txn", "--processes", "3",
                           "--threads", "2", "--cap", str(CAP), "--duration", "0.5",
                           "--json", str(out))
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())["rows"]
    targets = {(r["workload"], r["target"]) for r in rows}
    expected = {("select1", "broker"), ("select1", "direct"), ("txn", "broker"),
                ("txn", "broker-tx"), ("txn", "direct"), ("txn", "direct-pipeline")}
    assert expected <= targets
    pgbouncer = [r for r in rows if r["target"].startswith("pgbouncer")]
    assert len(pgbouncer) == 3  # select1, txn and txn in pipeline mode
    if bench.find_pgbouncer():  # make test installs it when it can
        assert not any(r["skipped"] for r in pgbouncer)
    for r in rows:
        if r["skipped"]:
            assert r["target"].startswith("pgbouncer") and "not installed" in r["skipped"]
            continue
        assert r["operations"] > 0 and r["errors"] == 0, r
        assert r["p50_ms"] <= r["p99_ms"]
        direct = r["target"].startswith("direct")
        if not direct:
            assert 0 < r["max_server_connections"] <= CAP, r
        assert r["vs_direct"] is not None
        # CPU per request: the clients' always, the broker's (or PgBouncer's)
        # where there is one between them and PostgreSQL.
        assert r["client_cpu_us"] > 0, r
        assert (r["broker_cpu_us"] is None) == direct, r
    for line in ("ops/s", "vs pgbouncer", "select1", "broker-tx", "client us/req",
                 "broker us/req"):
        assert line in result.stdout


def test_missing_pgbouncer_is_reported_not_fatal(dsn):
    plan = bench.Plan(workloads=("select1",), targets=("pgbouncer", "direct"), processes=1,
                      duration=0.2, dsn=dsn, pgbouncer="/nonexistent/pgbouncer")
    rows = bench.run(plan)
    assert rows[0].skipped.startswith("pgbouncer not installed")
    assert rows[1].operations > 0 and rows[1].vs_pgbouncer is None
    assert "not run: pgbouncer not installed" in bench.format_table(rows)


def test_baseline_checkout_runs_right_after_this_broker(dsn):
    # This checkout as its own baseline: the A/B machinery, not a comparison.
    plan = bench.Plan(workloads=("select1",), targets=("broker",), processes=1,
                      duration=0.2, cap=CAP, dsn=dsn, baseline=str(REPO))
    rows = bench.run(plan)
    assert [r.target for r in rows] == ["broker", "baseline-broker"]
    assert all(r.operations > 0 and r.errors == 0 for r in rows)


def test_rounds_give_one_row_per_target_with_each_rounds_ratio(dsn):
    plan = bench.Plan(workloads=("select1",), targets=("broker", "direct"), processes=1,
                      duration=0.2, cap=CAP, dsn=dsn, baseline=str(REPO), rounds=3)
    rows = bench.run(plan)
    # The first round's order, whatever order the later rounds ran in.
    assert [r.target for r in rows] == ["broker", "baseline-broker", "direct"]
    assert all(r.rounds == 3 and r.errors == 0 and r.operations > 0 for r in rows)
    direct = rows[-1]
    assert direct.vs_direct == 1.0 and direct.vs_direct_rounds == [1.0, 1.0, 1.0]
    broker = rows[0]
    assert len(broker.vs_direct_rounds) == 3
    assert broker.vs_direct == sorted(broker.vs_direct_rounds)[1]
    low, high = min(broker.vs_direct_rounds), max(broker.vs_direct_rounds)
    spread = f" ({low:.2f}-{high:.2f})" if low != high else ""
    assert f"{broker.vs_direct:.2f}x{spread}" in bench.format_table(rows)


def test_max_conns_counts_only_the_target_measured(dsn):
    # Idle sessions of someone else on the same database: before the count
    # filtered by application_name they showed as the broker's connections.
    others = [psycopg.connect(dsn, application_name="someone-else") for _ in range(CAP + 3)]
    try:
        plan = bench.Plan(workloads=("select1",), targets=("broker", "direct"), processes=1,
                          duration=0.2, cap=CAP, dsn=dsn)
        rows = {r.target: r for r in bench.run(plan)}
    finally:
        for conn in others:
            conn.close()
    assert 0 < rows["broker"].max_server_connections <= CAP
    assert rows["direct"].max_server_connections == 1  # one client, one connection


def total_balance(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT sum(abalance) FROM pgbench_accounts").fetchone()[0]


def test_orm_pages_commit_through_every_target(dsn, tmp_path):
    bench._ensure_pgbench_tables(dsn, 1)  # to read the balance before the first page
    before = total_balance(dsn)
    out = tmp_path / "bench.json"
    result = bench_command(dsn, "--workloads", "orm", "--processes", "2", "--threads", "2",
                           "--cap", str(CAP), "--duration", "0.5", "--json", str(out))
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [r["target"] for r in rows] == ["broker", "pgbouncer", "direct"]
    ran = [r for r in rows if not r["skipped"]]
    if bench.find_pgbouncer():
        assert len(ran) == 3
    for r in ran:
        assert r["workload"] == "orm"
        assert r["operations"] > 0 and r["errors"] == 0 and not r["first_error"], r
    # Each page adds 1 to one account: the table counts exactly the pages the
    # bench says committed, through every target together.
    assert total_balance(dsn) - before == sum(r["operations"] for r in ran)
    by_target = {r["target"]: r for r in ran}
    assert by_target["direct"]["max_server_connections"] == 4  # one per client thread
    for r in ran:
        if r["target"] != "direct":
            assert 0 < r["max_server_connections"] <= CAP, r
    # The ratios are in the table, as the JSON has them.
    broker = by_target["broker"]
    line = next(line for line in result.stdout.splitlines()
                if re.match(r"orm\s+broker\s", line))
    assert f"{broker['vs_direct']:.2f}x" in line
    if "pgbouncer" in by_target:
        assert f"{broker['vs_pgbouncer']:.2f}x" in line


def test_orm_without_sqlalchemy_says_so_and_the_rest_runs(dsn):
    # The bench in a process where SQLAlchemy cannot be imported, as when
    # the broker is installed without its sqlalchemy extra.
    code = ("import sys; sys.modules['sqlalchemy'] = None; "
            "from broker.cli import main; sys.exit(main(sys.argv[1:]))")
    result = subprocess.run(
        [sys.executable, "-c", code, "bench", "--dsn", dsn, "--workloads", "orm,select1",
         "--targets", "broker,direct", "--processes", "1", "--duration", "0.2"],
        capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr
    for target in ("broker", "direct"):
        assert f"orm/{target}: not run: SQLAlchemy missing" in result.stdout
    assert "pip install 'poolbroker[sqlalchemy]'" in result.stdout
    assert re.search(r"^select1\s+direct\s", result.stdout, re.M), result.stdout


def test_web_pages_commit_in_every_form(dsn, tmp_path):
    # A page is five reads and one update in one transaction, statement by
    # statement and in one round trip (the broker's batch, psycopg's pipeline).
    bench._ensure_pgbench_tables(dsn, 1)
    before = total_balance(dsn)
    out = tmp_path / "bench.json"
    result = bench_command(dsn, "--workloads", "web", "--processes", "2", "--cap", str(CAP),
                           "--duration", "0.5", "--json", str(out))
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())["rows"]
    targets = ["broker", "broker-tx", "pgbouncer", "pgbouncer-pipeline", "direct",
               "direct-pipeline"]
    if not bench.find_pgbouncer():
        targets.remove("pgbouncer-pipeline")
    assert [r["target"] for r in rows] == targets
    ran = [r for r in rows if not r["skipped"]]
    for r in ran:
        assert r["operations"] > 0 and r["errors"] == 0 and not r["first_error"], r
        assert r["client_cpu_us"] > 0
        assert re.search(rf"^web\s+{r['target']}\s", result.stdout, re.M), result.stdout
    # Each page adds 1 to one account: every form committed all its pages.
    assert total_balance(dsn) - before == sum(r["operations"] for r in ran)


def test_overload_offers_at_a_rate_and_prints_its_columns(dsn, tmp_path):
    # Cap 1 and 10 ms statements: 100 per second at the most, offered 300.
    out = tmp_path / "bench.json"
    result = bench_command(dsn, "--workloads", "overload", "--processes", "2", "--cap", "1",
                           "--statement-time", "0.01", "--rate", "300", "--deadline", "0.05",
                           "--duration", "1", "--json", str(out))
    assert result.returncode == 0, result.stderr
    rows = {r["target"]: r for r in json.loads(out.read_text())["rows"]}
    assert "no cap" in rows["direct"]["skipped"]
    ran = [r for r in rows.values() if not r["skipped"]]
    assert [r["target"] for r in ran] == (["broker", "pgbouncer"] if bench.find_pgbouncer()
                                          else ["broker"])
    for r in ran:
        assert r["offered_per_second"] > 0 and r["late_starts"] >= 0, r
        assert r["threads"] > 1  # enough threads per process to keep offering
        requests = r["operations"] + r["errors"] + r["late_answers"] + r["unsent"]
        assert requests > 0 and r["max_server_connections"] <= 1, r
        assert r["goodput_of_capacity"] is not None and r["client_cpu_us"] > 0, r
    for column in ("offered/s", "goodput/s", "of capacity", "late starts", "broker us/req"):
        assert column in result.stdout
    assert "overload/direct: not run: direct psycopg has no cap" in result.stdout


def test_late_starts_count_only_statements_started_after_their_deadline(dsn):
    bench.ensure_late_sequence(dsn)
    before = bench.late_starts(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        now = conn.execute("SELECT extract(epoch FROM clock_timestamp())::float8").fetchone()[0]
        for deadline in (now - 60, now + 60, now + 60):
            conn.execute(bench.OVERLOAD, [deadline, 0.001])
    assert bench.late_starts(dsn) - before == 1


def test_psycopg_statements_are_cancelled_at_their_deadline(dsn):
    # The overload workload's deadline for psycopg, which has none of its own.
    session = bench._PsycopgSession(dsn, True, "pb-bench-test", True)
    with pytest.raises(psycopg.errors.QueryCanceled):
        session.run_within("SELECT pg_sleep(30)", None, 0.2)
    session.run_within("SELECT 1", None, 0.2)  # the next statement is not cancelled


def test_a_failed_pipelined_transaction_leaves_the_session_usable(dsn):
    # In pipeline mode a failed statement skips the rest up to the Sync,
    # COMMIT too: the session must roll back, not stay in an aborted
    # transaction (through PgBouncer it would hold a server connection).
    session = bench._PsycopgSession(dsn, True, "pb-bench-test", interactive=False)
    with pytest.raises(psycopg.errors.DivisionByZero):
        session.transaction([("SELECT 1", None), ("SELECT 1 / 0", None), ("SELECT 2", None)])
    session.transaction([("SELECT 1", None)])
    session.run("SELECT 1")
