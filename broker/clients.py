"""Who may talk to the broker: how many client sockets, and which local users.

Descriptors are the broker's scarcest resource: every client socket holds
one, and a process out of them cannot open a server connection (libzmq
aborts on some paths).  So the open-files limit is raised to its hard
limit at start, and beyond ``max_clients`` connected sockets each newly
accepted one is shut down at once: its client sees the connection drop,
retries with libzmq's reconnect backoff, and gets in once others leave.

Over ipc, the kernel tells libzmq the peer's credentials.  The gate is the
context's ZAP handler: libzmq asks it about every new connection before it
reads a frame, and a uid other than the broker's own or ``allowed_uids``
(or, with CURVE, a key not on the allow-list) is refused at the handshake,
so it cannot even make the broker hold an endless multipart message.  A
message from a uid no longer allowed (after a reload) is dropped unread.
This holds for abstract endpoints (``ipc://@name``), which have no
directory whose mode could protect them.
"""

from __future__ import annotations

import logging
import os
import resource
import socket
import time

import zmq
from zmq.utils import z85
from zmq.utils.monitor import recv_monitor_message

logger = logging.getLogger("poolbroker")

DESCRIPTORS_RESERVED = 64
"""Descriptors kept for the broker's own use (libzmq, pipes, logs) besides
three per server connection (its socket, a cancel, a reconnect)."""
REFUSED_LOG_INTERVAL = 10.0
_UNPARSED = object()

ZAP_ENDPOINT = "inproc://zeromq.zap.01"  # fixed by ZMTP's ZAP (RFC 27)
ZAP_DOMAIN = b"poolbroker"  # libzmq consults ZAP for NULL-mechanism peers only with a domain
_ZAP_VERSION = b"1.0"
_ZAP_OK = b"200"
_ZAP_DENIED = b"400"


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


def peer_credentials(frame: zmq.Frame) -> tuple[int, int] | None:
    """(uid, pid) of an ipc sender; None over tcp."""
    return parse_peer_address(peer_address(frame))


class ClientGate:
    """Counts the client sockets of one ROUTER and admits them, and their users."""

    def __init__(self, context: zmq.Context, router: zmq.Socket, *, max_clients: int,
                 ipc: bool, allowed_uids: tuple[int, ...]) -> None:
        """Made before ``router`` binds: its handshakes go through the gate."""
        self.max_clients = max_clients
        self.connected = 0
        self.refused = 0  # sockets shut down beyond max_clients
        self.rejected = 0  # messages dropped from a uid not allowed
        self.denied = 0  # connections refused at the handshake
        self.peak = 0  # most sockets admitted at once since start
        self.monitor = router.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        self.zap = context.socket(zmq.REP)
        self.zap.setsockopt(zmq.LINGER, 0)
        self.zap.bind(ZAP_ENDPOINT)
        router.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN)
        self._curve_keys: frozenset[bytes] | None = None  # z85 keys, with CURVE on
        self._check_uids = ipc
        self._uids = frozenset((os.getuid(), *allowed_uids))
        self._warned: set[tuple[str, int | None]] = set()  # (what, uid) already logged
        self._uid_of: dict[str | None, int | None] = {}  # Peer-Address -> uid
        self._shut: set[int] = set()  # descriptors refused, until libzmq closes them
        self._refused_log_at = 0.0

    @property
    def admitted(self) -> int:
        """Client sockets connected, less those being turned away."""
        return self.connected - len(self._shut)

    def close(self) -> None:
        self.monitor.close(linger=0)
        self.zap.close(linger=0)

    def allow_keys(self, keys: frozenset[bytes]) -> None:
        """CURVE's allow-list (z85 public keys): checked at each new connection."""
        self._curve_keys = keys

    def on_handshakes(self) -> None:
        """Answer libzmq's ZAP requests: one per connection being set up."""
        zap = self.zap
        while zap.get(zmq.EVENTS) & zmq.POLLIN:
            request = zap.recv_multipart()
            # version, request id, domain, address, routing id, mechanism, credentials...
            request_id, address, mechanism = request[1], request[3], request[5]
            user_id = self._admit(address.decode("utf-8", "replace"), mechanism, request[6:])
            if user_id is None:
                self.denied += 1
                zap.send_multipart([_ZAP_VERSION, request_id, _ZAP_DENIED, b"not allowed",
                                    b"", b""])
            else:
                zap.send_multipart([_ZAP_VERSION, request_id, _ZAP_OK, b"OK", user_id, b""])

    def _admit(self, address: str, mechanism: bytes, credentials: list[bytes]) -> bytes | None:
        """The User-Id a new connection's messages will carry, or None to refuse it."""
        if self._check_uids:
            peer = parse_peer_address(address)
            uid = peer[0] if peer else None
            if uid not in self._uids:
                self._warn(uid, "refusing connections")
                return None
        if self._curve_keys is None:
            return b"" if mechanism == b"NULL" else None
        if mechanism != b"CURVE" or not credentials or len(credentials[0]) != 32:
            return None
        key = z85.encode(credentials[0])
        if key not in self._curve_keys:
            logger.info("refusing a connection: CURVE key %s is not in the allow-list",
                        key.decode("ascii"))
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
            if self.connected > self.max_clients:
                self._refuse(int(event["value"]), event["endpoint"])

    def _refuse(self, fd: int, endpoint: bytes) -> None:
        # shutdown(), never close(): the descriptor stays libzmq's, which
        # sees the end of the stream and closes it itself.  A duplicate is
        # used so that the check and the shutdown cannot hit another socket
        # that reused the number: only one accepted on this endpoint matches.
        try:
            duplicate = socket.socket(fileno=os.dup(fd))
        except OSError:
            return  # already gone
        with duplicate:
            try:
                if not _accepted_on(duplicate, endpoint.decode()):
                    return
                duplicate.shutdown(socket.SHUT_RDWR)
            except OSError:
                return
        self._shut.add(fd)
        self.refused += 1
        now = time.monotonic()
        if now >= self._refused_log_at:
            self._refused_log_at = now + REFUSED_LOG_INTERVAL
            logger.warning(
                "refusing new client sockets: %d are connected (max_clients=%d); "
                "they retry, and get in as others leave (%d refused so far)",
                self.connected - 1, self.max_clients, self.refused)

    def allow_uids(self, allowed_uids: tuple[int, ...]) -> None:
        """A reload's ``allowed_uids``: checked from the next message on."""
        self._uids = frozenset((os.getuid(), *allowed_uids))
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

    def allowed(self, frame: zmq.Frame) -> bool:
        """Whether the sender may use the broker: not on a socket refused
        (a request can arrive between its accept and its shutdown) and, over
        ipc, of an allowed uid."""
        if self._shut and frame.get(zmq.SRCFD) in self._shut:
            return False
        if not self._check_uids:
            return True
        # Checked on every message, never cached by routing id: a client may
        # choose its own, and reuse one another process used before.  The
        # address itself comes from the kernel each time; only its parse is kept.
        address = peer_address(frame)
        uid = self._uid_of.get(address, _UNPARSED)
        if uid is _UNPARSED:
            credentials = parse_peer_address(address)
            uid = credentials[0] if credentials else None
            if len(self._uid_of) >= ADDRESSES_KEPT:
                self._uid_of.clear()
            self._uid_of[address] = uid
        if uid in self._uids:
            return True
        self.rejected += 1
        self._warn(uid, "dropping requests")
        return False

    def _warn(self, uid: int | None, what: str) -> None:
        if (what, uid) not in self._warned:
            self._warned.add((what, uid))
            logger.warning("%s from uid %s: not the broker's own uid nor in allowed_uids",
                           what, uid)


def _accepted_on(sock: socket.socket, endpoint: str) -> bool:
    local = sock.getsockname()
    if endpoint.startswith("ipc://"):
        path = endpoint[len("ipc://"):]
        if path.startswith("@"):  # abstract: the kernel names it with a leading NUL
            return local in (b"\0" + path[1:].encode(), "\0" + path[1:])
        return local == path
    port = endpoint.rpartition(":")[2]
    return isinstance(local, tuple) and str(local[1]) == port
