"""The prepared statements of one server connection: the broker is their only owner.

psycopg's own automatic preparing is off on server connections (see
``pool.open_connection``): a reset (``DISCARD ALL``) would drop statements
psycopg still believes exist.  Here a query is prepared on its
``threshold``-th run on a connection, in the same round trip as that run.
Names are never reused, so a stale name can never run the wrong query;
whatever the cache forgets is dropped on the server too (the connection
sends ``DEALLOCATE ALL`` or is reset), so the server's count stays bounded
by ``limit``.
"""

from __future__ import annotations

PREPARE_THRESHOLD = 2
"""Runs of the same query on a connection before it is prepared there:
parse and plan once (measured: a primary-key lookup 137 -> 110 us)."""

MAX_PREPARED = 500
"""Statements prepared per connection at most; beyond it queries run unprepared."""
MAX_PREPARED_TEXT = 16 * 1024
"""Longer statements are never prepared: the cache keeps the texts it names."""

Key = tuple  # (query bytes, parameter type oids)


class PreparedCache:
    """Which queries are prepared on one connection, under which names."""

    __slots__ = ("_executions", "_names", "_next", "_preparing", "generation", "limit",
                 "schema_version", "threshold")

    def __init__(self, *, limit: int = MAX_PREPARED, threshold: int = PREPARE_THRESHOLD) -> None:
        self.limit = limit
        self.threshold = threshold
        self._names: dict[Key, bytes] = {}
        self._preparing: set[Key] = set()
        self._executions: dict[int, int] = {}  # by hash: a tally keeps no text alive
        self._next = 1
        self.generation = 0
        """Bumped whenever the server's statements are dropped: a PREPARE sent
        before that must not be recorded when its result arrives after."""
        self.schema_version = 0
        """The broker's count of DDL it saw commit, when these plans were checked
        against it: owned by the loop."""

    def __len__(self) -> int:
        return len(self._names)

    @property
    def empty(self) -> bool:
        """Nothing prepared on the server, nor being prepared."""
        return not self._names and not self._preparing

    def name(self, key: Key) -> bytes | None:
        """The name ``key`` is prepared under, if it is."""
        return self._names.get(key)

    def name_to_prepare(self, key: Key) -> bytes | None:
        """A fresh name if ``key`` should be prepared now (on its threshold-th run)."""
        if key in self._preparing or len(self._names) + len(self._preparing) >= self.limit \
                or len(key[0]) > MAX_PREPARED_TEXT:
            return None
        tally = hash(key)
        seen = self._executions.get(tally, 0) + 1
        if seen < self.threshold:
            if len(self._executions) >= self.limit * 4:
                self._executions.clear()  # one-off queries: keep the tally bounded
            self._executions[tally] = seen
            return None
        self._executions.pop(tally, None)
        self._preparing.add(key)
        name = b"_pb_%d" % self._next
        self._next += 1
        return name

    def settled(self, key: Key, name: bytes, generation: int, ok: bool) -> None:
        """The PREPARE of ``key`` as ``name`` has answered."""
        self._preparing.discard(key)
        if ok and generation == self.generation:
            self._names[key] = name

    def forget(self) -> None:
        """The server's prepared statements are gone (or about to be)."""
        self._names.clear()
        self._executions.clear()
        self.generation += 1
