"""assets (Comfy API v2): records over blobs kept in comfyfleet's storage under their blake3
hash, so the same bytes are stored once however often they are uploaded

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB, UUID

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "assets",
        sa.Column("id", UUID(as_uuid=True), primary_key=True),
        # blake3 of the bytes (hex), computed by the gateway; the blob's storage key follows.
        sa.Column("hash", sa.String(64), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("content_type", sa.String(200), nullable=False),
        sa.Column("file_path", sa.String(), nullable=True),
        sa.Column("tags", JSONB(), nullable=True),
        # SHA-256 (hex) of the API key that made it, never the key; null without keys.
        sa.Column("api_key_hash", sa.String(64), nullable=True),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
    )
    # Dedup (is the blob stored?) and the by-hash lookups of one key.
    op.create_index("assets_by_hash", "assets", ["hash", "api_key_hash"])


def downgrade() -> None:
    op.drop_table("assets")
