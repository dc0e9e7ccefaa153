"""The clients' transport over ipc without CURVE: ZeroMQ's wire protocol
(ZMTP 3.1, NULL security) spoken by the loop itself on a unix socket.

With libzmq's ROUTER, each request and each reply crossed the broker's
I/O thread: two thread wake-ups, and the loop's zmq_poll asking each zmq
socket for its events, per round trip.  A transaction's statements go one
round trip at a time, so nothing amortized that (README, Performance).
Here the loop reads a client's socket and writes its reply itself.

What it keeps of the ROUTER it replaces, for either kind of client (the
client's own ZMTP over ipc, or a libzmq DEALER):

- the handshake: greeting, READY with Socket-Type ROUTER; PING answered;
- one routing id per connection, never reused;
- heartbeats: a PING to a client silent for HEARTBEAT_INTERVAL, and the
  connection dropped once it has been silent HEARTBEAT_TIMEOUT;
- a frame over ``max_message_bytes`` drops the connection (MAXMSGSIZE);
- at most ``queue_limit`` replies queued for a client that does not read:
  past it a reply is undeliverable (SNDHWM with ROUTER_MANDATORY);
- the gate's ``max_clients`` and uid checks at accept, from the kernel's
  credentials (which also name the client's pid); a reload that drops a
  uid from ``allowed_uids`` closes its connections (``allow_uids``), so a
  message needs no check of its own.

A transport gives the loop what ``router.RouterTransport`` gives.
"""

from __future__ import annotations

import collections
import errno
import contextlib
import itertools
import logging
import mmap
import os
import select
import socket
import struct
import threading
import time
from typing import Any, Iterator

from client._zmtp import (
    COMMAND, GREETING, GREETING_BYTES, LONG, MORE, command, null_greeting, socket_type,
)

from .clients import ClientGate
from .logs import LogBudget
from .router import HEARTBEAT_IVL_MS, HEARTBEAT_TIMEOUT_MS, Handler

logger = logging.getLogger("poolbroker")

HEARTBEAT_INTERVAL = HEARTBEAT_IVL_MS / 1000
HEARTBEAT_TIMEOUT = HEARTBEAT_TIMEOUT_MS / 1000
ACCEPT_BATCH = 64
"""Connections accepted per turn before requests get theirs."""
READ_BYTES = 64 * 1024  # below malloc's mmap threshold
READS_PER_TURN = 16
"""Reads of one connection per turn: a large request does not hold the others."""
FRAMES_PER_TURN = 64
"""Frames of one connection handled per turn (libzmq's ROUTER gave the loop
256 messages a turn, fair-queued): a client that pipelines thousands of
requests, or floods frames, holds the loop no longer than that; the rest
waits in its buffer for the next turn, which comes at once."""
FRAME_COST = 1024
"""Bytes each frame of a message counts at least against max_message_bytes."""
HANDSHAKE_TIMEOUT = 30.0
"""Seconds a connection has to complete its handshake (libzmq's default)."""
_OUT_OF_DESCRIPTORS = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))
LARGE_READ_BYTES = 16 * 1024 * 1024
"""One read of a large frame's rest at most (a frame over READ_BYTES is
read into a buffer of its own)."""
COMMAND_BYTES = 8 * 1024
"""A command frame (READY's metadata, a PING's context) longer than this
drops the connection: ZMTP's are tens of bytes."""
FRAMES_KEPT = 3
"""Frames of one message kept: a request has one or two, and decode_request
refuses more (the rest of such a message is read and dropped)."""
COPY_BYTES = 64 * 1024
"""Replies below this size go with their frame header in one buffer."""
ACCEPT_ERRORS_PER_SECOND = 1.0
ACCEPT_WAIT_MS = 50
_EPOLLRDHUP = select.EPOLLRDHUP
"""Before the loop serves: how often the accepting thread looks whether it may stop."""

_UCRED = struct.Struct("3i")  # SO_PEERCRED: pid, uid, gid
_HELLO = GREETING + command(b"\x05READY" + socket_type(b"ROUTER"))
_PING = command(b"\x04PING\x00\x00")  # TTL 0: the client sets no timeout of its own
_CLIENT_TYPES = frozenset((b"DEALER", b"REQ", b"ROUTER"))  # what libzmq's ROUTER accepts
_NOSIGNAL = socket.MSG_NOSIGNAL
_EPOLLIN, _EPOLLOUT = select.EPOLLIN, select.EPOLLOUT
_FLAGS = MORE | LONG | COMMAND


class _Peer:
    __slots__ = ("sock", "fd", "routing_id", "pid", "uid", "same_clock", "inbox", "large",
                 "large_filled", "large_flags", "frames", "message_bytes", "budget",
                 "backlogged", "closing", "mask", "accepted_at", "outbox", "replies_queued",
                 "alive_at", "pinged_at", "greeted", "ready")

    def __init__(self, sock: socket.socket, routing_id: bytes, pid: int, uid: int,
                 same_clock: bool, now: float) -> None:
        self.sock: socket.socket | None = sock
        self.fd = sock.fileno()
        self.routing_id = routing_id
        self.pid = pid
        self.uid = uid
        self.same_clock = same_clock
        self.inbox = bytearray()  # bytes read and not yet parsed: a frame's start
        self.large: mmap.mmap | None = None  # a large frame being read, in its own buffer
        self.large_filled = 0
        self.large_flags = 0
        self.frames: list[bytes] = []  # the message being read, frame by frame
        self.message_bytes = 0  # of the message being read, its frames not kept included
        self.budget = 0  # frames it may still have handled this turn
        self.backlogged = False  # in Listener._backlog: bytes read and not yet handled
        self.closing = False  # nothing more is read from it: the broker is closing
        self.mask = 0  # what epoll watches it for
        self.accepted_at = now
        # What the socket did not take: (bytes, whether they end a reply).
        self.outbox: collections.deque[tuple[Any, bool]] = collections.deque()
        self.replies_queued = 0  # replies in the outbox, whole or in part
        self.alive_at = now  # when it last sent something, or took some of its output
        self.pinged_at = 0.0  # when a PING left for it whole, since alive_at
        self.greeted = False
        self.ready = False


class Listener:
    def __init__(self, listener: socket.socket, gate: ClientGate, *, max_message_bytes: int,
                 queue_limit: int) -> None:
        """Serve clients accepted on ``listener`` (see endpoint.listen)."""
        self._listener = listener
        self._listen_fd = listener.fileno()
        self._gate = gate
        self._max_bytes = max_message_bytes
        self._queue_limit = queue_limit
        self._epoll = select.epoll()
        self._epoll.register(self._listen_fd, _EPOLLIN)
        self._accepting = True
        self._watch = _EPOLLIN  # what a new connection is polled for: see accepting()
        self._peers: dict[bytes, _Peer] = {}  # by routing id
        self._by_fd: dict[int, _Peer] = {}
        self._backlog: list[_Peer] = []  # peers whose budget ran out, in their order
        self._ids = itertools.count(1)
        self._scratch = bytearray(READ_BYTES)
        self._next_beat = 0.0
        self._accept_log = LogBudget(ACCEPT_ERRORS_PER_SECOND)
        # One descriptor for the loop to poll however many clients there
        # are: zmq_poll walks its whole list at every turn.
        self.requests: Any = self._epoll.fileno()
        self.events: Any = None

    def set_queue_limit(self, limit: int) -> None:
        self._queue_limit = limit

    @contextlib.contextmanager
    def accepting(self) -> Iterator[None]:
        """Accept (and greet) connections on a thread of their own while the
        loop cannot: before it serves, it may wait seconds for room (a dead
        predecessor's connections) or for the database, and clients must not
        take the broker for absent meanwhile.  Their requests wait unread;
        a connection closed meanwhile is closed here too (its client may be
        one that reconnects each time its heartbeat goes unanswered)."""
        done = threading.Event()

        def accept() -> None:
            while not done.is_set():
                try:
                    for fd, mask in self._epoll.poll(ACCEPT_WAIT_MS / 1000):
                        if fd == self._listen_fd:
                            self._accept(time.monotonic())
                        elif (peer := self._by_fd.get(fd)) is not None:
                            self._drop(peer, "closed before the broker served")
                except Exception:  # the loop takes over at the end of the wait anyway
                    logger.exception("accepting client connections failed")
                    done.wait(HEARTBEAT_INTERVAL)
                if not self._accepting:  # out of descriptors: a pause, as at a tick
                    done.wait(HEARTBEAT_INTERVAL)
                    self._resume_accepting()

        # Hang-ups only: what the clients send is the loop's to read.
        self._watch = _EPOLLRDHUP
        thread = threading.Thread(target=accept, name="poolbroker-accept", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()
            self._watch = _EPOLLIN
            now = time.monotonic()
            for peer in self._peers.values():
                self._rewatch(peer)
                peer.alive_at = now  # unread, not silent: the loop reads it next

    @property
    def backlogged(self) -> bool:
        """Requests are read and wait for the next turn: it must not wait."""
        return bool(self._backlog)

    def receive(self, handler: Handler, now: float) -> None:
        """Accept, read and write what is ready; hand each request to ``handler``."""
        served = ()
        if self._backlog:
            served, self._backlog = self._backlog, []
            for peer in served:
                peer.backlogged = False
                if peer.sock is not None:
                    peer.budget = FRAMES_PER_TURN
                    self._handle_inbox(peer, handler, now)
        by_fd = self._by_fd
        for fd, mask in self._epoll.poll(0):
            if fd == self._listen_fd:
                self._accept(now)
                continue
            peer = by_fd.get(fd)
            if peer is None:
                continue
            if mask & _EPOLLOUT:
                self._flush(peer)
            if mask & ~_EPOLLOUT and peer.sock is not None and not peer.backlogged \
                    and peer not in served:
                peer.budget = FRAMES_PER_TURN
                self._read(peer, handler, now)

    def _handle_inbox(self, peer: _Peer, handler: Handler, now: float) -> None:
        """Go on with the frames a budget left read and unhandled."""
        inbox = peer.inbox
        with memoryview(inbox) as data:
            used = self._parse(peer, data, handler, now)
        if used > 0:
            del inbox[:used]

    # Connections

    def _accept(self, now: float) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                sock, _ = self._listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno not in _OUT_OF_DESCRIPTORS:
                    continue  # that one connection (ECONNABORTED, EPERM)
                if (more := self._accept_log.allow()) is not None:
                    logger.warning("cannot accept client connections: %s%s", exc, more)
                self._epoll.unregister(self._listen_fd)  # retried on the next tick
                self._accepting = False
                return
            try:
                pid, uid, _ = _UCRED.unpack(
                    sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
            except OSError:
                sock.close()
                continue
            if not self._gate.admit_peer(uid):
                sock.close()  # the client retries (max_clients) or gives up (its uid)
                continue
            sock.setblocking(False)
            try:
                # An empty socket's buffer takes it whole.  Sent before the
                # client's greeting: libzmq's waits for ours to go on.
                sock.send(_HELLO, _NOSIGNAL)
            except OSError:
                sock.close()
                self._gate.peer_left()
                continue
            try:
                self._epoll.register(sock.fileno(), self._watch)
            except OSError as exc:  # ENOMEM, ENOSPC (max_user_watches)
                logger.warning("cannot watch a client connection: %s", exc)
                sock.close()
                self._gate.peer_left()
                continue
            peer = _Peer(sock, next(self._ids).to_bytes(8, "big"), pid, uid,
                         self._gate.reads_our_clock(pid), now)
            peer.mask = self._watch
            self._peers[peer.routing_id] = peer
            self._by_fd[peer.fd] = peer

    def _resume_accepting(self) -> None:
        if not self._accepting:
            self._accepting = True
            self._epoll.register(self._listen_fd, _EPOLLIN)

    def _drop(self, peer: _Peer, why: str = "") -> None:
        sock, peer.sock = peer.sock, None
        if sock is None:
            return
        if why:
            logger.debug("dropping client connection (pid %d): %s", peer.pid, why)
        self._epoll.unregister(peer.fd)
        sock.close()
        del self._by_fd[peer.fd]
        del self._peers[peer.routing_id]
        peer.outbox.clear()
        peer.large = None
        peer.frames = []
        self._gate.peer_left()

    def connected(self, routing_id: bytes) -> bool:
        """Whether the client's connection is up (gone, or silent past the
        heartbeat's timeout, it is dropped)."""
        return routing_id in self._peers

    def may_control(self, routing_id: bytes, frames: list, admin_keys: frozenset[str]) -> bool:
        """A process of the broker's own uid (see ClientGate.may_control)."""
        peer = self._peers.get(routing_id)
        return peer is not None and peer.uid == os.getuid()

    def allow_uids(self, allowed_uids: tuple[int, ...]) -> None:
        """A reload's: the connections of a uid no longer allowed are closed."""
        self._gate.allow_uids(allowed_uids)
        for peer in list(self._peers.values()):
            if peer.uid not in self._gate.uids:
                self._drop(peer, f"uid {peer.uid} is no longer allowed")

    def tick(self, now: float) -> None:
        """Heartbeats, each HEARTBEAT_INTERVAL; accepting again after a failure."""
        if now < self._next_beat:
            return
        self._next_beat = now + HEARTBEAT_INTERVAL
        self._resume_accepting()
        for peer in list(self._peers.values()):
            self._beat(peer, now)

    def _beat(self, peer: _Peer, now: float) -> None:
        """A PING to a peer silent for HEARTBEAT_INTERVAL; dropped when silent
        HEARTBEAT_TIMEOUT after one left whole, or (unready, or not taking
        its output) silent that long at all.  A loop busy for seconds sent
        no PING meanwhile, so drops nobody for it."""
        if not peer.ready and now - peer.accepted_at >= HANDSHAKE_TIMEOUT:
            self._drop(peer, f"no handshake within {HANDSHAKE_TIMEOUT:g} s")
            return
        if now - peer.alive_at < HEARTBEAT_INTERVAL:
            return
        if peer.pinged_at > peer.alive_at:
            quiet = now - peer.pinged_at
        elif peer.ready and not peer.outbox:
            if self._write(peer, _PING, False):
                peer.pinged_at = now
            return
        else:
            quiet = now - peer.alive_at
        if quiet >= HEARTBEAT_TIMEOUT and not _unread(peer.sock):
            self._drop(peer, f"no sign of life for {now - peer.alive_at:.1f} s")

    # Reading

    def _read(self, peer: _Peer, handler: Handler, now: float) -> None:
        sock, scratch = peer.sock, self._scratch
        for _ in range(READS_PER_TURN):
            large = peer.large
            try:
                if large is not None:  # straight into its place
                    wanted = min(len(large) - peer.large_filled, LARGE_READ_BYTES)
                    with memoryview(large) as rest:
                        size = sock.recv_into(rest[peer.large_filled:], wanted)
                else:
                    size = sock.recv_into(scratch)
            except BlockingIOError:
                return
            except OSError as exc:  # ECONNRESET
                self._drop(peer, str(exc))
                return
            if not size:
                self._drop(peer)
                return
            peer.alive_at = now
            if large is not None:
                peer.large_filled += size
                if peer.large_filled < len(large):
                    if size < wanted:
                        return  # the socket is empty: the next poll says
                    continue
                peer.large = None
                if not self._message(peer, peer.large_flags, large, handler, now):
                    return
                continue
            inbox = peer.inbox
            if inbox:
                inbox += memoryview(scratch)[:size]
            with memoryview(inbox if inbox else scratch)[:len(inbox) or size] as data:
                used = self._parse(peer, data, handler, now)
                if used < 0:
                    return  # dropped
                if not inbox and used < size:  # else the usual: whole frames, nothing kept
                    peer.inbox = bytearray(data[used:])
            if inbox and used:
                del inbox[:used]
            if size < READ_BYTES or peer.backlogged:
                return  # the socket is empty, or nearly: the next poll says

    def _parse(self, peer: _Peer, data: memoryview, handler: Handler, now: float) -> int:
        """Handle the whole frames at the start of ``data``, and take a large
        one's start: the bytes used, or -1 when the connection was dropped."""
        at, end = 0, len(data)
        if not peer.greeted:
            if end and data[0] != 0xFF:
                self._drop(peer, "not ZMTP")
                return -1
            if end < GREETING_BYTES:
                return 0
            if not null_greeting(data):
                self._drop(peer, "not ZMTP 3 with NULL security")
                return -1
            peer.greeted = True
            at = GREETING_BYTES
        while end - at >= 2:
            if not peer.budget:  # the rest on the next turn, after the others'
                self._backlog_add(peer)
                break
            flags = data[at]
            if flags & LONG:
                if end - at < 9:
                    break
                size = int.from_bytes(data[at + 1:at + 9], "big")
                start = at + 9
            else:
                size = data[at + 1]
                start = at + 2
            if flags & ~_FLAGS:
                self._drop(peer, f"invalid frame flags {flags:#x}")
                return -1
            if flags & COMMAND:
                if size > COMMAND_BYTES:
                    self._drop(peer, f"a command of {size} bytes")
                    return -1
            elif not peer.ready:
                self._drop(peer, "a message before the handshake")
                return -1
            elif peer.message_bytes + size > self._max_bytes:
                # The whole message: its frames are held until the last one.
                self._drop(peer, f"a message of over {self._max_bytes} bytes "
                                 "(max_message_bytes)")
                return -1
            if end - start < size:
                if size > READ_BYTES:  # a message frame (commands are smaller)
                    # Its own buffer, read into in place: pages are committed
                    # as data comes, not when a size is announced.
                    large = peer.large = mmap.mmap(-1, size)
                    large[:end - start] = data[start:end]
                    peer.large_filled, peer.large_flags = end - start, flags
                    return end
                break
            at = start + size
            peer.budget -= 1
            body = data[start:at]
            if flags & COMMAND:
                if not self._command(peer, body):
                    return -1
            elif not self._message(peer, flags, body, handler, now):
                return -1
        return at

    def _message(self, peer: _Peer, flags: int, body: memoryview | mmap.mmap,
                 handler: Handler, now: float) -> bool:
        """A message frame read whole; whether the connection stays."""
        frames = peer.frames
        more = flags & MORE
        if not more or len(frames) < FRAMES_KEPT:
            frames.append(body if type(body) is mmap.mmap else bytes(body))
        if more:
            # At least FRAME_COST each: a stream of empty frames ends too.
            peer.message_bytes += max(len(body), FRAME_COST)
            return True
        peer.frames = []
        peer.message_bytes = 0
        handler(peer.routing_id, frames, peer.pid, peer.same_clock, now)
        return peer.sock is not None  # else dropped by a failed reply

    def _command(self, peer: _Peer, body: memoryview) -> bool:
        """Whether the connection stays."""
        name = bytes(body[1:1 + body[0]]) if body else b""
        if name == b"READY":
            kind = _properties(body[1 + len(name):]).get(b"Socket-Type")
            if peer.ready or kind not in _CLIENT_TYPES:
                self._drop(peer, f"a READY from a {kind!r} socket")
                return False
            peer.ready = True
        elif name == b"PING" and not peer.outbox:  # TTL (2 bytes), then a context to echo
            # Not queued behind output it does not read: it hears from us anyway.
            self._write(peer, command(b"\x04PONG" + bytes(body[7:7 + 16])), False)
        elif name == b"ERROR":
            self._drop(peer, "the client sent ERROR")
        return peer.sock is not None  # PONG (a sign of life, as anything), or unknown

    # Writing

    def send(self, routing_id: bytes, message: bytes) -> bool:
        """Queue ``message`` for the client; False when it cannot be: it is
        gone, or has ``queue_limit`` replies queued already."""
        peer = self._peers.get(routing_id)
        if peer is None or peer.replies_queued >= self._queue_limit:
            return False
        size = len(message)
        header = bytes((0, size)) if size < 256 else b"\x02" + size.to_bytes(8, "big")
        if size < COPY_BYTES:
            self._write(peer, header + message, True)
        else:  # no copy: the header, then the body (queued after it if need be)
            self._write(peer, header, False)
            self._write(peer, message, True)
        return peer.sock is not None  # else dropped: EPIPE, ECONNRESET

    def _write(self, peer: _Peer, data: bytes, ends_reply: bool) -> bool:
        """Write ``data`` or queue what the socket does not take; whether it
        left whole (False too when the peer is gone)."""
        if peer.outbox:
            peer.outbox.append((data, ends_reply))
            peer.replies_queued += ends_reply
            return False
        if peer.sock is None:  # dropped by the write before (its header's)
            return False
        try:
            sent = peer.sock.send(data, _NOSIGNAL)
        except BlockingIOError:
            sent = 0
        except OSError as exc:  # EPIPE, ECONNRESET: gone
            self._drop(peer, str(exc))
            return False
        if sent == len(data):
            return True
        peer.outbox.append((memoryview(data)[sent:], ends_reply))
        peer.replies_queued += ends_reply
        self._rewatch(peer)
        return False

    def _flush(self, peer: _Peer) -> None:
        outbox = peer.outbox
        progress = False
        while outbox:
            data, ends_reply = outbox[0]
            try:
                sent = peer.sock.send(data, _NOSIGNAL)
            except BlockingIOError:
                break
            except OSError as exc:
                self._drop(peer, str(exc))
                return
            progress = True
            if sent < len(data):
                outbox[0] = (memoryview(data)[sent:], ends_reply)
                break
            outbox.popleft()
            peer.replies_queued -= ends_reply
        if progress:
            peer.alive_at = time.monotonic()  # it reads: slowly, maybe, but alive
        self._rewatch(peer)

    def _rewatch(self, peer: _Peer) -> None:
        mask = (0 if peer.closing else _EPOLLIN) | (_EPOLLOUT if peer.outbox else 0)
        if mask != peer.mask:
            self._epoll.modify(peer.fd, mask)
            peer.mask = mask

    def _backlog_add(self, peer: _Peer) -> None:
        if not peer.backlogged:
            peer.backlogged = True
            self._backlog.append(peer)

    def close(self, linger_ms: int) -> None:
        """Give queued replies ``linger_ms`` to leave, then close every connection."""
        deadline = time.monotonic() + linger_ms / 1000
        if self._accepting:
            self._epoll.unregister(self._listen_fd)
            self._accepting = False
        for peer in list(self._peers.values()):
            if peer.outbox:
                peer.closing = True  # nothing more is read
                self._rewatch(peer)
            else:
                self._drop(peer)
        while self._peers:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            for fd, _ in self._epoll.poll(remaining):
                if (peer := self._by_fd.get(fd)) is not None:
                    self._flush(peer)
                    if not peer.outbox:
                        self._drop(peer)
        for peer in list(self._peers.values()):
            self._drop(peer)
        self._epoll.close()
        self._listener.close()
        self._gate.close()


def _unread(sock: socket.socket) -> bool:
    """Whether bytes wait in ``sock`` (a loop busy for seconds has not read them)."""
    try:
        return bool(sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except OSError:  # nothing there (EAGAIN), or gone
        return False


def _properties(data: memoryview) -> dict[bytes, bytes]:
    """A READY command's metadata: name (1-byte length), value (4-byte length)."""
    found, at = {}, 0
    try:
        while at < len(data):
            name_end = at + 1 + data[at]
            value_end = name_end + 4 + int.from_bytes(data[name_end:name_end + 4], "big")
            found[bytes(data[at + 1:name_end])] = bytes(data[name_end + 4:value_end])
            at = value_end
    except IndexError:
        pass
    return found
