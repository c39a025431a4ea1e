"""The queued jobs' index (jobs_queued_by_tenant, migration 0017) holds each job's api_key_hash
as well as its tenant (`coalesce(api_key_hash, '')`): PostgreSQL takes an index-only scan only
when the columns a read names are in the index, not an expression of them, so no read of it
was one. The positions' snapshot (sql/claim.sql `backlog`: every queued job's tenant, priority
and created_at) read the 100,000 queued jobs' 9,092 heap pages and sorted them on disk,
0.1-0.5 s; from the index alone, in its order, 30-55 ms. An entry of a key's queued job grows
by the key's digest (none for the jobs of no key); no write takes an entry more.

Revision ID: 0047
Revises: 0046
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op

revision = "0047"
down_revision = "0046"
branch_labels = None
depends_on = None

KEY: list[str | sa.TextClause] = [sa.text("coalesce(api_key_hash, '')"), sa.text("priority DESC"),
                                  "created_at"]
QUEUED = sa.text("status = 'queued'")


def upgrade() -> None:
    op.drop_index("jobs_queued_by_tenant", table_name="jobs")
    op.create_index("jobs_queued_by_tenant", "jobs", KEY, postgresql_include=["api_key_hash"],
                    postgresql_where=QUEUED)


def downgrade() -> None:
    op.drop_index("jobs_queued_by_tenant", table_name="jobs")
    op.create_index("jobs_queued_by_tenant", "jobs", KEY, postgresql_where=QUEUED)
