"""cache-aware placement: how many later jobs have been dispatched before each queued job

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Bounded by AFFINITY_WINDOW: a job overtaken that often is the next its backends take.
    op.add_column("jobs", sa.Column("overtaken", sa.Integer(), nullable=False,
                                    server_default="0"))


def downgrade() -> None:
    op.drop_column("jobs", "overtaken")
