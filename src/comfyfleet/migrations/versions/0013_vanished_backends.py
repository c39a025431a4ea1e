"""a backend drained because its address left DNS is marked, so that discovery enables again
only the drains it made, never one made by hand or by a pod's preStop hook

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("backends", sa.Column("vanished", sa.Boolean(), nullable=False,
                                        server_default=sa.false()))


def downgrade() -> None:
    op.drop_column("backends", "vanished")
