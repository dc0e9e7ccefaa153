"""Clients survive fork: children never touch their parent's sockets."""

from __future__ import annotations

import os
import threading

import client
from conftest import run_in_processes


def _use_inherited(c: client.Client) -> list:
    results = []
    threads = [threading.Thread(target=lambda i=i: results.append(
        c.execute("SELECT %s::int", [i]).rows[0][0])) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # A grandchild too.
    pid = os.fork()
    if pid == 0:
        code = 0 if c.execute("SELECT 42").rows == [(42,)] else 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    results.append(os.waitstatus_to_exitcode(status))
    return sorted(results)


def test_client_used_before_fork_works_in_children(broker):
    c = broker.client
    assert c.execute("SELECT 1").rows == [(1,)]  # the parent's socket exists
    results = run_in_processes(_use_inherited, [(c,)] * 4)
    assert results == [[0, 0, 1, 2]] * 4
    assert c.execute("SELECT 2").rows == [(2,)]  # and the parent's still works
