"""``poolbroker serve | config | stats | ctl | bench | keygen | embedded-postgres``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

from client.protocol import CONTROL_COMMANDS

from . import config, logs
from . import stats as S
from .config import ConfigError, load
from .redact import Redactor


def _serve(args: argparse.Namespace) -> int:
    from .loop import Broker

    try:
        settings = load(args.config, config.flag_values(args))
        logs.configure(settings.log_level, settings.log_format)
        Redactor(*settings.all_dsns).install()
        # A reload reads the same sources again, with the same precedence.
        Broker(settings, reread=lambda: load(args.config, config.flag_values(args))).run()
    except ConfigError as exc:
        return _config_failed(exc)
    except Exception:
        # Through the handler: in the log's format, the password masked.
        logging.getLogger("poolbroker").critical("the broker failed", exc_info=True)
        return 1
    return 0


def _config_failed(exc: ConfigError) -> int:
    for problem in exc.problems:
        print(f"poolbroker: {problem}", file=sys.stderr)
    return 2


def _config(args: argparse.Namespace) -> int:
    from .settings_docs import defaults_toml, settings_toml

    if args.defaults:
        print(defaults_toml(), end="")
        return 0
    try:
        settings = load(args.config, config.flag_values(args))
    except ConfigError as exc:
        return _config_failed(exc)
    print(Redactor(*settings.all_dsns)(settings_toml(settings)), end="")
    return 0


def _ask(args: argparse.Namespace, command: str | None) -> Any:
    """The broker's answer to ``command`` (a control command; None: stats),
    or ``client.Error``."""
    import client

    broker = client.Client(args.endpoint, timeout=args.timeout)
    return broker.stats() if command is None else broker.control(command)


def _stats(args: argparse.Namespace) -> int:
    return _show(args, None)


def _show(args: argparse.Namespace, command: str | None) -> int:
    """``poolbroker stats``, ``ctl stats`` and ``ctl pools``: one snapshot, printed."""
    import client

    try:
        numbers = _ask(args, command)
    except client.Error as exc:
        print(f"poolbroker: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(numbers, indent=2, sort_keys=True))
    elif command == "pools":
        print(format_pools(numbers))
    else:
        print(format_stats(numbers))
    return 0


def _ctl(args: argparse.Namespace) -> int:
    import client

    if args.command_name in ("stats", "pools"):
        return _show(args, args.command_name)
    try:
        answer = _ask(args, args.command_name)
    except client.Error as exc:
        print(f"poolbroker: {exc}", file=sys.stderr)
        return 1
    if args.command_name != "reload":
        print(f"{args.command_name}: done")
        return 0
    if args.json:
        print(json.dumps(answer, indent=2, sort_keys=True))
    else:
        for name, value in answer["applied"].items():
            print(f"applied: {name} = {config.toml_literal(value)}")
        for name in answer["restart_needed"]:
            print(f"needs a restart, kept: {name}")
        for problem in answer["problems"]:
            print(f"poolbroker: {problem}", file=sys.stderr)
    if answer["problems"]:
        print("poolbroker: the settings are invalid: the broker kept the running ones",
              file=sys.stderr)
        return 1
    return 0


def format_pools(numbers: dict[str, Any]) -> str:
    """The pools as PgBouncer's SHOW POOLS shows them: ``poolbroker ctl pools``."""
    columns = (S.POOL_NAME, *S.SHOW_POOLS)
    rows = [columns] + [tuple(_cell(entry[c]) for c in columns)
                        for entry in numbers.get(S.POOLS, [])]
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    return "\n".join("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                               for i, (cell, w) in enumerate(zip(row, widths))).rstrip()
                     for row in rows)


def format_stats(numbers: dict[str, Any]) -> str:
    """``poolbroker stats`` as text: uptime, the pools as SHOW POOLS shows
    them, peaks, percentiles, then every counter and gauge by name."""
    pools = numbers.get(S.POOLS, [])
    lines = [f"uptime {_duration(numbers[S.UPTIME_SECONDS])}", "", format_pools(numbers)]
    lines += ["", "peaks since start: " + ", ".join(
        f"{title} {_cell(numbers.get(name))}" for title, name in (
            ("clients", S.CLIENTS_CONNECTED_PEAK), ("requests waiting", S.REQUESTS_WAITING_PEAK),
            ("server connections active", S.POOL_ACTIVE_PEAK)))]
    waits = sum(sum(entry[S.WAIT_SECONDS]["counts"]) for entry in pools)
    timed_out = numbers[S.REQUESTS_TIMEOUTS] + numbers[S.REQUESTS_ABANDONED]
    for title, name, note in (
            ("queue wait", S.REQUESTS_WAIT_PERCENTILE,
             f"of {waits} requests through the queue, {timed_out} ended in PoolTimeout"),
            ("statement time", S.STATEMENT_PERCENTILE, "server time")):
        values = ", ".join(f"p{p} {_cell(numbers[name.format(p)])}" for p in S.PERCENTILES)
        lines.append(f"{title} ms: {values} ({note})")
    scalars = {k: v for k, v in numbers.items() if not isinstance(v, (list, dict))}
    width = max(map(len, scalars))
    lines.append("")
    lines += [f"{name:<{width}}  {_cell(scalars[name])}" for name in sorted(scalars)]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _duration(seconds: float) -> str:
    """``3723.5`` -> ``1h 02m 03s (3723 s)``."""
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{hours}h {minutes:02d}m {secs:02d}s"
    return f"{days}d {text} ({whole} s)" if days else f"{text} ({whole} s)"


def _embedded_postgres(args: argparse.Namespace) -> int:
    from .embedded import Cluster, PostgresNotFound

    try:
        cluster = Cluster(args.datadir, args.socket_dir, args.port)
        if args.action == "dsn":
            print(cluster.dsn)
            return 0
        cluster.init()
        if args.action == "serve":
            cluster.exec_server()  # does not return
    except PostgresNotFound as exc:
        print(f"poolbroker: {exc}", file=sys.stderr)
        return 2
    return 0


def _bench(args: argparse.Namespace) -> int:
    from . import bench

    def choices(text: str, allowed: tuple[str, ...], what: str) -> tuple[str, ...]:
        picked = tuple(x.strip() for x in text.split(",") if x.strip())
        unknown = set(picked) - set(allowed)
        if unknown or not picked:
            raise SystemExit(f"poolbroker bench: unknown {what} {sorted(unknown)}; "
                             f"choose from {', '.join(allowed)}")
        return picked

    # The overload workload divides by the statement time (its capacity) and
    # by the rate (its due times); a deadline of 0 would send nothing.
    if args.rounds < 1:
        raise SystemExit("poolbroker bench: --rounds must be 1 or more")
    if args.rate < 0 or args.deadline <= 0 or args.statement_time <= 0:
        raise SystemExit("poolbroker bench: --rate must be 0 or more, --deadline and "
                         "--statement-time more than 0")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s: %(message)s")
    plan = bench.Plan(
        workloads=choices(args.workloads or ",".join(bench.WORKLOADS), bench.WORKLOADS,
                          "workload"),
        targets=choices(args.targets, bench.TARGETS, "target"),
        processes=args.processes, threads=args.threads, cap=args.cap,
        duration=args.duration, scale=args.scale,
        dsn=args.dsn or os.environ.get("POOLBROKER_DSN"), pgbouncer=args.pgbouncer,
        baseline=args.baseline, rate=args.rate, deadline=args.deadline,
        statement_time=args.statement_time, rounds=args.rounds)
    rows = bench.run(plan)
    print(bench.format_table(rows))
    if args.json:
        bench.write_json(rows, args.json, plan)
    return 0


def _keygen(args: argparse.Namespace) -> int:
    import zmq.auth

    try:
        os.makedirs(args.directory, mode=0o700, exist_ok=True)
        # zmq.auth writes with open(): a new file gets the umask's mode (0644
        # in a 0755 directory) and an existing one keeps its own.  Make the
        # secret's file private before the key is written into it.
        secret_path = os.path.join(args.directory, f"{args.name}.key_secret")
        fd = os.open(secret_path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            os.fchmod(fd, 0o600)
        finally:
            os.close(fd)
        public, secret = zmq.auth.create_certificates(args.directory, args.name)
    except OSError as exc:
        print(f"poolbroker: cannot write the certificates: {exc}", file=sys.stderr)
        return 1
    print(f"public certificate: {public}\nsecret certificate: {secret} (keep it private)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="poolbroker", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    # No abbreviated flags: with a family of --max-... settings, one that is
    # unambiguous today would become ambiguous when a setting is added.
    serve = commands.add_parser("serve", help="run the broker", allow_abbrev=False)
    show = commands.add_parser(
        "config", allow_abbrev=False,
        help="check the settings and print them as the broker would run with them, "
             "the DSN's password masked")
    for command in (serve, show):
        command.add_argument("--config", metavar="FILE",
                             help="TOML file of settings (see etc/poolbroker.toml)")
        config.add_flags(command)
    serve.set_defaults(func=_serve)
    show.add_argument("--defaults", action="store_true",
                      help="print every setting with its default and its meaning, "
                           "commented out: etc/poolbroker.toml")
    show.set_defaults(func=_config)

    stats = commands.add_parser("stats", help="print the broker's counters")
    stats.set_defaults(func=_stats)

    ctl = commands.add_parser(
        "ctl", help="control a running broker (its own user only, over ipc)",
        description="stats: as 'poolbroker stats'; pools: the SHOW POOLS table; reload: "
                    "re-read the settings as SIGHUP does; pause: hold new requests queued "
                    "(running ones finish; deadlines and pool_timeout still apply); resume: "
                    "release them; reconnect: replace every server connection once idle; "
                    "drain: as SIGTERM, finish what runs and exit 0")
    ctl.add_argument("command_name", metavar="command", choices=CONTROL_COMMANDS,
                     help=", ".join(CONTROL_COMMANDS))
    ctl.set_defaults(func=_ctl)
    for command in (stats, ctl):
        command.add_argument("--endpoint", help="broker endpoint [POOLBROKER_ENDPOINT]")
        command.add_argument("--timeout", type=float, default=5.0)
        command.add_argument("--json", action="store_true")

    bench = commands.add_parser(
        "bench", help="drive a workload through the broker, PgBouncer and direct psycopg")
    bench.add_argument("--dsn", help="database to use [POOLBROKER_DSN]; default: a "
                                     "throwaway cluster the bench creates")
    bench.add_argument("--workloads",  # default: bench.WORKLOADS, not imported for other commands
                       help="comma-separated: select1, pk, txn, mixed, orm, web, overload "
                            "(all; orm needs SQLAlchemy)")
    bench.add_argument("--targets", default="broker,pgbouncer,direct",
                       help="comma-separated: broker, pgbouncer, direct (all)")
    bench.add_argument("--processes", type=int, default=8, help="client processes (8)")
    bench.add_argument("--threads", type=int, default=1, help="threads per process (1)")
    bench.add_argument("--cap", type=int, default=4,
                       help="server connections for the broker and PgBouncer (4)")
    bench.add_argument("--duration", type=float, default=5.0, help="seconds per run (5)")
    bench.add_argument("--rounds", type=int, default=1,
                       help="run each workload this many times, the targets' order "
                            "reversed every other round, and report medians, each ratio "
                            "with its range over the rounds (1)")
    bench.add_argument("--scale", type=int, default=1, help="pgbench scale factor (1)")
    bench.add_argument("--pgbouncer", help="path of the pgbouncer binary (found on PATH)")
    bench.add_argument("--baseline", metavar="DIR",
                       help="also run the broker of this checkout (say, a git worktree of "
                            "an older commit), right after this one: an A/B in one run")
    bench.add_argument("--rate", type=float, default=0.0,
                       help="overload: requests offered per second, over every client "
                            "(default: twice the capacity, cap / statement time)")
    bench.add_argument("--deadline", type=float, default=0.1,
                       help="overload: each request's deadline in seconds (0.1)")
    bench.add_argument("--statement-time", type=float, default=0.003,
                       help="overload: seconds each statement sleeps (0.003)")
    bench.add_argument("--json", help="also write the results to this file")
    bench.set_defaults(func=_bench)

    keygen = commands.add_parser(
        "keygen", help="make a CURVE certificate pair (for tcp endpoints)")
    keygen.add_argument("directory")
    keygen.add_argument("name", help="e.g. broker, or the client's host name")
    keygen.set_defaults(func=_keygen)

    embedded = commands.add_parser("embedded-postgres",
                                   help="a local PostgreSQL cluster for 'make run'")
    embedded.add_argument("action", choices=("init", "serve", "dsn"))
    embedded.add_argument("--datadir", default="var/pgdata")
    embedded.add_argument("--socket-dir", default="var/run")
    embedded.add_argument("--port", type=int, default=5432)
    embedded.set_defaults(func=_embedded_postgres)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
