"""The clients' transport over tcp, and over ipc with CURVE: libzmq's ROUTER.

libzmq accepts, frames, heartbeats (a peer silent 3 s after a PING is
dropped) and encrypts on its I/O thread; the gate (``clients.ClientGate``)
vets each connection at its handshake and counts them from the socket's
monitor.  A transport gives the loop: ``requests`` and ``events`` to poll,
``receive``, ``send``, ``connected``, ``may_control``, ``tick``,
``set_queue_limit`` and ``close`` (see ``zmtp.Listener``, the other one).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import zmq

from client import protocol
from client.protocol import STATUS_OK

from . import endpoint as endpoints
from .clients import ClientGate

ROUTER_BATCH = 256
"""Requests read per turn before connections get their turn."""
HEARTBEAT_IVL_MS = 1000
HEARTBEAT_TIMEOUT_MS = 3000
"""A peer that sends nothing this long after a heartbeat PING is dropped."""

_NOBLOCK = int(zmq.NOBLOCK)  # plain ints: pyzmq converts an enum flag on every call
_NOBLOCK_MORE = int(zmq.NOBLOCK | zmq.SNDMORE)
_POLLIN = int(zmq.POLLIN)
_EVENTS = int(zmq.EVENTS)
_COPY_THRESHOLD = zmq.COPY_THRESHOLD  # bytes from which pyzmq sends without copying
_PROBE = protocol.pack([protocol.PROBE_REQUEST_ID, STATUS_OK, None])

Handler = Callable[[bytes, list, "int | None", bool, float], None]
"""``(routing_id, frames, client_pid, same_clock, now)``: one request."""


class RouterTransport:
    def __init__(self, endpoint: str, gate: ClientGate, *, max_message_bytes: int,
                 queue_limit: int, curve: tuple[bytes, bytes] | None) -> None:
        """Bind ``endpoint``; ``curve``: the server's (public, secret) keys."""
        self._context = zmq.Context()
        self._router = router = self._context.socket(zmq.ROUTER)
        self._gate = gate
        try:
            gate.serve_router(self._context, router)
            if curve is not None:
                router.curve_publickey, router.curve_secretkey = curve
                router.curve_server = True
            router.setsockopt(zmq.ROUTER_MANDATORY, 1)
            router.setsockopt(zmq.LINGER, 0)
            router.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
            self.set_queue_limit(queue_limit)
            router.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
            router.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
            endpoints.bind(router, endpoint)
        except BaseException:
            self.close(0)
            raise
        self.requests: Any = router
        self.events: Any = gate.monitor
        self.backlogged = False  # what a turn leaves unread stays in libzmq's queues
        # The backend's methods, bound once: pyzmq's Socket and Frame classes
        # route every attribute through a Python-level __getattr__ hook, and
        # its Socket.send adds Python code (draft-socket options) to each frame.
        self._recv = zmq.backend.Socket.recv.__get__(router)
        self._router_events = zmq.backend.Socket.get.__get__(router)
        self._send = zmq.backend.Socket.send.__get__(router)

    def set_queue_limit(self, limit: int) -> None:
        """Messages queued for one client, each way (libzmq applies it to
        clients that connect from then on).  libzmq bounds a peer's queue in
        messages, not bytes; past the limit it stops reading a client's
        socket (the client's sends wait)."""
        self._router.setsockopt(zmq.SNDHWM, limit)
        self._router.setsockopt(zmq.RCVHWM, limit)

    def accepting(self) -> contextlib.AbstractContextManager[None]:
        """libzmq's I/O thread accepts, and the gate's thread vets, by themselves."""
        return contextlib.nullcontext()

    def on_events(self) -> None:
        self._gate.on_events()

    def receive(self, handler: Handler, now: float) -> None:
        """Hand each request waiting in the socket to ``handler``, up to a batch."""
        recv, sender, same_clock = self._recv, self._gate.sender, self._gate.same_clock
        for read in range(ROUTER_BATCH):
            # Asked, not tried: a zmq.Again ending each turn's reads cost
            # more than the rest of a request's reading.  Not asked before
            # the first read: the poll just said there is one (and pyzmq's
            # get() costs ~2 us: it makes an enum).
            if read and not self._router_events(_EVENTS) & _POLLIN:
                return
            try:
                routing_id = recv(_NOBLOCK)  # bytes: a Frame costs more
                frame = recv(_NOBLOCK, copy=False)  # its metadata: the sender
            except zmq.Again:
                return
            frames = [frame]
            while frame.more:
                frame = recv(_NOBLOCK, copy=False)
                frames.append(frame)
            pid = sender(frames[-1])
            handler(routing_id, frames, pid, pid in same_clock, now)

    def send(self, routing_id: bytes, message: bytes) -> bool:
        """Queue ``message`` for the client; False when it cannot be: the
        client is gone (EHOSTUNREACH), or stopped reading (EAGAIN)."""
        # Frame by frame: send_multipart costs a few microseconds more a reply.
        try:
            self._send(routing_id, _NOBLOCK_MORE)
            # A large reply goes without a copy, as pyzmq's own send would send it.
            self._send(message, _NOBLOCK, copy=len(message) < _COPY_THRESHOLD)
        except zmq.ZMQError:
            return False
        return True

    def connected(self, routing_id: bytes) -> bool:
        """Whether the client's connection is up: a frozen or vanished peer
        fails its heartbeats and its pipe is closed, so ROUTER_MANDATORY
        refuses a message to it."""
        try:
            self._send(routing_id, _NOBLOCK_MORE)
            self._send(_PROBE, _NOBLOCK)
        except zmq.ZMQError as exc:
            return exc.errno != zmq.EHOSTUNREACH  # EAGAIN: up, just not reading
        return True

    def may_control(self, routing_id: bytes, frames: list, admin_keys: frozenset[str]) -> bool:
        return self._gate.may_control(frames[-1], admin_keys)

    def tick(self, now: float) -> None:
        """libzmq keeps its own time."""

    def allow_uids(self, allowed_uids: tuple[int, ...]) -> None:
        """A reload's: checked from each connection's next message on."""
        self._gate.allow_uids(allowed_uids)

    def close(self, linger_ms: int) -> None:
        """Give queued replies ``linger_ms`` to leave, then stop."""
        self._router.close(linger=linger_ms)
        self._gate.close()  # after the router: no handshake goes unvetted
        self._context.term()
