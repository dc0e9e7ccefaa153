"""Settings precedence, the endpoint's directory, and refusals at start-up."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from broker.config import ConfigError, Settings, load
from conftest import REPO, short_tempdir


def test_precedence_flag_env_file_default(tmp_path):
    config = tmp_path / "pb.toml"
    config.write_text('[poolbroker]\ndsn = "dbname=file"\nmax_connections = 3\npool_timeout = 7\n'
                      'idle_transaction_timeout = 9\n')
    env = {"POOLBROKER_DSN": "dbname=env", "POOLBROKER_MAX_CONNECTIONS": "5"}
    settings = load(str(config), {"max_connections": 8, "dsn": None}, environ=env)
    assert settings.max_connections == 8  # flag beats env
    assert settings.dsn == "dbname=env"  # env beats file
    assert settings.pool_timeout == 7.0  # file beats default
    assert settings.max_waiting == Settings(dsn="dbname=x").max_waiting  # default
    assert settings.application_name == "poolbroker"


def test_shipped_config_parses_and_matches_the_defaults():
    settings = load(str(REPO / "etc" / "poolbroker.toml"), {"dsn": "dbname=x"}, environ={})
    assert settings == Settings(dsn="dbname=x")


@pytest.mark.parametrize("text,message", [
    ("[poolbroker]\nmax_conections = 3\n", "unknown setting"),
    ("[poolbroker]\nmax_connections = 'many'\n", "must be int"),
    ("[poolbroker]\nmax_connections = 0\n", "at least 1"),
    ("[poolbroker]\nmax_connections = 2\nmin_connections = 3\n", "must not exceed"),
    ("[poolbroker]\npool_timeout = -1\n", "negative"),
    ("[poolbroker\n", "cannot read"),
    ("[poolbroker]\napplication_name = 'app~1'\n", "application_name must be"),
    ("[poolbroker]\napplication_name = 'caf\u00e9'\n", "application_name must be"),
    (f"[poolbroker]\napplication_name = '{'x' * 47}'\n", "at most 46"),
])
def test_bad_settings_are_refused(tmp_path, text, message):
    config = tmp_path / "pb.toml"
    config.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load(str(config), {"dsn": "dbname=x"}, environ={})


def test_missing_dsn_is_refused():
    with pytest.raises(ConfigError, match="no database"):
        load(None, {}, environ={})


def _serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "broker.cli", "serve", *args],
                          capture_output=True, text=True, timeout=30, cwd=REPO,
                          env={**os.environ, "POOLBROKER_DSN": "host=/nonexistent"})


def test_ipc_socket_directory_must_be_private():
    shared = short_tempdir()
    os.chmod(shared, 0o777)
    result = _serve("--endpoint", f"ipc://{shared}/b.sock")
    assert result.returncode == 2
    assert "0700" in result.stderr


def test_ipc_socket_directory_is_created_0700(start_broker):
    parent = short_tempdir()
    broker = start_broker(endpoint=f"ipc://{parent}/sub/b.sock", max_connections=1)
    mode = stat.S_IMODE(os.stat(f"{parent}/sub").st_mode)
    assert mode == 0o700
    assert broker.client.ping() is None


def test_plain_tcp_needs_explicit_consent():
    result = _serve("--endpoint", "tcp://127.0.0.1:0")
    assert result.returncode == 2
    assert "--insecure-tcp" in result.stderr and "CURVE" in result.stderr
