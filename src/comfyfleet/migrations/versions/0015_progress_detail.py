"""a running job records which node runs and its step out of how many (ComfyUI's `executing`
and `progress` events), so that every process can tell, not only the one following it

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("progress_detail", JSONB(), nullable=True))


def downgrade() -> None:
    op.drop_column("jobs", "progress_detail")
