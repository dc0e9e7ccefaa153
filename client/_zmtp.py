"""ZeroMQ's wire protocol (ZMTP 3.1, NULL security), spoken as a DEALER
from the calling thread over a unix socket: the client's ipc transport.

libzmq hands each message to its I/O thread and each reply back, two
thread wake-ups per request in every worker process.  Measured (32
processes of ``SELECT 1``, cap 4, six rounds alternated on one broker,
medians): libzmq 134 us of client CPU a request, this 84, and 35% more
requests a second (README, Performance).  The broker speaks ZMTP itself
over ipc too (broker/zmtp.py, which shares this module's wire constants);
tcp (and CURVE) keep libzmq on both ends.

The broker drops a peer that sends nothing for 3 s after one of its
heartbeat PINGs.  A worker's thread answers PINGs while it waits for a
reply; between requests one keep-alive thread per process sends each idle
connection a PONG every KEEPALIVE_INTERVAL (and drops what it read).  A
frozen process (SIGSTOP) sends nothing, so the broker still ends its
transaction; so would a process that holds the GIL for 3 s on end.
"""

from __future__ import annotations

import logging
import math
import os
import select
import socket
import struct
import threading
import time
import weakref

logger = logging.getLogger("poolbroker.client")

KEEPALIVE_INTERVAL = 1.0
"""Seconds between PONGs on an idle connection (the broker PINGs every
second and waits 3 s for anything back)."""

MORE, LONG, COMMAND = 1, 2, 4  # a frame's flags (a reply is never in parts)
_NOTHING_READ = 0xFF  # no frame's flags byte
GREETING_BYTES = 64
GREETING = (b"\xff" + bytes(8) + b"\x7f" + b"\x03\x01" + b"NULL".ljust(20, b"\0")
             + b"\x00" + bytes(31))
_RECV_BYTES = 64 * 1024  # below malloc's mmap threshold: a recv() of more costs a mmap
_RECV_MAX = 16 * 1024 * 1024  # one recv() of a large frame at most
_POLL_MAX_MS = 2**31 - 1  # poll() takes no longer wait (a timeout of weeks waits in steps)
_NOSIGNAL = socket.MSG_NOSIGNAL
_DONTWAIT = socket.MSG_DONTWAIT


def command(body: bytes) -> bytes:
    return bytes((COMMAND, len(body))) + body


def null_greeting(greeting: bytes | memoryview) -> bool:
    """Whether a peer's greeting is ZMTP 3 with NULL security."""
    return (greeting[0] == 0xFF and greeting[9] & 1 and greeting[10] >= 3
            and bytes(greeting[12:32]).rstrip(b"\0") == b"NULL")


def socket_type(name: bytes) -> bytes:
    """A READY command's Socket-Type property."""
    return b"\x0bSocket-Type" + struct.pack(">I", len(name)) + name


_READY = command(b"\x05READY" + socket_type(b"DEALER"))
_PONG = command(b"\x04PONG")
_ROUTER = socket_type(b"ROUTER")  # in the broker's READY


class Closed(Exception):
    """The connection was lost with a request in flight."""


class Unsent(Exception):
    """No broker took the request within the time given: it never ran.
    ``connected``: a broker was connected, but did not read it whole."""

    def __init__(self, why: str, *, connected: bool = False) -> None:
        super().__init__(why)
        self.connected = connected


_PATH_MAX = 107  # sun_path's 108 bytes, less the terminating NUL


def address(endpoint: str) -> str:
    """The unix socket address of an ``ipc://`` endpoint (``@name``: the
    abstract namespace); ValueError if it cannot be one."""
    path = endpoint[len("ipc://"):]
    if path in ("", "@") or "\0" in path:
        raise ValueError("no socket path")
    if len(os.fsencode(path)) > _PATH_MAX:
        raise ValueError(f"a unix socket path has at most {_PATH_MAX} bytes")
    return "\0" + path[1:] if path.startswith("@") else path


class Dealer:
    """A thread's connection to the broker, made on its first request and
    again whenever it is found gone.  The owner holds ``lock`` from sending
    a request to the end of its reply; the keep-alive thread takes it only
    when free."""

    __slots__ = ("__weakref__", "_address", "_buffer", "_fast_wait", "_poll", "_recv",
                 "_recv_into", "_scratch", "_sock", "_writing", "lock")

    def __init__(self, address: str, fast_wait: float) -> None:
        self._address = address
        self._fast_wait = struct.pack("ll", 0, int(fast_wait * 1e6))  # under a second
        self._sock: socket.socket | None = None
        self._buffer = bytearray()
        self._scratch = bytearray(_RECV_BYTES)
        self.lock = threading.Lock()
        self._writing = threading.Lock()  # a frame on its way: the keeper's PONG waits
        _keep_alive(self)

    def send(self, frame: bytes, deadline: float, give_up_at: float) -> None:
        """Send one message frame, connecting first if need be (until
        ``give_up_at``); Unsent if no broker took it whole by then, or by
        ``deadline`` once it was being sent.  Anything else raised meanwhile
        (an interrupt) closes the connection: a frame cut short cannot be
        followed by another, and the broker drops it with the connection."""
        size = len(frame)
        data = (bytes((0, size)) if size < 256 else b"\x02" + size.to_bytes(8, "big")) + frame
        while True:
            if self._sock is None:
                self._connect(give_up_at)
            try:
                with self._writing:
                    sent = self._send_all(data, deadline)
                if sent:
                    return
            except BaseException:
                self.close()
                raise

    def _send_all(self, data: bytes, deadline: float) -> bool:
        """Whether ``data`` went whole; False if the connection was found
        gone (closed now) with none of it sent."""
        sock = self._sock
        try:
            sent = sock.send(data, _NOSIGNAL)
        except BlockingIOError:  # SO_SNDTIMEO, nothing sent: the broker is not reading
            sent = 0
        except OSError:  # EPIPE, ECONNRESET: the broker closed it (restarted, dropped us)
            self.close()
            return False
        rest = memoryview(data)[sent:]
        while rest:
            try:
                rest = rest[sock.send(rest, _NOSIGNAL):]
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise Unsent("the broker did not read the request in time",
                                 connected=True) from None
            except OSError as exc:
                raise Unsent(f"the connection was lost while the request was sent ({exc})",
                             connected=True) from None
        return True

    def _connect(self, give_up_at: float) -> None:
        pause = 0.01
        while True:
            remaining = give_up_at - time.monotonic()
            if remaining <= 0:
                raise Unsent("no broker accepted the connection")
            try:
                self._handshake(remaining)
                return
            except (OSError, Closed):
                # Not there yet, restarting, or refused (max_clients, another user's)
                time.sleep(max(0.0, min(pause, give_up_at - time.monotonic())))
                pause = min(pause * 2, 0.1)

    def _handshake(self, timeout: float) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(self._address)
            sock.sendall(GREETING + _READY)
            greeting = b""
            while len(greeting) < GREETING_BYTES:
                chunk = sock.recv(GREETING_BYTES - len(greeting))
                if not chunk:
                    raise Closed("the broker closed the connection during the handshake")
                greeting += chunk
            if not null_greeting(greeting):
                raise Closed("the peer does not speak ZMTP 3 without security")
            # Blocking, with kernel timeouts: a broker that stops reading
            # cannot hold a send past its deadline, nor one that stops writing
            # the rest of a large frame a recv() (the wait for a reply's
            # start is in poll(): see _read_start).
            sock.settimeout(None)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, self._fast_wait)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, self._fast_wait)
            self._sock, self._recv, self._recv_into = sock, sock.recv, sock.recv_into
            self._buffer = bytearray()
            self._poll = select.poll()
            self._poll.register(sock.fileno(), select.POLLIN)
            deadline = time.monotonic() + timeout
            while True:  # the broker's READY (its socket type) ends the handshake
                frame, command = self._next(deadline)
                if frame is None:
                    raise Closed("no handshake from the broker")
                if command and frame[:6] == b"\x05READY":
                    if _ROUTER not in frame:
                        raise Closed("the peer is not a ZeroMQ ROUTER")
                    return
        except BaseException:
            self._sock = None
            sock.close()
            raise

    def recv(self, deadline: float) -> bytes | bytearray | None:
        """The next message frame, answering the broker's PINGs meanwhile;
        None at ``deadline``, Closed if the connection is lost."""
        if self._sock is None:
            raise Closed("the connection is closed")
        while True:
            frame, command = self._next(deadline)
            if not command:
                return frame
            if frame[:5] == b"\x04PING":
                self._pong()

    def _next(self, deadline: float) -> tuple[bytes | bytearray | None, bool]:
        """(the next frame, whether it is a command); (None, False) at the deadline."""
        buffer = self._buffer
        while True:
            have = len(buffer)
            bounds = frame_bounds(buffer, 0)
            if bounds is not None and bounds[1] <= have:
                start, end = bounds
                frame = buffer[start:end]
                flags = buffer[0]
                del buffer[:end]
                return frame, bool(flags & COMMAND)
            if not have:  # a frame's start: into the scratch buffer, see below
                chunk = self._read_start(deadline)
                if chunk is None:
                    return None, False
                try:
                    bounds = frame_bounds(chunk, 0)
                    if bounds is not None and bounds[1] == len(chunk):
                        return bytes(chunk[bounds[0]:]), bool(chunk[0] & COMMAND)  # the usual
                    buffer += chunk
                except BaseException:  # an interrupt before the bytes were kept
                    self.close()
                    raise
                continue
            want = _RECV_BYTES if bounds is None else min(max(bounds[1] - have, _RECV_BYTES),
                                                          _RECV_MAX)
            try:
                chunk = self._recv(want)
                if not chunk:
                    raise Closed("the broker closed the connection")
                buffer += chunk
            except BlockingIOError:  # nothing within fast_wait
                if not self._wait(deadline):
                    return None, False
            except OSError as exc:  # ECONNRESET
                self.close()
                raise Closed(str(exc)) from None
            except BaseException:  # Closed, or an interrupt: what recv() read may be lost
                self.close()
                raise

    def _read_start(self, deadline: float) -> memoryview | None:
        """What came, read into the scratch buffer with nothing before it;
        None at the deadline.  An interrupt while waiting leaves the
        connection as it is: the scratch's first byte, which no frame starts
        with, tells that nothing was read (a bytes object returned by recv()
        would be lost with it, and the stream out of step).

        It waits in poll(), not in recv(): a recv() sleeps on the socket's one
        wait queue, which the kernel also wakes when the broker reads this
        client's request (room to write again), so each request woke the
        client for nothing, a context switch on the broker's time too (at 32
        processes of interactive pages, 10 of 34 switches a page).  poll()
        wakes for input only."""
        scratch = self._scratch
        while True:
            scratch[0] = _NOTHING_READ
            if not self._wait(deadline):
                return None
            try:
                size = self._recv_into(scratch)
                if not size:
                    self.close()
                    raise Closed("the broker closed the connection")
                return memoryview(scratch)[:size]
            except BlockingIOError:  # taken meanwhile after all: wait again
                pass
            except OSError as exc:  # ECONNRESET
                self.close()
                raise Closed(str(exc)) from None
            except BaseException:
                if scratch[0] != _NOTHING_READ:
                    self.close()  # Closed, or an interrupt with the bytes read
                raise

    def _wait(self, deadline: float) -> bool:
        """Whether something came to read by ``deadline`` (what is there
        already counts, even past it: a reply that came in time is read)."""
        while True:  # interrupted here: nothing read
            remaining_ms = math.ceil((deadline - time.monotonic()) * 1000)
            ready = self._poll.poll(min(max(0, remaining_ms), _POLL_MAX_MS))
            if ready or remaining_ms <= _POLL_MAX_MS:
                return bool(ready)

    def _pong(self, wait: bool = True) -> None:
        """Answer (``wait``: for a frame on its way to be sent whole first)."""
        if not self._writing.acquire(blocking=wait):
            return
        try:
            sock = self._sock
            if sock is not None:
                sock.send(_PONG, _NOSIGNAL | _DONTWAIT)
        except OSError:
            pass  # full or closed: the next PING, or the next request, finds out
        finally:
            self._writing.release()

    def keep_alive(self) -> None:
        """From the keep-alive thread.  Between requests: read what came,
        drop its PINGs (anything else is a reply given up on: left for the
        owner, who counts it), and answer.  During one whose owner is not
        reading (it runs a nested request, see Client._request) nor writing:
        answer only.  Client.close() may close the socket meanwhile, from the
        owner's thread, without either lock."""
        if self.lock.acquire(blocking=False):
            try:
                self._drain()
            finally:
                self.lock.release()
        self._pong(wait=False)

    def _drain(self) -> None:
        sock = self._sock
        if sock is None:
            return
        buffer = self._buffer
        try:
            while True:
                chunk = sock.recv(_RECV_BYTES, _DONTWAIT)
                if not chunk:
                    self.close()  # gone: the next request connects again
                    return
                buffer += chunk
        except BlockingIOError:
            pass
        except OSError:
            self.close()
            return
        kept, at = bytearray(), 0
        while (bounds := frame_bounds(buffer, at)) is not None and bounds[1] <= len(buffer):
            if not buffer[at] & COMMAND:
                kept += buffer[at:bounds[1]]
            at = bounds[1]
        self._buffer = kept + buffer[at:]

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def __del__(self) -> None:  # a thread that ended without Client.close()
        self.close()


def frame_bounds(data: bytes | bytearray, at: int) -> tuple[int, int] | None:
    """(start, end) of the body of the frame at ``at``, if its header is there."""
    have = len(data) - at
    if have < 2:
        return None
    if data[at] & LONG:
        if have < 9:
            return None
        return at + 9, at + 9 + int.from_bytes(data[at + 1:at + 9], "big")
    return at + 2, at + 2 + data[at + 1]


# One keep-alive thread per process, started with its first connection.
# No lock: a signal handler or a finalizer may make a connection while
# another is being registered or the keeper walks them (each step below is
# one C-level operation on a set).
_dealers: weakref.WeakSet[Dealer] = weakref.WeakSet()
_keeper_pid = 0
keeper_ident: int | None = None
"""The keep-alive thread's: a request made there (by a finalizer that a
garbage collection runs on it) must not use a connection of its own, whose
lock it may hold (see Client._request)."""


def _keep_alive(dealer: Dealer) -> None:
    global _keeper_pid
    _dealers.add(dealer)
    if _keeper_pid != os.getpid():
        _keeper_pid = os.getpid()
        threading.Thread(target=_keeper, name="poolbroker-keepalive", daemon=True).start()


def _keeper() -> None:
    global keeper_ident
    keeper_ident = threading.get_ident()
    while True:
        time.sleep(KEEPALIVE_INTERVAL)
        _keep_alive_all()


def _keep_alive_all() -> None:
    # A function of its own: its references to the dealers are dropped when
    # it returns, not kept through the sleep (each would outlive its thread).
    for ref in _dealers.data.copy():
        dealer = ref()
        if dealer is None:
            continue
        try:
            dealer.keep_alive()
        except Exception:  # never the end of the keep-alive of every other
            logger.exception("poolbroker: keeping a connection to the broker alive failed")


def _after_fork_in_child() -> None:
    """The parent's connections are its own: the child closes its copies
    (the parent's stay open) and starts its keep-alive with its first."""
    global _dealers, _keeper_pid, keeper_ident
    inherited = [ref() for ref in _dealers.data.copy()]
    _dealers, _keeper_pid, keeper_ident = weakref.WeakSet(), 0, None
    for dealer in inherited:
        if dealer is not None:
            dealer.close()


os.register_at_fork(after_in_child=_after_fork_in_child)
