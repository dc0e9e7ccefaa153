"""One broker per endpoint: claim it before binding, or refuse to start.

Two brokers on one endpoint would be two caps (a split brain), and
libzmq binds an ipc path silently over a live broker's socket file.  The
kernel refuses a second bind of a tcp address or an abstract ipc name, so
only filesystem ipc paths need a claim of their own: an exclusive lock on
``<socket>.lock``, held for the broker's life and released by the kernel
when it dies (SIGKILL included).  Whatever still listens on the socket
while its lock is free (a broker that predates the lock) also counts as
alive; a socket nobody accepts on is a dead broker's leftover, replaced.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import stat
import struct

import zmq

from .config import ConfigError

logger = logging.getLogger("poolbroker")

PROBE_TIMEOUT = 1.0
"""Seconds to wait for a listener to accept: one too busy to accept is alive."""

_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class EndpointInUse(ConfigError):
    """Another broker (or another program) serves the endpoint."""


def ipc_path(endpoint: str) -> str | None:
    """The socket file of a filesystem ipc endpoint (absolute), else None."""
    if not endpoint.startswith("ipc://"):
        return None
    path = endpoint[len("ipc://"):]
    if path.startswith("@") or path == "*":  # abstract namespace; libzmq picks a name
        return None
    return os.path.abspath(path)


def canonical(endpoint: str) -> str:
    """The endpoint as one string however it is spelt: ipc paths resolved."""
    path = ipc_path(endpoint)
    return f"ipc://{os.path.realpath(path)}" if path is not None else endpoint


def prepare_ipc_directory(endpoint: str) -> None:
    """Create the socket's directory 0700 and refuse one others can write."""
    path = ipc_path(endpoint)
    if path is None:
        return
    directory = os.path.dirname(path)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    st = os.lstat(directory)
    if stat.S_ISLNK(st.st_mode):
        # Its owner could re-point it later, at a socket of their own.
        raise ConfigError(f"{directory} is a symbolic link: give the real directory")
    if st.st_uid != os.getuid():
        raise ConfigError(f"{directory} belongs to uid {st.st_uid}, not to this user")
    if st.st_mode & 0o077:
        raise ConfigError(
            f"{directory} is accessible to other users (mode {st.st_mode & 0o777:o}); "
            "the broker's socket must live in a 0700 directory")


class Claim:
    """This process's hold on a filesystem ipc endpoint, until ``release()``."""

    def __init__(self, fd: int, path: str) -> None:
        self._fd = fd
        self._path = path

    def release(self) -> None:
        """After the socket is closed: its file goes (while the lock is held,
        no other broker can have bound that path), so that the next broker
        does not take a clean stop for a crash."""
        if self._fd >= 0:
            try:
                os.unlink(self._path)
            except FileNotFoundError:
                pass
            os.close(self._fd)  # the lock file stays: removing it would race a newcomer
            self._fd = -1


def claim(endpoint: str) -> Claim | None:
    """Make sure no live broker serves ``endpoint``, and that none can start
    on it while this one runs.  Raises EndpointInUse.  A stale socket file
    is removed.  None for endpoints whose bind the kernel keeps exclusive."""
    path = ipc_path(endpoint)
    if path is None:
        return None
    fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise EndpointInUse(_in_use(endpoint, _read_pid(fd))) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _remove_stale_socket(endpoint, path)
    except BaseException:
        os.close(fd)
        raise
    return Claim(fd, path)


def _remove_stale_socket(endpoint: str, path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"{path} exists and is not a socket: remove it or choose "
                          "another endpoint")
    pid = listener_pid(path)
    if pid is not None:
        raise EndpointInUse(_in_use(endpoint, pid))
    logger.warning("replacing %s: a socket file left by a broker that is gone "
                   "(nothing accepts on it)", path)
    os.unlink(path)


def bind(router: zmq.Socket, endpoint: str) -> None:
    """``router.bind(endpoint)``, with a clear error when it is taken."""
    try:
        router.bind(endpoint)
    except zmq.ZMQError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise ConfigError(f"cannot bind {endpoint}: {exc}") from None
        raise _taken(endpoint) from None


LISTEN_BACKLOG = 1024
"""Connections the kernel queues for the loop's next accept: a fork of
hundreds of workers connects at once."""


def listen(endpoint: str, address: str) -> socket.socket:
    """A non-blocking unix socket listening at ``address`` (of an ``ipc://``
    endpoint, claimed before), with a clear error when it is taken."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(address)
        sock.listen(LISTEN_BACKLOG)
    except OSError as exc:
        sock.close()
        if exc.errno != errno.EADDRINUSE:
            raise ConfigError(f"cannot bind {endpoint}: {exc}") from None
        raise _taken(endpoint) from None
    sock.setblocking(False)
    return sock


def _taken(endpoint: str) -> EndpointInUse:
    pid = None
    if endpoint.startswith("ipc://@"):
        pid = listener_pid("\0" + endpoint[len("ipc://@"):])
    return EndpointInUse(_in_use(endpoint, pid))


def listener_pid(address: str) -> int | None:
    """The pid of the process accepting on a Unix socket (0: alive, pid
    unknown); None when nothing accepts there."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(PROBE_TIMEOUT)
        try:
            s.connect(address)
        except (FileNotFoundError, ConnectionRefusedError):
            return None
        except (TimeoutError, BlockingIOError):
            return 0  # its backlog is full: busy, not dead
        except OSError as exc:
            raise ConfigError(f"cannot tell whether a broker serves {address!r}: {exc}") \
                from None
        pid, _, _ = _PEERCRED.unpack(
            s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
        return pid


def _read_pid(fd: int) -> int | None:
    text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    return int(text) if text.isdigit() else None


def _in_use(endpoint: str, pid: int | None) -> str:
    if pid is None and endpoint.startswith("tcp://"):
        return (f"{endpoint} is already in use: another broker, or another program, "
                "listens there; refusing to start")
    who = f" (pid {pid})" if pid else ""
    return (f"another broker is serving {endpoint}{who}; refusing to start a second one "
            "(two brokers would mean two caps)")
