"""API keys: jobs remember the key that submitted them (as a digest), and keys made with
`comfyfleet keys create` are kept (as digests) in their own table

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("api_key_hash", sa.String(64), nullable=True))
    # A key's page of jobs, newest first.
    op.create_index(
        "jobs_by_key_created",
        "jobs",
        ["api_key_hash", sa.text("created_at DESC"), sa.text("id DESC")],
        postgresql_where=sa.text("api_key_hash IS NOT NULL"),
    )
    # MAX_QUEUED_PER_KEY counts a key's unfinished jobs at every submit.
    op.create_index(
        "jobs_unfinished_by_key",
        "jobs",
        ["api_key_hash"],
        postgresql_where=sa.text("status IN ('queued', 'dispatched', 'running', 'uploading')"),
    )
    op.create_table(
        "api_keys",
        sa.Column("name", sa.String(100), primary_key=True),
        sa.Column("key_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("admin", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        # Revoked keys stay listed, so that their jobs can still be told apart.
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
    )


def downgrade() -> None:
    op.drop_table("api_keys")
    op.drop_index("jobs_unfinished_by_key", table_name="jobs")
    op.drop_index("jobs_by_key_created", table_name="jobs")
    op.drop_column("jobs", "api_key_hash")
