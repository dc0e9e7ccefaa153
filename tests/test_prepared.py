"""The loop prepares repeated statements on its connections, and never lets a
dropped or outdated prepared statement cost more than one clear error."""

from __future__ import annotations

import pytest

import client

PREPARED = "SELECT count(*) FROM pg_prepared_statements WHERE name LIKE '\\_pb\\_%%'"


def test_repeated_statements_are_prepared_and_correct(start_broker):
    c = start_broker(max_connections=1).client
    for n in range(10):
        assert c.execute("SELECT %s::int * 2, %s::text", [n, str(n)]).rows == [(2 * n, str(n))]
    assert c.execute(PREPARED, []).rows[0][0] >= 1
    # A parameter error is the same whether prepared or not.
    with pytest.raises(client.DataError):
        c.execute("SELECT %s::int * 2, %s::text", ["x", "y"])
    assert c.execute("SELECT %s::int * 2, %s::text", [4, "4"]).rows == [(8, "4")]


def test_discard_all_after_a_transaction_drops_nothing_we_rely_on(start_broker):
    c = start_broker(max_connections=1).client
    for n in range(3):
        c.execute("SELECT %s::int", [n])
    with c.transaction() as tx:  # session state: DISCARD ALL runs at the end
        tx.execute("SET search_path = public")
    assert c.execute(PREPARED, []).rows[0][0] <= 1  # only this query's own
    for n in range(3):
        assert c.execute("SELECT %s::int", [n]).rows == [(n,)]


def test_a_changed_table_is_rerun_transparently(start_broker, admin):
    admin.execute("DROP TABLE IF EXISTS prepared_shape")
    admin.execute("CREATE TABLE prepared_shape (id int PRIMARY KEY, a text)")
    admin.execute("INSERT INTO prepared_shape VALUES (1, 'x')")
    c = start_broker(max_connections=1).client
    for _ in range(3):
        assert c.execute("SELECT * FROM prepared_shape WHERE id = %s", [1]).rows == [(1, "x")]
    admin.execute("ALTER TABLE prepared_shape ADD COLUMN b int DEFAULT 7")
    # The prepared plan no longer fits ("cached plan must not change result
    # type"); outside a transaction the broker runs it again, unprepared.
    for _ in range(3):
        assert c.execute("SELECT * FROM prepared_shape WHERE id = %s", [1]).rows == [(1, "x", 7)]
    # Inside a transaction the error stands: the transaction is aborted.
    for _ in range(2):
        c.execute("SELECT * FROM prepared_shape WHERE id = %s", [1])
    admin.execute("ALTER TABLE prepared_shape ADD COLUMN c int DEFAULT 8")
    with pytest.raises(client.NotSupportedError) as info:
        with c.transaction() as tx:
            tx.execute("SELECT * FROM prepared_shape WHERE id = %s", [1])
    assert info.value.sqlstate == "0A000"
    assert c.execute("SELECT * FROM prepared_shape WHERE id = %s", [1]).rows == [(1, "x", 7, 8)]


@pytest.mark.parametrize("through", ["autocommit", "transaction"])
def test_ddl_through_the_broker_leaves_no_stale_plan_on_any_connection(start_broker, through):
    # The dialect compliance suites drop and recreate tables of the same
    # name between tests: every connection had the old shape prepared.
    broker = start_broker(max_connections=3)
    c = broker.client
    table = f"prepared_ddl_{through}"
    c.execute(f"DROP TABLE IF EXISTS {table}")
    c.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, a text)")
    c.execute(f"INSERT INTO {table} VALUES (1, 'x')")
    select = f"SELECT * FROM {table} WHERE id = %s"
    # Three transactions at once hold three connections: each prepares it.
    transactions = [c.transaction() for _ in range(3)]
    for tx in transactions:
        tx.__enter__()
    for _ in range(3):
        for tx in transactions:
            assert tx.execute(select, [1]).rows == [(1, "x")]
    for tx in transactions:
        tx.__exit__(None, None, None)
    assert broker.client.execute(PREPARED, []).rows[0][0] >= 1
    change = [f"DROP TABLE {table}", f"CREATE TABLE {table} (id int PRIMARY KEY, a text, b int)",
              f"INSERT INTO {table} VALUES (1, 'y', 2)"]
    if through == "autocommit":
        for sql in change:
            c.execute(sql)
    else:
        with c.transaction() as tx:
            for sql in change:
                tx.execute(sql)
    # Inside transactions, where no rerun can hide a stale plan.
    transactions = [c.transaction() for _ in range(3)]
    for tx in transactions:
        tx.__enter__()
    for tx in transactions:
        assert tx.execute(select, [1]).rows == [(1, "y", 2)]
    for tx in transactions:
        tx.__exit__(None, None, None)


def test_a_search_path_set_in_one_transaction_breaks_no_other_clients_transaction(
        start_broker, admin):
    # Schema-per-tenant apps: SET LOCAL search_path in each transaction.  A
    # plan prepared under one search_path is replanned under another against
    # another table: "cached plan must not change result type" (0A000), which
    # inside a transaction cannot be rerun.
    admin.execute("DROP SCHEMA IF EXISTS tenant_b CASCADE")
    admin.execute("DROP TABLE IF EXISTS tenant_rows")
    admin.execute("CREATE SCHEMA tenant_b")
    admin.execute("CREATE TABLE tenant_rows (id int, a text)")
    admin.execute("INSERT INTO tenant_rows VALUES (1, 'public')")
    admin.execute("CREATE TABLE tenant_b.tenant_rows (id int, a text, b int)")
    admin.execute("INSERT INTO tenant_b.tenant_rows VALUES (1, 'b', 2)")
    broker = start_broker(max_connections=1)  # one connection: every client shares its plans
    select = "SELECT * FROM tenant_rows WHERE id = %s"
    first, second = broker.client, client.Client(broker.endpoint, timeout=15)
    for _ in range(3):  # prepared under the default search_path
        assert first.execute(select, [1]).rows == [(1, "public")]
    for setting in ("SET LOCAL search_path = tenant_b, public",
                    "SELECT set_config('search_path', 'tenant_b', true)"):
        with first.transaction() as tx:
            tx.execute(setting)
            for _ in range(3):  # the old plan unused; a new one prepared here
                assert tx.execute(select, [1]).rows == [(1, "b", 2)]
        with second.transaction() as tx:  # ... is not this transaction's
            for _ in range(3):
                assert tx.execute(select, [1]).rows == [(1, "public")]
    second.close()


def test_deallocate_inside_a_transaction_leaves_no_name_the_broker_uses(start_broker):
    c = start_broker(max_connections=1).client
    select = "SELECT %s::int + 1"
    for statement in ("DEALLOCATE ALL", "DISCARD PLANS"):
        with c.transaction() as tx:
            for n in range(3):
                assert tx.execute(select, [n]).rows == [(n + 1,)]
            tx.execute(statement)
            assert tx.execute(select, [5]).rows == [(6,)]  # was 26000
        assert c.execute(select, [7]).rows == [(8,)]
        assert c.execute(PREPARED, []).rows[0][0] <= 1


def test_a_transaction_waiting_on_another_transactions_ddl_gets_the_new_shape(start_broker,
                                                                              admin):
    # The DDL has been sent but not committed when the other transaction's
    # statement goes out: by name, it waits for the lock and is then replanned
    # against the new columns (0A000, which a transaction cannot rerun).
    import threading
    admin.execute("DROP TABLE IF EXISTS prepared_race")
    admin.execute("CREATE TABLE prepared_race (id int, a text)")
    admin.execute("INSERT INTO prepared_race VALUES (1, 'x')")
    broker = start_broker(max_connections=2)
    c = broker.client
    select = "SELECT * FROM prepared_race WHERE id = %s"
    first, second = c.transaction(), c.transaction()  # both connections prepare it
    first.__enter__()
    second.__enter__()
    for _ in range(3):
        assert first.execute(select, [1]).rows == second.execute(select, [1]).rows == [(1, "x")]
    first.__exit__(None, None, None)
    second.__exit__(None, None, None)
    migration = c.transaction()
    migration.__enter__()
    migration.execute("ALTER TABLE prepared_race ADD COLUMN b int DEFAULT 5")
    other = client.Client(broker.endpoint, timeout=15)
    seen = []

    def reader():
        with other.transaction() as tx:
            seen.append(tx.execute(select, [1]).rows)

    thread = threading.Thread(target=reader)
    thread.start()
    # The reader's statement is on the server, waiting for the lock.
    while not admin.execute("SELECT count(*) FROM pg_locks WHERE NOT granted").fetchone()[0]:
        thread.join(0.02)
    migration.__exit__(None, None, None)
    thread.join()
    assert seen == [[(1, "x", 5)]]
    other.close()
