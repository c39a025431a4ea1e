"""jobs record what was accepted with a caveat (warnings) and the shape of their webhook body
(webhook_format: null is Standard Webhooks' event; "comfyui-server" is ComfyUI-server's record)

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-08
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("warnings", JSONB, nullable=True))
    op.add_column("jobs", sa.Column("webhook_format", sa.String(), nullable=True))


def downgrade() -> None:
    op.drop_column("jobs", "webhook_format")
    op.drop_column("jobs", "warnings")
