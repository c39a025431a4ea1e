"""an API key may name a default callback URL: the webhook of the key's jobs that name none,
which is every Comfy API v2 job (the v2 contract has no callback field yet)

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("api_keys", sa.Column("callback_url", sa.String(2000), nullable=True))


def downgrade() -> None:
    op.drop_column("api_keys", "callback_url")
