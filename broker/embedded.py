"""A PostgreSQL cluster of our own: ``make run`` without a DSN, and the tests.

PostgreSQL refuses to run as root, so when we are root the server runs
as the ``postgres`` user and owns its directories.
"""

from __future__ import annotations

import glob
import os
import pwd
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

SERVER_USER = "postgres"

# Settings for a disposable cluster: durability is not the point here.
DEFAULT_SERVER_SETTINGS = {
    "listen_addresses": "",
    "max_connections": "200",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
}


class PostgresNotFound(RuntimeError):
    pass


def find_bindir() -> Path:
    """Where initdb and postgres live: $POOLBROKER_PG_BINDIR, Debian's layout, or PATH."""
    candidates = []
    if os.environ.get("POOLBROKER_PG_BINDIR"):
        candidates.append(os.environ["POOLBROKER_PG_BINDIR"])
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                         key=lambda p: int(p.split("/")[-2]) if p.split("/")[-2].isdigit() else 0,
                         reverse=True)
    which = shutil.which("initdb")
    if which:
        candidates.append(os.path.dirname(which))
    for candidate in candidates:
        if os.path.exists(os.path.join(candidate, "initdb")):
            return Path(candidate)
    raise PostgresNotFound(
        "PostgreSQL server binaries (initdb, postgres) not found: install them "
        "(Debian/Ubuntu: apt-get install postgresql) or set POOLBROKER_PG_BINDIR")


def _server_user() -> dict[str, Any]:
    """subprocess arguments that run a command as the server's user."""
    if os.getuid() != 0:
        return {}
    try:
        pwd.getpwnam(SERVER_USER)
    except KeyError:
        raise PostgresNotFound(
            f"running as root needs a '{SERVER_USER}' user for PostgreSQL "
            "(the postgresql package creates it)") from None
    return {"user": SERVER_USER, "group": pwd.getpwnam(SERVER_USER).pw_gid}


class Cluster:
    """A cluster in ``datadir`` listening only on a unix socket in ``socket_dir``."""

    def __init__(self, datadir: str | Path, socket_dir: str | Path, port: int = 5432,
                 settings: dict[str, str] | None = None) -> None:
        self.datadir = Path(datadir).absolute()
        self.socket_dir = Path(socket_dir).absolute()
        self.port = port
        self.settings = {**DEFAULT_SERVER_SETTINGS, **(settings or {})}
        self.bindir = find_bindir()
        self._as_server_user = _server_user()

    @property
    def dsn(self) -> str:
        return f"host={self.socket_dir} port={self.port} user=postgres dbname=postgres"

    def _own(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self._as_server_user:
            entry = pwd.getpwnam(SERVER_USER)
            os.chown(path, entry.pw_uid, entry.pw_gid)

    def _run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.bindir / argv[0]), *argv[1:]], check=check,
                              capture_output=True, text=True, cwd="/",
                              **self._as_server_user)

    def init(self) -> None:
        """initdb once; a cluster already there is kept."""
        if (self.datadir / "PG_VERSION").exists():
            return
        self._own(self.datadir)
        self._run("initdb", "-D", str(self.datadir), "-U", "postgres", "-A", "trust",
                  "-E", "UTF8", "--no-sync")

    def _options(self) -> list[str]:
        settings = {**self.settings, "unix_socket_directories": str(self.socket_dir),
                    "port": str(self.port)}
        return [f"-c{name}={value}" for name, value in settings.items()]

    def _shell_options(self) -> str:
        """The same, as one string for ``pg_ctl -o`` (which a shell parses)."""
        return " ".join(shlex.quote(option) for option in self._options())

    def server_argv(self) -> list[str]:
        """The foreground server command (for supervisord)."""
        return [str(self.bindir / "postgres"), "-D", str(self.datadir), *self._options()]

    def exec_server(self) -> None:
        """Replace this process with the server, as the server's user."""
        self._own(self.socket_dir)
        if self._as_server_user:
            os.setgid(self._as_server_user["group"])
            os.setuid(pwd.getpwnam(SERVER_USER).pw_uid)
        argv = self.server_argv()
        os.execv(argv[0], argv)

    def start(self) -> None:
        self._own(self.socket_dir)
        self._run("pg_ctl", "-D", str(self.datadir), "-o", self._shell_options(), "-w", "-t", "60",
                  "-l", str(self.datadir / "server.log"), "start")

    def running(self) -> bool:
        return self._run("pg_ctl", "-D", str(self.datadir), "status", check=False).returncode == 0

    def start_if_stopped(self) -> None:
        if not self.running():
            self.start()

    def restart(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.datadir), "-o", self._shell_options(), "-m", mode, "-w",
                  "-l", str(self.datadir / "server.log"), "restart")

    def stop(self, mode: str = "immediate") -> None:
        self._run("pg_ctl", "-D", str(self.datadir), "-m", mode, "-w", "stop", check=False)
