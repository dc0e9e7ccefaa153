"""A small Flask-SQLAlchemy app: authors and their books, through the broker.

    gunicorn -c etc/gunicorn.conf.py --chdir etc/flaskapp 'library:create_app()'

or ``make run-flask`` (supervisord, a broker capped at 4, gunicorn gthread
4 workers x 4 threads).  The database is ``LIBRARY_DATABASE_URL``, by
default ``postgresql+poolbroker://`` (the broker at POOLBROKER_ENDPOINT, or
the default endpoint, with the dialect's default pool).  The same app runs
unchanged on ``postgresql+psycopg://...`` and SQLAlchemy's QueuePool: the
URL is the only difference, which is the point.

    POST /authors                     {"name": ...}          201, 409 if taken
    GET  /authors/<id>                the author and the titles of their books
    POST /authors/<id>/books          {"titles": [...]}      201, all or none (409)
    GET  /authors/<id>/books?page=&per_page=                 paginated
    GET  /books?page=&per_page=       every book with its author, paginated
"""

from __future__ import annotations

import os
import time
from typing import Any

import sqlalchemy as sa
from flask import Flask, abort, request
from flask_sqlalchemy import SQLAlchemy
from flask_sqlalchemy.pagination import Pagination
from sqlalchemy import exc, orm

DEFAULT_URL = "postgresql+poolbroker://"
UNIQUE_VIOLATION = "23505"
MAX_PER_PAGE = 50


class Base(orm.DeclarativeBase):
    pass


db = SQLAlchemy(model_class=Base)


class Author(db.Model):
    __tablename__ = "library_authors"

    id: orm.Mapped[int] = orm.mapped_column(primary_key=True)
    name: orm.Mapped[str] = orm.mapped_column(sa.String(100), unique=True)
    # Kept by the same transaction that adds books: a reader never sees a
    # count that disagrees with the rows.
    book_count: orm.Mapped[int] = orm.mapped_column(default=0)
    books: orm.Mapped[list[Book]] = orm.relationship(
        back_populates="author", order_by="Book.id")


class Book(db.Model):
    __tablename__ = "library_books"
    __table_args__ = (sa.UniqueConstraint("author_id", "title",
                                          name="library_books_author_title_key"),)

    id: orm.Mapped[int] = orm.mapped_column(primary_key=True)
    title: orm.Mapped[str] = orm.mapped_column(sa.String(200))
    author_id: orm.Mapped[int] = orm.mapped_column(sa.ForeignKey("library_authors.id"))
    author: orm.Mapped[Author] = orm.relationship(back_populates="books")


def _is_unique_violation(error: exc.IntegrityError) -> bool:
    # Both drivers' errors carry the SQLSTATE: only a duplicate is the
    # client's fault (409); another integrity error is a bug (500).
    return getattr(error.orig, "sqlstate", None) == UNIQUE_VIOLATION


def _constraint(error: exc.IntegrityError) -> str | None:
    diag = getattr(error.orig, "diag", None)
    return getattr(diag, "constraint_name", None)


def _page_args() -> tuple[int, int]:
    page = request.args.get("page", 1, type=int)
    per_page = request.args.get("per_page", 10, type=int)
    if page < 1 or not 1 <= per_page <= MAX_PER_PAGE:
        abort(400, f"page >= 1 and 1 <= per_page <= {MAX_PER_PAGE}")
    return page, per_page


def _page(pagination: Pagination, items: list[Any]) -> dict[str, Any]:
    return {"items": items, "page": pagination.page, "per_page": pagination.per_page,
            "pages": pagination.pages, "total": pagination.total}


def create_app(url: str | None = None, create_schema: bool = True) -> Flask:
    """The app on ``url`` (default ``LIBRARY_DATABASE_URL``, else the broker)."""
    app = Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = url or os.environ.get(
        "LIBRARY_DATABASE_URL", DEFAULT_URL)
    db.init_app(app)

    @app.post("/authors")
    def add_author() -> tuple[dict[str, Any], int]:
        name = (request.get_json(silent=True) or {}).get("name")
        if not isinstance(name, str) or not name:
            abort(400, "name required")
        author = Author(name=name)
        db.session.add(author)
        try:
            db.session.flush()  # the INSERT, so that the duplicate shows here
            body = {"id": author.id, "name": author.name, "book_count": 0}
            # Read before commit: commit expires the object, and reading it
            # after would cost another transaction.
            db.session.commit()
        except exc.IntegrityError as error:
            # The failed flush leaves the session unusable until it rolls back.
            db.session.rollback()
            if not _is_unique_violation(error):
                raise
            return {"error": "author exists", "name": name,
                    "constraint": _constraint(error)}, 409
        return body, 201

    @app.get("/authors/<int:author_id>")
    def get_author(author_id: int) -> dict[str, Any]:
        author = db.session.get(Author, author_id,
                                options=[orm.selectinload(Author.books)])
        if author is None:
            abort(404)
        return {"id": author.id, "name": author.name, "book_count": author.book_count,
                "books": [book.title for book in author.books]}

    @app.post("/authors/<int:author_id>/books")
    def add_books(author_id: int) -> tuple[dict[str, Any], int]:
        titles = (request.get_json(silent=True) or {}).get("titles")
        if not isinstance(titles, list) or not titles \
                or not all(isinstance(t, str) and t for t in titles):
            abort(400, "titles: a non-empty list of strings")
        try:
            # One transaction: the books and the count, or nothing.  The row
            # lock serialises writers of one author, so the count is exact.
            with db.session.begin():
                author = db.session.get(Author, author_id, with_for_update=True)
                if author is None:
                    abort(404)
                author.books.extend(Book(title=title) for title in titles)
                author.book_count += len(titles)
                count = author.book_count
        except exc.IntegrityError as error:
            # begin()'s block has rolled back already; this one is a no-op,
            # kept so that every IntegrityError path reads the same.
            db.session.rollback()
            if not _is_unique_violation(error):
                raise
            return {"error": "duplicate title", "author_id": author_id,
                    "constraint": _constraint(error)}, 409
        return {"author_id": author_id, "added": titles, "book_count": count}, 201

    @app.get("/authors/<int:author_id>/books")
    def list_author_books(author_id: int) -> dict[str, Any]:
        page, per_page = _page_args()
        if db.session.get(Author, author_id) is None:
            abort(404)
        pagination = db.paginate(
            sa.select(Book).where(Book.author_id == author_id).order_by(Book.id),
            page=page, per_page=per_page, error_out=False)
        return _page(pagination, [{"id": b.id, "title": b.title} for b in pagination.items])

    @app.get("/books")
    def list_books() -> dict[str, Any]:
        page, per_page = _page_args()
        pagination = db.paginate(
            sa.select(Book).options(orm.joinedload(Book.author)).order_by(Book.id),
            page=page, per_page=per_page, error_out=False)
        return _page(pagination, [{"id": b.id, "title": b.title, "author": b.author.name}
                                  for b in pagination.items])

    if create_schema:
        with app.app_context():
            _create_schema()
            # With preload_app gunicorn's arbiter runs this and forks the
            # workers from it: a pooled connection (QueuePool) left here
            # would be shared by every worker.  The broker's dialect pools
            # nothing, so this costs it nothing.
            db.engine.dispose()
    return app


def _create_schema(timeout: float = 60.0) -> None:
    """Create the tables once, waiting for the database to come up.

    Under supervisord the broker (and an embedded PostgreSQL) start beside
    gunicorn, not before it.  Without preload_app every worker gets here at
    once: a transaction-scoped advisory lock (session locks are session
    state, which the broker refuses) lets one create while the others wait.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            with db.engine.begin() as conn:
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext('library schema'))"))
                db.metadata.create_all(conn)
            return
        except exc.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)

