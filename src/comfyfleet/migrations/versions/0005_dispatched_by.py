"""jobs remember which gateway process dispatched them, so a live process's jobs are left to
it and a dead one's are taken over (comfyfleet.jobs.lease)

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-22
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("dispatched_by", sa.Integer(), nullable=True))


def downgrade() -> None:
    op.drop_column("jobs", "dispatched_by")
