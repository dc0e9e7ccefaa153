"""Live control: ``poolbroker ctl`` over the broker's own socket, SIGHUP
reloads, pause/resume, reconnect and drain, against real broker processes
and a real PostgreSQL; the cap sampled from pg_stat_activity."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import tomllib
import uuid
from typing import Any

import pytest

import client
from client import protocol
from conftest import (
    REPO, ConnectionSampler, Load, _toml, backend_pids, free_port, request_as, wait_until,
)
from test_security import NOBODY, certificates  # noqa: F401 (a fixture)

STATEMENT = "SELECT pg_backend_pid() FROM pg_sleep(0.01)"
"""Long enough (10 ms) that a few client processes keep every connection busy."""


def _ctl(broker: Any, *args: str, **environ: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "broker.cli", "ctl", *args,
                           "--endpoint", broker.endpoint],
                          capture_output=True, text=True, timeout=30, cwd=REPO,
                          env={**os.environ, **environ})


def _rewrite(broker: Any, **changes: Any) -> None:
    """Change settings in the broker's config file (None: remove one)."""
    with open(broker.config, "rb") as f:
        table = tomllib.load(f)["poolbroker"]
    table.update(changes)
    broker.config.write_text("[poolbroker]\n" + "".join(
        f"{k} = {_toml(v)}\n" for k, v in table.items() if v is not None))


class Running(threading.Thread):
    """One statement run from its own client, in the background."""

    def __init__(self, broker: Any, sql: str) -> None:
        super().__init__()
        self.rows: list[Any] = []
        self._client = client.Client(broker.endpoint, timeout=10)
        self._sql = sql
        self.start()

    def run(self) -> None:
        self.rows = self._client.execute(self._sql).rows


def test_ctl_is_for_the_brokers_own_user_only(start_broker):
    if os.geteuid() != 0:
        pytest.skip("acting as another user needs root (CI runs as root)")
    broker = start_broker(max_connections=1, allowed_uids=[NOBODY],
                          endpoint=f"ipc://@pbtest-{uuid.uuid4().hex[:12]}")
    # An allowed user may run statements, not control the broker.
    _, status, payload = request_as(NOBODY, broker.endpoint, protocol.OP_CONTROL, ["pause"])
    assert status == protocol.STATUS_ERROR
    assert payload["kind"] == "ProgrammingError" and payload["sqlstate"] == "42501"
    assert broker.stats()["paused"] == 0
    # The broker's own user may, through the command line.
    out = _ctl(broker, "pools")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[:3] == ["pool", "cl_active", "cl_waiting"]
    assert "default" in out.stdout
    stats = _ctl(broker, "stats")
    assert stats.returncode == 0 and "uptime" in stats.stdout and "paused" in stats.stdout
    assert broker.client.execute("SELECT 1").rows == [(1,)]


def test_ctl_is_refused_over_tcp(start_broker):
    # No uid travels over tcp; without CURVE no key either: no operator.
    broker = start_broker(max_connections=1, endpoint=f"tcp://127.0.0.1:{free_port()}",
                          insecure_tcp=True)
    with pytest.raises(client.ProgrammingError) as info:
        broker.client.control("drain")
    assert info.value.sqlstate == "42501"
    out = _ctl(broker, "pause")
    assert out.returncode == 1 and "broker's own user" in out.stderr
    assert broker.stats()["paused"] == 0
    assert broker.client.execute("SELECT 1").rows == [(1,)]


def test_ctl_over_tcp_only_with_an_admin_key(start_broker, certificates, tmp_path):
    keys, allowed = certificates
    admins = tmp_path / "admins"
    admins.mkdir()
    shutil.copy(keys / "stranger.key", admins / "operator.key")  # not among the clients'
    broker = start_broker(
        endpoint=f"tcp://127.0.0.1:{free_port()}", max_connections=1,
        curve_secret_key_file=str(keys / "broker.key_secret"),
        curve_allowed_clients=str(allowed), curve_admin_clients=str(admins),
        client_options={"curve_server_key": str(keys / "broker.key"),
                        "curve_client_cert": str(keys / "worker.key_secret")})
    # A client's key runs statements, not the broker.
    with pytest.raises(client.ProgrammingError):
        broker.client.control("pause")
    operator = {"POOLBROKER_CURVE_SERVER_KEY": str(keys / "broker.key"),
                "POOLBROKER_CURVE_CLIENT_CERT": str(keys / "stranger.key_secret")}
    out = _ctl(broker, "pause", **operator)
    assert out.returncode == 0, out.stderr
    assert broker.stats()["paused"] == 1
    assert _ctl(broker, "resume", **operator).returncode == 0
    assert broker.stats()["paused"] == 0
    assert broker.client.execute("SELECT 1").rows == [(1,)]


def test_max_waiting_still_bounds_the_queue_while_paused(start_broker):
    broker = start_broker(max_connections=1, max_waiting=1)
    broker.client.control("pause")
    waiter = Running(broker, "SELECT 1")
    assert wait_until(lambda: broker.stats()["requests_waiting"] == 1, 5)
    with pytest.raises(client.TooManyRequests):
        client.Client(broker.endpoint, timeout=5).execute("SELECT 2")
    broker.client.control("resume")
    waiter.join(5)
    assert waiter.rows == [(1,)]


def test_sighup_raises_and_lowers_the_cap_under_load(start_broker, dsn, admin):
    broker = start_broker(min_connections=1, max_connections=2)
    app = broker.application_name
    load = Load(broker.endpoint, 6, 7.0, sql=STATEMENT, transaction_every=20)
    with ConnectionSampler(dsn, app) as low:
        time.sleep(1.0)
    _rewrite(broker, max_connections=5)
    broker.proc.send_signal(signal.SIGHUP)
    with ConnectionSampler(dsn, app) as high:
        assert wait_until(lambda: high.maximum == 5, 5), high.maximum
    _rewrite(broker, max_connections=1)
    broker.proc.send_signal(signal.SIGHUP)
    # The surplus closes as it becomes idle; nothing running is cancelled.
    assert wait_until(lambda: len(backend_pids(admin, app)) <= 1, 5)
    with ConnectionSampler(dsn, app) as lowered:
        time.sleep(1.0)
    answered, errors, _ = load.finish()
    stats = broker.stats()
    print(f"\n{answered} requests; connections sampled at most: {low.maximum} at cap 2, "
          f"{high.maximum} at cap 5, {lowered.maximum} at cap 1 "
          f"({low.samples + high.samples + lowered.samples} samples)")
    assert errors == []
    assert low.maximum <= 2 and high.maximum == 5 and lowered.maximum <= 1
    assert stats["pool_max"] == 1 and stats["reloads"] == 2
    assert stats["requests_cancelled"] == 0
    assert "SIGHUP: applied max_connections=5" in broker.log()


def test_a_setting_that_needs_a_restart_is_named_and_kept(start_broker, admin):
    broker = start_broker(max_connections=2, max_clients=50)
    app = broker.application_name
    broker.client.execute("SELECT 1")
    _rewrite(broker, max_clients=60, application_name="renamed", pool_timeout=7.0)
    answer = broker.client.control("reload")
    assert answer == {"applied": {"pool_timeout": 7.0},
                      "restart_needed": ["max_clients", "application_name"], "problems": []}
    assert "only applied at a restart (kept as they are): max_clients, application_name" \
        in broker.log()
    assert broker.stats()["clients_max"] == 50
    broker.client.control("reconnect")  # new connections still carry the old name
    assert broker.client.execute("SELECT current_setting('application_name')").rows[0][0] \
        .startswith(app)
    assert backend_pids(admin, app)


def test_an_invalid_file_keeps_the_running_settings(start_broker):
    broker = start_broker(max_connections=3)
    _rewrite(broker, max_connections="4", max_idel=1.0)
    answer = broker.client.control("reload")
    assert answer["applied"] == {} and len(answer["problems"]) == 2
    assert any("max_connections must be an integer" in p for p in answer["problems"])
    assert any("unknown setting 'max_idel'" in p for p in answer["problems"])
    broker.proc.send_signal(signal.SIGHUP)  # the same, by signal: logged, not fatal
    assert wait_until(lambda: broker.log().count("max_connections must be an integer") == 2, 5)
    assert "the settings are invalid: kept the running ones" in broker.log()
    out = _ctl(broker, "reload")
    assert out.returncode == 1 and "max_idel" in out.stderr
    assert broker.proc.poll() is None
    stats = broker.stats()
    assert stats["pool_max"] == 3 and stats["reloads"] == 0
    assert broker.client.execute("SELECT 1").rows == [(1,)]


def test_pause_holds_requests_their_deadlines_apply_and_resume_releases_them(start_broker):
    broker = start_broker(max_connections=2)
    c = broker.client
    slow = Running(broker, "SELECT 7 FROM pg_sleep(0.5)")
    assert wait_until(lambda: broker.stats()["pool_active"] == 1, 5)
    assert c.control("pause") is None
    assert broker.stats()["paused"] == 1
    # A deadline passes while paused: PoolTimeout, the statement never ran.
    with pytest.raises(client.PoolTimeout):
        client.Client(broker.endpoint, timeout=0.5).execute("SELECT 1")
    slow.join()
    assert slow.rows == [(7,)]  # the statement running when paused finished
    waiter = Running(broker, "SELECT 2")
    assert wait_until(lambda: broker.stats()["requests_waiting"] == 1, 5)
    time.sleep(0.3)
    assert waiter.is_alive() and broker.stats()["requests_waiting"] == 1
    assert _ctl(broker, "resume").returncode == 0
    waiter.join(5)
    assert waiter.rows == [(2,)]
    stats = broker.stats()
    assert stats["paused"] == 0 and stats["requests_abandoned"] == 1


def test_reconnect_replaces_every_backend_without_failing_a_request(start_broker, dsn, admin):
    broker = start_broker(min_connections=2, max_connections=3)
    app = broker.application_name
    load = Load(broker.endpoint, 4, 4.0, sql=STATEMENT, transaction_every=20)
    with ConnectionSampler(dsn, app) as sampler:
        time.sleep(1.0)
        before = backend_pids(admin, app)
        assert broker.client.control("reconnect") is None
        assert wait_until(lambda: backend_pids(admin, app).isdisjoint(before), 5)
        answered, errors, _ = load.finish()
    stats = broker.stats()
    print(f"\n{answered} requests, {len(before)} backends replaced, "
          f"at most {sampler.maximum} connections sampled (cap 3)")
    assert errors == [] and answered > 0
    assert stats["connections_recycled"] >= len(before) >= 2
    assert stats["connections_lost"] == 0
    assert sampler.maximum <= 3


def test_drain_finishes_what_runs_and_exits_0(start_broker):
    broker = start_broker(max_connections=2)
    slow = Running(broker, "SELECT 3 FROM pg_sleep(0.5)")
    assert wait_until(lambda: broker.stats()["pool_active"] == 1, 5)
    out = _ctl(broker, "drain")
    assert out.returncode == 0, out.stderr
    assert broker.proc.wait(15) == 0
    slow.join()
    assert slow.rows == [(3,)]
    assert "poolbroker ctl drain" in broker.log()
