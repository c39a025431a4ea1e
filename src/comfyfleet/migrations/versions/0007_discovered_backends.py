"""backends found through COMFYUI_DISCOVERY record which discovery added them, so that it alone
drains and removes them

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("backends", sa.Column("discovered_by", sa.String(300), nullable=True))


def downgrade() -> None:
    op.drop_column("backends", "discovered_by")
