"""SQLAlchemy's test provisioning for the dialect: SQLAlchemy imports
``<dialect package>.provision`` (``Dialect.load_provisioning``), and the
PostgreSQL hooks (schema clean-up, temp tables...) register themselves for
the backend name when their module is imported.  Only the compliance suite
(``compliance/sqlalchemy``) needs it."""

from sqlalchemy.dialects.postgresql import provision  # noqa: F401 - registers the hooks
