"""Soak: many client processes, killed at random and replaced, against one broker.

Every reply is checked against its request; every write a client saw
acknowledged must be in the database, and nothing else may be.  Run with
``make soak`` (1,000,000 requests from 32 processes); ``test_soak.py``
runs a 50,000-request version inside ``make test``.

Each worker logs ``attempt ID`` before a write, ``ack ID`` after its
acknowledgement, and any failure, to a file of its own, flushed each
time, so a SIGKILL loses nothing of what the worker knew.  Workers share
no lock or queue with the parent: one killed while holding it would
stall the rest.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

import client
from conftest import BrokerProcess, ConnectionSampler, short_tempdir, throwaway_cluster

WRITE_SHARE = 0.1  # of requests: an INSERT with a unique id
TRANSACTION_SHARE = 0.05  # of requests: a two-statement transaction that inserts
RSS_WARMUP_SHARE = 0.2  # RSS growth is measured from this point of the run


@dataclass
class SoakReport:
    requests: int = 0
    processes: int = 0
    kills: int = 0
    failed: int = 0  # errors seen by any worker
    mismatched: int = 0
    stale_replies: int = 0  # replies to requests nobody was waiting for
    lost_writes: int = 0  # acknowledged, not stored
    phantom_writes: int = 0  # stored, never attempted by a killed worker nor acknowledged
    max_connections_seen: int = 0
    cap: int = 0
    rss_warm_kb: int = 0
    rss_end_kb: int = 0
    seconds: float = 0.0
    first_failures: list[str] = field(default_factory=list)

    @property
    def rss_growth(self) -> float:
        return (self.rss_end_kb - self.rss_warm_kb) / self.rss_warm_kb

    def summary(self) -> str:
        return (f"{self.requests:,} requests from {self.processes} processes in "
                f"{self.seconds:.0f} s ({self.requests / self.seconds:,.0f}/s), "
                f"{self.kills} clients killed; failed {self.failed}, mismatched "
                f"{self.mismatched}, stale replies {self.stale_replies}, lost writes "
                f"{self.lost_writes}, phantom writes {self.phantom_writes}; max server "
                f"connections {self.max_connections_seen} (cap {self.cap}); broker RSS "
                f"{self.rss_warm_kb / 1024:.1f} -> {self.rss_end_kb / 1024:.1f} MB "
                f"({self.rss_growth:+.1%}) after warm-up")


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def _worker(endpoint: str, slot: int, generation: int, done: multiprocessing.Array,
            log_dir: str, stop: Any) -> None:
    rng = random.Random(slot * 7919 + generation)
    c = client.Client(endpoint, timeout=60)
    log = open(Path(log_dir, f"{slot}.{generation}.log"), "a", buffering=1)
    base = (slot * 10_000 + generation) * 10_000_000
    seq = 0
    while not stop.value:
        seq += 1
        token = base + seq
        roll = rng.random()
        try:
            if roll < WRITE_SHARE:
                log.write(f"attempt {token}\n")
                r = c.execute("INSERT INTO soak_writes VALUES (%s) RETURNING id", [token])
                ok = r.rows == [(token,)]
                log.write(f"ack {token}\n")
            elif roll < WRITE_SHARE + TRANSACTION_SHARE:
                log.write(f"attempt {token}\n")
                with c.transaction() as tx:
                    tx.execute("INSERT INTO soak_writes VALUES (%s)", [token])
                    ok = tx.execute("SELECT id FROM soak_writes WHERE id = %s",
                                    [token]).rows == [(token,)]
                log.write(f"ack {token}\n")
            else:
                text = f"t{token}"
                r = c.execute("SELECT %s::bigint, %s::text", [token, text])
                ok = r.rows == [(token, text)]
        except client.Error as exc:
            message = str(exc).replace("\n", " ")
            log.write(f"failed {type(exc).__name__}: {message}\n")
            continue
        if not ok:
            log.write(f"mismatched {token}\n")
        done[slot] += 1  # this slot's only writer: the previous one is dead
    log.write(f"stale {c._stale_replies}\n")


def _read_logs(log_dir: str, killed: set[str], report: SoakReport) -> tuple[set[int], set[int]]:
    """Acknowledged ids, and ids attempted by killed workers without an ack;
    failures, mismatches and stale replies are added to ``report``."""
    acked: set[int] = set()
    in_doubt: set[int] = set()
    for path in Path(log_dir).glob("*.log"):
        attempts: set[int] = set()
        for line in path.read_text().splitlines():
            what, _, rest = line.partition(" ")
            if what in ("failed", "mismatched"):
                setattr(report, what, getattr(report, what) + 1)
                if len(report.first_failures) < 5:
                    report.first_failures.append(line)
            elif what == "stale" and rest.isdigit():
                report.stale_replies += int(rest)
            elif rest.isdigit():  # else a line cut short by SIGKILL
                (acked if what == "ack" else attempts).add(int(rest))
        if path.stem in killed:
            in_doubt |= attempts - acked
    return acked, in_doubt


def run_soak(broker: BrokerProcess, dsn: str, *, requests: int, processes: int,
             kill_interval: float, seed: int = 1) -> SoakReport:
    """Drive ``requests`` through ``broker`` while killing clients at random."""
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute("DROP TABLE IF EXISTS soak_writes")
        admin.execute("CREATE TABLE soak_writes (id bigint PRIMARY KEY)")
    ctx = multiprocessing.get_context("fork")
    done = ctx.Array("q", processes, lock=False)  # requests answered, per slot
    # A flag without a lock: an Event's lock, held by a worker SIGKILLed inside
    # is_set(), is never released, and every other worker then blocks on it.
    stop = ctx.RawValue("b", 0)
    log_dir = short_tempdir("pb-soak-")
    rng = random.Random(seed)
    report = SoakReport(processes=processes, cap=broker.max_connections)
    generations = [0] * processes
    killed: set[str] = set()

    def spawn(slot: int) -> multiprocessing.Process:
        proc = ctx.Process(target=_worker, args=(broker.endpoint, slot, generations[slot],
                                                 done, log_dir, stop))
        proc.start()
        return proc

    started = time.monotonic()
    with ConnectionSampler(dsn, broker.application_name, interval=0.01) as sampler:
        workers = [spawn(slot) for slot in range(processes)]
        next_kill = time.monotonic() + kill_interval
        while (answered := sum(done)) < requests:
            if not report.rss_warm_kb and answered >= requests * RSS_WARMUP_SHARE:
                report.rss_warm_kb = _rss_kb(broker.proc.pid)
            if broker.proc.poll() is not None:
                raise RuntimeError(f"the broker exited:\n{broker.log()[-3000:]}")
            if time.monotonic() >= next_kill:
                next_kill += kill_interval
                slot = rng.randrange(processes)
                os.kill(workers[slot].pid, signal.SIGKILL)
                workers[slot].join()
                killed.add(f"{slot}.{generations[slot]}")
                report.kills += 1
                generations[slot] += 1
                workers[slot] = spawn(slot)
            time.sleep(0.005)
        stop.value = 1
        for proc in workers:
            proc.join(timeout=60)
        report.seconds = time.monotonic() - started
        report.rss_end_kb = _rss_kb(broker.proc.pid)
    report.requests = sum(done)
    report.max_connections_seen = sampler.maximum
    acked, in_doubt = _read_logs(log_dir, killed, report)
    with psycopg.connect(dsn, autocommit=True) as admin:
        stored = {row[0] for row in admin.execute("SELECT id FROM soak_writes")}
    report.lost_writes = len(acked - stored)
    report.phantom_writes = len(stored - acked - in_doubt)
    shutil.rmtree(log_dir, ignore_errors=True)
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1_000_000)
    parser.add_argument("--processes", type=int, default=32)
    parser.add_argument("--cap", type=int, default=4)
    parser.add_argument("--kill-interval", type=float, default=0.2,
                        help="seconds between client kills")
    parser.add_argument("--port", type=int, default=5434)
    args = parser.parse_args()
    with throwaway_cluster("pb-soakpg-", args.port) as cluster:
        broker = BrokerProcess(cluster.dsn, max_connections=args.cap, log_level="INFO")
        broker.start()
        try:
            report = run_soak(broker, cluster.dsn, requests=args.requests,
                              processes=args.processes, kill_interval=args.kill_interval)
        finally:
            broker.stop()
            shutil.rmtree(broker.dir, ignore_errors=True)
    print(f"[soak] {report.summary()}")
    for failure in report.first_failures:
        print(f"[soak]   {failure}")
    ok = (report.failed == report.mismatched == report.stale_replies == 0
          and report.lost_writes == report.phantom_writes == 0
          and report.max_connections_seen <= report.cap and report.rss_growth < 0.10)
    print("[soak] PASS" if ok else "[soak] FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
