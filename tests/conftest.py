"""Fixtures: a real PostgreSQL cluster, real broker processes, real forks."""

from __future__ import annotations

import configparser
import contextlib
import multiprocessing
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import psycopg
import pytest
import zmq

import client
from broker.embedded import Cluster
from broker.predecessors import MARK

OF_APPLICATION = f"split_part(application_name, '{MARK}', 1) = %s"
"""SQL: the backend belongs to the application named by the parameter; brokers
append their mark (``~...``) to the configured application_name."""

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
"""Where the venv's console scripts (supervisord, gunicorn, poolbroker) are."""


def stop_process(proc: subprocess.Popen, timeout: float) -> int:
    """TERM, wait up to ``timeout``, then KILL; the exit code."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


def short_tempdir(prefix: str = "pb-") -> str:
    """A 0700 directory short enough for an ipc path (107 bytes at most)."""
    return tempfile.mkdtemp(prefix=prefix, dir="/tmp")


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on now (the OS's pick)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def throwaway_cluster(prefix: str, port: int) -> Iterator[Cluster]:
    """A PostgreSQL cluster from initdb in a temporary directory, removed after."""
    root = short_tempdir(prefix)
    os.chmod(root, 0o755)  # the server may run as another user
    cluster = Cluster(f"{root}/data", f"{root}/run", port=port)
    cluster.init()
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def pg() -> Cluster:
    # Under pytest-xdist (make test) each worker process has its own session,
    # hence its own cluster: a directory of its own with a unix socket only
    # (listen_addresses is empty, so the port only names the socket file).
    # pg_stat_activity counts, pg_terminate_backend sweeps and lock waits
    # therefore see one worker's brokers and connections, as in a serial run.
    with throwaway_cluster("pb-pg-", 5432) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def dsn(pg: Cluster) -> str:
    return pg.dsn


@pytest.fixture
def admin(dsn: str) -> psycopg.Connection:
    """A direct connection for set-up and for checking what the broker did."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        yield conn


HEAVY_FILES = frozenset({"test_soak.py", "test_limits.py", "test_fuzz.py", "test_bounds.py",
                         "test_flask_app.py", "test_operations.py"})
"""Files whose tests each load the whole machine (dozens of client processes,
gunicorn workers, thousands of sockets, fuzzing flat out).  Under pytest-xdist
(make test: --dist loadgroup) they share one group, hence one worker, so
two of them never run at once: the load beside them stays one other
worker's, and the timing windows of tests (a 2 s connect_timeout, a retry
after max_clients) keep the room they have in a serial run."""


@pytest.hookimpl(tryfirst=True)  # before xdist's worker reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Every other file is a group of its own: its tests in order on one
    # worker, its module fixtures set up once (what --dist loadfile does).
    for item in items:
        name = item.path.name
        item.add_marker(pytest.mark.xdist_group("heavy" if name in HEAVY_FILES else name))


_FIGURES: list[str] = []
"""Lines given to ``figures``, in the order their tests' reports arrived."""


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> Callable[[str], None]:
    """``figures(line)``: a line of measured figures, printed in a section at
    the end of the run.  It travels in the test's report (user_properties),
    so it reaches the terminal from a pytest-xdist worker too, where output
    printed past capture is lost."""
    return lambda line: request.node.user_properties.append(("figures", line))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    # Called in the process that prints the run: the controller under xdist.
    if report.when == "call":
        _FIGURES.extend(value for name, value in report.user_properties if name == "figures")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _FIGURES:
        terminalreporter.section("figures")
        for line in _FIGURES:
            terminalreporter.write_line(line)


class Supervisord:
    """``supervisord -n`` on a copy of one of etc/'s configs.

    The copy lives in a short temporary directory with every runtime file
    (its own log, pid file, control socket, program logs), so a test never
    touches var/ nor another test's supervisord.  ``%(here)s`` is replaced
    by the original's directory, so the programs' commands still find the
    files shipped beside it.  ``edit`` may change the parsed config before
    it is written (the ``[program:*]`` sections say what is run).
    """

    def __init__(self, template: Path, env: dict[str, str],
                 edit: Callable[[configparser.RawConfigParser, str], None] | None = None) -> None:
        self.dir = short_tempdir()
        d = self.dir
        parser = configparser.RawConfigParser()
        parser.read(template)
        here = str(Path(template).resolve().parent)
        for section in parser.sections():
            for key, value in parser[section].items():
                parser[section][key] = value.replace("%(here)s", here)
        parser["supervisord"].update(logfile=f"{d}/supervisord.log", pidfile=f"{d}/sd.pid",
                                     childlogdir=d)
        parser["unix_http_server"]["file"] = f"{d}/sd.sock"
        parser["supervisorctl"]["serverurl"] = f"unix://{d}/sd.sock"
        if parser.has_section("include"):
            # Not var/supervisord.d: `make run`'s embedded PostgreSQL is not the tests'.
            parser["include"]["files"] = f"{d}/*.include"
        for program in self.programs(parser):
            parser[f"program:{program}"]["stdout_logfile"] = f"{d}/{program}.log"
        if edit is not None:
            edit(parser, d)
        self.config = Path(d, "supervisord.conf")
        with open(self.config, "w") as f:
            parser.write(f)
        self.proc = subprocess.Popen([str(BIN / "supervisord"), "-n", "-c", str(self.config)],
                                     env=env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)

    @staticmethod
    def programs(parser: configparser.RawConfigParser) -> list[str]:
        return [s.partition(":")[2] for s in parser.sections() if s.startswith("program:")]

    def ctl(self, *args: str) -> str:
        return subprocess.run([str(BIN / "supervisorctl"), "-c", str(self.config), *args],
                              capture_output=True, text=True, timeout=60).stdout.strip()

    def pid(self, program: str) -> int:
        """The program's pid, 0 while it is not running."""
        out = self.ctl("pid", program)
        return int(out) if out.isdigit() else 0

    def log(self, program: str) -> str:
        path = Path(self.dir, f"{program}.log")
        return path.read_text(errors="replace") if path.exists() else ""

    def close(self) -> None:
        # supervisord's own stop: every program TERMed and waited for in
        # reverse priority order, groups included.
        stop_process(self.proc, timeout=60)
        shutil.rmtree(self.dir, ignore_errors=True)


class BrokerProcess:
    """``poolbroker serve`` in a subprocess, with its own endpoint and application_name."""

    def __init__(self, dsn: str, client_options: dict[str, Any] | None = None,
                 **settings: Any) -> None:
        self.dir = short_tempdir()
        self.endpoint = settings.pop("endpoint", f"ipc://{self.dir}/b.sock")
        self.open_files = settings.pop("open_files", None)  # the soft RLIMIT_NOFILE it starts with
        self.application_name = settings.setdefault("application_name",
                                                    f"pbtest-{uuid.uuid4().hex[:8]}")
        self.max_connections = settings.get("max_connections", 10)
        settings.setdefault("log_level", "DEBUG")
        pools = settings.pop("pools", {})  # name -> that [pools.NAME] table's settings
        self.config = Path(self.dir, "poolbroker.toml")
        self.config.write_text("".join(
            f"[{table}]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in values.items())
            for table, values in [("poolbroker", settings),
                                  *((f"pools.{name}", pool) for name, pool in pools.items())]))
        self.log_path = Path(self.dir, "broker.log")
        self.dsn = dsn
        self.proc: subprocess.Popen | None = None
        self.client_options = client_options or {}
        self.client = client.Client(self.endpoint, timeout=15, **self.client_options)

    def start(self, wait: bool = True) -> BrokerProcess:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "broker.cli", "serve", "--config", str(self.config),
                 "--dsn", self.dsn, "--endpoint", self.endpoint],
                stdout=log, stderr=subprocess.STDOUT, cwd=REPO, preexec_fn=self._limit_files)
        if wait:
            self.wait_ready()
        return self

    def _limit_files(self) -> None:
        if self.open_files is not None:
            hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
            resource.setrlimit(resource.RLIMIT_NOFILE, (self.open_files, hard))

    def wait_ready(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        probe = client.Client(self.endpoint, timeout=0.5, **self.client_options)
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"broker exited {self.proc.returncode}:\n{self.log()}")
            try:
                probe.ping()
                probe.close()
                return
            except client.BrokerUnavailable:
                time.sleep(0.05)
        raise RuntimeError(f"broker not ready after {timeout} s:\n{self.log()}")

    def stop(self) -> int | None:
        return stop_process(self.proc, timeout=20) if self.proc else None

    def stats(self) -> dict[str, Any]:
        return self.client.stats()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def server_connections(self, conn: psycopg.Connection) -> int:
        return conn.execute(f"SELECT count(*) FROM pg_stat_activity WHERE {OF_APPLICATION}",
                            [self.application_name]).fetchone()[0]


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


@contextlib.contextmanager
def broker_starter(dsn: str, **defaults: Any) -> Iterator[Callable[..., BrokerProcess]]:
    """``start(wait=True, **settings)`` for brokers on ``dsn``, all stopped at the end."""
    started: list[BrokerProcess] = []

    def start(wait: bool = True, **settings: Any) -> BrokerProcess:
        broker = BrokerProcess(settings.pop("dsn", dsn), **{**defaults, **settings})
        started.append(broker)
        return broker.start(wait=wait)

    try:
        yield start
    finally:
        for broker in started:
            broker.stop()
            shutil.rmtree(broker.dir, ignore_errors=True)


@pytest.fixture
def start_broker(dsn: str) -> Iterator[Callable[..., BrokerProcess]]:
    with broker_starter(dsn) as start:
        yield start


@pytest.fixture
def broker(start_broker: Callable[..., BrokerProcess]) -> BrokerProcess:
    return start_broker(max_connections=4)


class ConnectionSampler(threading.Thread):
    """Samples pg_stat_activity from its own connection while a load runs."""

    def __init__(self, dsn: str, application_name: str, interval: float = 0.002) -> None:
        super().__init__(daemon=True)
        self._dsn = dsn
        self._application_name = application_name
        self._interval = interval
        self._done = threading.Event()
        self.maximum = 0  # the broker's connections at once, at most
        self.maximum_by_database: dict[str, int] = {}  # the same, of each database
        self.samples = 0

    def run(self) -> None:
        # Reconnects: some tests restart the database under the sampler.
        query = f"SELECT datname FROM pg_stat_activity WHERE {OF_APPLICATION}"
        by_database = self.maximum_by_database
        while not self._done.is_set():
            try:
                with psycopg.connect(self._dsn, autocommit=True, connect_timeout=2) as conn:
                    while not self._done.is_set():
                        databases = [name for (name,) in
                                     conn.execute(query, [self._application_name])]
                        self.maximum = max(self.maximum, len(databases))
                        for name in set(databases):
                            by_database[name] = max(by_database.get(name, 0),
                                                    databases.count(name))
                        self.samples += 1
                        self._done.wait(self._interval)
            except psycopg.OperationalError:
                self._done.wait(0.05)

    def __enter__(self) -> ConnectionSampler:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._done.set()
        self.join()


def memory_kb(pid: int) -> dict[str, int]:
    """VmRSS (now) and VmHWM (peak since start) of a process, in kB."""
    values = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                values[name] = int(rest.split()[0])
    return values


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    """Whether ``predicate`` became true within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


@contextlib.contextmanager
def raw_socket(endpoint: str, *, reads: bool = True) -> Iterator[zmq.Socket]:
    """A bare DEALER speaking the wire protocol by hand, for input no client
    would send; ``reads=False``: one whose receive buffers are tiny, as a
    client that never reads its replies."""
    ctx = zmq.Context()
    socket = ctx.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    if not reads:
        socket.setsockopt(zmq.RCVHWM, 1)
        socket.setsockopt(zmq.RCVBUF, 4096)
    socket.connect(endpoint)
    try:
        yield socket
    finally:
        socket.close(linger=0)
        ctx.term()


def run_as(uid: int, work: Callable[[], bytes]) -> bytes:
    """What ``work`` returns, run in a forked child that takes the uid
    (needs root); b"" if it raised."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        result = b""
        try:
            os.setgid(uid)
            os.setuid(uid)
            result = work()
        finally:
            os.write(write_end, result)
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    return data


def request_as(uid: int, endpoint: str, op: int, body: list) -> list | None:
    """The reply ([request_id, status, payload]) a process of ``uid`` gets to
    one request at ``endpoint`` within 2 s, or None: a process that speaks
    the wire protocol by hand."""
    from client import protocol

    def request() -> bytes:
        ctx = zmq.Context()
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(endpoint)
        s.send_multipart([protocol.pack([1, op, 5000, None]), protocol.pack(body)])
        return s.recv() if s.poll(2000) else protocol.pack(None)

    return protocol.unpack(run_as(uid, request) or protocol.pack(None))


@contextlib.contextmanager
def thread_client(endpoint: str, timeout: float) -> Iterator[client.Client]:
    """A Client whose socket (of the calling thread) is closed when done: sockets
    left to the garbage collector can collide with a new socket's monitor."""
    c = client.Client(endpoint, timeout=timeout)
    try:
        yield c
    finally:
        c.close()


def _child(target: Callable, args: tuple, results: Any, index: int) -> None:
    try:
        results.put((index, True, target(*args)))
    except BaseException:
        results.put((index, False, traceback.format_exc()))


def run_in_processes(target: Callable, arg_lists: list[tuple], timeout: float = 180) -> list:
    """Fork one process per argument tuple; return their results in order.

    Children are real forks of the test process: whatever client state the
    parent holds is inherited, as it would be under gunicorn or Celery.
    """
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    procs = [ctx.Process(target=_child, args=(target, args, results, i))
             for i, args in enumerate(arg_lists)]
    for p in procs:
        p.start()
    collected: dict[int, Any] = {}
    failures = []
    deadline = time.monotonic() + timeout
    while len(collected) + len(failures) < len(procs):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            index, ok, value = results.get(timeout=remaining)
        except Exception:
            break
        if ok:
            collected[index] = value
        else:
            failures.append(value)
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
            p.join()
    if failures:
        pytest.fail(f"{len(failures)} child processes failed; first:\n{failures[0]}")
    if len(collected) < len(procs):
        pytest.fail(f"only {len(collected)} of {len(procs)} child processes reported in time")
    return [collected[i] for i in range(len(procs))]



def backend_pids(admin: psycopg.Connection, application_name: str) -> set[int]:
    """A broker's server connections, as the server sees them."""
    rows = admin.execute(f"SELECT pid FROM pg_stat_activity WHERE {OF_APPLICATION}",
                         [application_name]).fetchall()
    return {pid for (pid,) in rows}


def steady_requests(endpoint: str, seconds: float, sql: str, transaction_every: int,
                    pool: str | None = None) -> tuple[int, list[str], list[int]]:
    """``sql`` (which returns the backend's pid) for ``seconds``, every
    ``transaction_every``-th time in a two-statement transaction, on the
    broker's ``pool``: (requests answered, errors, server pids that answered)."""
    c = client.Client(endpoint, timeout=30, pool=pool)
    done, errors, pids = 0, [], set()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if done % transaction_every == transaction_every - 1:
                with c.transaction() as tx:
                    (pid,) = tx.execute(sql).rows[0]
                    tx.execute("SELECT %s::int", [pid])
            else:
                (pid,) = c.execute(sql).rows[0]
            pids.add(pid)
            done += 1
        except client.Error as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
    c.close()
    return done, errors, sorted(pids)


class Load:
    """``processes`` forked client processes sending steady_requests in the background."""

    def __init__(self, endpoint: str, processes: int, seconds: float, *,
                 sql: str = "SELECT pg_backend_pid()", transaction_every: int = 10,
                 pool: str | None = None) -> None:
        self.results: list[Any] = []
        self._thread = threading.Thread(target=lambda: self.results.extend(run_in_processes(
            steady_requests, [(endpoint, seconds, sql, transaction_every, pool)] * processes,
            timeout=60)))
        self._thread.start()

    def finish(self) -> tuple[int, list[str], set[int]]:
        """(requests answered, errors, server pids that answered), once all have ended."""
        self._thread.join()
        return (sum(done for done, _, _ in self.results),
                [e for _, errs, _ in self.results for e in errs],
                set().union(*(pids for _, _, pids in self.results)))