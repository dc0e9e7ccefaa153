"""Big results: refused past max_result_bytes, or streamed in chunks; either
way the broker's memory stays bounded."""

from __future__ import annotations

import pytest

import client
from conftest import OF_APPLICATION, memory_kb

MB = 1024 * 1024




def test_result_over_max_result_bytes_fails_and_memory_stays_bounded(start_broker, admin):
    broker = start_broker(max_connections=1, max_result_bytes=MB)
    c = broker.client
    c.execute("SELECT 1")
    before = memory_kb(broker.proc.pid)
    # About 550 MB if it were read whole.
    with pytest.raises(client.ResultTooLarge) as info:
        c.execute("SELECT g, repeat('x', 100) FROM generate_series(1, 5000000) g", timeout=60)
    assert info.value.sqlstate == "54000"
    assert "max_result_bytes" in str(info.value) and "client.stream()" in str(info.value)
    peak_growth_mb = (memory_kb(broker.proc.pid)["VmHWM"] - before["VmHWM"]) / 1024
    print(f"\n[max_result_bytes] broker peak RSS grew {peak_growth_mb:.1f} MB "
          "refusing a ~550 MB result (limit 1 MB)")
    assert peak_growth_mb < 50
    # The statement was cancelled and the only connection serves again.
    assert c.execute("SELECT 1").rows == [(1,)]
    running = admin.execute(
        f"SELECT count(*) FROM pg_stat_activity WHERE {OF_APPLICATION} "
        "AND query LIKE '%%generate_series(1, 5000000)%%' AND state = 'active'",
        [broker.application_name]).fetchone()[0]
    assert running == 0
    # Results that are not read in chunks (batches, commands with RETURNING)
    # are checked as a whole.
    with pytest.raises(client.ResultTooLarge):
        c.batch(["SELECT repeat('x', 2000000)"])
    with pytest.raises(client.ResultTooLarge):
        c.execute("WITH t AS (SELECT repeat('x', 2000000) AS v) SELECT v FROM t; SELECT 1")
    assert c.execute("SELECT repeat('x', 1000)").rows == [("x" * 1000,)]


def test_requests_too_big_for_the_loop_run_on_the_connection_thread(start_broker):
    """Bodies over 64 KiB are decoded and sent by the connection's thread, with
    the same chunked reads, limits and batches as the loop's."""
    c = start_broker(max_connections=1, max_result_bytes=MB).client
    big = "x" * 100_000
    assert c.execute("SELECT length(%s)", [big]).rows == [(100_000,)]
    assert [r.rows for r in c.batch([("SELECT length(%s)", [big]), "SELECT 2"])] == [
        [(100_000,)], [(2,)]]
    with pytest.raises(client.ResultTooLarge):
        c.execute("SELECT repeat(%s, 20)", [big])
    assert c.execute("SELECT 1").rows == [(1,)]


def test_max_result_bytes_zero_reads_results_whole(start_broker):
    c = start_broker(max_connections=1, max_result_bytes=0).client
    assert c.execute("SELECT repeat('x', 3000000)").rows == [("x" * 3_000_000,)]
    # Past the 64 MB the transport takes for a request: a reply is as large
    # as its broker lets results be.
    big = c.execute("SELECT length(v), v FROM repeat('x', %s) v", [65 * MB], timeout=60)
    assert big.rows[0][0] == len(big.rows[0][1]) == 65 * MB
    r = c.execute("SELECT 1 AS a WHERE false")
    assert (r.columns, r.rows) == (["a"], [])


def test_empty_results_keep_their_columns(broker):
    r = broker.client.execute("SELECT 1 AS a, 'b' AS b WHERE false")
    assert (r.columns, r.rows, r.rowcount) == (["a", "b"], [], 0)
    r = broker.client.execute("SELECT g AS n FROM generate_series(1, 3) g -- trailing comment")
    assert (r.columns, r.rows, r.rowcount) == (["n"], [(1,), (2,), (3,)], 3)


def test_stream_returns_a_million_rows_with_bounded_broker_memory(broker):
    c = broker.client
    c.execute("SELECT 1")
    before = memory_kb(broker.proc.pid)
    expected = 1
    with c.stream("SELECT g, md5(g::text) AS h FROM generate_series(1, %s) g ORDER BY g",
                  [1_000_000], chunk_rows=20_000) as rows:
        for g, h in rows:
            assert g == expected
            expected += 1
        assert rows.columns == ["g", "h"]
    assert expected - 1 == 1_000_000
    peak_growth_mb = (memory_kb(broker.proc.pid)["VmHWM"] - before["VmHWM"]) / 1024
    print(f"\n[stream] 1,000,000 rows in chunks of 20,000: broker peak RSS grew "
          f"{peak_growth_mb:.1f} MB")
    assert peak_growth_mb < 50  # the whole result would be about 60 MB packed
    assert c.stats()["sessions_active"] == 0


def test_stream_edge_cases(broker):
    c = broker.client
    stream = c.stream("SELECT 1 AS a WHERE false")
    assert list(stream) == [] and stream.columns == ["a"]
    with pytest.raises(client.ProgrammingError):
        list(c.stream("SELECT * FROM no_such_table"))
    with c.stream("SELECT generate_series(1, 100)", chunk_rows=7) as rows:
        first = [next(iter(rows)) for _ in range(1)]
    assert first == [(1,)]
    assert c.stats()["sessions_active"] == 0
    with pytest.raises(client.InterfaceError):
        c.stream("SELECT 1", chunk_rows=0)
