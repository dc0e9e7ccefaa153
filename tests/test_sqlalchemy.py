"""The SQLAlchemy dialect ``postgresql+poolbroker`` against a real broker and
PostgreSQL: Core and ORM, errors, isolation, streaming, types, liveness and
the cap."""

from __future__ import annotations

import datetime as dt
import threading
import uuid
from decimal import Decimal

import pytest
import sqlalchemy as sa
from sqlalchemy import exc, orm, pool
from sqlalchemy.dialects import postgresql as pg_types

from client import dbapi
from client.sqlalchemy import PoolbrokerDialect
from conftest import ConnectionSampler


def engine_for(broker, **kwargs) -> sa.Engine:
    return sa.create_engine(f"postgresql+poolbroker://?endpoint={broker.endpoint}&timeout=15",
                            **kwargs)


@pytest.fixture
def engine(broker):
    eng = engine_for(broker)
    yield eng
    eng.dispose()


class Base(orm.DeclarativeBase):
    pass


class Author(Base):
    __tablename__ = "sa_authors"
    id: orm.Mapped[int] = orm.mapped_column(primary_key=True)
    name: orm.Mapped[str] = orm.mapped_column(sa.String(50), unique=True)
    books: orm.Mapped[list[Book]] = orm.relationship(back_populates="author",
                                                     order_by="Book.id")


class Book(Base):
    __tablename__ = "sa_books"
    id: orm.Mapped[int] = orm.mapped_column(primary_key=True)
    title: orm.Mapped[str]
    author_id: orm.Mapped[int] = orm.mapped_column(sa.ForeignKey("sa_authors.id"))
    author: orm.Mapped[Author] = orm.relationship(back_populates="books")


@pytest.fixture
def schema(engine):
    """DDL runs in a transaction: the broker runs it pinned, like any other."""
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    yield
    Base.metadata.drop_all(engine)


# The engine

def test_the_entry_point_finds_the_dialect_and_nullpool_is_its_default(broker, engine):
    assert isinstance(engine.dialect, PoolbrokerDialect)
    assert engine.dialect.dbapi is dbapi
    assert isinstance(engine.pool, pool.NullPool)
    assert engine.dialect.supports_statement_cache and engine.dialect.use_insertmanyvalues
    with engine.connect() as conn:
        assert conn.scalar(sa.text("SELECT 1")) == 1
        assert engine.dialect.server_version_info >= (10,)


def test_queuepool_sizing_arguments_are_accepted_and_mean_nothing(broker):
    """The one-line change: an engine made for QueuePool keeps its arguments."""
    eng = engine_for(broker, pool_size=5, max_overflow=10, pool_timeout=30, pool_recycle=3600)
    assert isinstance(eng.pool, pool.NullPool)
    with eng.connect() as conn:
        assert conn.scalar(sa.text("SELECT 1")) == 1


def test_the_endpoint_comes_from_the_environment_without_a_url_parameter(broker, monkeypatch):
    monkeypatch.setenv("POOLBROKER_ENDPOINT", broker.endpoint)
    eng = sa.create_engine("postgresql+poolbroker://ignored@host")
    with eng.connect() as conn:
        assert conn.scalar(sa.text("SELECT 41 + 1")) == 42


def test_unknown_url_parameters_are_refused():
    with pytest.raises(ValueError, match="sslmode"):
        sa.create_engine("postgresql+poolbroker://?sslmode=require").connect()


# Core and ORM

def test_core_crud_and_insertmanyvalues_with_returning(engine, schema):
    authors = Author.__table__
    with engine.begin() as conn:
        rows = conn.execute(authors.insert().returning(authors.c.id, authors.c.name),
                            [{"id": i, "name": f"a{i}"} for i in range(1, 251)]).all()
        assert [tuple(r) for r in rows] == [(i, f"a{i}") for i in range(1, 251)]
        updated = conn.execute(authors.update().where(authors.c.id <= 10)
                               .values(name=authors.c.name + "!"))
        assert updated.rowcount == 10
        conn.execute(authors.delete().where(authors.c.id > 200))
    with engine.connect() as conn:
        assert conn.scalar(sa.select(sa.func.count()).select_from(authors)) == 200
        assert conn.scalar(sa.select(authors.c.name).where(authors.c.id == 3)) == "a3!"


def test_executemany_without_returning_counts_every_row(engine, schema):
    authors = Author.__table__
    with engine.begin() as conn:
        conn.execute(authors.insert(), [{"id": i, "name": f"b{i}"} for i in range(1, 21)])
        result = conn.execute(authors.update().where(authors.c.id == sa.bindparam("pk"))
                              .values(name=sa.bindparam("n")),
                              [{"pk": i, "n": f"c{i}"} for i in range(1, 6)])
        assert result.rowcount == 5


def test_orm_crud_with_a_relationship(engine, schema):
    with orm.Session(engine) as session, session.begin():
        session.add(Author(id=1, name="ann", books=[Book(id=1, title="one"),
                                                     Book(id=2, title="two")]))
    with orm.Session(engine) as session:
        ann = session.get(Author, 1)
        assert [b.title for b in ann.books] == ["one", "two"]
        ann.books[0].title = "uno"
        session.delete(ann.books[1])
        session.commit()
        loaded = session.scalars(sa.select(Book).options(orm.joinedload(Book.author))).all()
        assert [(b.title, b.author.name) for b in loaded] == [("uno", "ann")]


def test_a_unique_violation_is_an_integrity_error_and_the_session_rolls_back(engine, schema):
    with orm.Session(engine) as session:
        session.add(Author(id=1, name="ann"))
        session.commit()
        session.add(Author(id=2, name="ann"))
        with pytest.raises(exc.IntegrityError) as raised:
            session.commit()
        assert isinstance(raised.value.orig, dbapi.IntegrityError)
        assert raised.value.orig.sqlstate == "23505"
        session.rollback()
        session.add(Author(id=2, name="bob"))
        session.commit()
        assert session.scalars(sa.select(Author.name).order_by(Author.id)).all() == ["ann", "bob"]


def test_a_failed_nested_transaction_rolls_back_to_its_savepoint(engine, schema):
    """begin_nested(): the outer transaction goes on after the inner one fails."""
    with orm.Session(engine) as session:
        session.add(Author(id=1, name="ann"))
        session.flush()
        with pytest.raises(exc.IntegrityError):
            with session.begin_nested():
                session.add(Author(id=2, name="ann"))
        session.add(Author(id=3, name="cy"))
        session.commit()
        assert session.scalars(sa.select(Author.name).order_by(Author.id)).all() == ["ann", "cy"]


# Isolation, read only, autocommit

@pytest.mark.parametrize("level", ["READ COMMITTED", "REPEATABLE READ", "SERIALIZABLE",
                                   "READ UNCOMMITTED"])
def test_isolation_levels_apply_to_the_transaction(engine, level):
    with engine.connect().execution_options(isolation_level=level) as conn:
        assert conn.get_isolation_level() == level
        assert conn.scalar(sa.text("SHOW transaction_isolation")).upper() == level
    with engine.connect() as conn:  # the level does not outlive the checkout
        assert conn.scalar(sa.text("SHOW transaction_isolation")) == "read committed"
        assert engine.dialect.get_default_isolation_level(conn.connection.dbapi_connection) \
            == "READ COMMITTED"


def test_an_engine_wide_isolation_level(broker):
    eng = engine_for(broker, isolation_level="SERIALIZABLE")
    with eng.connect() as conn:
        assert conn.scalar(sa.text("SHOW transaction_isolation")) == "serializable"
    autocommit = engine_for(broker, isolation_level="AUTOCOMMIT")
    with autocommit.connect() as conn:
        assert conn.connection.dbapi_connection.autocommit
        assert conn.get_isolation_level() == "AUTOCOMMIT"
        assert autocommit.dialect.default_isolation_level == "READ COMMITTED"


def test_autocommit_takes_the_shared_path_and_commits_each_statement(engine, schema, admin):
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        assert conn.connection.dbapi_connection.autocommit
        conn.execute(sa.insert(Author.__table__).values(id=1, name="ann"))
        # Visible from outside before any commit: it ran on its own.
        assert admin.execute("SELECT name FROM sa_authors").fetchall() == [("ann",)]
        conn.rollback()  # nothing to roll back
    assert admin.execute("SELECT count(*) FROM sa_authors").fetchone()[0] == 1


def test_read_only_transactions_refuse_writes(engine, schema):
    with engine.connect().execution_options(postgresql_readonly=True) as conn:
        with pytest.raises(exc.InternalError, match="read-only"):
            conn.execute(sa.insert(Author.__table__).values(id=1, name="ann"))


# Streaming

def test_stream_results_and_yield_per_use_a_named_cursor(engine, schema):
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO sa_authors SELECT g, 'n' || g "
                             "FROM generate_series(1, 1000) g"))
    with engine.connect() as conn:
        result = conn.execution_options(stream_results=True, max_row_buffer=50).execute(
            sa.select(Author.__table__).order_by(Author.id))
        assert isinstance(result.context.cursor, dbapi.ServerCursor)
        assert [row.id for row in result] == list(range(1, 1001))
    with orm.Session(engine) as session:
        seen = 0
        for partition in session.scalars(sa.select(Author).order_by(Author.id)
                                         .execution_options(yield_per=100)).partitions():
            assert len(partition) == 100
            seen += len(partition)
        assert seen == 1000


# Types

def test_types_round_trip_as_with_psycopg(engine):
    table = sa.Table(
        "sa_types", sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("j", sa.JSON), sa.Column("jb", pg_types.JSONB),
        sa.Column("u", sa.Uuid), sa.Column("n", sa.Numeric(20, 6)),
        sa.Column("f", sa.Float), sa.Column("ints", pg_types.ARRAY(sa.Integer)),
        sa.Column("texts", pg_types.ARRAY(sa.Text)),
        sa.Column("ts", sa.DateTime(timezone=True)), sa.Column("d", sa.Date),
        sa.Column("b", sa.LargeBinary), sa.Column("flag", sa.Boolean),
    )
    table.drop(engine, checkfirst=True)
    table.create(engine)
    values = {
        "id": 1, "j": {"a": [1, 2, {"b": None}], "s": "é"}, "jb": [1, "two", {"3": 4.5}],
        "u": uuid.uuid4(), "n": Decimal("12345.678901"), "f": 1.5, "ints": [1, 2, 3],
        "texts": ["a", "b c", ""],
        "ts": dt.datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=dt.timezone.utc),
        "d": dt.date(2024, 2, 29), "b": b"\x00\xff", "flag": True,
    }
    try:
        with engine.begin() as conn:
            conn.execute(table.insert(), values)
            conn.execute(table.insert(), {"id": 2})  # NULLs everywhere
        with engine.connect() as conn:
            row = conn.execute(table.select().where(table.c.id == 1)).one()._asdict()
            assert row == values
            assert conn.execute(table.select().where(table.c.id == 2)).one()[1:] == \
                (None,) * (len(values) - 1)
            # JSON paths and containment compile with casts the server accepts.
            assert conn.scalar(sa.select(table.c.j["s"].as_string())
                               .where(table.c.jb.contains([1]))) == "é"
            assert conn.scalar(sa.select(table.c.id).where(table.c.ints.any(2))) == 1
            assert conn.scalar(sa.select(table.c.id).where(table.c.u == values["u"])) == 1
    finally:
        table.drop(engine)


# Liveness

def test_do_ping_and_pool_pre_ping_through_a_live_broker(broker):
    eng = engine_for(broker, poolclass=pool.QueuePool, pool_pre_ping=True)
    with eng.connect() as conn:
        assert eng.dialect.do_ping(conn.connection.dbapi_connection) is True
    before = broker.stats()["requests_num"]
    with eng.connect() as conn:  # checked out again: pinged first
        conn.scalar(sa.text("SELECT 1"))
    # ping, the statement (carrying its BEGIN), the rollback of reset-on-return,
    # and the stats request itself.
    assert broker.stats()["requests_num"] - before == 4


def test_a_missing_broker_is_a_disconnect(start_broker):
    broker = start_broker(max_connections=2)
    eng = sa.create_engine(f"postgresql+poolbroker://?endpoint={broker.endpoint}&timeout=2",
                           poolclass=pool.QueuePool, pool_pre_ping=True)
    with eng.connect() as conn:
        conn.scalar(sa.text("SELECT 1"))
    broker.stop()
    with pytest.raises(exc.OperationalError) as raised:
        with eng.connect() as conn:
            conn.scalar(sa.text("SELECT 1"))
    assert isinstance(raised.value.orig, dbapi.OperationalError)
    # The same error mid-statement invalidates the connection.
    dialect = eng.dialect
    from client import BrokerUnavailable
    assert dialect.is_disconnect(BrokerUnavailable("gone"), None, None)
    assert dialect.is_disconnect(dbapi.OperationalError("x", sqlstate="57P01"), None, None)
    assert dialect.is_disconnect(dbapi.OperationalError("x", sqlstate="08006"), None, None)
    assert not dialect.is_disconnect(dbapi.OperationalError("x", sqlstate="57014"), None, None)
    assert not dialect.is_disconnect(dbapi.IntegrityError("x", sqlstate="23505"), None, None)


def test_a_lost_broker_mid_session_invalidates_the_connection(start_broker):
    broker = start_broker(max_connections=2)
    eng = sa.create_engine(f"postgresql+poolbroker://?endpoint={broker.endpoint}&timeout=2")
    with eng.connect() as conn:
        conn.scalar(sa.text("SELECT 1"))
        broker.stop()
        with pytest.raises(exc.OperationalError) as raised:
            conn.scalar(sa.text("SELECT 2"))
        assert raised.value.connection_invalidated


# The cap

def test_sixteen_threads_of_orm_sessions_hold_the_brokers_cap(start_broker, dsn, admin):
    broker = start_broker(max_connections=2)
    eng = engine_for(broker)
    Base.metadata.drop_all(eng)
    Base.metadata.create_all(eng)
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            for i in range(15):
                with orm.Session(eng) as session, session.begin():
                    author = Author(id=worker * 100 + i, name=f"w{worker}-{i}")
                    author.books.append(Book(id=worker * 100 + i, title="t"))
                    session.add(author)
                with orm.Session(eng) as session:
                    assert session.get(Author, worker * 100 + i).books[0].title == "t"
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    with ConnectionSampler(dsn, broker.application_name) as sampler:
        threads = [threading.Thread(target=work, args=(w,)) for w in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []
    assert sampler.samples > 0 and 1 <= sampler.maximum <= 2
    assert admin.execute("SELECT count(*) FROM sa_books").fetchone()[0] == 240
    Base.metadata.drop_all(eng)


# What it costs

def test_an_orm_get_update_commit_takes_three_round_trips(broker, engine, schema):
    """The BEGIN rides with the SELECT, the UPDATE is one, COMMIT is one, and
    returning the connection to the pool (a rollback of nothing) is free."""
    with orm.Session(engine) as session, session.begin():
        session.add(Author(id=1, name="ann"))
    before = broker.stats()["requests_num"]
    with orm.Session(engine) as session:
        session.get(Author, 1).name = "bob"
        session.commit()
    assert broker.stats()["requests_num"] - before - 1 == 3  # less the stats request itself
    with orm.Session(engine) as session:
        assert session.get(Author, 1).name == "bob"


def test_a_multi_statement_text_runs_as_in_psycopg(engine):
    """SQLAlchemy sends {} for a text() without binds (a migration's SQL
    script): psycopg then takes the simple protocol, and so does the broker."""
    with engine.begin() as conn:
        assert conn.execute(sa.text("SELECT 1; SELECT 2")).all() == [(1,)]
