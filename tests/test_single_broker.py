"""One broker per endpoint: a second broker on a live endpoint would be a
second cap."""

from __future__ import annotations

import os
import socket
import uuid
from typing import Any

import pytest

import client


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _endpoint(kind: str) -> dict[str, Any]:
    if kind == "ipc":
        return {}  # BrokerProcess's own ipc path
    if kind == "abstract":
        return {"endpoint": f"ipc://@pb-{uuid.uuid4().hex[:12]}"}
    return {"endpoint": f"tcp://127.0.0.1:{_free_port()}", "insecure_tcp": True}


@pytest.mark.parametrize("kind", ["ipc", "abstract", "tcp"])
def test_second_broker_on_a_live_endpoint_refuses_to_start(start_broker, kind):
    first = start_broker(max_connections=2, **_endpoint(kind))
    second = start_broker(wait=False, endpoint=first.endpoint, max_connections=2,
                          insecure_tcp=kind == "tcp")
    status = second.proc.wait(timeout=20)
    log = second.log()
    assert status != 0, log
    assert "Traceback" not in log
    if kind == "tcp":
        assert f"{first.endpoint} is already in use" in log
    else:
        assert f"another broker is serving {first.endpoint} (pid {first.proc.pid})" in log
    # The first never noticed.
    assert first.proc.poll() is None
    assert first.client.execute("SELECT 1").rows == [(1,)]


def test_stale_socket_of_a_killed_broker_is_replaced(start_broker):
    broker = start_broker(max_connections=2)
    path = broker.endpoint[len("ipc://"):]
    broker.proc.kill()
    broker.proc.wait()
    assert os.path.exists(path)  # SIGKILL leaves the socket file behind
    broker.start()
    fresh = client.Client(broker.endpoint, timeout=10)
    try:
        assert fresh.execute("SELECT 1").rows == [(1,)]
    finally:
        fresh.close()
    assert "replacing" in broker.log() and "a broker that is gone" in broker.log()
