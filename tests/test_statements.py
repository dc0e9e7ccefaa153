"""broker.statements: classification of SQL text by its session effects (no database)."""

from __future__ import annotations

import threading

import pytest

from broker import statements
from broker.statements import CACHE_MAX_BYTES, CACHE_MAX_TEXT, Classification, Kind, classify

P, U, S, O, C, T = Kind.PLAIN, Kind.UTILITY, Kind.SESSION, Kind.OPAQUE, Kind.COPY, Kind.TRANSACTION


@pytest.fixture(autouse=True)
def unlimited_parse_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Classification itself is under test here, not the time given to it
    (but in the test of that time): every text is parsed, however many
    long ones a test sends at once."""
    monkeypatch.setattr(statements, "budget", statements.ParseBudget(1.0, float("inf")))


def case(case_id: str, sql: str | bytes, kind: Kind, reason: str = "") -> object:
    """One row: ``reason``, when given, must appear in the classification's reason."""
    return pytest.param(sql, kind, reason, id=case_id)


PLAIN = [
    case("select", "SELECT 1", P),
    case("param", "select * from t where id = $1 and b = $2", P),
    case("set-in-literal", "SELECT 'SET search_path = x'", P),
    case("set-in-E-literal", r"SELECT E'\' SET ROLE admin; LISTEN x'", P),
    case("set-in-dollar-quote", "SELECT $q$ SET search_path = x $q$", P),
    case("set-in-line-comment", "SELECT 1 -- ; SET search_path = x", P),
    case("set-in-block-comment", "/* SET ROLE admin; */ SELECT 1", P),
    case("nested-comment", "/* a /* SET x = 1; */ b */ SELECT 1", P),
    case("set_config-local", "SELECT set_config('a', 'b', true)", P),
    case("set_config-local-qualified", "SELECT pg_catalog.set_config('app.user', $1, true)", P),
    case("set_config-local-named",
         "SELECT set_config(setting_name => 'a', new_value => 'b', is_local => true)", P),
    case("set_config-local-upper", "SELECT SET_CONFIG('app.x', 'y', TRUE)", P),
    case("set_config-search_path-local", "SELECT set_config('search_path', 'public', true)", P),
    case("xact-advisory-lock", "SELECT pg_advisory_xact_lock(1)", P),
    case("try-xact-advisory-lock", "SELECT pg_try_advisory_xact_lock_shared(1, 2)", P),
    case("table-named-temp", "SELECT * FROM temp", P),
    case("quoted-names", 'SELECT "set_config", "listen" FROM "temp" JOIN listen USING (id)', P),
    case("column-set_config", "SELECT set_config FROM t", P),
    case("insert-column-set_config", "INSERT INTO t(set_config) VALUES (1)", P),
    case("update-set", "UPDATE t SET a = 1 WHERE id = $1", P),
    case("update-set-column-named-set_config", "UPDATE t SET set_config = 'x', listen = 2", P),
    case("delete-subquery", "DELETE FROM t WHERE a IN (SELECT b FROM u)", P),
    case("merge", "MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN UPDATE SET a = s.a "
                  "WHEN NOT MATCHED THEN INSERT VALUES (s.id, s.a)", P),
    case("values", "VALUES (1, 'SET x'), (2, 'LISTEN')", P),
    case("table", "TABLE t", P),
    case("cte", "WITH x AS (SELECT 1) SELECT * FROM x", P),
    case("data-modifying-cte",
         "WITH d AS (DELETE FROM t RETURNING *) INSERT INTO u SELECT * FROM d", P),
    case("read-pg_temp", "SELECT * FROM pg_temp.t", P),
    case("insert-literals",
         "INSERT INTO t VALUES ('temp', 'LISTEN x', 'pg_temp.x', 'DISCARD ALL')", P),
    case("for-update", "SELECT * FROM t FOR UPDATE SKIP LOCKED", P),
    case("other-function", "SELECT my_set_config('a', 'b', false), set_configs(1)", P),
    case("notify-function", "SELECT pg_notify('chan', 'x')", P),
    case("trailing-semicolons", "SELECT 1;;", P),
    case("two-selects", "SELECT 1; SELECT 2", P),
]

UTILITY = [
    case("create-table", "CREATE TABLE t (a int)", U),
    case("create-unlogged", "CREATE UNLOGGED TABLE t (a int)", U),
    case("create-table-named-temp", 'CREATE TABLE "temp" (listen int, set_config text)', U),
    case("create-index-concurrently", "CREATE INDEX CONCURRENTLY i ON t (a)", U),
    case("vacuum", "VACUUM (ANALYZE) t", U),
    case("analyze", "ANALYZE t", U),
    case("notify", "NOTIFY chan, 'SET x = 1'", U),
    case("savepoint", "SAVEPOINT s1", U),
    case("release", "RELEASE SAVEPOINT s1", U),
    case("rollback-to", "ROLLBACK TO SAVEPOINT s1", U),
    case("set-local", "SET LOCAL statement_timeout = '5s'", U),
    case("set-local-role", "SET LOCAL ROLE admin", U),
    case("set-local-search_path", "SET LOCAL search_path = public, \"$user\"", U),
    case("set-transaction", "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", U),
    case("set-constraints", "SET CONSTRAINTS ALL DEFERRED", U),
    case("copy-to-file", "COPY t TO '/tmp/t.csv'", U),
    case("copy-query-to-file", "COPY (SELECT 1) TO '/tmp/t.csv'", U),
    case("copy-from-program", "COPY t FROM PROGRAM 'cat /tmp/x'", U),
    case("explain", "EXPLAIN SELECT * FROM t", U),
    case("explain-analyze", "EXPLAIN (ANALYZE, BUFFERS) SELECT 1", U),
    case("checkpoint", "CHECKPOINT", U),
    case("close", "CLOSE c", U),
    case("close-all", "CLOSE ALL", U),
    case("fetch", "FETCH 10 FROM c", U),
    case("move", "MOVE NEXT IN c", U),
    case("declare", "DECLARE c CURSOR FOR SELECT 1", U),
    case("declare-without-hold", "DECLARE c SCROLL CURSOR WITHOUT HOLD FOR SELECT 1", U),
    case("execute", "EXECUTE p(1, 'x')", U),
    case("show", "SHOW search_path", U),
    case("select-into", "SELECT 1 AS a INTO new_table", U),
    case("create-table-as", "CREATE TABLE t2 AS SELECT * FROM t", U),
    case("alter-role-set", "ALTER ROLE app SET search_path = pg_temp, public", U),
    case("alter-database-set", "ALTER DATABASE db SET work_mem = '64MB'", U),
    case("alter-system", "ALTER SYSTEM SET work_mem = '64MB'", U),
    case("function-with-set-clause", "CREATE FUNCTION f() RETURNS int LANGUAGE sql "
                                     "SET search_path = public AS 'SELECT 1'", U),
    case("function-body-is-text", "CREATE FUNCTION f() RETURNS void LANGUAGE plpgsql AS "
                                  "$$BEGIN PERFORM set_config('a', 'b', false); END$$", U),
    case("lock", "LOCK TABLE t IN ACCESS EXCLUSIVE MODE", U),
    case("truncate", "TRUNCATE t", U),
    case("drop-table-named-temp", "DROP TABLE IF EXISTS temp", U),
    case("comment-on", "COMMENT ON TABLE t IS 'SET ROLE admin'", U),
    case("create-extension", "CREATE EXTENSION IF NOT EXISTS pg_trgm", U),
    case("create-and-select", "CREATE TABLE t (a int); SELECT 1", U),
]

SESSION = [
    case("sql-text-query_to_xml", "SELECT query_to_xml('SELECT set_config(''app.x'', ''1'', "
         "false)', true, true, '')", S, "query_to_xml()"),
    case("sql-text-ts_stat", "SELECT ts_stat('SELECT set_config(''a'',''1'',false)::tsvector')",
         S, "ts_stat()"),
    case("set", "SET search_path = a", S, "SET (session-level)"),
    case("set-to-list", "set search_path to a, b", S),
    case("set-session", "SET SESSION search_path = a", S),
    case("set-default", "SET statement_timeout TO DEFAULT", S),
    case("set-time-zone", "SET TIME ZONE 'UTC'", S),
    case("set-names", "SET NAMES 'UTF8'", S),
    case("set-role", "SET ROLE admin", S),
    case("set-session-authorization", "SET SESSION AUTHORIZATION bob", S),
    case("set-session-characteristics", "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY", S),
    case("set-after-comments", "/* c */ -- x\n SET work_mem = '1GB'", S),
    case("set-mixed-case", "sEt WoRk_MeM = '1GB'", S),
    case("reset", "RESET search_path", S, "RESET"),
    case("reset-role", "RESET ROLE", S),
    case("reset-all", "RESET ALL", S, "RESET ALL"),
    case("set-local-pg_temp", "SET LOCAL search_path = pg_temp, public", S, "pg_temp"),
    case("set_config", "SELECT set_config('a', 'b', false)", S, "set_config(..., false)"),
    case("set_config-quoted", "SELECT \"set_config\"('a', 'b', false)", S, "set_config"),
    case("set_config-qualified", "SELECT pg_catalog.set_config('a', 'b', false)", S),
    case("set_config-quoted-qualified", "SELECT \"pg_catalog\".\"set_config\"('a', 'b', false)", S),
    case("set_config-upper", "SELECT SET_CONFIG('a', 'b', FALSE)", S),
    case("set_config-quoted-upper", "SELECT \"SET_CONFIG\"('a', 'b', false)", S),
    case("set_config-user-schema", "SELECT myschema.set_config('a', 'b', false)", S),
    case("set_config-param", "SELECT set_config('a', 'b', $1)", S, "not a literal"),
    case("set_config-expression", "SELECT set_config('a', 'b', 1 = 1)", S),
    case("set_config-string-true", "SELECT set_config('a', 'b', 'true')", S),
    case("set_config-E-escape", r"SELECT set_config(E'search\x5fpath', 'x', false)", S),
    case("set_config-named",
         "SELECT set_config(is_local => false, setting_name => 'a', new_value => 'b')", S),
    case("set_config-search_path-pg_temp",
         "SELECT set_config('search_path', 'pg_temp, public', true)", S, "search_path"),
    case("set_config-search_path-param", "SELECT set_config('search_path', $1, true)", S),
    case("set_config-scalar-subquery",
         "SELECT * FROM t WHERE a = (SELECT set_config('a', 'b', false))", S),
    case("set_config-cte", "WITH x AS (SELECT set_config('a', 'b', false)) SELECT * FROM x", S),
    case("set_config-data-modifying-cte",
         "WITH d AS (UPDATE t SET a = set_config('a', 'b', false) RETURNING *) SELECT * FROM d", S),
    case("set_config-function-arg", "SELECT coalesce(upper(set_config('a', 'b', false)), 'x')", S),
    case("set_config-case", "SELECT CASE WHEN a THEN set_config('a', 'b', false) END FROM t", S),
    case("set_config-order-by", "SELECT * FROM t ORDER BY set_config('a', b, false)", S),
    case("set_config-values", "VALUES (1), (length(set_config('a', 'b', false)))", S),
    case("set_config-insert-select", "INSERT INTO t SELECT set_config('a', 'b', false)", S),
    case("set_config-returning", "DELETE FROM t RETURNING set_config('a', 'b', false)", S),
    case("set_config-in-from", "SELECT * FROM set_config('a', 'b', false)", S),
    case("set_config-in-explain", "EXPLAIN SELECT set_config('a', 'b', false)", S),
    case("set_config-in-execute-arg", "EXECUTE p(set_config('a', 'b', false))", S),
    case("set_config-in-copy-to-file", "COPY (SELECT set_config('a', 'b', false)) TO '/tmp/x'", S),
    case("set_config-in-default",
         "ALTER TABLE t ADD COLUMN b text DEFAULT set_config('a', 'b', false)", S),
    case("advisory-lock-lateral", "SELECT * FROM t, LATERAL (SELECT pg_advisory_lock(t.id)) l", S,
         "pg_advisory_lock()"),
    case("setseed-update-from", "UPDATE t SET a = 1 FROM (SELECT setseed(0.5)) s", S, "setseed()"),
    case("advisory-lock-declare", "DECLARE c CURSOR FOR SELECT pg_advisory_lock(1)", S),
    case("listen", "LISTEN chan", S, "LISTEN"),
    case("listen-quoted", 'LISTEN "Chan"', S),
    case("unlisten", "UNLISTEN *", S, "UNLISTEN"),
    case("prepare", "PREPARE p AS SELECT 1", S, "PREPARE"),
    case("prepare-typed", "PREPARE p(int) AS SELECT $1", S),
    case("deallocate", "DEALLOCATE p", S, "DEALLOCATE"),
    case("deallocate-all", "DEALLOCATE ALL", S),
    case("declare-with-hold", "DECLARE c CURSOR WITH HOLD FOR SELECT 1", S, "WITH HOLD"),
    case("declare-no-scroll-with-hold", "declare c no scroll cursor with hold for select 1", S),
    case("temp-table", "CREATE TEMP TABLE x (a int)", S, "temporary"),
    case("temporary-table", "CREATE TEMPORARY TABLE x (a int)", S),
    case("local-temp-table", "CREATE LOCAL TEMP TABLE x (a int)", S),
    case("global-temp-table", "create global temporary table x (a int)", S),
    case("temp-on-commit-drop", "CREATE TEMP TABLE x (a int) ON COMMIT DROP", S),
    case("temp-like", "CREATE TEMP TABLE x (LIKE t)", S),
    case("temp-view", "CREATE TEMP VIEW v AS SELECT 1", S),
    case("temp-sequence", "CREATE TEMP SEQUENCE s", S),
    case("temp-table-as", "CREATE TEMP TABLE x AS SELECT 1", S),
    case("select-into-temp", "SELECT 1 AS a INTO TEMP x", S),
    case("select-into-temporary-table", "SELECT * INTO TEMPORARY TABLE x FROM t", S),
    case("explain-analyze-temp-table-as", "EXPLAIN ANALYZE CREATE TEMP TABLE x AS SELECT 1", S),
    case("pg_temp-table", "CREATE TABLE pg_temp.x (a int)", S, "pg_temp"),
    case("pg_temp-quoted", 'CREATE TABLE "pg_temp".x (a int)', S),
    case("pg_temp_N-view", "CREATE VIEW pg_temp_3.v AS SELECT 1", S),
    case("pg_temp-function",
         "CREATE FUNCTION pg_temp.f() RETURNS int LANGUAGE sql AS 'SELECT 1'", S),
    case("pg_temp-composite-type", "CREATE TYPE pg_temp.t AS (a int)", S),
    case("pg_temp-enum", "CREATE TYPE pg_temp.e AS ENUM ('a')", S),
    case("pg_temp-domain", "CREATE DOMAIN pg_temp.d AS int", S),
    case("pg_temp-operator",
         "CREATE OPERATOR pg_temp.@@ (leftarg = int4, rightarg = int4, procedure = int4mi)", S),
    case("pg_temp-foreign-table", "CREATE FOREIGN TABLE pg_temp.ft (a int) SERVER srv", S),
    case("pg_temp-select-into", "SELECT 1 AS a INTO pg_temp.x", S),
    case("pg_temp-index", "CREATE INDEX ON pg_temp.x (a)", S),
    case("pg_temp-drop", "DROP TABLE pg_temp.x", S),
    case("temp-in-statement-list", "CREATE TABLE a (x int); CREATE TEMP TABLE b (y int)", S),
    case("discard-all", "DISCARD ALL", S, "DISCARD"),
    case("discard-plans", "DISCARD PLANS", S),
    case("discard-temp", "DISCARD TEMP", S),
    case("discard-sequences", "DISCARD SEQUENCES", S),
    case("load", "LOAD 'auto_explain'", S, "LOAD"),
    case("set-then-select", "SET x.y = 1; SELECT 1", S),
    case("bytes", b"SET search_path = a", S),
]

OPAQUE = [
    case("do", "DO $$BEGIN PERFORM 1; END$$", O, "DO block"),
    case("do-language", "DO LANGUAGE plpgsql 'BEGIN NULL; END'", O),
    case("call", "CALL p()", O, "CALL"),
    case("call-qualified", "CALL myschema.proc($1)", O),
    case("syntax-error", "SELEC 1", O, "cannot parse: syntax error"),
    case("psycopg-placeholder", "SELECT %s", O, "cannot parse"),
    case("unterminated-literal", "SELECT 'x", O, "cannot parse"),
    case("nul-character", "SELECT 1\x00; SET x = 1", O, "cannot parse"),
    case("invalid-utf8", b"SELECT '\xff'", O, "cannot parse"),
    case("lone-surrogate", "SELECT '\ud800'", O, "cannot parse"),
    case("select-then-do", "SELECT 1; DO $$BEGIN END$$", O),
    case("set-then-do", "SET ROLE x; DO $$BEGIN END$$", O, "DO block"),
]

COPY = [
    case("copy-from-stdin", "COPY t FROM STDIN", C, "FROM STDIN"),
    case("copy-from-stdin-options", "COPY t (a, b) FROM STDIN WITH (FORMAT csv)", C),
    case("copy-from-stdin-lower", "copy t from stdin", C),
    case("copy-to-stdout", "COPY t TO STDOUT", C, "TO STDOUT"),
    case("copy-query-to-stdout", "COPY (SELECT * FROM t WHERE a = 1) TO STDOUT WITH CSV HEADER", C),
    case("copy-then-select", "COPY t FROM STDIN; SELECT 1", C),
    case("copy-session-query", "COPY (SELECT set_config('a', 'b', false)) TO STDOUT", C),
]

TRANSACTION = [
    case("begin", "BEGIN", T, "BEGIN"),
    case("begin-isolation", "BEGIN ISOLATION LEVEL SERIALIZABLE", T),
    case("start-transaction", "START TRANSACTION READ ONLY", T, "START TRANSACTION"),
    case("commit", "COMMIT", T, "COMMIT"),
    case("end", "END", T, "COMMIT"),
    case("rollback", "ROLLBACK", T, "ROLLBACK"),
    case("abort", "ABORT", T, "ROLLBACK"),
    case("commit-and-chain", "COMMIT AND CHAIN", T),
    case("prepare-transaction", "PREPARE TRANSACTION 'x'", T, "PREPARE TRANSACTION"),
    case("commit-prepared", "COMMIT PREPARED 'x'", T, "COMMIT PREPARED"),
    case("rollback-prepared", "ROLLBACK PREPARED 'x'", T, "ROLLBACK PREPARED"),
    case("mixed-case-after-comment", "/* go */ BeGiN", T),
    case("begin-select-commit", "begin; select 1; commit", T),
    case("outranks-copy", "COPY t FROM STDIN; COMMIT", T),
]


ALL_CASES = PLAIN + UTILITY + SESSION + OPAQUE + COPY + TRANSACTION


@pytest.mark.parametrize("sql, kind, reason", ALL_CASES)
def test_classify(sql: str | bytes, kind: Kind, reason: str) -> None:
    found = classify(sql)
    assert found.kind is kind, found
    assert reason in found.reason
    if kind in (Kind.PLAIN, Kind.UTILITY):
        assert found.reason == ""
    else:
        assert found.reason


@pytest.mark.parametrize("name", sorted(statements._SESSION_FUNCTIONS - {"set_config"}))
def test_every_session_function(name: str) -> None:
    assert classify(f"SELECT {name}($1)").kind is Kind.SESSION
    nested = f"SELECT 1 FROM t WHERE x = (SELECT pg_catalog.{name.upper()}(1, 'a'))"
    assert classify(nested).kind is Kind.SESSION


@pytest.mark.parametrize("sql, count", [
    pytest.param("", 0, id="empty"),
    pytest.param("  \n\t", 0, id="whitespace"),
    pytest.param("-- only a comment", 0, id="line-comment"),
    pytest.param("/* only /* a */ comment */", 0, id="block-comment"),
    pytest.param("SELECT 1", 1, id="one"),
    pytest.param("SELECT 1; SELECT 2; SELECT ';'", 3, id="three"),
    pytest.param("SELECEt", 1, id="unparsable-counts-one"),
])
def test_statement_count(sql: str, count: int) -> None:
    found = classify(sql)
    assert found.statements == count
    if count == 0:
        assert found == Classification(Kind.PLAIN, 0, False, "", False)


@pytest.mark.parametrize("sql, from_stdin", [
    pytest.param("COPY t FROM STDIN", True, id="from-stdin"),
    pytest.param("COPY t (a) FROM STDIN (FORMAT binary)", True, id="from-stdin-binary"),
    pytest.param("COPY t TO STDOUT", False, id="to-stdout"),
    pytest.param("COPY t FROM STDIN; SELECT 1", False, id="not-single"),
    pytest.param("COPY t FROM '/tmp/x'", False, id="from-file"),
    pytest.param("SELECT 1", False, id="select"),
])
def test_copy_from_stdin(sql: str, from_stdin: bool) -> None:
    assert classify(sql).copy_from_stdin is from_stdin


def test_cache_hit_returns_the_same_object() -> None:
    sql = "SELECT a FROM cache_hit_test WHERE id = $1"
    assert classify(sql) is classify(sql)
    assert classify(sql.encode()) is classify(sql.encode())
    assert statements._cache[sql] is classify(sql)


def test_cache_is_bounded_by_bytes() -> None:
    filler = "x" * 30_000
    texts = [f"SELECT {i} /* {filler} */" for i in range(2 * CACHE_MAX_BYTES // len(filler))]
    for text in texts:
        classify(text)
        assert statements._cache_bytes <= CACHE_MAX_BYTES
    assert sum(len(key) + statements.ENTRY_BYTES for key in statements._cache) \
        == statements._cache_bytes  # ASCII keys
    assert texts[0] not in statements._cache  # oldest evicted
    assert texts[-1] in statements._cache
    assert len(statements._cache) == len(statements._order)


def test_huge_text_is_not_parsed_nor_cached() -> None:
    sql = "SELECT 1 /* " + "x" * CACHE_MAX_TEXT + " */"
    found = classify(sql)
    assert found.kind is Kind.OPAQUE and found.reason.startswith("not parsed")
    assert sql not in statements._cache
    wide = "SELECT 1 /* " + "é" * (CACHE_MAX_TEXT // 2) + " */"  # few chars, many bytes
    assert classify(wide).kind is Kind.PLAIN
    assert wide not in statements._cache


def test_huge_comment_hides_nothing() -> None:
    # Not parsed, so treated as able to do anything: run alone, reset after.
    assert classify("/* " + "x" * (1 << 20) + " */ SET ROLE admin").kind is Kind.OPAQUE


def test_deep_nesting_is_opaque_not_a_crash() -> None:
    found = classify("SELECT " + "+".join(["1"] * 30_000))
    assert found.kind is Kind.OPAQUE and found.reason.startswith("cannot parse")


def test_concurrent_misses_and_evictions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(statements, "CACHE_MAX_BYTES", 4096)
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(300):
                if i % 2:
                    sql, expected = f"SELECT {i % 97} FROM t{n} WHERE a = $1", Kind.PLAIN
                else:
                    sql, expected = f"SET x.y{i % 89} = {n}", Kind.SESSION
                assert classify(sql).kind is expected
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert statements._cache_bytes <= 4096
    assert sum(size for _, size in statements._order) == statements._cache_bytes
    assert set(statements._cache) == {key for key, _ in statements._order}


def test_cache_of_short_texts_is_bounded_by_their_overhead_too() -> None:
    count = 2 * CACHE_MAX_BYTES // statements.ENTRY_BYTES
    for i in range(count):  # "SELECT 1234567": a dozen bytes each, far more in memory
        classify(f"SELECT {i}")
    assert len(statements._cache) < CACHE_MAX_BYTES // statements.ENTRY_BYTES


@pytest.mark.parametrize(("sql", "changes"), [
    ("SELECT * FROM t WHERE id = $1", False),
    ("INSERT INTO t VALUES (1) RETURNING *", False),
    ("WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d", False),
    ("SET search_path = app", False),
    ("SELECT set_config('app.tenant', '7', false)", False),
    ("EXPLAIN SELECT 1", False),
    ("VACUUM ANALYZE t", False),
    ("TRUNCATE t", False),
    ("CREATE INDEX ON t (id)", False),
    ("REFRESH MATERIALIZED VIEW m", False),
    ("GRANT SELECT ON t TO PUBLIC", False),
    ("COMMENT ON TABLE t IS 'x'", False),
    ("CREATE OR REPLACE VIEW v AS SELECT 1 AS a, 2 AS b", True),
    ("ALTER TYPE mood ADD VALUE 'meh'", True),
    ("ALTER DOMAIN d SET NOT NULL", True),
    ("CREATE TABLE t2 (id int)", True),
    ("ALTER TABLE t ADD COLUMN b int", True),
    ("DROP TABLE t", True),
    ("SELECT * INTO t3 FROM t", True),
    ("EXPLAIN ANALYZE CREATE TABLE t4 AS SELECT 1", True),
    ("INSERT INTO t VALUES (1); ALTER TABLE t DROP COLUMN b", True),
    ("DO $$ BEGIN EXECUTE 'ALTER TABLE t ADD c int'; END $$", True),
    ("SELEC nothing", True),  # unparsable: assume the worst
    ("/* bulk */ INSERT INTO t VALUES " + "(1)," * 20_000 + "(1)", False),  # too long to parse
    ("SELECT " + "1," * 40_000 + "1", True),  # too long, and SELECT may be SELECT INTO
], ids=lambda value: value[:30] if isinstance(value, str) else None)
def test_ddl_is_told_apart_from_statements_that_keep_every_table_as_it_was(
        sql: str, changes: bool) -> None:
    # After DDL the broker drops every connection's prepared plans (0A000).
    assert classify(sql).changes_schema is changes


def test_long_new_texts_beyond_the_parse_budget_run_unparsed_and_uncached(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # A flood of distinct long texts: once the loop's share of parsing time
    # is spent, the rest are treated as texts too long to parse (anything
    # may happen: alone, reset after), and not cached, so they are parsed
    # once there is time again.  Short texts are always parsed.
    monkeypatch.setattr(statements, "budget", statements.ParseBudget(0.25, 0.002))
    dense = "SELECT " + ",".join(str(i % 10) for i in range(2000))  # 4 KB, a few ms each
    found = [classify(f"{dense} -- {n}") for n in range(20)]
    unparsed = [f for f in found if f.reason.startswith("not parsed: the time")]
    assert found[0].kind is Kind.PLAIN and unparsed
    assert all(f.kind is Kind.OPAQUE and f.changes_schema for f in unparsed)
    assert statements.budget.refused == len(unparsed)
    assert sum(f"{dense} -- {n}" in statements._cache for n in range(20)) == 20 - len(unparsed)
    dml = classify("INSERT INTO t VALUES " + ",".join(f"({i})" for i in range(1000)))
    assert dml.reason.startswith("not parsed") and not dml.changes_schema  # DML by its first word
    assert classify("SET search_path = a").kind is Kind.SESSION  # short: parsed all the same
    statements.budget.at -= 1.0  # a second later: a quarter second of parsing is back
    assert classify(f"{dense} -- later").kind is Kind.PLAIN


@pytest.mark.parametrize("sql, drops", [
    ("SET LOCAL search_path = tenant, public", True),
    ("SET search_path TO tenant", True),
    ("RESET search_path", True),
    ("RESET ALL", True),
    ("SELECT set_config('search_path', 'tenant', true)", True),
    ("SELECT 1 FROM (SELECT pg_catalog.set_config($1, 'x', true)) s", True),  # name unknown
    ("SELECT set_config('application_name', 'x', true)", False),
    ("DEALLOCATE ALL", True),
    ("DEALLOCATE _pb_1", True),
    ("DISCARD PLANS", True),
    ("SET LOCAL statement_timeout = 5", False),
    ("SELECT * FROM t WHERE id = $1", False),
    ("CREATE TABLE t2 (a int)", False),
])
def test_statements_after_which_a_connections_plans_are_unusable(sql, drops):
    assert classify(sql).drops_plans is drops
