"""COPY through ``client.copy()``: in from bytes, str or row tuples, out as
byte chunks, inside transactions too; COPY sent any other way is refused
before it reaches the server and leaves the broker serving; a million
rows out with the broker's memory bounded."""

from __future__ import annotations

import hashlib
import shutil
import threading
import time

import psycopg
import pytest

import client
from conftest import OF_APPLICATION, BrokerProcess, memory_kb

MB = 1024 * 1024


@pytest.fixture(scope="module")
def copy_broker(dsn: str) -> BrokerProcess:
    """One broker at max_connections=1 for the tests that leave it as they found it:
    every statement after a COPY must run on the very connection the COPY used."""
    broker = BrokerProcess(dsn, max_connections=1).start()
    yield broker
    broker.stop()
    shutil.rmtree(broker.dir, ignore_errors=True)


@pytest.fixture
def items(admin: psycopg.Connection) -> str:
    admin.execute("DROP TABLE IF EXISTS copy_items")
    admin.execute("CREATE TABLE copy_items (id int PRIMARY KEY, name text, flag bool, data bytea)")
    return "copy_items"


def _rows(admin: psycopg.Connection, table: str = "copy_items") -> list[tuple]:
    return admin.execute(f"SELECT * FROM {table} ORDER BY id").fetchall()


def _psycopg_copy_out(admin: psycopg.Connection, sql: str) -> bytes:
    """What psycopg itself reads from ``sql``: the oracle for copy() out."""
    with admin.cursor() as cur, cur.copy(sql) as copy:
        return b"".join(bytes(chunk) for chunk in copy)


def _broker_backends(admin: psycopg.Connection, broker: BrokerProcess, condition: str,
                     settle: float = 5.0) -> int:
    """How many of the broker's server connections match ``condition``, once
    settled: a connection the broker has just closed may linger a moment."""
    query = (f"SELECT count(*) FROM pg_stat_activity WHERE {OF_APPLICATION} AND "
             + condition)
    deadline = time.monotonic() + settle
    while True:
        count = admin.execute(query, [broker.application_name]).fetchone()[0]
        if count == 0 or time.monotonic() > deadline:
            return count
        time.sleep(0.02)


def _no_broker_backend_in_a_transaction(admin: psycopg.Connection, broker: BrokerProcess) -> int:
    return _broker_backends(
        admin, broker, "state IN ('idle in transaction', 'idle in transaction (aborted)')")


# COPY ... FROM STDIN


def test_copy_in_from_bytes_chunks_split_anywhere(copy_broker, admin, items):
    chunks = [b"1\tann\tt\t\\N\n2\tb", b"ob\tf\t\\\\x0102\n", b"3", b"\tcarol\t\\N\t\\N\n"]
    result = copy_broker.client.copy("COPY copy_items FROM STDIN", chunks)
    assert result.rowcount == 3
    assert _rows(admin) == [(1, "ann", True, None), (2, "bob", False, b"\x01\x02"),
                            (3, "carol", None, None)]


def test_copy_in_from_str_chunks_with_unicode(copy_broker, admin, items):
    chunks = ["1\tünïcødé ✓\n", "2\t日本語 🐘\n3\t", "plain\n"]
    result = copy_broker.client.copy("COPY copy_items (id, name) FROM STDIN", chunks)
    assert result.rowcount == 3
    assert [(r[0], r[1]) for r in _rows(admin)] == [
        (1, "ünïcødé ✓"), (2, "日本語 🐘"), (3, "plain")]


ROW_TUPLES = [
    (1, None, None, None),
    (2, "tab\there", True, b"\x00\x01\\\t\n\xff"),
    (3, "new\nline and carriage\rreturn", False, b""),
    (4, "back\\slash \\N \\t", True, None),
    (5, "\\N", None, b"\\N"),
    (6, "", False, b"x"),
    (7, "ünïcødé ✓ 日本語 🐘", None, "🐘".encode()),
    (8, "trailing backslash\\", True, b"\\"),
]


def test_copy_in_from_row_tuples_escapes_none_tabs_newlines_and_backslashes(
        copy_broker, admin, items):
    result = copy_broker.client.copy("COPY copy_items FROM STDIN", ROW_TUPLES)
    assert result.rowcount == len(ROW_TUPLES)
    assert _rows(admin) == ROW_TUPLES  # None stays NULL; "\\N" and "" stay strings


def test_copy_in_from_a_lazy_generator_of_many_rows(copy_broker, admin, items):
    n = 20_000
    result = copy_broker.client.copy(
        "COPY copy_items (id, name) FROM STDIN", ((i, f"row {i}") for i in range(1, n + 1)))
    assert result.rowcount == n
    assert admin.execute("SELECT count(*), sum(id), max(name) FROM copy_items").fetchone() == (
        n, n * (n + 1) // 2, "row 9999")


def test_copy_in_csv_with_header_from_bytes(copy_broker, admin, items):
    data = [b'id,name\n1,"a, quoted ""name"""\n', b"2,\n3,plain\n"]
    result = copy_broker.client.copy(
        "COPY copy_items (id, name) FROM STDIN (FORMAT csv, HEADER true)", data)
    assert result.rowcount == 3
    assert [(r[0], r[1]) for r in _rows(admin)] == [
        (1, 'a, quoted "name"'), (2, None), (3, "plain")]


def test_copy_in_of_no_data_copies_no_rows(copy_broker, admin, items):
    assert copy_broker.client.copy("COPY copy_items FROM STDIN", []).rowcount == 0
    assert copy_broker.client.copy("COPY copy_items FROM STDIN", [b""]).rowcount == 0
    assert _rows(admin) == []


# COPY ... TO STDOUT


def test_copy_out_of_a_table_matches_psycopg_byte_for_byte(copy_broker, admin, items):
    with admin.cursor() as cur:
        cur.executemany("INSERT INTO copy_items VALUES (%s, %s, %s, %s)", ROW_TUPLES)
    sql = "COPY copy_items TO STDOUT"
    expected = _psycopg_copy_out(admin, sql + " ")  # another text: no cache in common
    chunks = list(copy_broker.client.copy(sql))
    assert chunks and all(isinstance(chunk, bytes) for chunk in chunks)
    assert b"".join(chunks) == expected
    # Read back through copy() in, the rows are the same.
    admin.execute("CREATE TEMP TABLE copy_back (LIKE copy_items)")
    with admin.cursor() as cur, cur.copy("COPY copy_back FROM STDIN") as copy:
        copy.write(b"".join(chunks))
    assert admin.execute("SELECT * FROM copy_back ORDER BY id").fetchall() == ROW_TUPLES


def test_copy_out_of_a_query_in_csv_with_header(copy_broker, admin):
    sql = ("COPY (SELECT g AS n, 'v,' || g AS label, NULL::int AS nothing "
           "FROM generate_series(1, 500) g ORDER BY g) TO STDOUT (FORMAT csv, HEADER)")
    data = b"".join(copy_broker.client.copy(sql))
    assert data == _psycopg_copy_out(admin, sql)
    lines = data.split(b"\n")
    assert lines[0] == b"n,label,nothing" and lines[1] == b'1,"v,1",' and lines[-1] == b""
    assert len(lines) == 502


def test_copy_out_of_an_empty_result_yields_no_data(copy_broker):
    assert b"".join(copy_broker.client.copy("COPY (SELECT 1 WHERE false) TO STDOUT")) == b""


def test_copy_out_as_a_context_manager_closed_early_frees_the_only_connection(
        copy_broker, admin):
    c = copy_broker.client
    with c.copy("COPY (SELECT g, repeat('y', 100) FROM generate_series(1, 500000) g) "
                "TO STDOUT") as chunks:
        first = next(iter(chunks))
    assert first.startswith(b"1\t" + b"y" * 100 + b"\n")
    # The rest was dropped and the connection (the only one) serves again.
    for n in range(3):
        assert c.execute("SELECT %s::int", [n], timeout=10).rows == [(n,)]
    assert _broker_backends(admin, copy_broker, "state <> 'idle'") == 0  # no COPY left running
    # A second copy out, read to the end this time, is whole.
    assert b"".join(c.copy("COPY (SELECT 1, 'z') TO STDOUT")) == b"1\tz\n"


# Inside a transaction


def test_copy_in_and_out_inside_a_transaction_commit_and_rollback(copy_broker, admin, items):
    c = copy_broker.client
    with c.transaction() as tx:
        assert tx.copy("COPY copy_items (id, name) FROM STDIN",
                       [(1, "one"), (2, "two")]).rowcount == 2
        assert tx.execute("SELECT count(*) FROM copy_items").rows == [(2,)]
        assert b"".join(tx.copy("COPY copy_items (id, name) TO STDOUT")) == b"1\tone\n2\ttwo\n"
        tx.execute("UPDATE copy_items SET name = 'uno' WHERE id = 1")
    assert [(r[0], r[1]) for r in _rows(admin)] == [(1, "uno"), (2, "two")]

    class Undo(Exception):
        pass

    with pytest.raises(Undo):
        with c.transaction() as tx:
            assert tx.copy("COPY copy_items (id, name) FROM STDIN",
                           [b"3\tthree\n", "4\tfour\n"]).rowcount == 2
            assert b"3\tthree\n" in b"".join(tx.copy("COPY copy_items (id, name) TO STDOUT"))
            raise Undo
    assert [(r[0], r[1]) for r in _rows(admin)] == [(1, "uno"), (2, "two")]  # COPY undone
    # A COPY that fails inside a transaction fails the transaction.
    with pytest.raises(client.IntegrityError):
        with c.transaction() as tx:
            tx.execute("INSERT INTO copy_items (id, name) VALUES (10, 'ten')")
            tx.copy("COPY copy_items (id, name) FROM STDIN", [(11, "eleven"), (1, "dup")])
    assert [r[0] for r in _rows(admin)] == [1, 2]
    assert _no_broker_backend_in_a_transaction(admin, copy_broker) == 0
    assert c.execute("SELECT 1").rows == [(1,)]


# Errors


def test_copy_with_a_bad_row_reports_the_server_error_and_the_connection_stays_usable(
        copy_broker, admin, items):
    c = copy_broker.client
    bad = [
        # (data, exception class, SQLSTATE)
        ([b"1\tok\n", b"not_an_int\tbad\n"], client.DataError, "22P02"),
        ([(1, "ok"), ("x", "bad")], client.DataError, "22P02"),
        ([b"1\tok\textra\tcolumns\there\n"], client.DataError, "22P04"),
        ([b"1\n"], client.DataError, "22P04"),
        ([(1, "a"), (1, "again")], client.IntegrityError, "23505"),
    ]
    for data, error, sqlstate in bad:
        with pytest.raises(error) as info:
            c.copy("COPY copy_items (id, name) FROM STDIN", data)
        assert info.value.sqlstate == sqlstate, (data, info.value)
        assert _rows(admin) == []  # the COPY is atomic: nothing from it stays
        assert c.execute("SELECT %s::text", [sqlstate]).rows == [(sqlstate,)]
    with pytest.raises(client.ProgrammingError) as info:
        c.copy("COPY no_such_table FROM STDIN", [(1,)])
    assert info.value.sqlstate == "42P01"
    with pytest.raises(client.ProgrammingError) as info:
        list(c.copy("COPY (SELECT * FROM no_such_table) TO STDOUT"))
    assert info.value.sqlstate == "42P01"
    with pytest.raises(client.DataError) as info:
        list(c.copy("COPY (SELECT 1 / (g - 3) FROM generate_series(1, 5) g) TO STDOUT"))
    assert info.value.sqlstate == "22012"
    # The same (only) connection copies and serves normally afterwards.
    assert c.copy("COPY copy_items (id, name) FROM STDIN", [(1, "fine")]).rowcount == 1
    assert b"".join(c.copy("COPY copy_items (id, name) TO STDOUT")) == b"1\tfine\n"
    assert _no_broker_backend_in_a_transaction(admin, copy_broker) == 0


def test_an_exception_raised_by_the_data_iterable_aborts_the_copy(copy_broker, admin, items):
    class SourceFailed(Exception):
        pass

    def rows():
        for i in range(1, 1001):
            yield (i, f"row {i}")
        raise SourceFailed("the caller's data source broke")

    with pytest.raises(SourceFailed):
        copy_broker.client.copy("COPY copy_items (id, name) FROM STDIN", rows())
    assert _rows(admin) == []
    assert copy_broker.client.execute("SELECT 1", timeout=10).rows == [(1,)]
    assert _no_broker_backend_in_a_transaction(admin, copy_broker) == 0


# COPY through the other entry points: refused, the broker serves on


COPY_ELSEWHERE = [
    "COPY copy_refused TO STDOUT",
    "copy copy_refused from stdin",
    "COPY (SELECT 1) TO STDOUT",
    "/* comment */ Copy copy_refused TO STDOUT (FORMAT csv)",
    "SELECT 1; COPY copy_refused FROM STDIN",
]


def _send_copy(c: client.Client, path: str, sql: str) -> None:
    if path == "execute":
        c.execute(sql, timeout=10)
    elif path == "batch":
        c.batch(["INSERT INTO copy_refused VALUES (99)", sql], timeout=10)
    else:
        with c.transaction(timeout=10) as tx:
            tx.execute("INSERT INTO copy_refused VALUES (98)")
            tx.execute(sql)


@pytest.mark.parametrize("path", ["execute", "batch", "transaction"])
def test_copy_through_execute_batch_or_transaction_is_refused_and_the_broker_serves_on(
        start_broker, admin, path):
    admin.execute("DROP TABLE IF EXISTS copy_refused")
    admin.execute("CREATE TABLE copy_refused (id int)")
    admin.execute("INSERT INTO copy_refused VALUES (1)")
    broker = start_broker(max_connections=1)
    c = broker.client
    for round_ in range(3):
        for sql in COPY_ELSEWHERE:
            with pytest.raises(client.NotSupportedError) as info:
                _send_copy(c, path, sql)
            assert "copy()" in str(info.value), (sql, info.value)
            # The one server connection still serves, right away.
            assert c.execute("SELECT %s::text", [sql], timeout=10).rows == [(sql,)]
    # Nothing of a refused batch or transaction was kept.
    assert admin.execute("SELECT id FROM copy_refused").fetchall() == [(1,)]
    assert c.batch(["SELECT 1", ("SELECT %s::int", [2])], timeout=10)[1].rows == [(2,)]
    with c.transaction(timeout=10) as tx:
        assert tx.execute("SELECT count(*) FROM copy_refused").rows == [(1,)]
    assert _no_broker_backend_in_a_transaction(admin, broker) == 0


# Size: a million rows out, memory bounded




def test_copy_a_million_rows_out_with_bounded_broker_memory(start_broker):
    broker = start_broker(max_connections=1)
    c = broker.client
    c.execute("SELECT 1")
    pid = broker.proc.pid
    before_kb = memory_kb(pid)["VmRSS"]
    peak_rss_kb = before_kb
    done = threading.Event()

    def sample() -> None:
        nonlocal peak_rss_kb
        while not done.is_set():
            peak_rss_kb = max(peak_rss_kb, memory_kb(pid)["VmRSS"])
            done.wait(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    rows, width = 1_000_000, 100
    digest, total = hashlib.sha256(), 0
    try:
        with c.copy(f"COPY (SELECT g, repeat('x', {width}) FROM generate_series(1, {rows}) g) "
                    "TO STDOUT", timeout=120) as chunks:
            for n, chunk in enumerate(chunks):
                if n == 0:
                    # A slow reader: the broker must not read ahead of it unbounded.
                    time.sleep(1.5)
                digest.update(chunk)
                total += len(chunk)
    finally:
        done.set()
        sampler.join()
    expected = hashlib.sha256()
    tail = b"\t" + b"x" * width + b"\n"
    for start in range(1, rows + 1, 10_000):
        expected.update(b"".join(b"%d" % g + tail for g in range(start, start + 10_000)))
    assert total == 5_888_896 + (width + 2) * rows  # digits of 1..1e6, then tab, x*100, newline
    assert digest.hexdigest() == expected.hexdigest()
    peak_kb = max(peak_rss_kb, memory_kb(pid)["VmHWM"])
    growth_mb = (peak_kb - before_kb) / 1024
    print(f"\n[copy out] {total / MB:.0f} MB in {n + 1} chunks: broker peak RSS "
          f"{peak_kb / 1024:.0f} MB, grew {growth_mb:.1f} MB")
    assert total > 100 * MB
    assert peak_kb < 150 * 1024
    assert growth_mb < 50  # far less than the output
    assert c.execute("SELECT 1").rows == [(1,)]
