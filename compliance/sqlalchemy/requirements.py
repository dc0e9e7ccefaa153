"""What the dialect supports, for SQLAlchemy's suite: the suite's defaults,
less what the broker's session-state policy rules out."""

from sqlalchemy.testing import exclusions
from sqlalchemy.testing.requirements import SuiteRequirements


class Requirements(SuiteRequirements):
    @property
    def temporary_tables(self):
        # Temporary tables are session state: refused outside a transaction,
        # dropped when it ends (DISCARD ALL), so no later checkout sees them.
        return exclusions.closed()

    @property
    def temp_table_reflection(self):
        return exclusions.closed()

    @property
    def two_phase_transactions(self):
        return exclusions.closed()
