"""A tenant of the claim's read (`claim_tenant`) no longer says whether its backlog goes on past
the jobs read: the read says it once, for any tenant (`beyond`), which is all the dispatcher
asks. Each tenant's values come with its first job read, in the one pass over the jobs read
that gives their arrays (sql/claim.sql `claim`): a tenant's `beyond` needed its last job, so
a second pass over the jobs read, grouped by tenant, which made PostgreSQL keep them in a
tuplestore and cost it more CPU than the rest of the read's shape saved (migration 0048).

Revision ID: 0049
Revises: 0048
Create Date: 2026-12-08
"""

from alembic import op

revision = "0049"
down_revision = "0048"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TYPE claim_tenant DROP ATTRIBUTE beyond")


def downgrade() -> None:
    op.execute("ALTER TYPE claim_tenant ADD ATTRIBUTE beyond boolean")
