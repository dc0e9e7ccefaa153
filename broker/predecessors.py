"""How a broker marks its server connections, so that its successor can
tell a dead predecessor's connections from anyone else's.

``application_name`` is the configured name followed by ``~<where>.<pid>``,
``<where>`` a hash of the host and the endpoint: brokers of other
endpoints or hosts, even with the same application_name, differ in it.
"""

from __future__ import annotations

import hashlib
import socket

MARK = "~"
"""Separates the configured application_name from the broker's mark."""
MARK_BYTES = 1 + 8 + 1 + 7
"""``~``, 8 hex digits, ``.``, a pid (pid_max is at most 2**22: 7 digits)."""


def marked_prefix(application_name: str, endpoint: str) -> str:
    """What every connection of every broker of ``endpoint`` on this host,
    with this ``application_name``, starts with."""
    where = hashlib.sha256(f"{socket.gethostname()}\0{endpoint}".encode()).hexdigest()[:8]
    return f"{application_name}{MARK}{where}."
