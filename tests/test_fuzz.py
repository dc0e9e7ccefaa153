"""Property-based fuzzing of the wire protocol against a live broker.

At least 100,000 messages, generated and then mutated: garbage bytes, wrong shapes and types,
huge declared lengths, deep nesting, bad ext payloads, unknown operations,
forged session ids and another client's real transaction id.  Afterwards
the broker must be alive, within its cap, and correct for a normal client;
no message may have hit a broker bug (an InternalError reply).
"""

from __future__ import annotations

import os
import time

import msgpack
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from client import protocol
from conftest import run_in_processes

# The adversarial byte strings make Hypothesis's reprs of strategies large.
pytestmark = pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisWarning")

CAP = 4
MESSAGES_PER_EXAMPLE = 50
# 52,000 messages in make test (about 30 s); POOLBROKER_FUZZ_EXAMPLES=520 for 104,000.
EXAMPLES = int(os.environ.get("POOLBROKER_FUZZ_EXAMPLES", "260"))

ADVERSARIAL = [
    b"", b"\xc1", b"\x90", b"\x94\xc0\xc0\xc0\xc0",
    b"\xdb\xff\xff\xff\xff",  # str 32 declaring 4 GiB
    b"\xc6\xff\xff\xff\xffabc",  # bin 32 declaring 4 GiB
    b"\xdd\xff\xff\xff\xff",  # array 32 declaring 4 billion items
    b"\xdf\xff\xff\xff\xff",  # map 32 declaring 4 billion pairs
    b"\x91" * 4000 + b"\xc0",  # deep nesting
    b"\x81" * 2000 + b"\xc0",
    b"\xc9\xff\xff\xff\xff\x04",  # ext 32 declaring 4 GiB
    b"\xd4\x63\x00",  # unknown ext type
]

_scalars = (st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats()
            | st.text(max_size=20) | st.binary(max_size=20))
_exts = st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=24))
values = st.recursive(
    _scalars | _exts,
    lambda children: (st.lists(children, max_size=4)
                      | st.dictionaries(st.text(max_size=5) | st.integers(-1000, 1000), children, max_size=4)),
    max_leaves=12)


def _pack(value: object) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


SQL = st.sampled_from([
    "SELECT 1", "SELECT %s", "SELECT %(a)s", "SELECT $1", "SELECT %s, %s", "BEGIN", "COMMIT",
    "SET search_path = x", "LISTEN x", "SELECT 1; SELECT 2", ";", "", "SELECT pg_sleep(0)",
    "SELECT 'x' || %s", "SELECT %s::int", "SELECT * FROM pg_class LIMIT %s",
]) | st.text(max_size=40)
PARAMS = st.none() | st.lists(values, max_size=3) | st.dictionaries(st.text(max_size=3), values,
                                                                     max_size=3) | values


def _messages(stolen_session: bytes) -> st.SearchStrategy[list[list[bytes]]]:
    sessions = (st.none() | st.binary(max_size=32) | st.just(stolen_session)
                | st.binary(min_size=16, max_size=16) | values)
    good_shape_header = st.builds(
        lambda rid, op, t, s: _pack([rid, op, t, s]),
        st.integers(-(2**63), 2**63 - 1) | values,
        st.integers(-3, 12) | values,
        st.none() | st.integers(-5, 10**12) | values,
        sessions)
    header = (good_shape_header | st.binary(max_size=64) | values.map(_pack)
              | st.sampled_from(ADVERSARIAL))
    statement = st.builds(lambda sql, params: _pack([sql, params]), SQL, PARAMS)
    batch = st.lists(st.tuples(SQL, PARAMS).map(list), max_size=3).map(lambda b: _pack([b]))
    body = (statement | batch | st.binary(max_size=64) | values.map(_pack)
            | st.sampled_from(ADVERSARIAL))
    message = (st.tuples(header, body).map(list)
               | st.lists(st.binary(max_size=16) | header, min_size=1, max_size=4))
    return st.lists(message, min_size=MESSAGES_PER_EXAMPLE, max_size=MESSAGES_PER_EXAMPLE)


def _mutants(frames: list[bytes]) -> list[list[bytes]]:
    """The message plus cheap variants of it: truncated and bit-flipped frames.

    Generating a message costs far more than sending one; mutating what was
    generated multiplies the messages per example."""
    last = frames[-1]
    middle = len(last) // 2
    flipped = last[:middle] + bytes([last[middle] ^ 0x5A]) + last[middle + 1:] if last else b"\x00"
    return [frames, [*frames[:-1], last[:middle]], [*frames[:-1], flipped],
            [*frames[:-1], last + last]]


def _drain(socket: zmq.Socket, kinds: dict[str, int], wait_ms: int = 0) -> None:
    while socket.poll(wait_ms):
        reply = protocol.unpack(socket.recv())
        kind = reply[2]["kind"] if reply[1] == protocol.STATUS_ERROR else "ok"
        kinds[kind] = kinds.get(kind, 0) + 1
        wait_ms = 0


def _fuzz(endpoint: str, stolen: bytes) -> tuple[int, dict[str, int]]:
    """Runs in a child process, so that transactions the fuzzer opens end
    with it (the broker rolls back a dead owner's transactions)."""
    ctx = zmq.Context()
    fuzzer = ctx.socket(zmq.DEALER)
    fuzzer.setsockopt(zmq.LINGER, 0)
    fuzzer.connect(endpoint)
    sent = 0
    kinds: dict[str, int] = {}

    @settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(_messages(stolen))
    def fuzz(messages: list[list[bytes]]) -> None:
        nonlocal sent
        for generated in messages:
            for frames in _mutants(generated):
                fuzzer.send_multipart(frames)
                sent += 1
        _drain(fuzzer, kinds)

    try:
        fuzz()
        _drain(fuzzer, kinds, wait_ms=2000)
    finally:
        fuzzer.close()
        ctx.term()
    return sent, kinds


def test_fuzzed_messages_leave_the_broker_alive_and_correct(start_broker, admin, figures):
    broker = start_broker(max_connections=CAP, log_level="INFO", pool_timeout=5,
                          max_client_requests=1000, idle_transaction_timeout=600)
    victim = broker.client
    # A real transaction of another client, whose id the fuzzer also sends.
    transaction = victim.transaction()
    transaction.__enter__()
    transaction.execute("SELECT 1")
    [(sent, kinds)] = run_in_processes(_fuzz, [(broker.endpoint, transaction._session)],
                                       timeout=600)
    # The fuzzer's own transactions are rolled back, and the backlog it left
    # queued in the socket (up to RCVHWM) dropped, once the broker notices
    # it died: wait until only this test's stats requests arrive.
    deadline = time.monotonic() + 30
    stats = broker.stats()
    while time.monotonic() < deadline:
        time.sleep(0.5)
        before, stats = stats, broker.stats()
        if (stats["requests_num"] == before["requests_num"] + 1
                and stats["sessions_active"] == 1 and stats["requests_waiting"] == 0):
            break
    figures(f"[fuzz] {sent:,} messages; replies by kind: {dict(sorted(kinds.items()))}; "
            f"{stats['messages_malformed']:,} counted malformed")
    assert sent >= 0.95 * 4 * EXAMPLES * MESSAGES_PER_EXAMPLE  # four forms of each message
    assert broker.proc.poll() is None
    assert kinds.get("InternalError", 0) == 0
    assert stats["sessions_active"] == 1
    # The stolen transaction id got the fuzzer nothing; the owner carries on.
    assert transaction.execute("SELECT 2").rows == [(2,)]
    transaction.__exit__(None, None, None)
    assert victim.execute("SELECT %s::int", [41]).rows == [(41,)]
    assert stats["pool_size"] <= CAP
    assert broker.server_connections(admin) <= CAP
