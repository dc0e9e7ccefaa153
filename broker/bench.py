"""``poolbroker bench``: one workload through the broker, PgBouncer and direct psycopg.

Each target is driven by the same forked client processes and threads for
the same duration, one target at a time, while a separate connection
samples ``pg_stat_activity``.  Without ``--dsn`` the bench creates a
throwaway PostgreSQL cluster; ``pk``, ``txn``, ``mixed`` and ``orm`` need
pgbench's tables, created with ``pgbench -i`` when they are missing.
``orm`` needs SQLAlchemy (the ``sqlalchemy`` extra); without it its rows
say so and the other workloads run.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from .embedded import SERVER_USER, Cluster, find_bindir
from .predecessors import MARK

logger = logging.getLogger("poolbroker.bench")

WORKLOADS = ("select1", "pk", "txn", "mixed", "orm")
TARGETS = ("broker", "pgbouncer", "direct")
ACCOUNTS_PER_SCALE = 100_000
TELLERS_PER_SCALE = 10

# pgbench's TPC-B-like transaction.
TPCB = (
    "UPDATE pgbench_accounts SET abalance = abalance + %(delta)s WHERE aid = %(aid)s",
    "SELECT abalance FROM pgbench_accounts WHERE aid = %(aid)s",
    "UPDATE pgbench_tellers SET tbalance = tbalance + %(delta)s WHERE tid = %(tid)s",
    "UPDATE pgbench_branches SET bbalance = bbalance + %(delta)s WHERE bid = %(bid)s",
    "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) "
    "VALUES (%(tid)s, %(bid)s, %(aid)s, %(delta)s, CURRENT_TIMESTAMP)",
)
PK_LOOKUP = "SELECT abalance FROM pgbench_accounts WHERE aid = %s"
ACCOUNT_UPDATE = "UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = %s"
# A target's server connections, by the application_name its clients (or
# its broker) give them: other sessions on a shared database, pgbench -i,
# a previous target's leftovers or the sampler itself must not count.
# Brokers append their mark (``~...``) to the configured name.
COUNT_SERVER_CONNECTIONS = (
    "SELECT count(*) FROM pg_stat_activity "
    f"WHERE split_part(application_name, '{MARK}', 1) = %s")


@dataclass
class Row:
    workload: str
    target: str  # broker, broker-tx, baseline-broker(-tx), pgbouncer, direct
    processes: int
    threads: int
    seconds: float
    operations: int = 0
    errors: int = 0
    first_error: str = ""
    per_second: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    max_server_connections: int = 0
    broker_peak_rss_mb: float | None = None
    vs_pgbouncer: float | None = None
    vs_direct: float | None = None
    skipped: str = ""  # why this target did not run


# Sessions: what one client thread talks to.

# Tells two benches on one database apart; taken once, because the forked
# clients must name their connections as their parent's sampler expects.
_RUN = os.getpid()


def application_name(target: str) -> str:
    """What a target's server connections are called during this bench run."""
    return f"pb-bench.{_RUN}.{target}"


def _psycopg_options(prepare: bool, application_name: str) -> dict[str, Any]:
    # PgBouncer 1.18 in transaction mode cannot keep prepared statements.
    return {"application_name": application_name, "prepare_threshold": 5 if prepare else None}


class _PsycopgSession:
    def __init__(self, dsn: str, prepare: bool, application_name: str) -> None:
        self._conn = psycopg.connect(dsn, autocommit=True,
                                     **_psycopg_options(prepare, application_name))

    def run(self, sql: str, params: Any = None) -> None:
        cur = self._conn.execute(sql, params)
        if cur.description is not None:
            cur.fetchall()

    def transaction(self, params: dict[str, int]) -> None:
        with self._conn.transaction():
            for sql in TPCB:
                self.run(sql, params)


class _BrokerSession:
    def __init__(self, endpoint: str, interactive: bool) -> None:
        import client

        self._client = client.Client(endpoint, timeout=60)
        self._interactive = interactive

    def run(self, sql: str, params: Any = None) -> None:
        self._client.execute(sql, params)

    def transaction(self, params: dict[str, int]) -> None:
        if self._interactive:
            with self._client.transaction() as tx:
                for sql in TPCB:
                    tx.execute(sql, params)
        else:
            self._client.batch([(sql, params) for sql in TPCB])


# The orm workload: one page of a SQLAlchemy web app per operation.

def sqlalchemy_missing() -> str:
    """Why the orm workload cannot run here, or "" when it can."""
    try:
        import sqlalchemy.orm  # noqa: F401
        import client.sqlalchemy  # noqa: F401  (the dialect needs SQLAlchemy 2)
    except ImportError as exc:
        return (f"SQLAlchemy missing or unusable ({exc}); "
                "install it with: pip install 'poolbroker[sqlalchemy]'")
    return ""


@cache
def _account_model() -> type:
    """``pgbench_accounts`` as a mapped class, defined on first use because
    SQLAlchemy is optional.  Every column is mapped, so a get loads the whole
    row as an app's model would."""
    from sqlalchemy import Integer, String
    from sqlalchemy.orm import DeclarativeBase, mapped_column

    class Base(DeclarativeBase):
        pass

    class Account(Base):
        __tablename__ = "pgbench_accounts"
        aid = mapped_column(Integer, primary_key=True)
        bid = mapped_column(Integer)
        abalance = mapped_column(Integer)
        filler = mapped_column(String(84))

    return Account


def _broker_engine(endpoint: str) -> Any:
    import sqlalchemy as sa

    # The dialect's default pool: what a user who changes only the URL gets.
    return sa.create_engine(sa.URL.create("postgresql+poolbroker",
                                          query={"endpoint": endpoint, "timeout": "60"}))


def _psycopg_engine(dsn: str, prepare: bool, application_name: str) -> Any:
    import sqlalchemy as sa

    # SQLAlchemy's default pool (QueuePool): the engine keeps its connection
    # (to PgBouncer, or to PostgreSQL) between pages, as an app's does.
    return sa.create_engine("postgresql+psycopg://", connect_args={
        **conninfo_to_dict(dsn), **_psycopg_options(prepare, application_name)})


class _OrmSession:
    """A SQLAlchemy engine for one client thread: with the psycopg dialect
    the thread keeps one connection, as the other workloads' sessions do
    (and as a worker's thread does with its process's engine)."""

    def __init__(self, engine: Any) -> None:
        from sqlalchemy.orm import sessionmaker

        self._sessions = sessionmaker(engine)
        self._account = _account_model()
        with engine.connect():  # the dialect's first-connect queries, before the clock runs
            pass

    def page(self, aid: int) -> None:
        """Get by primary key, change an attribute, commit."""
        with self._sessions() as session:
            account = session.get(self._account, aid)
            # An SQL expression rather than a sum computed here: concurrent
            # pages on one row lose no increment, so the table counts the
            # pages committed exactly.
            account.abalance = self._account.abalance + 1
            session.commit()


def _broker_sessions(workload: str, endpoint: str, interactive: bool) -> Callable[[], Any]:
    if workload == "orm":
        return lambda: _OrmSession(_broker_engine(endpoint))
    return lambda: _BrokerSession(endpoint, interactive)


def _psycopg_sessions(workload: str, dsn: str, prepare: bool,
                      application_name: str) -> Callable[[], Any]:
    if workload == "orm":
        return lambda: _OrmSession(_psycopg_engine(dsn, prepare, application_name))
    return lambda: _PsycopgSession(dsn, prepare, application_name)


def _operation(workload: str, session: Any, rng: random.Random,
               scale: int) -> Callable[[], None]:
    accounts = ACCOUNTS_PER_SCALE * scale

    def tpcb_params() -> dict[str, int]:
        return {"aid": rng.randint(1, accounts), "tid": rng.randint(1, TELLERS_PER_SCALE * scale),
                "bid": rng.randint(1, scale), "delta": rng.randint(-5000, 5000)}

    if workload == "select1":
        return lambda: session.run("SELECT 1")
    if workload == "pk":
        return lambda: session.run(PK_LOOKUP, [rng.randint(1, accounts)])
    if workload == "txn":
        return lambda: session.transaction(tpcb_params())
    if workload == "orm":
        return lambda: session.page(rng.randint(1, accounts))

    def mixed() -> None:  # 70% lookups, 20% single-row updates, 10% transactions
        roll = rng.random()
        if roll < 0.7:
            session.run(PK_LOOKUP, [rng.randint(1, accounts)])
        elif roll < 0.9:
            session.run(ACCOUNT_UPDATE, [rng.randint(1, accounts)])
        else:
            session.transaction(tpcb_params())
    return mixed


# Client processes.

def _client_thread(make_session: Callable[[], Any], workload: str, scale: int, seed: int,
                   connected: threading.Barrier, go: Any, duration: float,
                   out: list) -> None:
    rng = random.Random(seed)
    try:
        session = make_session()
    except Exception as exc:  # counted, not fatal: the row says what went wrong
        out.append(([], 1, f"connect: {type(exc).__name__}: {exc}"))
        connected.wait()
        return
    operation = _operation(workload, session, rng, scale)
    connected.wait()
    go.wait()
    latencies: list[float] = []
    errors, first_error = 0, ""
    end = time.monotonic() + duration
    clock = time.perf_counter
    while time.monotonic() < end:
        started = clock()
        try:
            operation()
        except Exception as exc:
            errors += 1
            first_error = first_error or f"{type(exc).__name__}: {exc}"
            continue
        latencies.append(clock() - started)
    out.append((latencies, errors, first_error))


def _client_process(make_session: Callable[[], Any], workload: str, scale: int, index: int,
                    threads: int, ready: Any, go: Any, duration: float, results: Any) -> None:
    out: list = []
    barrier = threading.Barrier(threads + 1)
    workers = [threading.Thread(target=_client_thread, args=(
        make_session, workload, scale, index * 1000 + t, barrier, go, duration, out))
        for t in range(threads)]
    for worker in workers:
        worker.start()
    barrier.wait()  # every thread has connected (or failed to)
    ready.put(index)
    for worker in workers:
        worker.join()
    latencies = [x for part in out for x in part[0]]
    errors = sum(part[1] for part in out)
    first_error = next((part[2] for part in out if part[2]), "")
    results.put((latencies, errors, first_error))


class _Sampler(threading.Thread):
    def __init__(self, dsn: str, application_name: str) -> None:
        super().__init__(daemon=True)
        self._dsn = dsn
        self._application_name = application_name
        self._done = threading.Event()
        self.maximum = 0

    def run(self) -> None:
        with psycopg.connect(self._dsn, autocommit=True) as conn:
            while not self._done.is_set():
                count = conn.execute(COUNT_SERVER_CONNECTIONS,
                                     [self._application_name]).fetchone()[0]
                self.maximum = max(self.maximum, count)
                self._done.wait(0.01)

    def stop(self) -> int:
        self._done.set()
        self.join()
        return self.maximum


def _drive(row: Row, make_session: Callable[[], Any], dsn: str, scale: int) -> Row:
    ctx = multiprocessing.get_context("fork")
    ready, go, results = ctx.Queue(), ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_client_process, args=(
        make_session, row.workload, scale, i, row.threads, ready, go, row.seconds, results))
        for i in range(row.processes)]
    for proc in procs:
        proc.start()
    for _ in procs:
        ready.get(timeout=120)
    sampler = _Sampler(dsn, application_name(row.target))
    sampler.start()
    go.set()
    latencies: list[float] = []
    for _ in procs:
        part, errors, first_error = results.get(timeout=row.seconds + 120)
        latencies += part
        row.errors += errors
        row.first_error = row.first_error or first_error
    for proc in procs:
        proc.join()
    row.max_server_connections = sampler.stop()
    row.operations = len(latencies)
    row.per_second = row.operations / row.seconds
    if latencies:
        latencies.sort()
        row.p50_ms = statistics.median(latencies) * 1000
        row.p99_ms = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000
    return row


# The systems under test.

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


@contextmanager
def _running_broker(dsn: str, cap: int, workdir: str, name: str,
                    source: str | None = None) -> Iterator[tuple[str, int]]:
    """This broker, or with ``source`` the one in that checkout (its own
    ``.venv`` when it has one): the same clients drive both.  Its server
    connections are called ``name``."""
    tree = Path(source or Path(__file__).resolve().parent.parent)
    python = tree / ".venv" / "bin" / "python"
    endpoint = f"ipc://{workdir}/broker/b.sock"  # the broker makes the directory 0700
    # application_name has a flag only since settings were declared once, and
    # --baseline may run an older checkout: every checkout reads it from a
    # config file; a JSON string is a TOML basic string.
    fd, config = tempfile.mkstemp(prefix="broker-", suffix=".toml", dir=workdir)
    with os.fdopen(fd, "w") as f:
        f.write(f"[poolbroker]\napplication_name = {json.dumps(name)}\n")
    proc = subprocess.Popen(
        [str(python) if source and python.exists() else sys.executable,
         "-m", "broker.cli", "serve", "--config", config, "--dsn", dsn, "--endpoint", endpoint,
         "--max-connections", str(cap), "--log-level", "WARNING",
         "--max-waiting", "100000"],
        cwd=tree)
    try:
        import client

        probe = client.Client(endpoint, timeout=0.5)
        deadline = time.monotonic() + 30
        while True:
            try:
                probe.ping()
                break
            except client.BrokerUnavailable:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the broker did not start") from None
        probe.close()
        yield endpoint, proc.pid
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def find_pgbouncer(explicit: str | None = None) -> str | None:
    """The binary given, else one on PATH or in /usr/sbin; None if absent."""
    candidates = [explicit] if explicit else [shutil.which("pgbouncer"), "/usr/sbin/pgbouncer"]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


@contextmanager
def _running_pgbouncer(binary: str, dsn: str, cap: int, workdir: str) -> Iterator[str]:
    """PgBouncer in transaction mode with the same cap; yields a client DSN."""
    server = conninfo_to_dict(dsn)
    directory = Path(tempfile.mkdtemp(prefix="pgbouncer-", dir=workdir))
    directory.chmod(0o755)
    port = _free_port()
    user = server.get("user") or os.environ.get("USER", SERVER_USER)
    (directory / "userlist.txt").write_text(f'"{user}" "{server.get("password", "")}"\n')
    target = make_conninfo(**{k: v for k, v in server.items()
                              if k in ("host", "port", "dbname", "user", "password")})
    (directory / "pgbouncer.ini").write_text(f"""[databases]
bench = {target}

[pgbouncer]
listen_addr =
listen_port = {port}
unix_socket_dir = {directory}
auth_type = trust
auth_file = {directory}/userlist.txt
pool_mode = transaction
default_pool_size = {cap}
max_db_connections = {cap}
max_client_conn = 20000
ignore_startup_parameters = extra_float_digits
logfile = {directory}/pgbouncer.log
pidfile = {directory}/pgbouncer.pid
""")
    argv = [binary, str(directory / "pgbouncer.ini")]
    if os.getuid() == 0:  # PgBouncer refuses to run as root
        import pwd
        entry = pwd.getpwnam(SERVER_USER)
        for path in (directory, *directory.iterdir()):
            os.chown(path, entry.pw_uid, entry.pw_gid)
        os.chmod(workdir, 0o755)
        argv[1:1] = ["-u", SERVER_USER]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        socket_file = directory / f".s.PGSQL.{port}"
        deadline = time.monotonic() + 30
        while not socket_file.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                log = (directory / "pgbouncer.log")
                raise RuntimeError("PgBouncer did not start: " +
                                   (log.read_text()[-2000:] if log.exists() else ""))
            time.sleep(0.05)
        yield make_conninfo(host=str(directory), port=port, dbname="bench", user=user)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _ensure_pgbench_tables(dsn: str, scale: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        if conn.execute("SELECT to_regclass('pgbench_accounts')").fetchone()[0]:
            return
    logger.info("creating pgbench tables (scale %d)", scale)
    env = {**os.environ, "PGAPPNAME": "poolbroker-bench"}
    subprocess.run([str(find_bindir() / "pgbench"), "-i", "-q", "-s", str(scale), dsn],
                   check=True, capture_output=True, env=env)


@contextmanager
def _database(dsn: str | None, workdir: str) -> Iterator[str]:
    if dsn:
        yield dsn
        return
    root = Path(workdir, "pg")
    root.mkdir()
    os.chmod(workdir, 0o755)
    os.chmod(root, 0o755)
    cluster = Cluster(root / "data", root / "run", port=_free_port(),
                      settings={"max_connections": "2200", "shared_buffers": "128MB"})
    cluster.init()
    cluster.start()
    try:
        yield cluster.dsn
    finally:
        cluster.stop()


# The bench.

@dataclass(frozen=True, kw_only=True)
class Plan:
    workloads: tuple[str, ...] = WORKLOADS
    targets: tuple[str, ...] = TARGETS
    processes: int = 8
    threads: int = 1
    cap: int = 4
    duration: float = 5.0
    scale: int = 1
    dsn: str | None = None
    pgbouncer: str | None = None
    baseline: str | None = None  # a checkout of another poolbroker, run after "broker"


def run(plan: Plan) -> list[Row]:
    """Every workload through every target; ratios filled in per workload.
    A workload that cannot run here gives rows that say why."""
    why_not = {w: sqlalchemy_missing() if w == "orm" else "" for w in plan.workloads}
    results = {w: [_skipped(_row(plan, w, t), why_not[w]) for t in plan.targets]
               for w in plan.workloads if why_not[w]}
    runnable = [w for w in plan.workloads if not why_not[w]]
    if runnable:
        workdir = tempfile.mkdtemp(prefix="pb-bench-", dir="/tmp")
        try:
            with _database(plan.dsn, workdir) as dsn:
                if set(runnable) - {"select1"}:
                    _ensure_pgbench_tables(dsn, plan.scale)
                for workload in runnable:
                    results[workload] = _run_workload(plan, workload, dsn, workdir)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    return [r for w in plan.workloads for r in results[w]]


def _row(plan: Plan, workload: str, target: str) -> Row:
    return Row(workload, target, plan.processes, plan.threads, plan.duration)


def _skipped(row: Row, why: str) -> Row:
    row.skipped = why
    return row


def _run_workload(plan: Plan, workload: str, dsn: str, workdir: str) -> list[Row]:
    def row(target: str) -> Row:
        return _row(plan, workload, target)

    rows: list[Row] = []
    for target in plan.targets:
        name = application_name(target)
        if target == "broker":
            brokers = [("", None)] + ([("baseline-", plan.baseline)] if plan.baseline else [])
            variants = [(False, "broker")] + ([(True, "broker-tx")] if workload == "txn" else [])
            for interactive, variant in variants:
                for prefix, source in brokers:  # A/B: each variant, back to back
                    name = application_name(prefix + variant)
                    with _running_broker(dsn, plan.cap, workdir, name, source) \
                            as (endpoint, pid):
                        result = _drive(row(prefix + variant), _broker_sessions(
                            workload, endpoint, interactive), dsn, plan.scale)
                        result.broker_peak_rss_mb = round(_peak_rss_mb(pid), 1)
                    rows.append(result)
        elif target == "pgbouncer":
            binary = find_pgbouncer(plan.pgbouncer)
            if binary is None:
                rows.append(_skipped(row(target), "pgbouncer not installed "
                                                  "(Debian: apt-get install pgbouncer)"))
                continue
            with _running_pgbouncer(binary, dsn, plan.cap, workdir) as bouncer_dsn:
                rows.append(_drive(row(target), _psycopg_sessions(
                    workload, bouncer_dsn, False, name), dsn, plan.scale))
        elif target == "direct":
            rows.append(_drive(row(target), _psycopg_sessions(workload, dsn, True, name),
                               dsn, plan.scale))
        else:
            raise ValueError(f"unknown target {target!r}")
    baseline = {r.target: r.per_second for r in rows if not r.skipped}
    for r in rows:
        if r.skipped:
            continue
        if baseline.get("pgbouncer"):
            r.vs_pgbouncer = round(r.per_second / baseline["pgbouncer"], 2)
        if baseline.get("direct"):
            r.vs_direct = round(r.per_second / baseline["direct"], 2)
    return rows


def format_table(rows: list[Row]) -> str:
    header = ("workload", "target", "clients", "ops/s", "p50 ms", "p99 ms", "max conns",
              "errors", "vs pgbouncer", "vs direct", "broker RSS MB")

    def ratio(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}x"

    lines = [header]
    for r in rows:
        if r.skipped:
            continue
        clients = f"{r.processes}x{r.threads}"
        lines.append((r.workload, r.target, clients, f"{r.per_second:,.0f}", f"{r.p50_ms:.2f}",
                      f"{r.p99_ms:.2f}", str(r.max_server_connections), str(r.errors),
                      ratio(r.vs_pgbouncer), ratio(r.vs_direct),
                      "-" if r.broker_peak_rss_mb is None else f"{r.broker_peak_rss_mb:.0f}"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = ["  ".join(cell.ljust(widths[i]) if i < 2 else cell.rjust(widths[i])
                     for i, cell in enumerate(line)).rstrip() for line in lines]
    for r in rows:
        if r.skipped:
            out.append(f"{r.workload}/{r.target}: not run: {r.skipped}")
        if r.first_error:
            out.append(f"first error ({r.workload}/{r.target}): {r.first_error}")
    return "\n".join(out)


def write_json(rows: list[Row], path: str, plan: Plan) -> None:
    document = {"plan": {k: v for k, v in asdict(plan).items() if k != "dsn"},
                "rows": [asdict(r) for r in rows]}
    with open(path, "w") as f:
        json.dump(document, f, indent=2)
