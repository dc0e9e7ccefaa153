"""The Flask example (etc/flaskapp) end to end, as `make run-flask` runs it:
supervisord from etc/flaskapp/supervisord.conf, a broker capped at 4,
gunicorn from etc/gunicorn.conf.py (gthread, 4 workers x 4 threads), real
HTTP from 64 connections.  Then the same app and the same load with the
psycopg dialect and SQLAlchemy's default QueuePool, straight to PostgreSQL,
to see how many server connections that opens."""

from __future__ import annotations

import configparser
import contextlib
import http.client
import json
import math
import os
import threading
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import psycopg
import pytest

import client
from broker.embedded import Cluster
from conftest import BIN, REPO, ConnectionSampler, Supervisord, free_port, wait_until

FLASKAPP = REPO / "etc" / "flaskapp"
CAP = 4  # etc/flaskapp/poolbroker.toml
WORKERS = 4  # etc/gunicorn.conf.py's defaults
CONCURRENCY = 64
PER_CONNECTION = 32  # 64 x 32 = 2,048 requests
PER_PAGE = 3


class FlaskStack(Supervisord):
    """etc/flaskapp/supervisord.conf as shipped, but for its runtime files, a
    test endpoint and an application_name of our own on the broker."""

    def __init__(self, dsn: str, database_url: str | None = None) -> None:
        self.port = free_port()
        self.broker_application_name = f"pbtest-flask-{uuid.uuid4().hex[:8]}"
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("GUNICORN_", "POOLBROKER_", "LIBRARY_"))}
        # The shipped commands (`poolbroker`, `gunicorn`) are found on PATH, as
        # under `make run-flask`; gunicorn.conf.py's defaults (gthread 4x4,
        # preload) apply, nothing from the caller's environment.
        env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", POOLBROKER_DSN=dsn,
                   GUNICORN_BIND=f"127.0.0.1:{self.port}")
        if database_url is not None:
            env["LIBRARY_DATABASE_URL"] = database_url
        super().__init__(FLASKAPP / "supervisord.conf", env, edit=self._edit)

    def _edit(self, parser: configparser.RawConfigParser, d: str) -> None:
        self.endpoint = f"ipc://{d}/b.sock"
        # Both programs inherit it: the broker binds it, the app's
        # postgresql+poolbroker:// (no endpoint in the URL) finds it there.
        parser["supervisord"]["environment"] = f'POOLBROKER_ENDPOINT="{self.endpoint}"'
        shipped = FLASKAPP / "poolbroker.toml"
        toml = Path(d, "poolbroker.toml")
        toml.write_text(shipped.read_text() +
                        f'application_name = "{self.broker_application_name}"\n')
        program = parser["program:poolbroker"]
        assert f"--config {shipped}" in program["command"]
        program["command"] = program["command"].replace(f"--config {shipped}", f"--config {toml}")

    def wait_ready(self, timeout: float = 60.0) -> None:
        def answers() -> bool:
            try:
                status, _ = request(self.port, "GET", "/books?page=1&per_page=1")
                return status == 200
            except OSError:
                return False

        if not wait_until(answers, timeout, interval=0.2):
            raise AssertionError("the app did not answer:\n" + self.log("flaskapp")
                                 + self.log("poolbroker"))

    def gunicorn_workers(self) -> int:
        """How many workers gunicorn's arbiter has forked (its child processes)."""
        arbiter = self.pid("flaskapp")
        try:
            return len(Path(f"/proc/{arbiter}/task/{arbiter}/children").read_text().split())
        except OSError:  # not running
            return 0


def request(port: int, method: str, path: str, body: Any = None,
            conn: http.client.HTTPConnection | None = None) -> tuple[int, Any]:
    """(status, decoded JSON body) of one request, on ``conn`` if given (kept alive)."""
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        headers = {}
        payload = None
        if body is not None:
            payload = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        conn.request(method, path, body=payload, headers=headers)
        response = conn.getresponse()
        data = response.read()
        try:
            return response.status, json.loads(data)
        except ValueError:
            return response.status, data.decode(errors="replace")
    finally:
        if own:
            conn.close()


@dataclass
class Load:
    requests: int = 0
    statuses: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    titles: dict[str, list[str]] = field(default_factory=dict)  # author name -> titles


def drive(port: int, tag: str, concurrency: int = CONCURRENCY,
          per_connection: int = PER_CONNECTION) -> Load:
    """Each connection owns one author and checks every answer against what
    it wrote: only it writes that author, so every body is predictable
    whatever the other connections do."""
    load = Load()
    lock = threading.Lock()

    def run(c: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        name = f"{tag}-author-{c}"
        titles: list[str] = []
        author_id = None

        def call(method: str, path: str, body: Any, status: int, check: Any) -> Any:
            got_status, got = request(port, method, path, body, conn)
            with lock:
                load.requests += 1
                load.statuses[got_status] += 1
            if got_status != status or not check(got):
                raise AssertionError(f"{method} {path} {body!r}: {got_status} {got!r}")
            return got

        try:
            created = call("POST", "/authors", {"name": name}, 201,
                           lambda b: b["name"] == name and b["book_count"] == 0)
            author_id = created["id"]
            # The unique constraint: IntegrityError, rolled back, 409.
            call("POST", "/authors", {"name": name}, 409,
                 lambda b: b["error"] == "author exists"
                 and b["constraint"] == "library_authors_name_key")
            for i in range(per_connection - 2):
                kind = i % 4
                if kind == 0:  # a write in a transaction: two books and the count
                    batch = [f"t{len(titles)}", f"t{len(titles) + 1}"]
                    call("POST", f"/authors/{author_id}/books", {"titles": batch}, 201,
                         lambda b: b["added"] == batch
                         and b["book_count"] == len(titles) + 2)
                    titles += batch
                elif kind == 1:  # a duplicate in a batch: nothing of it is written
                    batch = [f"x{i}", titles[0]]
                    call("POST", f"/authors/{author_id}/books", {"titles": batch}, 409,
                         lambda b: b["constraint"] == "library_books_author_title_key")
                elif kind == 2:  # the relationship, and the count the writes kept
                    call("GET", f"/authors/{author_id}", None, 200,
                         lambda b: b == {"id": author_id, "name": name,
                                         "book_count": len(titles), "books": titles})
                else:  # pagination, one page past the end now and then
                    pages = math.ceil(len(titles) / PER_PAGE)
                    page = (i // 4) % (pages + 1) + 1
                    expected = titles[(page - 1) * PER_PAGE:page * PER_PAGE]
                    call("GET", f"/authors/{author_id}/books?page={page}&per_page={PER_PAGE}",
                         None, 200,
                         lambda b: [item["title"] for item in b["items"]] == expected
                         and b["total"] == len(titles) and b["pages"] == pages
                         and b["page"] == page)
        except Exception as exc:  # any failure counts against the run
            with lock:
                load.failures.append(f"{name}: {exc!r}")
        finally:
            conn.close()
            with lock:
                load.titles[name] = titles

    threads = [threading.Thread(target=run, args=(c,)) for c in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return load


def check_totals(port: int, admin: psycopg.Connection, load: Load) -> None:
    """The global list pages over every book once; the database agrees with
    what was acknowledged: every batch whole or absent, counts exact."""
    total = sum(len(t) for t in load.titles.values())
    status, first = request(port, "GET", "/books?page=1&per_page=50")
    assert status == 200
    assert first["total"] == total and first["pages"] == math.ceil(total / 50)
    ids = [item["id"] for item in first["items"]]
    assert len(ids) == 50 and ids == sorted(ids)
    status, last = request(port, "GET", f"/books?page={first['pages']}&per_page=50")
    assert status == 200 and len(last["items"]) == total - 50 * (first["pages"] - 1)
    assert {(item["author"], item["title"]) for item in last["items"]} <= {
        (name, title) for name, titles in load.titles.items() for title in titles}

    rows = admin.execute(
        "SELECT a.name, a.book_count, array_remove(array_agg(b.title ORDER BY b.id), NULL) "
        "FROM library_authors a LEFT JOIN library_books b ON b.author_id = a.id "
        "GROUP BY a.id").fetchall()
    assert {name: (count, titles) for name, count, titles in rows} == {
        name: (len(titles), titles) for name, titles in load.titles.items()}


@pytest.fixture
def fresh_schema(admin: psycopg.Connection) -> Iterator[None]:
    """The app creates its tables at start: each run begins without them."""
    admin.execute("DROP TABLE IF EXISTS library_books, library_authors")
    yield
    admin.execute("DROP TABLE IF EXISTS library_books, library_authors")


@contextlib.contextmanager
def running(stack: FlaskStack) -> Iterator[FlaskStack]:
    """The stack once the app answers; its logs shown if the test fails."""
    try:
        stack.wait_ready()
        # The first worker up answers; the others may still be booting.
        assert wait_until(lambda: stack.gunicorn_workers() == WORKERS, 30, interval=0.1)
        yield stack
    except BaseException:
        print("--- flaskapp.log\n" + stack.log("flaskapp")[-5000:])
        print("--- poolbroker.log\n" + stack.log("poolbroker")[-5000:])
        raise
    finally:
        stack.close()


def report(figures: Callable[[str], None], label: str, load: Load,
           sampler: ConnectionSampler) -> None:
    figures(f"[flask {label}] {load.requests} requests from {CONCURRENCY} connections "
            f"({dict(sorted(load.statuses.items()))}), {len(load.failures)} failed; "
            f"peak server connections {sampler.maximum} ({sampler.samples} samples)")


def test_flask_app_under_gunicorn_and_supervisord_holds_the_brokers_cap(
        dsn: str, admin: psycopg.Connection, fresh_schema: None,
        figures: Callable[[str], None]) -> None:
    with running(FlaskStack(dsn)) as stack:
        broker = client.Client(stack.endpoint, timeout=10)
        try:
            assert broker.stats()["pool_max"] == CAP
        finally:
            broker.close()
        with ConnectionSampler(dsn, stack.broker_application_name) as sampler:
            load = drive(stack.port, "broker")
        report(figures, f"postgresql+poolbroker, broker cap {CAP}", load, sampler)
        assert load.failures == []
        assert load.requests == CONCURRENCY * PER_CONNECTION
        assert 0 < sampler.maximum <= CAP
        check_totals(stack.port, admin, load)


def test_same_app_on_psycopg_and_queuepool_opens_what_it_opens(
        pg: Cluster, dsn: str, admin: psycopg.Connection, fresh_schema: None,
        figures: Callable[[str], None]) -> None:
    """No cap to assert: the figure the broker's replaces, measured."""
    application_name = f"pbtest-qp-{uuid.uuid4().hex[:8]}"
    url = (f"postgresql+psycopg:///postgres?host={pg.socket_dir}&port={pg.port}"
           f"&user=postgres&application_name={application_name}")
    with running(FlaskStack(dsn, url)) as stack:
        with ConnectionSampler(dsn, application_name) as sampler:
            load = drive(stack.port, "queuepool")
        report(figures, "postgresql+psycopg, QueuePool", load, sampler)
        assert load.failures == []
        assert load.requests == CONCURRENCY * PER_CONNECTION
        assert sampler.maximum > 0
        check_totals(stack.port, admin, load)
