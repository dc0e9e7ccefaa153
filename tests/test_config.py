"""Settings: precedence, their documents, every refusal at once, the endpoint's directory."""

from __future__ import annotations

import argparse
import os
import re
import stat
import subprocess
import sys
from typing import Any, Literal, get_args, get_origin

import pytest

from broker import settings_docs
from broker.config import (
    POOL_SPECS, SPECS, ConfigError, PoolSettings, Settings, Spec, add_flags, flag_values, load,
)
from conftest import REPO, short_tempdir


def test_precedence_flag_env_file_default(tmp_path):
    config = tmp_path / "pb.toml"
    config.write_text('[poolbroker]\ndsn = "dbname=file"\nmax_connections = 3\npool_timeout = 7\n'
                      'idle_transaction_timeout = 9\nlog_level = "warning"\n')
    env = {"POOLBROKER_DSN": "dbname=env", "POOLBROKER_MAX_CONNECTIONS": "5",
           "POOLBROKER_IDLE_TRANSACTION_TIMEOUT": "2.5", "POOLBROKER_LOG_LEVEL": ""}
    settings = load(str(config), {"max_connections": 8, "dsn": None}, environ=env)
    assert settings.max_connections == 8  # flag beats env
    assert settings.dsn == "dbname=env"  # env beats file
    assert settings.idle_transaction_timeout == 2.5  # env text parsed as the declared float
    assert settings.pool_timeout == 7.0 and isinstance(settings.pool_timeout, float)  # file
    assert settings.log_level == "WARNING"  # an empty variable is unset; choices in any case
    assert settings.max_waiting == Settings(dsn="dbname=x").max_waiting  # default
    assert settings.application_name == "poolbroker"


def _another_value(spec: Spec) -> tuple[str, Any]:
    """A valid value other than the default of any declared setting: as text, as loaded."""
    if spec.kind is bool:
        return ("no", False) if spec.default else ("yes", True)
    if spec.kind is int:
        return str(spec.default + 1), spec.default + 1
    if spec.kind is float:
        return str(spec.default + 0.5), spec.default + 0.5
    if get_origin(spec.kind) is tuple:
        return "5, 6", (5, 6)
    if get_origin(spec.kind) is Literal:
        other = next(choice for choice in get_args(spec.kind) if choice != spec.default)
        return other.lower(), other
    # A string setting's example is valid where it is checked; otherwise a
    # bare port number is (metrics_listen) and any text does.
    text = spec.example or "9187"
    return text, text


@pytest.mark.parametrize("source", ["environment", "flags"])
def test_every_setting_has_an_environment_variable_and_a_flag(source):
    """Each declared setting, given another value by its variable or its flag."""
    values = {name: _another_value(spec) for name, spec in SPECS.items()}
    if source == "environment":
        settings = load(None, environ={SPECS[name].env: text for name, (text, _) in values.items()})
    else:
        parser = argparse.ArgumentParser()
        add_flags(parser)
        argv = []
        for name, (text, value) in values.items():
            flag = SPECS[name].flag
            argv += ([flag] if value else [flag.replace("--", "--no-")]) \
                if SPECS[name].kind is bool else [flag, text]
        settings = load(None, flag_values(parser.parse_args(argv)), environ={})
    assert {name: getattr(settings, name) for name in SPECS} \
        == {name: value for name, (_, value) in values.items()}


def test_serve_help_lists_every_setting_with_its_default_and_variable():
    result = _poolbroker("serve", "--help")
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())  # argparse wraps lines
    for spec in SPECS.values():
        assert spec.flag in text and spec.env in text
        default = spec.shown or f"default: {spec.shown_default}"
        assert f"{default}; env {spec.env}]" in text
    assert "--insecure-tcp, --no-insecure-tcp" in text
    assert "[default: 10; env POOLBROKER_MAX_CONNECTIONS]" in text
    assert "--dsn TEXT libpq connection string of the database [required; env POOLBROKER_DSN]" \
        in text


def test_shipped_docs_are_the_declaration():
    """etc/poolbroker.toml and README's table are written by `make docs`; run it
    after changing a setting."""
    assert (REPO / "etc" / "poolbroker.toml").read_text() == settings_docs.defaults_toml()
    readme = (REPO / "README.md").read_text()
    assert settings_docs.readme_with_table(readme) == readme


def test_shipped_config_uncommented_gives_the_defaults(tmp_path):
    """Each `# name = value` line of etc/poolbroker.toml, uncommented, is valid and
    is the default (but for the settings whose default is computed or required),
    and so is its example pool."""
    lines = (REPO / "etc" / "poolbroker.toml").read_text().splitlines()
    uncommented = [line[2:] for line in lines if re.match(r"# (\w+ = |\[pools\.\w+\]$)", line)]
    table = uncommented.index("[pools.reports]")
    assignments, pool = uncommented[:table], uncommented[table + 1:]
    assert [line.split(" = ")[0] for line in assignments] == list(SPECS)
    assert [line.split(" = ")[0] for line in pool] == list(POOL_SPECS)
    config = tmp_path / "pb.toml"
    config.write_text("[poolbroker]\n" + "\n".join(uncommented) + "\n")
    settings = load(str(config), environ={})
    reports = PoolSettings(name="reports", dsn=settings.pools[0].dsn)
    assert settings == Settings(dsn=settings.dsn, endpoint=settings.endpoint, pools=(reports,))


def test_config_prints_what_serve_would_run_with(tmp_path):
    result = _poolbroker("config", "--max-connections", "4", "--allowed-uids", "7,8",
                         env={"POOLBROKER_DSN": "dbname=app password=hunter2",
                              "POOLBROKER_POOL_TIMEOUT": "2"})
    assert result.returncode == 0, result.stderr
    assert "hunter2" not in result.stdout
    config = tmp_path / "pb.toml"
    config.write_text(result.stdout)
    settings = load(str(config), {"dsn": "dbname=app"}, environ={})
    assert (settings.max_connections, settings.allowed_uids, settings.pool_timeout) \
        == (4, (7, 8), 2.0)
    assert _poolbroker("config", "--defaults").stdout \
        == (REPO / "etc" / "poolbroker.toml").read_text()


@pytest.mark.parametrize("text,message", [
    ("[poolbroker]\nmax_conections = 3\n",
     "unknown setting 'max_conections' (did you mean 'max_connections'?)"),
    ("[poolbroker]\nmax_connections = 'many'\n",
     "max_connections must be an integer, not the string \"many\""),
    ("[poolbroker]\nmax_connections = \"4\"\n",
     "max_connections must be an integer, not the string \"4\""),
    ("[poolbroker]\nmax_waiting = true\n",
     "max_waiting must be an integer, not the boolean true"),
    ("[poolbroker]\ninsecure_tcp = 1\n", "insecure_tcp must be true or false, not the integer 1"),
    ("[poolbroker]\npool_timeout = nan\n", "pool_timeout must be a number"),
    ("[poolbroker]\nallowed_uids = 1001\n", "allowed_uids must be a list of non-negative integers"),
    ("[poolbroker]\nallowed_uids = ['1001']\n", 'not the array ["1001"]'),
    ("[poolbroker]\nlog_level = 'verbose'\n",
     "log_level must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL, not the string \"verbose\""),
    ("[poolbroker]\nmax_connections = 0\n", "max_connections must be at least 1, not 0"),
    ("[poolbroker]\npool_timeout = -1\n", "pool_timeout must be at least 0, not -1.0"),
    ("[poolbroker]\nmax_connections = 2\nmin_connections = 3\n",
     "min_connections (3) must not exceed max_connections (2)"),
    ("[poolbroker\n", "cannot read"),
    ("max_connections = 4\n", "no [poolbroker] table"),
    ("max_connections = 4\n", "max_connections is outside the [poolbroker] table"),
    ("[poolbrokr]\nmax_connections = 4\n",
     "unknown table [poolbrokr] (did you mean 'poolbroker'?)"),
    ("", "no [poolbroker] table"),
    ("[poolbroker]\napplication_name = 'app~1'\n", "application_name must be"),
    ("[poolbroker]\napplication_name = 'caf\u00e9'\n", "application_name must be"),
    (f"[poolbroker]\napplication_name = '{'x' * 47}'\n", "at most 46"),
    ("[poolbroker]\ncurve_admin_clients = '/etc/pb/admins'\n",
     "curve_admin_clients needs CURVE (curve_secret_key_file)"),
])
def test_bad_settings_are_refused(tmp_path, text, message):
    config = tmp_path / "pb.toml"
    config.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load(str(config), {"dsn": "dbname=x"}, environ={})
    assert any(message in problem for problem in caught.value.problems), caught.value.problems


@pytest.mark.parametrize("name", ["max_lifetime", "max_idle"])
def test_a_lifetime_or_idle_time_under_a_second_is_refused(name):
    flag = name.replace("_", "-")
    with pytest.raises(ConfigError, match=f"{flag} must be 0 \\(never\\) or at least 1 second"):
        load(None, {"dsn": "dbname=x", name: "0.001"}, environ={})
    assert getattr(load(None, {"dsn": "dbname=x", name: "0"}, environ={}), name) == 0


def test_missing_dsn_is_refused():
    with pytest.raises(ConfigError, match="no database"):
        load(None, {}, environ={})


def test_serve_reports_every_bad_value_at_once(tmp_path):
    config = tmp_path / "pb.toml"
    config.write_text('[poolbroker]\nmax_connections = "4"\nmax_conections = 3\n')
    result = _poolbroker("serve", "--config", str(config), "--log-level", "verbose",
                         "--pool-timeout", "soon",
                         env={"POOLBROKER_MAX_WAITING": "lots", "POOLBROKER_DSN": ""})
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert result.stderr.splitlines() == [
        f'poolbroker: {config}: max_connections must be an integer, not the string "4"',
        f"poolbroker: {config}: unknown setting 'max_conections' "
        "(did you mean 'max_connections'?)",
        "poolbroker: POOLBROKER_MAX_WAITING must be an integer, not 'lots'",
        "poolbroker: --pool-timeout must be a number, not 'soon'",
        "poolbroker: --log-level must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL, "
        "not 'verbose'",
        "poolbroker: no database: give --dsn, POOLBROKER_DSN or dsn in the config file "
        "(or [pools.NAME] tables)",
    ]


def test_pools_are_tables_checked_like_settings(tmp_path):
    config = tmp_path / "pb.toml"
    config.write_text(
        '[poolbroker]\nmax_connections = 6\n'
        '[pools.reports]\ndsn = "dbname=reports password=s3cret"\nmax_connections = 2\n'
        '[pools.etl]\ndsn = "dbname=etl"\nmin_connections = 1\n')
    settings = load(str(config), {"dsn": "dbname=app"}, environ={})
    assert [(p.name, p.dsn, p.max_connections, p.min_connections) for p in settings.pools] == [
        ("reports", "dbname=reports password=s3cret", 2, 0), ("etl", "dbname=etl", 0, 1)]
    assert settings.all_dsns == ("dbname=app", "dbname=reports password=s3cret", "dbname=etl")
    # Pools alone, without a default dsn, are a database enough.
    assert load(str(config), environ={}).dsn == ""


@pytest.mark.parametrize("tables, message", [
    ('[pools.reports]\nmax_connections = 2\n', "pools.reports: no dsn"),
    ('[pools.reports]\ndsn = "dbname=r"\nmax_conections = 2\n',
     "unknown setting 'max_conections' (did you mean 'max_connections'?)"),
    ('[pools.reports]\ndsn = "dbname=r"\nmax_connections = "2"\n',
     'pools.reports.max_connections must be an integer, not the string "2"'),
    ('[pools.reports]\ndsn = "dbname=r"\nmax_connections = 9\n',
     "pools.reports.max_connections (9) must not exceed max_connections (4)"),
    ('[pools.reports]\ndsn = "dbname=r"\nmin_connections = 4\n',
     "the pools' min_connections add up to 5, more than max_connections (4)"),
    ('[pools.default]\ndsn = "dbname=r"\n', "and not 'default'"),
    ('[pools."bad name"]\ndsn = "dbname=r"\n', "a pool's name is 1-63 letters"),
    ('[pools.reports]\ndsn = "host=\'unterminated"\n', "pools.reports.dsn is not a valid libpq"),
    ('[pools]\nreports = "dbname=r"\n', "[pools] holds one table per pool"),
])
def test_bad_pools_are_refused_with_the_reason(tmp_path, tables, message):
    config = tmp_path / "pb.toml"
    config.write_text("[poolbroker]\nmax_connections = 4\n" + tables)
    with pytest.raises(ConfigError) as caught:
        load(str(config), {"dsn": "dbname=app"}, environ={})
    assert any(message in problem for problem in caught.value.problems), caught.value.problems


def _poolbroker(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("POOLBROKER_")}
    return subprocess.run([sys.executable, "-m", "broker.cli", *args],
                          capture_output=True, text=True, timeout=30, cwd=REPO,
                          env={**environ, "POOLBROKER_DSN": "host=/nonexistent", **(env or {})})


def test_ipc_socket_directory_must_be_private():
    shared = short_tempdir()
    os.chmod(shared, 0o777)
    result = _poolbroker("serve", "--endpoint", f"ipc://{shared}/b.sock")
    assert result.returncode == 2
    assert "0700" in result.stderr


def test_ipc_socket_directory_is_created_0700(start_broker):
    parent = short_tempdir()
    broker = start_broker(endpoint=f"ipc://{parent}/sub/b.sock", max_connections=1)
    mode = stat.S_IMODE(os.stat(f"{parent}/sub").st_mode)
    assert mode == 0o700
    assert broker.client.ping() is None


def test_plain_tcp_needs_explicit_consent():
    result = _poolbroker("serve", "--endpoint", "tcp://127.0.0.1:0")
    assert result.returncode == 2
    assert "--insecure-tcp" in result.stderr and "CURVE" in result.stderr


def test_the_live_settings_are_those_read_per_use():
    """The split a reload follows (README, Live control): what is bound,
    opened or sized at start needs a restart."""
    restart = {name for name, spec in SPECS.items() if not spec.live}
    assert restart == {"dsn", "endpoint", "max_message_bytes", "max_result_bytes",
                       "max_clients", "application_name", "curve_secret_key_file",
                       "insecure_tcp", "metrics_listen", "metrics_allow_remote"}
