"""an asset upload remembers the Idempotency-Key it came with (Comfy API v2), so a retry of
the same upload is the same asset; a key is one caller's, and holds for 24 hours

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("assets", sa.Column("idempotency_key", sa.String(255), nullable=True))
    # One asset per key and caller (no keys configured: one caller, the null hash).
    op.create_index("assets_by_idempotency_key", "assets",
                    [sa.text("coalesce(api_key_hash, '')"), "idempotency_key"], unique=True,
                    postgresql_where=sa.text("idempotency_key IS NOT NULL"))


def downgrade() -> None:
    op.drop_index("assets_by_idempotency_key", table_name="assets")
    op.drop_column("assets", "idempotency_key")
