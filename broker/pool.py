"""Server connections by state, the FIFO queue of jobs waiting for one, the cap.

Each connection has one state (``PgConn.state``), changed only through
``Pool.move``, which keeps the per-state sets the loop asks for.  Opening
a connection blocks, so it happens on a short-lived thread that hands the
finished connection back through a pipe the loop polls.

Sizing, from the loop's housekeeping tick (never on the request path):
``keep_warm`` opens up to ``min_connections``; ``idled_out`` names the
connections above it unused for ``max_idle``; ``aged`` those past their
lifetime, which the loop retires as soon as nothing of a client is on them.
A closed connection's slot stays counted until the server has let its
backend go (``closing``), so a replacement never overlaps it.

The first connection opens before the broker serves, and ends a dead
predecessor's connections (``predecessors.sweep``).  The cap counts those
it could not end (``foreign``); every connection that opens later looks
again which of them are left.
"""

from __future__ import annotations

import enum
import itertools
import logging
import os
import queue
import random
import re
import socket
import threading
import time
from collections import deque
from dataclasses import replace
from typing import Any, Callable, Iterator, NamedTuple

import psycopg
from psycopg.adapt import AdaptersMap

from . import predecessors
from . import stats as S
from .config import DEFAULT_POOL, PoolSettings, Settings
from .endpoint import canonical
from .pgconn import PgConn
from .predecessors import Backend
from .redact import Redactor
from .requests import Job

logger = logging.getLogger("poolbroker.pool")

CONNECT_BACKOFF_MIN = 0.1
CONNECT_BACKOFF_MAX = 5.0
QUICK_STATEMENT = 0.001
"""Seconds of server time under which a statement counts as quick: only
quick ones are pipelined behind others while the pool can still grow."""
ESTIMATES_KEPT = 10_000
ESTIMATE_DOUBT = 0.999
"""What a refusal on a statement's estimate leaves of the estimate: little
is taken, because under overload refusals come by the thousand a second
(at 0.9 the estimate fell to nothing and admission with it: 15% of
capacity answered in time instead of about 50% on the same busy box),
yet a thousand refusals with no run between them take off two thirds."""
SWEEP_CONNECT_TIMEOUT = 2
"""Seconds the first connection, opened before serving, may take: a database
that is down or unreachable must not hold the broker's start (libpq's minimum)."""
FOREIGN_RECHECK_INTERVAL = 1.0
"""Seconds between looks at a dead predecessor's connections still counted."""
UNREACHABLE_SQLSTATE = "08001"
"""sqlclient_unable_to_establish_sqlconnection: what clients are told when
the server gave no reason.  Not 08006 (connection_failure), which the broker
keeps for a connection lost with a statement in flight: that one may have
run, this one never did."""
LIFETIME_JITTER = 0.1
"""A connection's lifetime is max_lifetime less up to this fraction, at random:
connections opened together (min_connections at start) leave one by one, and
none outlives max_lifetime, which may have been set under an outside limit."""
AGED = "max_lifetime"
"""``PgConn.retiring``: the connection reached its lifetime."""
RECONNECT = "reconnect"
"""``PgConn.retiring``: ``poolbroker ctl reconnect`` asked for a new one."""
SURPLUS = "surplus"
"""``PgConn.retiring``: beyond a max_connections lowered by a reload."""
REBALANCE = "rebalance"
"""``PgConn.retiring``: another pool starves under the global cap."""
DEMAND_GRACE = 1.0
"""Seconds a pool counts as having work after its last request: its share
of the global cap outlives a pause between requests."""
BACKEND_EXIT_WAIT = 2.0
"""Seconds a closed connection's slot stays counted while the server has not
closed its end (its backend has not exited).  A server that never does (a
network path gone silent) must not take the slot for good."""

# libpq hands psycopg a refused connection's reason as text only (the
# exception's sqlstate is None), so PostgreSQL's own FATAL messages are
# recognised here: a client can then tell a full database (53300) from a
# missing one or a server going down.  A server that reports in another
# language falls back to UNREACHABLE_SQLSTATE.
_REFUSALS = tuple((re.compile(pattern), sqlstate) for pattern, sqlstate in (
    (r"too many clients already|remaining connection slots are reserved"
     r"|too many connections for (role|database)", "53300"),  # too_many_connections
    (r"the database system is (starting up|shutting down|in recovery mode"
     r"|not (yet )?accepting connections)", "57P03"),  # cannot_connect_now
    (r'database ".*" does not exist', "3D000"),  # invalid_catalog_name
    (r"password authentication failed", "28P01"),  # invalid_password
    (r'role ".*" does not exist|no pg_hba\.conf entry|is not permitted to log in',
     "28000"),  # invalid_authorization_specification
    (r'database ".*" is not currently accepting connections', "55000"),
    (r"permission denied for database", "42501"),  # insufficient_privilege
))


class ConnectError(NamedTuple):
    """Why a connection attempt failed, as clients are told."""

    message: str
    sqlstate: str


def connect_error(exc: Exception, message: str) -> ConnectError:
    """``exc`` (with its password already masked in ``message``) for clients."""
    sqlstate = getattr(exc, "sqlstate", None)  # set when the server answered a query
    if not sqlstate:
        sqlstate = next((code for pattern, code in _REFUSALS if pattern.search(message)),
                        UNREACHABLE_SQLSTATE)
    return ConnectError(message, sqlstate)



class State(enum.StrEnum):
    OPENING = "opening"
    IDLE = "idle"
    SHARED = "shared"  # running autocommit jobs of several clients; takes more
    BUSY = "busy"  # running a job that runs alone
    PINNED = "pinned"  # leased to a transaction
    RESETTING = "resetting"  # rolling back / DISCARD ALL, for nobody
    CLOSED = "closed"


# The states each request's path names (here and in the loop), as plain
# module names: Python 3.11 finds an enum's member through EnumType's
# __getattr__ hook, ~4x a plain attribute, and a connection moves twice a request.
IDLE, SHARED, BUSY, PINNED, RESETTING, CLOSED = (
    State.IDLE, State.SHARED, State.BUSY, State.PINNED, State.RESETTING, State.CLOSED)

COST_OF_LOSING = {State.IDLE: 0, State.SHARED: 1, State.BUSY: 2, State.RESETTING: 3,
                  State.PINNED: 4, State.OPENING: 5, State.CLOSED: 5}
"""How much a connection's retirement costs, by its state (least_needed's
order): idle ones go at once, a transaction keeps its connection longest."""


class Pools:
    """Every pool by name, and the global cap their connections share.

    Each pool has its own DSN, cap, queue (FIFO) and connections; a pool's
    settings are the broker's with its own ``dsn``, ``max_connections`` and
    ``min_connections`` (:func:`pool_settings`).  No pool starves while the
    global cap binds: see :meth:`rebalance`.
    """

    def __init__(self, settings: Settings, adapters: AdaptersMap, redact: Redactor) -> None:
        self.settings = settings
        self.conn_ids = itertools.count(1)  # unique across pools: sessions are keyed by them
        named = [PoolSettings(name=DEFAULT_POOL, dsn=settings.dsn)] if settings.dsn else []
        self.by_name: dict[str, Pool] = {
            spec.name: Pool(pool_settings(settings, spec), adapters, redact, spec.name, self)
            for spec in (*named, *settings.pools)}
        self.all: tuple[Pool, ...] = tuple(self.by_name.values())
        self.default: Pool | None = self.by_name.get(DEFAULT_POOL)
        self.by_wakeup: dict[int, Pool] = {pool.wakeup_fd: pool for pool in self.all}
        self.alone = len(self.all) == 1  # then a pool's own cap is the global one
        self.active_peak = 0  # most connections active at once, all pools together

    def conns(self) -> Iterator[PgConn]:
        for pool in self.all:
            yield from pool.conns.values()

    def note_active(self) -> None:
        """A pool's active connections reached a new peak: maybe all pools' too."""
        self.active_peak = max(self.active_peak, sum(pool.active for pool in self.all))

    def foreign(self) -> frozenset[Backend]:
        """Dead predecessors' connections still counted, of every pool's server."""
        if self.alone:
            return self.all[0].foreign
        return frozenset().union(*(pool.foreign for pool in self.all))

    def apply(self, settings: Settings) -> None:
        """A reload's settings (the pools themselves are fixed at start)."""
        self.settings = settings
        specs = {spec.name: spec for spec in settings.pools}
        for pool in self.all:
            spec = specs.get(pool.name) or PoolSettings(name=pool.name, dsn=settings.dsn)
            pool.settings = pool_settings(settings, spec)

    def room(self) -> int:
        """Connections that may still open under the global cap: open,
        opening, closed until their backends exit and a dead predecessor's
        count (those once, though several pools on one server see them)."""
        return self._room(Pool.held)

    def surplus(self) -> list[PgConn]:
        """Connections beyond a cap lowered by a reload: each pool's own,
        then the global one's (a dead predecessor's connections count),
        taken from the largest pool."""
        out = [conn for pool in self.all for conn in pool.surplus()]
        if out:
            return out
        donor = max(self.all, key=Pool.staying)
        return donor.least_needed(-self._room(Pool.staying))

    def _room(self, size: Callable[[Pool], int]) -> int:
        return self.settings.max_connections - sum(map(size, self.all)) - len(self.foreign())

    def _has_work(self, pool: Pool, now: float) -> bool:
        # A pool that had a request within DEMAND_GRACE still counts: one used
        # now and then must not have its connection taken between requests.
        return bool(pool.waiting or pool.active or now - pool.demand_at < DEMAND_GRACE)

    def _share(self, now: float) -> int:
        """Each pool's fair share of the global cap: divided among the pools
        that have work (see _has_work), at least one each."""
        busy = sum(1 for pool in self.all if self._has_work(pool, now))
        return max(1, self.settings.max_connections // max(1, busy))

    def _starved(self, share: int) -> list[Pool]:
        """Pools with requests waiting, below their share and their own cap,
        whose database answers (a failing pool must not take connections
        from healthy ones for attempts that fail)."""
        return [pool for pool in self.all if pool.waiting and not pool.failing
                and pool.held() < min(share, pool.settings.max_connections)]

    def starved(self, pool: Pool, now: float) -> bool:
        """Whether another pool starves (see rebalance) while ``pool`` holds
        at least its share: then ``pool`` does not grow into a freed slot."""
        share = self._share(now)
        return pool.held() >= share and any(other is not pool for other in self._starved(share))

    def rebalance(self, now: float) -> PgConn | None:
        """A connection to retire so that a starved pool can open one.

        When the global cap binds, a pool with requests waiting that holds
        less than its fair share (:meth:`_share`) gets a connection from a
        pool above its share (a pool with no work has none): the one whose
        loss costs least over every such pool (idle first, a transaction
        last), retired at once if idle, else once its clients' work is done
        (it takes no new work meanwhile).  One at a time, but for an idle
        one found while a busy one is on its way out; a pool at or above its
        share does not grow while another starves (:meth:`starved`).  A
        share is a floor, not a ceiling: an uncontended pool may use the
        whole cap."""
        if self.alone or self.room() > 0 or any(pool.closing for pool in self.all):
            return None
        share = self._share(now)
        starved = self._starved(share)
        if not starved:
            return None
        pending = [conn for conn in self.conns() if conn.retiring == REBALANCE]
        if any(conn.state == State.IDLE for conn in pending):
            return None  # it closes at once: its slot is coming
        best: tuple[int, int, PgConn] | None = None
        for pool in self.all:
            above = pool.staying() - (share if self._has_work(pool, now) else 0)
            if pool in starved or above <= 0:
                continue
            for conn in pool.least_needed(1):
                rank = (COST_OF_LOSING[conn.state], -above)
                if best is None or rank < best[:2]:
                    best = (*rank, conn)
        if best is None or (pending and best[0] != COST_OF_LOSING[State.IDLE]):
            return None
        return best[2]


def pool_settings(settings: Settings, spec: PoolSettings) -> Settings:
    """A pool's settings: the broker's, with the pool's DSN and sizes."""
    if spec.name == DEFAULT_POOL:
        return settings
    return replace(settings, dsn=spec.dsn, pools=(),
                   max_connections=spec.max_connections or settings.max_connections,
                   min_connections=spec.min_connections)


class Pool:
    """Owns the server connections of one DSN; the loop drives them."""

    def __init__(self, settings: Settings, adapters: AdaptersMap, redact: Redactor,
                 name: str, group: Pools) -> None:
        self.name = name
        self.settings = settings
        self.group = group
        self._adapters = adapters
        self._redact = redact
        self.conns: dict[int, PgConn] = {}
        # Closed connections whose backend may not have exited yet: the
        # descriptor the loop watches -> (our end of the socket, when to stop waiting).
        self.closing: dict[int, tuple[socket.socket, float]] = {}
        self._in: dict[State, dict[int, PgConn]] = {state: {} for state in State}
        self.waiting: deque[Job] = deque()
        self.demand_at = 0.0  # when a request last joined the queue (the loop sets it)
        self._opened: queue.SimpleQueue = queue.SimpleQueue()
        self.wakeup_fd, self._wakeup_write = os.pipe()
        os.set_blocking(self.wakeup_fd, False)
        self._backoff = 0.0
        self._retry_at = 0.0
        self._connect_error: ConnectError | None = None  # of the last attempt, if it failed
        self._durations: dict[int, float] = {}  # hash of a query key -> server seconds, smoothed
        self._marked = predecessors.marked_prefix(settings.application_name,
                                                  canonical(settings.endpoint))
        self.application_name = predecessors.own_name(self._marked)
        self.foreign: frozenset[Backend] = frozenset()  # a dead predecessor's, counted
        self._sweep_pending = True  # no connection opens beside the one that sweeps
        # Statistics, kept by the loop's thread alone (see snapshot()).
        self.waits = S.Histogram()  # queue waits, whatever ended them
        self.statement_times = S.Histogram()  # server time of each statement run
        self.waiting_peak = 0  # the loop updates it where the queue grows
        self.active_peak = 0

    # States

    def move(self, conn: PgConn, state: State) -> None:
        """Put ``conn`` in ``state``; ``close`` closes it."""
        del self._in[conn.state][conn.conn_id]  # a StrEnum: "opening" finds State.OPENING
        conn.state = state
        if state == CLOSED:
            self.conns.pop(conn.conn_id, None)
        else:
            self._in[state][conn.conn_id] = conn
            # Identity tests: hashing an enum member calls Python code.
            if state is SHARED or state is BUSY or state is PINNED:
                active = self.active
                if active > self.active_peak:
                    self.active_peak = active
                    self.group.note_active()

    @property
    def active(self) -> int:
        """Connections running clients' work (PgBouncer's sv_active)."""
        return len(self._in[SHARED]) + len(self._in[BUSY]) + len(self._in[PINNED])

    def snapshot(self, now: float) -> dict[str, Any]:
        """The pool's entry of the broker's statistics (``stats.POOLS``), but
        for the clients' columns, which the loop knows."""
        waiting = self.waiting
        return {
            S.POOL_NAME: self.name,
            S.CL_WAITING: len({job.routing_id for job in waiting}),
            S.SV_ACTIVE: self.active,
            S.SV_IDLE: self.count(State.IDLE),
            S.SV_USED: 0,  # idle connections are handed out without a check query
            S.SV_TESTED: self.count(State.RESETTING),
            S.SV_LOGIN: self.count(State.OPENING),
            S.MAXWAIT: round(now - waiting[0].queued_at, 6) if waiting else 0.0,
            S.POOL_MAX: self.settings.max_connections,
            S.POOL_MIN: self.settings.min_connections,
            S.REQUESTS_WAITING: len(waiting),
            S.REQUESTS_WAITING_PEAK: self.waiting_peak,
            S.POOL_ACTIVE_PEAK: self.active_peak,
            S.WAIT_SECONDS: self.waits.as_dict(),
            S.STATEMENT_SECONDS: self.statement_times.as_dict(),
        }

    def close(self, conn: PgConn) -> int | None:
        """Close ``conn``.  The descriptor returned, if any, is to be watched
        for input and handed to ``backend_gone``: until then the backend may
        still hold its slot on the server, and the cap counts it."""
        self.move(conn, State.CLOSED)
        held = conn.close()
        if held is None:
            return None
        fd = held.fileno()
        self.closing[fd] = (held, time.monotonic() + BACKEND_EXIT_WAIT)
        return fd

    def backend_gone(self, fd: int) -> bool:
        """Read what the server sent on a closed connection's socket; True
        once it has closed its end (the backend exited), the slot free."""
        held, _ = self.closing[fd]
        try:
            while held.recv(4096):  # a TLS close_notify, a last notice: not wanted
                pass
        except BlockingIOError:
            return False
        except OSError:
            pass  # reset: the backend is gone as well
        del self.closing[fd]
        held.close()
        return True

    def overdue(self, now: float) -> list[int]:
        """Closed connections whose backends have not let go within
        BACKEND_EXIT_WAIT: no longer counted, their descriptors closed."""
        late = [fd for fd, (_, until) in self.closing.items() if until <= now]
        for fd in late:
            held, _ = self.closing.pop(fd)
            held.close()
        if late:
            logger.warning("%d closed server connections not ended by the server within "
                           "%.0f s: no longer counted against max_connections",
                           len(late), BACKEND_EXIT_WAIT)
        return late

    def count(self, state: State) -> int:
        return len(self._in[state])

    def in_state(self, state: State) -> list[PgConn]:
        return list(self._in[state].values())

    def idle(self) -> PgConn | None:
        """The most recently used idle connection (its caches are warm)."""
        idle = self._in[IDLE]
        return next(reversed(idle.values())) if idle else None

    def shared(self) -> list[PgConn]:
        return list(self._in[State.SHARED].values())

    def held(self) -> int:
        """Connections counted against this pool's own cap: closed ones whose
        backends have not exited still count.  A dead predecessor's count
        against the global cap (``Pools.room``), whichever pool saw them."""
        return len(self.conns) + len(self.closing)

    @property
    def at_cap(self) -> bool:
        return self.held() >= self.settings.max_connections or self.group.room() <= 0

    @property
    def failing(self) -> bool:
        """The last attempt to connect failed (its database is down or missing)."""
        return self._connect_error is not None

    # Statement durations: what may be pipelined behind what

    def estimate(self, key: tuple) -> float | None:
        """The server seconds a statement took lately (smoothed), if known."""
        return self._durations.get(hash(key))

    def doubt(self, key: tuple) -> None:
        """A request was refused on the estimate: lower it a little, so that
        one that no longer holds (a slow spell, a cold first run) cannot keep
        refusing the statement; the next run sets it right."""
        key = hash(key)
        if key in self._durations:
            self._durations[key] *= ESTIMATE_DOUBT

    def ran(self, key: tuple, seconds: float) -> None:
        # By hash: the estimates must not keep statement texts alive, and a
        # collision only blurs an estimate.
        key = hash(key)
        durations = self._durations
        if len(durations) >= ESTIMATES_KEPT and key not in durations:
            durations.clear()
        previous = durations.get(key)
        durations[key] = seconds if previous is None else 0.8 * previous + 0.2 * seconds

    # Growth

    def grow(self, now: float, wanted: int) -> None:
        """Open up to ``wanted`` more connections, never beyond the cap."""
        if now < self._retry_at or self.at_cap:  # at cap: the common case under load
            return
        if not self.group.alone and self.group.starved(self, now):
            return  # the slot is for the pool below its share
        room = min(self.settings.max_connections - self.held(), self.group.room())
        opening = self.count(State.OPENING)
        if self._sweep_pending:
            # The first connection could not open: the next one sweeps, alone.
            # Until it has ended a predecessor's connections, they and it may
            # add up to one more than the cap (the database was unreachable
            # when the broker started, not when the predecessor died).
            wanted = 1
        for _ in range(min(room, wanted - opening)):
            threading.Thread(target=self._open,
                             args=(self._add_opening(), self._sweep_pending, self.foreign),
                             name="poolbroker-connect", daemon=True).start()

    def keep_warm(self, now: float) -> None:
        """Open connections up to ``min_connections``: at start, and again
        after losses and retirements (the backoff applies)."""
        opening = self.count(State.OPENING)
        wanted = self.settings.min_connections - (self.staying() - opening)
        if wanted > opening:
            self.grow(now, wanted)  # up to ``wanted`` opening at once

    def staying(self) -> int:
        """Connections open or opening, less those being retired."""
        return sum(1 for conn in self.conns.values() if not conn.retiring)

    def idled_out(self, now: float) -> list[PgConn]:
        """Idle connections unused for ``max_idle``, longest idle first, as
        many as stand above ``min_connections``.  Idle connections are
        handed out most recently used first, so under a steady load the
        ones it does not need are these."""
        max_idle = self.settings.max_idle
        idle = self._in[State.IDLE]
        if not max_idle or not idle:
            return []
        spare = self.staying() - self.count(State.OPENING) - self.settings.min_connections
        out: list[PgConn] = []
        for conn in idle.values():  # in the order they became idle
            if len(out) >= spare:
                break
            if now - conn.head_since >= max_idle:
                out.append(conn)
        return out

    def set_expiry(self, conn: PgConn) -> None:
        """When ``conn`` reaches its lifetime: at open, and again when a reload
        changes max_lifetime (the open connections follow the new value)."""
        lifetime = self.settings.max_lifetime
        conn.expires_at = conn.opened_at + lifetime * conn.lifetime_share if lifetime \
            else float("inf")

    def surplus(self) -> list[PgConn]:
        """Connections beyond max_connections (lowered by a reload) not yet
        being retired: idle ones first, then those whose clients' work ends
        soonest, transactions last.  One opening is not chosen: once open,
        it is idle, and the next tick takes it."""
        return self.least_needed(self.staying() - self.settings.max_connections)

    def least_needed(self, count: int) -> list[PgConn]:
        """Up to ``count`` connections not yet being retired, those whose
        loss costs least first: idle, then those whose clients' work ends
        soonest, transactions last."""
        out: list[PgConn] = []
        for state in (State.IDLE, State.SHARED, State.BUSY, State.RESETTING, State.PINNED):
            for conn in self._in[state].values():
                if len(out) >= count:
                    return out
                if not conn.retiring:
                    out.append(conn)
        return out

    def aged(self, now: float) -> list[PgConn]:
        """Connections past their lifetime, not yet being retired."""
        return [conn for conn in self.conns.values()
                if conn.expires_at <= now and not conn.retiring]

    def _add_opening(self) -> int:
        conn = PgConn(next(self.group.conn_ids), result_limit=self.settings.max_result_bytes,
                      chunked=bool(self.settings.max_result_bytes))
        conn.pool = self
        self.conns[conn.conn_id] = conn
        self._in[State.OPENING][conn.conn_id] = conn
        return conn.conn_id

    def _connect(self, connect_timeout: float) -> psycopg.Connection:
        s = self.settings
        backstop_ms = int(s.idle_transaction_timeout * 2000) if s.idle_transaction_timeout else 0
        options = f"-c idle_in_transaction_session_timeout={backstop_ms}"
        if s.connection_check_interval:
            # A backend whose broker died ends its statement instead of running it out.
            options += (" -c client_connection_check_interval="
                        f"{max(1, int(s.connection_check_interval * 1000))}")
        return psycopg.connect(
            s.dsn, autocommit=True, prepare_threshold=None, context=self._adapters,
            application_name=self.application_name, client_encoding="UTF8",
            connect_timeout=max(1, int(connect_timeout)), options=options)

    def _open(self, conn_id: int, sweep: bool, foreign: frozenset[Backend],
              connect_timeout: float | None = None,
              stopping: Callable[[], bool] | None = None) -> None:
        """Open a connection (on a thread of its own, but for the first);
        first end a dead predecessor's connections (``sweep``), or look
        which of those still counted (``foreign``) are left."""
        conn = None
        try:
            conn = self._connect(connect_timeout or self.settings.connect_timeout)
            before = time.time()
            server = conn.execute("SELECT extract(epoch FROM clock_timestamp())::float8") \
                .fetchone()[0]
            offset = server - (before + time.time()) / 2
            left: frozenset[Backend] | None = None
            if sweep:
                left = frozenset(predecessors.sweep(conn, self._marked))
                if stopping is not None:
                    left = self._wait_for_room(conn, left, stopping)
            elif foreign:
                left = foreign & predecessors.listed(conn, self._marked)
            self._opened.put((conn_id, conn, offset, left, sweep, None))
        except Exception as exc:
            if conn is not None:
                conn.close()
            error = connect_error(exc, self._redact(str(exc).strip()))
            self._opened.put((conn_id, None, 0.0, None, sweep, error))
        os.write(self._wakeup_write, b"x")

    def open_first(self, stopping: Callable[[], bool]) -> None:
        """Open the first connection before serving, and end a dead
        predecessor's connections on it: from the first request on, the
        application holds at most the cap.  A database that is down or
        unreachable does not hold the start: the next connection that
        opens sweeps instead, and none other opens meanwhile."""
        self._open(self._add_opening(), True, frozenset(),
                   min(self.settings.connect_timeout, SWEEP_CONNECT_TIMEOUT), stopping)

    def _wait_for_room(self, conn: psycopg.Connection, left: frozenset[Backend],
                       stopping: Callable[[], bool]) -> frozenset[Backend]:
        """Before serving: while connections that cannot be ended leave no
        room beside ``conn``, nothing could be served anyway."""
        cap = self.group.settings.max_connections  # they count against the global cap
        if len(left) >= cap:
            logger.warning("a dead broker's server connections fill max_connections: "
                           "waiting for them to end before serving")
        while len(left) >= cap and not stopping():
            time.sleep(FOREIGN_RECHECK_INTERVAL)
            left &= predecessors.listed(conn, self._marked)
        return left

    def _update_foreign(self, left: frozenset[Backend] | None, swept: bool) -> None:
        """What a connection that opened saw of a dead predecessor's."""
        if left is None:
            return
        before = len(self.foreign)
        if swept:
            self.foreign = left
            self._sweep_pending = False
        else:
            self.foreign &= left
        if before and not self.foreign:
            logger.info("a dead broker's server connections have ended: the whole cap is ours")

    def opened(self, now: float) -> tuple[list[PgConn], list[ConnectError]]:
        """Connections opened since the last call, and the attempts that failed."""
        try:
            os.read(self.wakeup_fd, 4096)
        except BlockingIOError:
            pass
        ready: list[PgConn] = []
        failed: list[ConnectError] = []
        while True:
            try:
                conn_id, conn, offset, left, swept, error = self._opened.get_nowait()
            except queue.Empty:
                return ready, failed
            pgconn = self.conns.get(conn_id)
            if conn is None or pgconn is None:
                if pgconn is not None:
                    self.move(pgconn, State.CLOSED)
                if conn is not None:
                    conn.close()
                if error is None:
                    continue
                failed.append(error)
                self._connect_error = error
                self._backoff = min(CONNECT_BACKOFF_MAX,
                                    max(CONNECT_BACKOFF_MIN, self._backoff * 2))
                self._retry_at = now + self._backoff
                logger.error("pool %r: cannot connect to the database (retry in %.1f s): %s",
                             self.name, self._backoff, error.message)
                continue
            self._backoff = 0.0
            self._connect_error = None
            self._update_foreign(left, swept)
            pgconn.attach(conn, offset, now)
            pgconn.opened_at = now
            pgconn.lifetime_share = 1 - LIFETIME_JITTER * random.random()
            self.set_expiry(pgconn)
            ready.append(pgconn)

    def unreachable(self, now: float) -> ConnectError | None:
        """The last connect error while it is every request's fate: no
        connection is open, none is opening that might succeed, and the
        backoff holds the next attempt, or no attempt may be made (other
        pools hold the global cap, and a failing pool takes nothing from
        them).  Requests are told at once; waiting would only delay the same
        error by up to CONNECT_BACKOFF_MAX, or to their deadline."""
        if self.conns or self._connect_error is None:
            return None
        if now >= self._retry_at and not self.at_cap:
            return None
        return self._connect_error

    def close_all(self) -> None:
        """At exit: close everything, waiting for no backend."""
        for conn in list(self.conns.values()):
            if conn.state != State.OPENING:
                self.close(conn)
        for held, _ in self.closing.values():
            held.close()
        self.closing.clear()
