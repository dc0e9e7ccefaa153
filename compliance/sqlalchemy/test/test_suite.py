"""SQLAlchemy's dialect suite, as README.dialects.rst has third-party dialects run it."""

from sqlalchemy.testing.suite import *  # noqa: F401,F403
from sqlalchemy.testing.suite import ServerSideCursorsTest as _ServerSideCursorsTest

from client import dbapi


class ServerSideCursorsTest(_ServerSideCursorsTest):
    def _is_server_side(self, cursor):
        # The suite only knows the drivers it ships with (its own TODO says
        # so): here a server-side cursor is the dbapi's named cursor.  Other
        # drivers (the same suite run with psycopg, to compare) keep its answer.
        if self.engine.dialect.driver != "poolbroker":
            return super()._is_server_side(cursor)
        return isinstance(cursor, dbapi.ServerCursor)
