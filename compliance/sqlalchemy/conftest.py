"""SQLAlchemy's third-party dialect suite (README.dialects.rst) for
postgresql+poolbroker: the dialect is found through its entry point."""

import pytest

pytest.register_assert_rewrite("sqlalchemy.testing.assertions")

from sqlalchemy.testing.plugin.pytestplugin import *  # noqa: E402,F401,F403
