"""gunicorn integration: ``post_fork = client.gunicorn.post_fork``.

With ``preload_app = True`` the application (and any client it touched)
was imported in the arbiter; the hook makes sure each worker starts with
no socket or ZeroMQ context from its parent.  Sockets are then created
per worker thread on first use, so sync and gthread workers both work.
"""

from __future__ import annotations

from typing import Any

from ._client import _after_fork_in_child


def post_fork(server: Any, worker: Any) -> None:
    # Keeps the endpoint and timeout configured at import (preload_app),
    # drops every socket and context inherited from the arbiter.
    _after_fork_in_child()
    server.log.debug("poolbroker client reset in worker %s", worker.pid)
