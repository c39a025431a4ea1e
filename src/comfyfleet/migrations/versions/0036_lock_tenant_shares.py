"""lock_tenant_shares(): the statement ending several jobs at once (sql/jobs.sql `finish`) locks
the shares of their tenants in one order before any job's end settles its charge

Revision ID: 0036
Revises: 0033
Create Date: 2026-12-07
"""

from alembic import op

revision = "0036"
down_revision = "0033"
branch_labels = None
depends_on = None

# The trigger jobs_settle_tenant_charge (migration 0017) locks a tenant's share as each job's
# row is written, in whatever order the statement writes them: two statements ending jobs of
# tenants a and b, one writing a's first and the other b's, could each hold one share and
# wait for the other. A statement settling two shares or more locks them all first, in the
# order of the tenants; one settling a single share needs no order, and one settling none
# (a queued job cancelled, a job ended off its GPU) touches no share, as before. PL/pgSQL, so
# that the table is locked only when it is read: a SQL function's statements, like the
# statement around it, lock every table they name before they run.
LOCK_TENANT_SHARES = """
CREATE FUNCTION lock_tenant_shares(tenants text[]) RETURNS void
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    IF cardinality(tenants) > 1 THEN
        PERFORM FROM tenant_shares WHERE tenant = ANY(tenants) ORDER BY tenant
        FOR NO KEY UPDATE;
    END IF;
END
$$
"""


def upgrade() -> None:
    op.execute(LOCK_TENANT_SHARES)


def downgrade() -> None:
    op.execute("DROP FUNCTION lock_tenant_shares(text[])")
