"""Nobody let in who should not be, and no secret let out."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import threading
import time

import pytest
import zmq
import zmq.auth

import client
from conftest import REPO, free_port, memory_kb, request_as, run_as, wait_until

SECRET = "Pw-Leak-7c1e"


def test_dsn_password_never_appears_in_logs_stats_or_errors(start_broker, dsn):
    # Trust authentication ignores the password; the missing database makes
    # every connection attempt fail, so error paths run and get logged.
    broker = start_broker(dsn=f"{dsn} password={SECRET} dbname=no_such_db_{SECRET}",
                          log_level="DEBUG")
    with pytest.raises(client.OperationalError) as info:
        broker.client.execute("SELECT 1", timeout=5)
    message = str(info.value)
    assert "no_such_db_********" in message  # the error is precise, the secret masked
    assert SECRET not in message
    assert SECRET not in repr(broker.stats())
    stats = subprocess.run([sys.executable, "-m", "broker.cli", "stats",
                            "--endpoint", broker.endpoint],
                           capture_output=True, text=True, timeout=30, cwd=REPO)
    assert stats.returncode == 0 and SECRET not in stats.stdout + stats.stderr
    log = broker.log()
    assert "cannot connect to the database" in log
    assert SECRET not in log


@pytest.mark.parametrize("bad_dsn", [
    f"host=/tmp password={SECRET} oops",
    f"postgresql://user:{SECRET}@localhost:5432/db?sslmode=nonsense x",
])
def test_malformed_dsn_is_refused_without_echoing_the_password(bad_dsn):
    out = subprocess.run([sys.executable, "-m", "broker.cli", "serve", "--dsn", bad_dsn,
                          "--endpoint", "ipc:///tmp/pb-never/b.sock"],
                         capture_output=True, text=True, timeout=30, cwd=REPO)
    assert out.returncode == 2
    assert "dsn is not a valid libpq connection string" in out.stderr
    assert SECRET not in out.stdout + out.stderr


@pytest.fixture
def certificates(tmp_path):
    """The broker's pair, an allowed client's and a stranger's, made by the CLI."""
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    keys = tmp_path / "keys"
    for name in ("broker", "worker", "stranger"):
        subprocess.run([sys.executable, "-m", "broker.cli", "keygen", str(keys), name],
                       check=True, capture_output=True, cwd=REPO)
    shutil.copy(keys / "worker.key", allowed / "worker.key")
    return keys, allowed


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_keygen_writes_the_secret_key_0600_even_into_an_existing_0755_directory(tmp_path):
    keys = tmp_path / "keys"
    keys.mkdir()
    keys.chmod(0o755)
    (keys / "old.key_secret").write_text("a secret someone left readable\n")
    (keys / "old.key_secret").chmod(0o644)
    for name in ("fresh", "old"):
        out = subprocess.run([sys.executable, "-m", "broker.cli", "keygen", str(keys), name],
                             capture_output=True, text=True, timeout=30, cwd=REPO, umask=0o022)
        assert out.returncode == 0, out.stderr
        assert _mode(keys / f"{name}.key_secret") == 0o600
        assert _mode(keys / f"{name}.key") == 0o644  # public: meant to be copied around
    assert "secret-key" in (keys / "old.key_secret").read_text()
    assert _mode(keys) == 0o755  # an existing directory is the user's business


def test_curve_admits_only_allowed_client_keys(start_broker, certificates):
    keys, allowed = certificates
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    broker = start_broker(
        endpoint=endpoint, max_connections=2,
        curve_secret_key_file=str(keys / "broker.key_secret"),
        curve_allowed_clients=str(allowed),
        client_options={"curve_server_key": str(keys / "broker.key"),
                        "curve_client_cert": str(keys / "worker.key_secret")})
    # The right key gets in.
    assert broker.client.execute("SELECT 7").rows == [(7,)]
    # No key, or a key not on the allow-list: the handshake fails, nothing is sent.
    received = broker.stats()["requests_num"]
    strangers = [
        client.Client(endpoint, timeout=1),
        client.Client(endpoint, timeout=1, curve_server_key=str(keys / "broker.key"),
                      curve_client_cert=str(keys / "stranger.key_secret")),
    ]
    for stranger in strangers:
        with pytest.raises(client.BrokerUnavailable) as info:
            stranger.execute("SELECT 1")
        assert not info.value.outcome_unknown
        stranger.close()
    assert broker.stats()["requests_num"] == received + 1  # this stats call only
    assert broker.client.execute("SELECT 8").rows == [(8,)]


def test_tcp_without_curve_or_consent_refuses_to_start():
    out = subprocess.run([sys.executable, "-m", "broker.cli", "serve", "--dsn", "dbname=x",
                          "--endpoint", f"tcp://127.0.0.1:{free_port()}"],
                         capture_output=True, text=True, timeout=30, cwd=REPO)
    assert out.returncode == 2
    assert "needs CURVE" in out.stderr and "--insecure-tcp" in out.stderr


def _ping_as(uid: int, endpoint: str) -> bool:
    """Whether a process of ``uid`` gets an answer to a ping at ``endpoint``."""
    from client import protocol

    return request_as(uid, endpoint, protocol.OP_PING, []) is not None


NOBODY = 65534


@pytest.mark.parametrize("kind", ["filesystem", "abstract"])
def test_another_local_user_is_refused_over_ipc(start_broker, kind):
    import os
    import uuid

    if os.geteuid() != 0:
        pytest.skip("acting as another user needs root (CI runs as root)")
    endpoint = None if kind == "filesystem" else f"ipc://@pbtest-{uuid.uuid4().hex[:12]}"
    options = {} if endpoint is None else {"endpoint": endpoint}
    broker = start_broker(max_connections=1, **options)
    assert broker.client.execute("SELECT 1").rows == [(1,)]
    assert not _ping_as(NOBODY, broker.endpoint)
    if kind == "abstract":  # no directory to stop it: refused at the handshake
        assert broker.stats()["clients_denied"] >= 1
        assert "refusing connections from uid 65534" in broker.log()
    assert broker.client.execute("SELECT 2").rows == [(2,)]


def test_another_local_user_cannot_make_the_broker_hold_an_endless_message(start_broker):
    # libzmq keeps the frames of a message until its last one arrives: a peer
    # that never ends one could fill the broker's memory.  Another user is
    # refused at the handshake, before any frame is read.
    import uuid

    if os.geteuid() != 0:
        pytest.skip("acting as another user needs root (CI runs as root)")
    broker = start_broker(max_connections=1, endpoint=f"ipc://@pbtest-{uuid.uuid4().hex[:12]}")
    assert broker.client.execute("SELECT 1").rows == [(1,)]
    before = memory_kb(broker.proc.pid)["VmHWM"]

    def endless_message() -> bytes:
        # ZMTP 3.0 by hand: libzmq's own sockets hold an incomplete message
        # back, a hostile peer does not.
        import socket

        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect("\0" + broker.endpoint[len("ipc://@"):])
        sock.sendall(b"\xff" + bytes(8) + b"\x7f" + bytes([3, 0]) + b"NULL".ljust(20, b"\0")
                     + bytes(32))
        ready = b"\x05READY" + b"\x0bSocket-Type" + (6).to_bytes(4, "big") + b"DEALER"
        sock.sendall(bytes([0x04, len(ready)]) + ready)
        piece = bytes([0x03]) + (1 << 20).to_bytes(8, "big") + b"x" * (1 << 20)  # MORE | LONG
        sent = 0
        sock.settimeout(5)
        try:
            for _ in range(200):  # 200 MiB offered, never a last frame
                sock.sendall(piece)
                sent += 1
        except OSError:
            pass  # refused: the broker closed the connection
        time.sleep(0.5)
        sock.close()
        return str(sent).encode()

    sent = int(run_as(NOBODY, endless_message) or 0)
    grown_mb = (memory_kb(broker.proc.pid)["VmHWM"] - before) / 1024
    print(f"\n[endless message] {sent} frames of 1 MiB sent; broker peak RSS +{grown_mb:.1f} MB")
    assert grown_mb < 16, grown_mb
    assert broker.stats()["clients_denied"] >= 1
    assert broker.client.execute("SELECT 2").rows == [(2,)]


def test_a_client_refused_at_the_handshake_gets_in_once_its_uid_is_allowed(start_broker):
    # libzmq gives up on a connection refused at the handshake for good: the
    # client must start a new socket, or a worker that met a misconfigured
    # broker once stays locked out after the fix.
    import signal
    import uuid

    if os.geteuid() != 0:
        pytest.skip("acting as another user needs root (CI runs as root)")
    broker = start_broker(max_connections=1, endpoint=f"ipc://@pbtest-{uuid.uuid4().hex[:12]}")
    refused_r, refused_w = os.pipe()
    allowed_r, allowed_w = os.pipe()

    def refused_then_allowed() -> bytes:
        c = client.Client(broker.endpoint, timeout=2)
        outcomes = []
        for _ in range(2):
            try:
                outcomes.append(str(c.execute("SELECT 1").rows))
            except client.Error as exc:
                outcomes.append(type(exc).__name__)
            os.write(refused_w, b"1")
            os.read(allowed_r, 1)
        return " ".join(outcomes).encode()

    outcome: list[bytes] = []
    child = threading.Thread(target=lambda: outcome.append(run_as(NOBODY, refused_then_allowed)))
    child.start()
    assert os.read(refused_r, 1) == b"1"
    broker.config.write_text(broker.config.read_text() + f"allowed_uids = [{NOBODY}]\n")
    broker.proc.send_signal(signal.SIGHUP)
    assert wait_until(lambda: "applied allowed_uids" in broker.log(), 5), broker.log()[-500:]
    os.write(allowed_w, b"1")
    os.read(refused_r, 1)
    os.write(allowed_w, b"1")
    child.join()
    assert outcome == [b"BrokerUnavailable [(1,)]"]


def test_a_uid_dropped_by_a_reload_loses_its_open_connection(start_broker):
    # Admitted at the handshake, then revoked: the reload closes what it has
    # open (over ipc no message is checked on its own), and it gets no
    # connection again.
    import signal
    import uuid

    if os.geteuid() != 0:
        pytest.skip("acting as another user needs root (CI runs as root)")
    broker = start_broker(max_connections=1, allowed_uids=[NOBODY],
                          endpoint=f"ipc://@pbtest-{uuid.uuid4().hex[:12]}")
    served_r, served_w = os.pipe()
    revoked_r, revoked_w = os.pipe()

    def served_then_revoked() -> bytes:
        c = client.Client(broker.endpoint, timeout=2)
        outcomes = [str(c.execute("SELECT 1").rows)]
        os.write(served_w, b"1")
        os.read(revoked_r, 1)
        try:
            outcomes.append(str(c.execute("SELECT 2").rows))
        except client.Error as exc:
            outcomes.append(type(exc).__name__)
        return " ".join(outcomes).encode()

    outcome: list[bytes] = []
    child = threading.Thread(target=lambda: outcome.append(run_as(NOBODY, served_then_revoked)))
    child.start()
    assert os.read(served_r, 1) == b"1"
    config = broker.config.read_text()
    assert f"allowed_uids = [{NOBODY}]" in config
    broker.config.write_text(config.replace(f"allowed_uids = [{NOBODY}]", "allowed_uids = []"))
    broker.proc.send_signal(signal.SIGHUP)
    assert wait_until(lambda: "applied allowed_uids" in broker.log(), 5), broker.log()[-500:]
    os.write(revoked_w, b"1")
    child.join()
    assert outcome == [b"[(1,)] BrokerUnavailable"]
    assert client.Client(broker.endpoint, timeout=2).execute("SELECT 3").rows == [(3,)]


def test_silent_connections_from_another_user_do_not_use_up_max_clients(start_broker):
    # Counted once accepted, connections that never greet would hold their
    # places for the whole handshake timeout; another user's are shut at once.
    import socket
    import uuid

    if os.geteuid() != 0:
        pytest.skip("acting as another user needs root (CI runs as root)")
    broker = start_broker(max_connections=1, max_clients=16,
                          endpoint=f"ipc://@pbtest-{uuid.uuid4().hex[:12]}")
    ready_r, ready_w = os.pipe()

    def hold_silent_connections() -> bytes:
        held = []
        for _ in range(40):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect("\0" + broker.endpoint[len("ipc://@"):])
            held.append(s)
        os.write(ready_w, b"1")
        time.sleep(4)
        return b""

    holder = threading.Thread(target=lambda: run_as(NOBODY, hold_silent_connections))
    holder.start()
    assert os.read(ready_r, 1) == b"1"
    time.sleep(0.5)
    c = client.Client(broker.endpoint, timeout=3)
    try:
        assert c.execute("SELECT 1").rows == [(1,)]
    finally:
        c.close()
        holder.join()
    stats = broker.stats()
    assert stats["clients_denied"] >= 40 and stats["clients_refused"] == 0, stats


def test_allowed_uids_admits_another_local_user(start_broker):
    import os
    import uuid

    if os.geteuid() != 0:
        pytest.skip("acting as another user needs root (CI runs as root)")
    broker = start_broker(max_connections=1, allowed_uids=[NOBODY],
                          endpoint=f"ipc://@pbtest-{uuid.uuid4().hex[:12]}")
    assert _ping_as(NOBODY, broker.endpoint)
    assert broker.stats()["messages_rejected"] == 0


def test_a_revoked_curve_key_is_refused_after_sighup(start_broker, certificates):
    import signal
    import time

    keys, allowed = certificates
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    worker = {"curve_server_key": str(keys / "broker.key"),
              "curve_client_cert": str(keys / "worker.key_secret")}
    broker = start_broker(
        endpoint=endpoint, max_connections=1, client_options=worker,
        curve_secret_key_file=str(keys / "broker.key_secret"),
        curve_allowed_clients=str(allowed))
    assert broker.client.execute("SELECT 1").rows == [(1,)]
    (allowed / "worker.key").unlink()
    (allowed / "garbage.key").write_text("not a certificate\n")  # must not keep the old list
    broker.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 5
    while "CURVE allow-list reloaded" not in broker.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert broker.proc.poll() is None  # SIGHUP reloads; it does not kill
    # Its connection still open (heartbeats keep it up) is cut off too.
    with pytest.raises(client.BrokerUnavailable):
        broker.client.execute("SELECT 2", timeout=1)
    after = client.Client(endpoint, timeout=1, **worker)
    with pytest.raises(client.BrokerUnavailable):
        after.execute("SELECT 2")
    after.close()


def test_strangers_curve_keys_cost_a_log_line_a_while(start_broker, certificates):
    # A hostile peer needs no key of its own: a fresh pair per connection.
    keys, allowed = certificates
    broker = start_broker(
        endpoint=f"tcp://127.0.0.1:{free_port()}", max_connections=1, log_level="INFO",
        client_options={"curve_server_key": str(keys / "broker.key"),
                        "curve_client_cert": str(keys / "worker.key_secret")},
        curve_secret_key_file=str(keys / "broker.key_secret"),
        curve_allowed_clients=str(allowed))
    before = os.path.getsize(broker.log_path)
    server = zmq.auth.load_certificate(str(keys / "broker.key"))[0]
    ctx = zmq.Context()
    sockets = []
    for _ in range(300):
        s = ctx.socket(zmq.DEALER)
        s.curve_serverkey = server
        s.curve_publickey, s.curve_secretkey = zmq.curve_keypair()
        s.connect(broker.endpoint)
        sockets.append(s)
    assert wait_until(lambda: broker.stats()["clients_denied"] >= 300, 10)
    for s in sockets:
        s.close(linger=0)
    ctx.term()
    grown = os.path.getsize(broker.log_path) - before
    print(f"\n[stranger keys] 300 denied: log +{grown} bytes")
    assert grown < 2000  # before: a line each, 42 kB
    assert broker.client.execute("SELECT 1").rows == [(1,)]


def test_a_symlinked_socket_directory_is_refused(tmp_path):
    import os

    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link = f"/tmp/pb-link-{os.getpid()}"
    os.symlink(real, link)
    try:
        out = subprocess.run([sys.executable, "-m", "broker.cli", "serve", "--dsn", "dbname=x",
                              "--endpoint", f"ipc://{link}/b.sock"],
                             capture_output=True, text=True, timeout=30, cwd=REPO)
    finally:
        os.unlink(link)
    assert out.returncode == 2
    assert "symbolic link" in out.stderr


@pytest.mark.parametrize("password", ["Se\\cr3t", 'Pa"ss9', "Qu'o\\te7"])
def test_config_output_masks_passwords_with_escapes(dsn, password):
    # Shown escaped (a TOML string here; a JSON log line or a repr() elsewhere),
    # a password must be masked in that spelling too.
    quoted = "'" + password.replace("\\", "\\\\").replace("'", "\\'") + "'"
    result = subprocess.run([sys.executable, "-m", "broker.cli", "config"],
                            capture_output=True, text=True, cwd=REPO,
                            env={**os.environ, "POOLBROKER_DSN": f"{dsn} password={quoted}"})
    assert result.returncode == 0, result.stderr
    assert "********" in result.stdout
    assert not any(piece in result.stdout for piece in ("cr3t", "ss9", "te7")), result.stdout
