"""Who may talk to the broker: how many client sockets, and which local users.

Descriptors are the broker's scarcest resource: every client socket holds
one, and a process out of them cannot open a server connection (libzmq
aborts on some paths).  So the open-files limit is raised to its hard
limit at start, and beyond ``max_clients`` connected sockets each newly
accepted one is shut down at once: its client sees the connection drop,
retries, and gets in once others leave.

Over ipc, the kernel tells the peer's credentials.  A socket accepted
from a uid other than the broker's own or ``allowed_uids`` is shut down at
once, uncounted, before a byte of it is read: by the loop's own listener
(``zmtp.Listener``, ipc without CURVE) as it accepts; with libzmq's ROUTER
(tcp, or CURVE), by the gate as the context's ZAP handler, on a thread of
its own so that handshakes complete while the loop is busy or not serving
yet (libzmq asks it about every new connection before it reads a frame,
and such a uid, or with CURVE a key not on the allow-list, is refused
there, so it cannot make the broker hold an endless multipart message).
A message from a uid or key no longer allowed (after a reload) is dropped
unread.  This holds for abstract endpoints (``ipc://@name``), which have
no directory whose mode could protect them.
"""

from __future__ import annotations

import logging
import os
import resource
import socket
import struct
import threading
import time

import zmq
from zmq.utils import z85
from zmq.utils.monitor import recv_monitor_message

logger = logging.getLogger("poolbroker")

DESCRIPTORS_RESERVED = 64
"""Descriptors kept for the broker's own use (libzmq, pipes, logs) besides
three per server connection (its socket, a cancel, a reconnect)."""
REFUSED_LOG_INTERVAL = 10.0

ZAP_ENDPOINT = "inproc://zeromq.zap.01"  # fixed by ZMTP's ZAP (RFC 27)
ZAP_DOMAIN = b"poolbroker"  # libzmq consults ZAP for NULL-mechanism peers only with a domain
_ZAP_VERSION = b"1.0"
_ZAP_OK = b"200"
_ZAP_DENIED = b"400"
ZAP_POLL_MS = 100
"""How often the handshake thread looks whether the gate is closing."""
_UCRED = struct.Struct("3i")  # SO_PEERCRED: pid, uid, gid


def raise_open_files_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            logger.warning("cannot raise the open-files limit from %d to %d: %s",
                           soft, hard, exc)
    return soft


def default_max_clients(open_files: int, max_connections: int) -> int:
    # A quarter kept free: sockets are counted once accepted, and libzmq
    # aborts when an accept finds no descriptor, so a burst needs headroom.
    return max(16, (open_files - DESCRIPTORS_RESERVED - 3 * max_connections) * 3 // 4)


ADDRESSES_KEPT = 4096
"""Peer-Address strings kept parsed: one per client process, so a
broker's usual clients are parsed once, and the dict stays bounded."""


def peer_address(frame: zmq.Frame) -> str | None:
    """libzmq's Peer-Address of a message: "localhost:UID:GID:PID" over
    ipc, from the kernel's credentials of the connection."""
    try:
        return frame.get("Peer-Address")
    except zmq.ZMQError:
        return None


def parse_peer_address(address: str | None) -> tuple[int, int] | None:
    """(uid, pid) of an ipc sender; None over tcp."""
    parts = address.split(":") if address else ()
    if len(parts) < 4 or not (parts[-3].isdigit() and parts[-1].isdigit()):
        return None
    return int(parts[-3]), int(parts[-1])


class ClientGate:
    """Counts the client connections and admits them, and their users: the
    policy, whichever transport accepts them.  libzmq's ROUTER reports its
    connections through ``serve_router``; the loop's own ipc listener
    (``zmtp.Listener``) asks ``admit_peer`` at each accept."""

    def __init__(self, *, max_clients: int, ipc: bool, allowed_uids: tuple[int, ...]) -> None:
        self.max_clients = max_clients
        self.connected = 0
        self.refused = 0  # sockets shut down beyond max_clients
        self.rejected = 0  # messages dropped from a uid not allowed
        self.denied = 0  # connections refused at the handshake
        self.peak = 0  # most sockets admitted at once since start
        self.monitor: zmq.Socket | None = None  # libzmq's accepts and disconnects
        self._curve_keys: frozenset[bytes] | None = None  # z85 keys, with CURVE on
        self._curve_text: frozenset[str] = frozenset()  # the same, as User-Id reads them
        self._check_uids = ipc
        self.uids = frozenset((os.getuid(), *allowed_uids))
        self._warned: set[tuple[str, int | None]] = set()  # (what, uid) already logged
        self._peer_of: dict[str | None, tuple] = {}  # Peer-Address -> (uid, pid)
        # Pids of clients whose monotonic clock is the broker's (same time
        # namespace, told by the kernel): their requests' sent_at counts.
        self.same_clock: set[int] = set()
        self._time_namespace = _time_namespace("self")
        self._shut: set[int] = set()  # descriptors refused, until libzmq closes them
        self._refused_log_at = 0.0
        self._keys_refused = 0  # CURVE keys refused since the last line about them
        self._keys_log_at = 0.0
        self._closing = threading.Event()
        self._handshakes: threading.Thread | None = None

    def serve_router(self, context: zmq.Context, router: zmq.Socket) -> None:
        """Vet ``router``'s connections: call before it binds, so that its
        handshakes go through the gate."""
        self.monitor = router.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        # Bound here, used only by the thread from its start: a connection
        # that arrives before a handler exists must not get in unasked.
        zap = context.socket(zmq.REP)
        zap.setsockopt(zmq.LINGER, 0)
        zap.bind(ZAP_ENDPOINT)
        router.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN)
        router.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)  # no handler: refused, not let in
        self._handshakes = threading.Thread(target=self._serve_handshakes, args=(zap,),
                                            name="poolbroker-zap", daemon=True)
        self._handshakes.start()

    @property
    def admitted(self) -> int:
        """Client sockets connected, less those being turned away."""
        return self.connected - len(self._shut)

    def close(self) -> None:
        """After the router is closed: until then, its handshakes need the thread."""
        self._closing.set()
        if self._handshakes is not None:
            self._handshakes.join()
        if self.monitor is not None:
            self.monitor.close(linger=0)

    def admit_peer(self, uid: int) -> bool:
        """Whether a connection just accepted from ``uid`` may stay (counted
        if so): the loop's own listener asks, before the handshake."""
        if uid not in self.uids:
            self.denied += 1
            self._warn(uid, "refusing connections")
            return False
        if self.connected >= self.max_clients:
            self._refused()
            return False
        self.connected += 1
        self.peak = max(self.peak, self.connected)
        return True

    def peer_left(self) -> None:
        self.connected -= 1

    def allows(self, uid: int) -> bool:
        """Whether a message from ``uid``, admitted before, is still taken
        (``allowed_uids`` may have changed since)."""
        if uid in self.uids:
            return True
        self.rejected += 1
        self._warn(uid, "dropping requests")
        return False

    def reads_our_clock(self, pid: int) -> bool:
        """Whether process ``pid`` reads the broker's monotonic clock."""
        return _time_namespace(str(pid)) == self._time_namespace

    def allow_keys(self, keys: frozenset[bytes]) -> None:
        """CURVE's allow-list (z85 public keys): checked at each new connection
        and on every message (a key removed by a reload is cut off)."""
        self._curve_keys = keys
        self._curve_text = frozenset(key.decode("ascii") for key in keys)

    def _serve_handshakes(self, zap: zmq.Socket) -> None:
        """Answer libzmq's ZAP requests (one per connection being set up) until
        the gate closes.  The allow-lists it reads are replaced whole, never
        changed in place, so the loop's thread may swap them meanwhile."""
        try:
            while not self._closing.is_set():
                if not zap.poll(ZAP_POLL_MS):
                    continue
                request = zap.recv_multipart()
                # version, request id, domain, address, routing id, mechanism, credentials...
                request_id, address, mechanism = request[1], request[3], request[5]
                user_id = self._admit(address.decode("utf-8", "replace"), mechanism,
                                      request[6:])
                if user_id is None:
                    self.denied += 1
                    zap.send_multipart([_ZAP_VERSION, request_id, _ZAP_DENIED, b"not allowed",
                                        b"", b""])
                else:
                    zap.send_multipart([_ZAP_VERSION, request_id, _ZAP_OK, b"OK", user_id, b""])
        except zmq.ZMQError as exc:  # the context terminated under it: nothing left to vet
            logger.debug("handshake thread stopped: %s", exc)
        finally:
            zap.close(linger=0)

    def _admit(self, address: str, mechanism: bytes, credentials: list[bytes]) -> bytes | None:
        """The User-Id a new connection's messages will carry, or None to refuse it."""
        if self._check_uids:
            peer = parse_peer_address(address)
            uid = peer[0] if peer else None
            if uid not in self.uids:
                self._warn(uid, "refusing connections")
                return None
        if self._curve_keys is None:
            return b"" if mechanism == b"NULL" else None
        if mechanism != b"CURVE" or not credentials or len(credentials[0]) != 32:
            return None
        key = z85.encode(credentials[0])
        if key not in self._curve_keys:
            self._keys_refused += 1
            now = time.monotonic()
            if now >= self._keys_log_at:  # any network peer can try keys: one line a while
                self._keys_log_at = now + REFUSED_LOG_INTERVAL
                logger.info("refusing connections: %d CURVE keys not in the allow-list "
                            "(the last %s)", self._keys_refused, key.decode("ascii"))
                self._keys_refused = 0
            return None
        return key  # libzmq gives each of its messages this User-Id

    def on_events(self) -> None:
        """Count what connected and left; refuse what came beyond the limit."""
        while True:
            try:
                event = recv_monitor_message(self.monitor, zmq.NOBLOCK)
            except zmq.Again:
                # Here, not per event: a burst of accepts and refusals is
                # counted once it is settled, never a refused socket with it.
                self.peak = max(self.peak, self.admitted)
                return
            if event["event"] == zmq.EVENT_DISCONNECTED:
                self.connected -= 1
                self._shut.discard(int(event["value"]))
                continue
            self.connected += 1
            fd, endpoint = int(event["value"]), event["endpoint"].decode()
            if self._check_uids and (uid := _peer_uid(fd, endpoint)) not in self.uids:
                # Another user's: shut before it holds a place under max_clients.
                if self._shut_down(fd, endpoint):
                    self.denied += 1
                    self._warn(uid, "refusing connections")
            elif self.admitted > self.max_clients and self._shut_down(fd, endpoint):
                self._refused()

    def _shut_down(self, fd: int, endpoint: str) -> bool:
        """Shut an accepted socket down; False if it is gone already."""
        # shutdown(), never close(): the descriptor stays libzmq's, which
        # sees the end of the stream and closes it itself.  A duplicate is
        # used so that the check and the shutdown cannot hit another socket
        # that reused the number: only one accepted on this endpoint matches.
        try:
            duplicate = socket.socket(fileno=os.dup(fd))
        except OSError:
            return False
        with duplicate:
            try:
                if not _accepted_on(duplicate, endpoint):
                    return False
                duplicate.shutdown(socket.SHUT_RDWR)
            except OSError:
                return False
        self._shut.add(fd)
        return True

    def _refused(self) -> None:
        self.refused += 1
        now = time.monotonic()
        if now >= self._refused_log_at:
            self._refused_log_at = now + REFUSED_LOG_INTERVAL
            logger.warning(
                "refusing new client sockets: %d are connected (max_clients=%d); "
                "they retry, and get in as others leave (%d refused so far)",
                self.admitted, self.max_clients, self.refused)

    def allow_uids(self, allowed_uids: tuple[int, ...]) -> None:
        """A reload's ``allowed_uids``: checked from the next message on."""
        self.uids = frozenset((os.getuid(), *allowed_uids))
        self._warned.clear()  # a uid dropped again is worth a line again

    def may_control(self, frame: zmq.Frame, admin_keys: frozenset[str]) -> bool:
        """Whether ``poolbroker ctl`` commands are taken from the sender: over
        ipc, a process of the broker's own uid (an ``allowed_uids`` user may
        run statements only); over tcp, a client whose CURVE key is in
        ``admin_keys`` (libzmq gives each message the User-Id the
        authenticator chose: the key, z85-encoded; none without CURVE)."""
        if not self._check_uids:
            return bool(admin_keys) and frame.get("User-Id") in admin_keys
        credentials = parse_peer_address(peer_address(frame))
        return credentials is not None and credentials[0] == os.getuid()

    def sender(self, frame: zmq.Frame) -> int | None:
        """The pid of the process that sent ``frame`` (0 when unknown: over
        tcp), or None when it may not use the broker: on a socket refused (a
        request can arrive between its accept and its shutdown), with a CURVE
        key no longer allowed, or over ipc from a uid not allowed."""
        if self._shut and frame.get(zmq.SRCFD) in self._shut:
            return None
        if self._curve_keys is not None and frame.get("User-Id") not in self._curve_text:
            return None  # a key removed by a reload, on a connection still open
        if not self._check_uids:
            return 0
        # Checked on every message, never cached by routing id: a client may
        # choose its own, and reuse one another process used before.  The
        # address itself comes from the kernel each time; only its parse is kept.
        address = peer_address(frame)
        peer = self._peer_of.get(address)
        if peer is None:
            peer = parse_peer_address(address) or (None, 0)
            if len(self._peer_of) >= ADDRESSES_KEPT:
                self._peer_of.clear()
                self.same_clock.clear()
            self._peer_of[address] = peer
            if peer[1] and self.reads_our_clock(peer[1]):
                self.same_clock.add(peer[1])
        uid, pid = peer
        return pid if self.allows(uid) else None

    def _warn(self, uid: int | None, what: str) -> None:
        if (what, uid) not in self._warned:
            self._warned.add((what, uid))
            logger.warning("%s from uid %s: not the broker's own uid nor in allowed_uids",
                           what, uid)


def _time_namespace(pid: str) -> str | None:
    """The time namespace of a process ("self": this one); None when the
    kernel has none or does not say (another user's process)."""
    try:
        return os.readlink(f"/proc/{pid}/ns/time")
    except OSError:
        return None


def _peer_uid(fd: int, endpoint: str) -> int | None:
    """The uid of the process at the other end of an accepted ipc socket."""
    try:
        with socket.socket(fileno=os.dup(fd)) as duplicate:
            if not _accepted_on(duplicate, endpoint):
                return None
            credentials = duplicate.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                               _UCRED.size)
    except OSError:
        return None
    return _UCRED.unpack(credentials)[1]


def _accepted_on(sock: socket.socket, endpoint: str) -> bool:
    local = sock.getsockname()
    if endpoint.startswith("ipc://"):
        path = endpoint[len("ipc://"):]
        if path.startswith("@"):  # abstract: the kernel names it with a leading NUL
            return local in (b"\0" + path[1:].encode(), "\0" + path[1:])
        return local == path
    port = endpoint.rpartition(":")[2]
    return isinstance(local, tuple) and str(local[1]) == port
