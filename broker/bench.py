"""``poolbroker bench``: one workload through the broker, PgBouncer and direct psycopg.

Each target is driven by the same forked client processes and threads for
the same duration, one target at a time, while a separate connection
samples ``pg_stat_activity``.  Without ``--dsn`` the bench creates a
throwaway PostgreSQL cluster; ``pk``, ``txn``, ``mixed``, ``orm`` and
``web`` need pgbench's tables, created with ``pgbench -i`` when they are
missing.  ``orm`` needs SQLAlchemy (the ``sqlalchemy`` extra); without it
its rows say so and the other workloads run.

Every workload but ``overload`` is a closed loop: each client thread sends
its next operation when the last one is answered.  ``overload`` is an open
loop: requests are offered at a fixed rate whatever the answers, each with
a deadline, and the server counts the statements that start after theirs.
"""

from __future__ import annotations

import heapq
import itertools
import json
import logging
import math
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
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from .embedded import SERVER_USER, Cluster, find_bindir
from .predecessors import MARK

logger = logging.getLogger("poolbroker.bench")

WORKLOADS = ("select1", "pk", "txn", "mixed", "orm", "web", "overload")
TARGETS = ("broker", "pgbouncer", "direct")
# Workloads whose operation is one transaction of several statements: each
# target runs them both statement by statement and in one round trip.
TRANSACTIONS = ("txn", "web")
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
WEB_READS = 5  # primary-key reads per page of the web workload, before its one update
# The overload workload's statement.  The server itself compares its clock
# with the request's deadline as the statement starts, so a statement whose
# client already gave up (and will never read the result) is counted too.
LATE_SEQUENCE = "bench_late"
OVERLOAD = ("SELECT CASE WHEN clock_timestamp() > to_timestamp(%s) "
            f"THEN nextval('{LATE_SEQUENCE}') END, pg_sleep(%s)")
# Statements started after their deadline so far (last_value is 1, not 0,
# before the first nextval).
LATE_STARTS = f"SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM {LATE_SEQUENCE}"
COUNT_ACTIVE = ("SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
                f"AND split_part(application_name, '{MARK}', 1) = %s")
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
    # broker, broker-tx, baseline-broker(-tx), pgbouncer(-pipeline), direct(-pipeline)
    target: str
    processes: int
    threads: int
    seconds: float
    operations: int = 0  # overload: answered within the deadline
    errors: int = 0
    first_error: str = ""
    per_second: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    max_server_connections: int = 0
    broker_peak_rss_mb: float | None = None
    # CPU (user + system) per request sent, in microseconds: of every client
    # process together, and of the broker process (PgBouncer's for its rows;
    # none for direct, whose work is all in PostgreSQL).
    client_cpu_us: float | None = None
    broker_cpu_us: float | None = None
    # overload only
    offered_per_second: float | None = None
    goodput_of_capacity: float | None = None  # per_second / (cap / statement time)
    late_answers: int = 0  # answered without error, but after the deadline
    unsent: int = 0  # due while every thread of its process still waited
    late_starts: int | None = None  # statements the server started after their deadline
    vs_pgbouncer: float | None = None  # of per_second (overload: of goodput)
    vs_direct: float | None = None
    skipped: str = ""  # why this target did not run
    # With several rounds: the figures above are medians over the rounds (the
    # counts are sums, the peaks maxima), a ratio the median of each round's
    # own ratio, and these each round's ratios.
    rounds: int = 1
    vs_pgbouncer_rounds: list[float] = field(default_factory=list)
    vs_direct_rounds: list[float] = field(default_factory=list)


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


Statements = list[tuple[str, Any]]  # (sql, params) of one transaction


class _PsycopgSession:
    def __init__(self, dsn: str, prepare: bool, application_name: str,
                 interactive: bool) -> None:
        self._conn = psycopg.connect(dsn, autocommit=True,
                                     **_psycopg_options(prepare, application_name))
        self._interactive = interactive
        # The statement run_within() may cancel, None between them: the
        # canceller checks it under the lock, so a cancel meant for one
        # statement never reaches the next.
        self.cancel_lock = threading.Lock()
        self.ticket: int | None = None

    def run(self, sql: str, params: Any = None) -> None:
        cur = self._conn.execute(sql, params)
        if cur.description is not None:
            cur.fetchall()

    def run_within(self, sql: str, params: Any, timeout: float) -> None:
        """run(), cancelled on the server when it has not ended within
        ``timeout`` seconds: psycopg has no per-call deadline, and a cancel
        is what a client that gives up can do to stop the work it asked for."""
        canceller = _canceller()
        with self.cancel_lock:
            self.ticket = canceller.arm(time.monotonic() + timeout, self)
        try:
            self.run(sql, params)
        finally:
            with self.cancel_lock:
                self.ticket = None

    def cancel(self) -> None:
        self._conn.cancel_safe()

    def transaction(self, statements: Statements) -> None:
        if self._interactive:
            with self._conn.transaction():
                for sql, params in statements:
                    self.run(sql, params)
            return
        # Pipeline mode: BEGIN, the statements and COMMIT go out together and
        # their results come back after one Sync, the analogue of a batch.
        # BEGIN and COMMIT as statements: psycopg's transaction() in a
        # pipeline syncs at its COMMIT and the pipeline again at its end, two
        # round trips (counted with strace).
        try:
            with self._conn.pipeline():
                self._conn.execute("BEGIN")
                cursors = [self._conn.execute(sql, params) for sql, params in statements]
                self._conn.execute("COMMIT")
        except psycopg.Error:
            # A failed statement skips the rest up to the Sync, COMMIT too,
            # and leaves the transaction open and aborted.
            self._conn.rollback()
            raise
        for cur in cursors:
            if cur.description is not None:
                cur.fetchall()


class _BrokerSession:
    def __init__(self, endpoint: str, interactive: bool) -> None:
        import client

        self._client = client.Client(endpoint, timeout=60)
        self._interactive = interactive
        # The thread's socket connects on first use: before the clock runs,
        # as psycopg's sessions connect in their constructor.  Else an
        # overload request would spend its deadline on the handshake.
        self._client.ping()

    def run(self, sql: str, params: Any = None) -> None:
        self._client.execute(sql, params)

    def run_within(self, sql: str, params: Any, timeout: float) -> None:
        self._client.execute(sql, params, timeout=timeout)

    def transaction(self, statements: Statements) -> None:
        if self._interactive:
            with self._client.transaction() as tx:
                for sql, params in statements:
                    tx.execute(sql, params)
        else:
            self._client.batch(statements)


class _Canceller(threading.Thread):
    """Cancels psycopg statements still running at their deadline: one
    thread per client process, where a timer per request would start
    thousands of threads a second."""

    def __init__(self) -> None:
        super().__init__(daemon=True, name="bench-canceller")
        self._due: list[tuple[float, int, _PsycopgSession]] = []  # a heap
        self._changed = threading.Condition()
        self._tickets = itertools.count(1)

    def arm(self, at: float, session: _PsycopgSession) -> int:
        with self._changed:
            ticket = next(self._tickets)
            heapq.heappush(self._due, (at, ticket, session))
            if self._due[0][1] == ticket:  # sooner than what the thread waits for
                self._changed.notify()
        return ticket

    def run(self) -> None:
        while True:
            with self._changed:
                while not self._due or self._due[0][0] > time.monotonic():
                    self._changed.wait(self._due[0][0] - time.monotonic() if self._due else None)
                _, ticket, session = heapq.heappop(self._due)
            # Outside the heap's lock: a cancel waits for PgBouncer's answer,
            # and the other threads keep arming meanwhile.
            with session.cancel_lock:
                if session.ticket == ticket:
                    try:
                        session.cancel()
                    except psycopg.Error:
                        pass  # the statement is ending anyway: its error says how


_cancellers: dict[int, _Canceller] = {}
_cancellers_lock = threading.Lock()


def _canceller() -> _Canceller:
    """This process's canceller (a forked client process starts its own)."""
    with _cancellers_lock:
        canceller = _cancellers.get(os.getpid())
        if canceller is None:
            canceller = _cancellers[os.getpid()] = _Canceller()
            canceller.start()
        return canceller


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


def _psycopg_sessions(workload: str, dsn: str, prepare: bool, application_name: str,
                      interactive: bool) -> Callable[[], Any]:
    if workload == "orm":
        return lambda: _OrmSession(_psycopg_engine(dsn, prepare, application_name))
    return lambda: _PsycopgSession(dsn, prepare, application_name, interactive)


def _operation(workload: str, session: Any, rng: random.Random,
               scale: int) -> Callable[[], None]:
    accounts = ACCOUNTS_PER_SCALE * scale

    def tpcb() -> Statements:
        params = {"aid": rng.randint(1, accounts),
                  "tid": rng.randint(1, TELLERS_PER_SCALE * scale),
                  "bid": rng.randint(1, scale), "delta": rng.randint(-5000, 5000)}
        return [(sql, params) for sql in TPCB]

    def web_page() -> Statements:
        aids = [rng.randint(1, accounts) for _ in range(WEB_READS)]
        return [(PK_LOOKUP, [aid]) for aid in aids] + [(ACCOUNT_UPDATE, [aids[0]])]

    if workload == "select1":
        return lambda: session.run("SELECT 1")
    if workload == "pk":
        return lambda: session.run(PK_LOOKUP, [rng.randint(1, accounts)])
    if workload == "txn":
        return lambda: session.transaction(tpcb())
    if workload == "web":
        return lambda: session.transaction(web_page())
    if workload == "orm":
        return lambda: session.page(rng.randint(1, accounts))

    def mixed() -> None:  # 70% lookups, 20% single-row updates, 10% transactions
        roll = rng.random()
        if roll < 0.7:
            session.run(PK_LOOKUP, [rng.randint(1, accounts)])
        elif roll < 0.9:
            session.run(ACCOUNT_UPDATE, [rng.randint(1, accounts)])
        else:
            session.transaction(tpcb())
    return mixed


# Client processes.

@dataclass
class _Tally:
    """What client threads measured: one per thread, summed per process,
    then per row."""
    latencies: list[float] = field(default_factory=list)  # seconds; overload: goodput only
    errors: int = 0
    first_error: str = ""
    late_answers: int = 0
    unsent: int = 0
    cpu_seconds: float = 0.0  # the process's, while the clock ran

    def failed(self, exc: Exception, during: str = "") -> None:
        self.errors += 1
        self.first_error = self.first_error or f"{during}{type(exc).__name__}: {exc}"

    def add(self, other: _Tally) -> None:
        self.latencies += other.latencies
        self.errors += other.errors
        self.first_error = self.first_error or other.first_error
        self.late_answers += other.late_answers
        self.unsent += other.unsent
        self.cpu_seconds += other.cpu_seconds


def _closed_loop(operation: Callable[[], None], end: float, tally: _Tally) -> None:
    clock = time.perf_counter
    while time.monotonic() < end:
        started = clock()
        try:
            operation()
        except Exception as exc:
            tally.failed(exc)
            continue
        tally.latencies.append(clock() - started)


def _open_loop(session: Any, plan: Plan, start: float, slots: Iterator[int], phase: float,
               tally: _Tally) -> None:
    """Offer a request at each of the process's due times, whatever the
    answers: the threads of a process share its times, each taking the
    next one when it is free, so slow answers do not slow the offer until
    every thread waits (a time that passes so is counted unsent).
    Latency runs from the due time, not from when a thread was free."""
    rate = plan.offered_rate / plan.processes
    end = start + plan.duration
    for slot in slots:
        due = start + (slot + phase) / rate
        if due >= end:
            return
        if (wait := due - time.monotonic()) > 0:
            time.sleep(wait)
        # The broker's client sends its timeout in whole milliseconds.
        remaining = due + plan.deadline - time.monotonic()
        if remaining < 0.001:
            tally.unsent += 1
            continue
        try:
            session.run_within(OVERLOAD, [time.time() + remaining, plan.statement_time],
                               remaining)
        except Exception as exc:
            tally.failed(exc)
            continue
        latency = time.monotonic() - due
        if latency <= plan.deadline:
            tally.latencies.append(latency)
        else:
            tally.late_answers += 1


def _client_thread(make_session: Callable[[], Any], plan: Plan, workload: str, seed: int,
                   connected: threading.Barrier, go: Any, start: Any, slots: Iterator[int],
                   phase: float, tally: _Tally) -> None:
    try:
        session = make_session()
    except Exception as exc:  # counted, not fatal: the row says what went wrong
        tally.failed(exc, "connect: ")
        connected.wait()
        return
    connected.wait()
    go.wait()
    if workload == "overload":
        _open_loop(session, plan, start.value, slots, phase, tally)
    else:
        _closed_loop(_operation(workload, session, random.Random(seed), plan.scale),
                     start.value + plan.duration, tally)


def _client_process(make_session: Callable[[], Any], plan: Plan, workload: str, index: int,
                    threads: int, ready: Any, go: Any, start: Any, results: Any) -> None:
    tallies = [_Tally() for _ in range(threads)]
    barrier = threading.Barrier(threads + 1)
    slots = itertools.count()  # next() on it is atomic: each due time goes to one thread
    phase = index / plan.processes  # the processes' due times interleave
    workers = [threading.Thread(target=_client_thread, args=(
        make_session, plan, workload, index * 1000 + t, barrier, go, start, slots, phase,
        tallies[t])) for t in range(threads)]
    for worker in workers:
        worker.start()
    barrier.wait()  # every thread has connected (or failed to)
    ready.put(index)
    go.wait()
    cpu = time.process_time()  # every thread's, connecting excluded
    for worker in workers:
        worker.join()
    total = _Tally(cpu_seconds=time.process_time() - cpu)
    for tally in tallies:
        total.add(tally)
    results.put(total)


class _Sampler(threading.Thread):
    def __init__(self, dsn: str, application_name: str) -> None:
        super().__init__(daemon=True)
        self._application_name = application_name
        self._done = threading.Event()
        self.maximum = 0
        # Connected, and a first count taken, before the clock runs: a
        # 0.2 s row on a loaded machine could end before run() had connected,
        # and report 0 connections.
        self._conn = psycopg.connect(dsn, autocommit=True)
        self._sample()

    def _sample(self) -> None:
        count = self._conn.execute(COUNT_SERVER_CONNECTIONS,
                                   [self._application_name]).fetchone()[0]
        self.maximum = max(self.maximum, count)

    def run(self) -> None:
        with self._conn:
            while not self._done.is_set():
                self._sample()
                self._done.wait(0.01)

    def stop(self) -> int:
        self._done.set()
        self.join()
        return self.maximum


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process, every thread of it, so far."""
    with open(f"/proc/{pid}/stat") as f:
        # Fields 14 and 15, counted after the command name, which may hold spaces.
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def ensure_late_sequence(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"CREATE SEQUENCE IF NOT EXISTS {LATE_SEQUENCE}")


def late_starts(dsn: str) -> int:
    """Overload statements the server has started after their deadline, ever."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(LATE_STARTS).fetchone()[0]


def _await_idle(dsn: str, application_name: str, timeout: float = 30.0) -> None:
    """Until no statement of the target runs: one its client gave up on may
    still be queued or running, and it must be counted if it starts late."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        give_up = time.monotonic() + timeout
        while conn.execute(COUNT_ACTIVE, [application_name]).fetchone()[0] \
                and time.monotonic() < give_up:
            time.sleep(0.05)


def _drive(row: Row, make_session: Callable[[], Any], dsn: str, plan: Plan,
           server_pid: int | None = None) -> Row:
    """Run the row's clients; ``server_pid`` is the broker's or PgBouncer's
    process, whose CPU the row reports."""
    ctx = multiprocessing.get_context("fork")
    ready, go, results = ctx.Queue(), ctx.Event(), ctx.Queue()
    start = ctx.Value("d", 0.0, lock=False)  # CLOCK_MONOTONIC is the same in every process
    procs = [ctx.Process(target=_client_process, args=(
        make_session, plan, row.workload, i, row.threads, ready, go, start, results))
        for i in range(row.processes)]
    for proc in procs:
        proc.start()
    for _ in procs:
        ready.get(timeout=120)
    name = application_name(row.target)
    overload = row.workload == "overload"
    late_before = late_starts(dsn) if overload else 0
    sampler = _Sampler(dsn, name)
    sampler.start()
    server_cpu = _cpu_seconds(server_pid) if server_pid else 0.0
    start.value = time.monotonic()
    go.set()
    tally = _Tally()
    for _ in procs:
        tally.add(results.get(timeout=row.seconds + 120))
    if server_pid:
        server_cpu = _cpu_seconds(server_pid) - server_cpu
    for proc in procs:
        proc.join()
    row.max_server_connections = sampler.stop()
    latencies = sorted(tally.latencies)
    row.errors, row.first_error = tally.errors, tally.first_error
    row.operations = len(latencies)
    row.per_second = row.operations / row.seconds
    if latencies:
        row.p50_ms = statistics.median(latencies) * 1000
        row.p99_ms = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000
    if sent := row.operations + tally.late_answers + row.errors:
        row.client_cpu_us = round(tally.cpu_seconds / sent * 1e6, 1)
        if server_pid:
            row.broker_cpu_us = round(server_cpu / sent * 1e6, 1)
    if overload:
        row.late_answers, row.unsent = tally.late_answers, tally.unsent
        row.offered_per_second = round((sent + row.unsent) / row.seconds, 1)
        row.goodput_of_capacity = round(row.per_second / plan.capacity, 3)
        _await_idle(dsn, name)
        row.late_starts = late_starts(dsn) - late_before
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
        # In a session of its own, as supervisord or systemd runs a service,
        # not in the clients': with the kernel's autogroup scheduling, the
        # CPU is shared between sessions first, so among the 32 clients'
        # processes it would get a 33rd of a contended core, not half.
        cwd=tree, start_new_session=True)
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
def _running_pgbouncer(binary: str, dsn: str, cap: int,
                       workdir: str) -> Iterator[tuple[str, int]]:
    """PgBouncer in transaction mode with the same cap; yields a client DSN
    and its process id."""
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
; 128 by default: overload's hundreds of client threads connecting at once got EAGAIN
listen_backlog = 4096
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
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # as the broker (see _running_broker)
    try:
        socket_file = directory / f".s.PGSQL.{port}"
        deadline = time.monotonic() + 30
        while not socket_file.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                log = (directory / "pgbouncer.log")
                raise RuntimeError("PgBouncer did not start: " +
                                   (log.read_text()[-2000:] if log.exists() else ""))
            time.sleep(0.05)
        yield make_conninfo(host=str(directory), port=port, dbname="bench", user=user), proc.pid
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
    # overload: requests offered per second (0: twice the capacity), each
    # request's deadline and its statement's duration, in seconds
    rate: float = 0.0
    deadline: float = 0.1
    statement_time: float = 0.003
    # Every workload this many times, the targets' order (and a baseline's
    # place) reversed every other round: on a shared machine one run of a
    # target can differ from the next by a third.
    rounds: int = 1

    @property
    def capacity(self) -> float:
        """Overload statements per second the cap can run at the most."""
        return self.cap / self.statement_time

    @property
    def offered_rate(self) -> float:
        return self.rate or 2 * self.capacity

    def threads_for(self, workload: str) -> int:
        """Client threads per process.  An open loop needs a free thread at
        each due time: a request holds one for about its deadline (the
        broker answers by then; psycopg's is cancelled then), so a
        process's share of the rate times the deadline, and half again for
        the stragglers."""
        if workload != "overload":
            return self.threads
        per_process = self.offered_rate / self.processes
        return max(self.threads, math.ceil(per_process * self.deadline * 1.5) + 1)


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
                if set(runnable) - {"select1", "overload"}:
                    _ensure_pgbench_tables(dsn, plan.scale)
                if "overload" in runnable:
                    ensure_late_sequence(dsn)
                for workload in runnable:
                    results[workload] = _medians([
                        _run_workload(plan, workload, dsn, workdir, reverse=bool(r % 2))
                        for r in range(plan.rounds)])
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    return [r for w in plan.workloads for r in results[w]]


def _row(plan: Plan, workload: str, target: str) -> Row:
    return Row(workload, target, plan.processes, plan.threads_for(workload), plan.duration)


def _skipped(row: Row, why: str) -> Row:
    row.skipped = why
    return row


def _forms(workload: str, target: str) -> list[tuple[bool, str]]:
    """(interactive, row's target) for each way ``target`` runs ``workload``.
    A transaction runs statement by statement and in one round trip: the
    broker's plain row is its batch (``-tx`` the interactive one),
    psycopg's plain row the interactive one (``-pipeline`` pipeline mode)."""
    both = workload in TRANSACTIONS
    if target == "broker":
        return [(False, target)] + ([(True, f"{target}-tx")] if both else [])
    return [(True, target)] + ([(False, f"{target}-pipeline")] if both else [])


def _run_workload(plan: Plan, workload: str, dsn: str, workdir: str, *,
                  reverse: bool = False) -> list[Row]:
    def row(target: str) -> Row:
        return _row(plan, workload, target)

    def ordered(items: list) -> list:
        return items[::-1] if reverse else items

    rows: list[Row] = []
    for target in ordered(list(plan.targets)):
        if target == "broker":
            brokers = [("", None)] + ([("baseline-", plan.baseline)] if plan.baseline else [])
            for interactive, variant in _forms(workload, target):
                for prefix, source in ordered(brokers):  # A/B: each variant, back to back
                    name = application_name(prefix + variant)
                    with _running_broker(dsn, plan.cap, workdir, name, source) \
                            as (endpoint, pid):
                        result = _drive(row(prefix + variant), _broker_sessions(
                            workload, endpoint, interactive), dsn, plan, pid)
                        result.broker_peak_rss_mb = round(_peak_rss_mb(pid), 1)
                    rows.append(result)
        elif target == "pgbouncer":
            binary = find_pgbouncer(plan.pgbouncer)
            if binary is None:
                rows.append(_skipped(row(target), "pgbouncer not installed "
                                                  "(Debian: apt-get install pgbouncer)"))
                continue
            # A PgBouncer per row, as a broker per row: each starts with no
            # server connection, and opens them with its row's clients' name
            # (one reused from the row before kept that row's name until
            # PgBouncer next set it, and the sampler could miss the row).
            for interactive, variant in _forms(workload, target):
                with _running_pgbouncer(binary, dsn, plan.cap, workdir) as (bouncer_dsn, pid):
                    rows.append(_drive(row(variant), _psycopg_sessions(
                        workload, bouncer_dsn, False, application_name(variant), interactive),
                        dsn, plan, pid))
        elif target == "direct" and workload == "overload":
            # Without a cap there is no capacity to offer twice: direct opens
            # a server connection per client thread, that is per request in
            # flight, and PostgreSQL runs them all.
            rows.append(_skipped(row(target), "direct psycopg has no cap to overload"))
        elif target == "direct":
            for interactive, variant in _forms(workload, target):
                rows.append(_drive(row(variant), _psycopg_sessions(
                    workload, dsn, True, application_name(variant), interactive), dsn, plan))
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


def _medians(rounds: list[list[Row]]) -> list[Row]:
    """One row per target from each round's: in the first round's order."""
    if len(rounds) == 1:
        return rounds[0]
    by_target: dict[str, list[Row]] = {}
    for rows in rounds:
        for r in rows:
            by_target.setdefault(r.target, []).append(r)
    return [_median_row(by_target[r.target]) for r in rounds[0]]


def _median_row(rows: list[Row]) -> Row:
    ran = [r for r in rows if not r.skipped]
    if not ran:
        return rows[0]

    def known(name: str) -> list:
        return [value for r in ran if (value := getattr(r, name)) is not None]

    def median(name: str) -> float | None:
        values = known(name)
        return statistics.median(values) if values else None

    def total(name: str) -> int | None:
        values = known(name)
        return sum(values) if values else None

    first = ran[0]
    merged = Row(first.workload, first.target, first.processes, first.threads, first.seconds,
                 rounds=len(ran),
                 first_error=next((r.first_error for r in ran if r.first_error), ""),
                 max_server_connections=max(r.max_server_connections for r in ran),
                 broker_peak_rss_mb=max(known("broker_peak_rss_mb"), default=None),
                 vs_pgbouncer_rounds=known("vs_pgbouncer"), vs_direct_rounds=known("vs_direct"))
    for name in ("per_second", "p50_ms", "p99_ms", "client_cpu_us", "broker_cpu_us",
                 "offered_per_second", "goodput_of_capacity", "vs_pgbouncer", "vs_direct"):
        setattr(merged, name, median(name))
    for name in ("operations", "errors", "late_answers", "unsent", "late_starts"):
        setattr(merged, name, total(name))
    return merged


def _ratio(value: float | None, rounds: list[float] | None = None) -> str:
    if value is None:
        return "-"
    if rounds and min(rounds) != max(rounds):
        return f"{value:.2f}x ({min(rounds):.2f}-{max(rounds):.2f})"
    return f"{value:.2f}x"


def _number(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


_Columns = tuple[tuple[str, Callable[[Row], str]], ...]
_LEAD: _Columns = (("workload", lambda r: r.workload), ("target", lambda r: r.target),
                   ("clients", lambda r: f"{r.processes}x{r.threads}"))
_CPU: _Columns = (("client us/req", lambda r: _number(r.client_cpu_us)),
                  ("broker us/req", lambda r: _number(r.broker_cpu_us)))
CLOSED_COLUMNS: _Columns = _LEAD + (
    ("ops/s", lambda r: _number(r.per_second)), ("p50 ms", lambda r: f"{r.p50_ms:.2f}"),
    ("p99 ms", lambda r: f"{r.p99_ms:.2f}"),
    ("max conns", lambda r: str(r.max_server_connections)), ("errors", lambda r: str(r.errors)),
    ("vs pgbouncer", lambda r: _ratio(r.vs_pgbouncer, r.vs_pgbouncer_rounds)),
    ("vs direct", lambda r: _ratio(r.vs_direct, r.vs_direct_rounds)), ("broker RSS MB", lambda r: _number(r.broker_peak_rss_mb))) + _CPU
# Goodput: answers within the deadline; failed: errors (refused or cancelled
# at the deadline); late: answers after it; unsent: due while every client
# thread still waited; late starts: counted by the server.
OVERLOAD_COLUMNS: _Columns = _LEAD + (
    ("offered/s", lambda r: _number(r.offered_per_second)),
    ("goodput/s", lambda r: _number(r.per_second)),
    ("of capacity", lambda r: _number(r.goodput_of_capacity, 2)),
    ("p99 ms", lambda r: f"{r.p99_ms:.2f}"), ("failed", lambda r: str(r.errors)),
    ("late", lambda r: str(r.late_answers)), ("unsent", lambda r: str(r.unsent)),
    ("late starts", lambda r: _number(r.late_starts)),
    ("max conns", lambda r: str(r.max_server_connections)),
    ("vs pgbouncer", lambda r: _ratio(r.vs_pgbouncer, r.vs_pgbouncer_rounds))) + _CPU


def _table(rows: list[Row], columns: _Columns) -> list[str]:
    lines = [tuple(name for name, _ in columns)] + [
        tuple(cell(r) for _, cell in columns) for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(columns))]
    return ["  ".join(cell.ljust(widths[i]) if i < 2 else cell.rjust(widths[i])
                      for i, cell in enumerate(line)).rstrip() for line in lines]


def format_table(rows: list[Row]) -> str:
    """The closed-loop rows, then the overload rows: their columns differ."""
    ran = [r for r in rows if not r.skipped]
    closed = [r for r in ran if r.workload != "overload"]
    overload = [r for r in ran if r.workload == "overload"]
    out = _table(closed, CLOSED_COLUMNS) if closed or not overload else []
    if overload:
        out += ([""] if out else []) + _table(overload, OVERLOAD_COLUMNS)
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
