"""The broker's prepared-statement cache is the one owner of prepared
statements on its server connections: tables that change shape again and
again never leave forgotten statements piling up on the server, and every
answer stays correct."""

from __future__ import annotations

from decimal import Decimal

import psycopg

from conftest import BrokerProcess

ROUNDS = 40
RUNS_PER_ROUND = 10

# The shapes the table takes in turn: (column definitions, the row, what a SELECT returns).
SHAPES = [
    ("id int PRIMARY KEY, v int", "(1, 10)", (1, 10)),
    ("id int PRIMARY KEY, v text", "(1, 'ten')", (1, "ten")),
    ("id int PRIMARY KEY, v numeric, w bool", "(1, 1.5, true)", (1, Decimal("1.5"), True)),
    ("id bigint PRIMARY KEY, v bytea", "(1, '\\x0a')", (1, b"\n")),
]


def _server_prepared(broker: BrokerProcess) -> list[str]:
    """Names prepared on the broker's (only) server connection, read through it."""
    with broker.client.transaction(timeout=10) as tx:
        return [row[0] for row in tx.execute("SELECT name FROM pg_prepared_statements").rows]


def test_prepared_statements_stay_bounded_across_repeated_schema_changes(
        start_broker, admin: psycopg.Connection):
    broker = start_broker(max_connections=1)
    c = broker.client
    wrong = []
    for round_ in range(ROUNDS):
        columns, row, expected = SHAPES[round_ % len(SHAPES)]
        admin.execute("DROP TABLE IF EXISTS prepared_churn")
        admin.execute(f"CREATE TABLE prepared_churn ({columns})")
        admin.execute(f"INSERT INTO prepared_churn VALUES {row}")
        for _ in range(RUNS_PER_ROUND):
            # The same texts every round: prepared once they repeat, and their
            # plans outdated by every change of the table.
            got = c.execute("SELECT * FROM prepared_churn WHERE id = %s", [1], timeout=10).rows
            if got != [expected]:
                wrong.append((round_, got))
            assert c.execute("SELECT count(*) FROM prepared_churn WHERE id >= %s", [0],
                             timeout=10).rows == [(1,)]
    assert wrong == []
    names = _server_prepared(broker)
    print(f"\n[prepared] after {ROUNDS} schema changes x {RUNS_PER_ROUND} runs: "
          f"{len(names)} prepared statements on the server")
    assert len(names) <= 20, names
    # And the churn did not stop the cache from working.
    for n in range(5):
        assert c.execute("SELECT %s::int + 1", [n]).rows == [(n + 1,)]
    assert len(_server_prepared(broker)) <= 20


def test_many_distinct_statements_do_not_grow_the_server_side_without_bound(start_broker):
    """Each distinct statement is run a few times (so it is worth preparing);
    what the cache forgets is deallocated on the server."""
    broker = start_broker(max_connections=1)
    c = broker.client
    distinct = 3000
    for k in range(distinct):
        sql = f"SELECT %s::int + {k}"
        for n in range(2):
            assert c.execute(sql, [n], timeout=10).rows == [(n + k,)]
    names = _server_prepared(broker)
    print(f"\n[prepared] {distinct} distinct statements run twice each: "
          f"{len(names)} prepared statements on the server")
    assert len(names) < distinct
