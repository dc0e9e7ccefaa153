"""Nobody let in who should not be, and no secret let out."""

from __future__ import annotations

import subprocess
import sys

import pytest

import client
from conftest import REPO

SECRET = "Pw-Leak-7c1e"


def test_dsn_password_never_appears_in_logs_stats_or_errors(start_broker, dsn):
    # Trust authentication ignores the password; the missing database makes
    # every connection attempt fail, so error paths run and get logged.
    broker = start_broker(dsn=f"{dsn} password={SECRET} dbname=no_such_db_{SECRET}",
                          log_level="DEBUG")
    with pytest.raises(client.OperationalError) as info:
        broker.client.execute("SELECT 1", timeout=5)
    message = str(info.value)
    assert "no_such_db_********" in message  # the error is precise, the secret masked
    assert SECRET not in message
    assert SECRET not in repr(broker.stats())
    stats = subprocess.run([sys.executable, "-m", "broker.cli", "stats",
                            "--endpoint", broker.endpoint],
                           capture_output=True, text=True, timeout=30, cwd=REPO)
    assert stats.returncode == 0 and SECRET not in stats.stdout + stats.stderr
    log = broker.log()
    assert "cannot connect to the database" in log
    assert SECRET not in log


@pytest.mark.parametrize("bad_dsn", [
    f"host=/tmp password={SECRET} oops",
    f"postgresql://user:{SECRET}@localhost:5432/db?sslmode=nonsense x",
])
def test_malformed_dsn_is_refused_without_echoing_the_password(bad_dsn):
    out = subprocess.run([sys.executable, "-m", "broker.cli", "serve", "--dsn", bad_dsn,
                          "--endpoint", "ipc:///tmp/pb-never/b.sock"],
                         capture_output=True, text=True, timeout=30, cwd=REPO)
    assert out.returncode == 2
    assert "dsn is not a valid libpq connection string" in out.stderr
    assert SECRET not in out.stdout + out.stderr
