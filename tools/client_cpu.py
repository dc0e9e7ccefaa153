"""CPU per request of the client hot path, and of the broker, at SELECT 1.

    python tools/client_cpu.py [--tree DIR[:LOOP] ...] [--rounds N] [--processes 32]
                               [--seconds 4] [--cap 4]

Starts a throwaway embedded PostgreSQL, then, round after round and tree
after tree (checkouts to compare, this one by default; alternating them
shares the machine's noise fairly), a broker of that tree capped at
``--cap`` connections and ``--processes`` forked clients of the same tree
calling ``Client(endpoint).execute("SELECT 1")`` for ``--seconds``.  It
prints, per run and as medians per tree: the clients' CPU per request
(every child's process CPU, its ZeroMQ I/O thread included, over its
requests), the broker's (its /proc stat, every thread, over the same
window) and the throughput.  Not a test: figures for issue 13.

``DIR:bare`` drives that tree's broker with a bare loop instead of the
client (a DEALER socket, one prepacked one-frame request, send and recv):
the floor that ZeroMQ and the kernel set for the client (brokers from
protocol 2); ``DIR:bare2`` the same with the header and the body in two
frames.  ``DIR`` alone (or ``DIR:client``) is the tree's client.

``--profile FILE`` instead runs one client process under cProfile for
``--seconds`` against a broker of this tree (with ``--processes`` - 1 others
loading it as above) and writes the stats to FILE; ``--profile-broker
FILE`` runs the broker's loop under cProfile (its thread's CPU time).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent.parent
TICKS = os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tree_env(tree: Path) -> dict[str, str]:
    # The tree's own packages, not whichever one the venv has installed.
    return {**os.environ, "PYTHONPATH": str(tree)}


def _proc_cpu(pid: int) -> float:
    """Seconds of CPU (user + system, every thread) ``pid`` has used."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def _postgres(workdir: str) -> tuple[subprocess.Popen, str]:
    datadir, sockdir, port = f"{workdir}/pgdata", f"{workdir}/pgrun", _free_port()
    cli = [sys.executable, "-m", "broker.cli", "embedded-postgres"]
    where = ["--datadir", datadir, "--socket-dir", sockdir, "--port", str(port)]
    env = _tree_env(HERE)
    subprocess.run([*cli, "init", *where], check=True, cwd=HERE, env=env,
                   stdout=subprocess.DEVNULL)
    server = subprocess.Popen([*cli, "serve", *where], cwd=HERE, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    dsn = subprocess.run([*cli, "dsn", *where], check=True, cwd=HERE, env=env,
                         capture_output=True, text=True).stdout.strip()
    return server, dsn


_PROFILED_BROKER = """
import cProfile, runpy, sys, time
profile, sys.argv = sys.argv[1], ["broker.cli", *sys.argv[2:]]
profiler = cProfile.Profile(time.thread_time)  # the loop's CPU, not its waits
profiler.enable()
try:
    runpy.run_module("broker.cli", run_name="__main__")
finally:
    profiler.disable()
    profiler.dump_stats(profile)
"""


def _broker(tree: Path, dsn: str, endpoint: str, cap: int,
            profile: str | None = None) -> subprocess.Popen:
    run = [sys.executable, "-c", _PROFILED_BROKER, profile] if profile else \
        [sys.executable, "-m", "broker.cli"]
    return subprocess.Popen(
        [*run, "serve", "--dsn", dsn, "--endpoint", endpoint,
         "--max-connections", str(cap), "--max-waiting", "100000", "--log-level", "WARNING"],
        cwd=tree, env=_tree_env(tree))


def _driver(tree: Path, loop: str, endpoint: str, args: argparse.Namespace, broker_pid: int,
            profile: str | None = None) -> dict:
    command = [sys.executable, __file__, "--drive", endpoint, "--processes",
               str(args.processes), "--seconds", str(args.seconds),
               "--broker-pid", str(broker_pid), "--loop", loop]
    if profile:
        command += ["--profile", profile]
    out = subprocess.run(command, cwd=tree, env=_tree_env(tree), check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def drive(endpoint: str, processes: int, seconds: float, broker_pid: int,
          profile: str | None, loop: str) -> None:
    """Fork the clients, time the window, print one JSON line."""
    import client  # the tree's, by PYTHONPATH

    probe = client.Client(endpoint, timeout=1)
    for _ in range(300):  # the broker may still be binding
        try:
            probe.ping()
            break
        except client.BrokerUnavailable:
            time.sleep(0.1)
    probe.close()
    start = time.monotonic() + 1.0  # every child connected and warm by then
    end = start + seconds
    pipes, pids = [], []
    for index in range(processes):
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read)
            code = 0
            try:
                if loop != "client":
                    _bare_child(endpoint, start, end, write, two_frames=loop == "bare2")
                else:
                    _child(client, endpoint, start, end, write,
                           profile if index == 0 else None)
            except BaseException:
                import traceback
                traceback.print_exc()
                code = 1
            os._exit(code)
        os.close(write)
        pipes.append(read)
        pids.append(pid)
    time.sleep(max(0.0, start - time.monotonic()))
    broker_before = _proc_cpu(broker_pid)
    time.sleep(max(0.0, end - time.monotonic()))
    broker_after = _proc_cpu(broker_pid)
    requests, cpu = 0, 0.0
    for read, pid in zip(pipes, pids):
        with os.fdopen(read) as f:
            count, used = json.loads(f.read() or "[0, 0]")
        os.waitpid(pid, 0)
        requests += count
        cpu += used
    print(json.dumps({
        "requests": requests, "per_second": requests / seconds,
        "client_us": cpu / requests * 1e6 if requests else None,
        "broker_us": (broker_after - broker_before) / requests * 1e6 if requests else None,
    }))


def _child(client, endpoint: str, start: float, end: float, write: int,
           profile: str | None) -> None:
    c = client.Client(endpoint)
    c.execute("SELECT 1")  # the socket is made and connected outside the window
    time.sleep(max(0.0, start - time.monotonic()))
    profiler = None
    if profile:
        import cProfile
        profiler = cProfile.Profile(time.thread_time)  # CPU, not time blocked in recv
        profiler.enable()
    execute, monotonic = c.execute, time.monotonic
    cpu0 = time.process_time()  # the whole process: ZeroMQ's I/O thread too
    count = 0
    while monotonic() < end:
        execute("SELECT 1")
        count += 1
    used = time.process_time() - cpu0
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(profile)
    os.write(write, json.dumps([count, used]).encode())
    os.close(write)


def _bare_child(endpoint: str, start: float, end: float, write: int, two_frames: bool) -> None:
    import zmq
    from client import protocol

    socket = zmq.Context().socket(zmq.DEALER)
    socket.connect(endpoint)
    header = protocol.pack([1, protocol.OP_EXECUTE, 60_000, None])
    body = protocol.pack(["SELECT 1", None])
    if two_frames:
        message: Any = [header, body]
        send = socket.send_multipart
    else:
        message, send = header + body, socket.send
    time.sleep(0.3)
    send(message)
    socket.poll(5000)
    socket.recv()
    time.sleep(max(0.0, start - time.monotonic()))
    recv, monotonic = socket.recv, time.monotonic
    cpu0 = time.process_time()
    count = 0
    while monotonic() < end:
        send(message)
        recv()
        count += 1
    used = time.process_time() - cpu0
    os.write(write, json.dumps([count, used]).encode())
    os.close(write)


def _target(spec: str) -> tuple[Path, str]:
    tree, _, loop = spec.partition(":")
    if loop not in ("", "client", "bare", "bare2"):
        raise SystemExit(f"unknown loop {loop!r}: client, bare or bare2")
    return Path(tree).resolve(), loop or "client"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", action="append",
                        help="a checkout to measure (repeat to compare); default: this one")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--processes", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--cap", type=int, default=4)
    parser.add_argument("--profile", help="cProfile one client into this file")
    parser.add_argument("--profile-broker",
                        help="cProfile the broker's loop (its thread's CPU) into this file")
    parser.add_argument("--loop", default="client", help=argparse.SUPPRESS)
    parser.add_argument("--drive", help=argparse.SUPPRESS)
    parser.add_argument("--broker-pid", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.drive:
        drive(args.drive, args.processes, args.seconds, args.broker_pid, args.profile, args.loop)
        return
    targets = [_target(spec) for spec in args.tree or [str(HERE)]]
    workdir = tempfile.mkdtemp(prefix="cpu-")
    os.chmod(workdir, 0o755)  # PostgreSQL's own user must reach its directories
    server, dsn = _postgres(workdir)
    runs: dict[tuple[Path, str], list[dict]] = {target: [] for target in targets}
    try:
        for round_ in range(1 if args.profile or args.profile_broker else args.rounds):
            for tree, loop in targets:
                sockdir = tempfile.mkdtemp(prefix="b-", dir=workdir)  # 0700
                endpoint = f"ipc://{sockdir}/b.sock"
                broker = _broker(tree, dsn, endpoint, args.cap, args.profile_broker)
                try:
                    run = _driver(tree, loop, endpoint, args, broker.pid, args.profile)
                finally:
                    broker.send_signal(signal.SIGTERM)
                    broker.wait(timeout=30)
                runs[tree, loop].append(run)
                print(f"round {round_ + 1} {tree}:{loop}: client {run['client_us']:.1f} us/req, "
                      f"broker {run['broker_us']:.1f} us/req, {run['per_second']:.0f} req/s",
                      flush=True)
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=30)
        shutil.rmtree(workdir, ignore_errors=True)
    for (tree, loop), results in runs.items():
        print(f"median of {len(results)} {tree}:{loop}: "
              + ", ".join(f"{key} {statistics.median(r[key] for r in results):.1f}"
                          for key in ("client_us", "broker_us", "per_second")))


if __name__ == "__main__":
    main()
