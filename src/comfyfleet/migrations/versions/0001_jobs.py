"""jobs table

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB, UUID

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

STATES = ("queued", "dispatched", "running", "uploading", "succeeded", "failed", "cancelled")


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("id", UUID(as_uuid=True), primary_key=True),
        sa.Column("client_task_id", sa.String(), nullable=True, unique=True),
        sa.Column("workflow", sa.String(), nullable=False),
        sa.Column("params", JSONB(), nullable=False, server_default="{}"),
        sa.Column("prompt", JSONB(), nullable=False, server_default="{}"),
        sa.Column("status", sa.String(16), nullable=False, server_default="queued"),
        sa.Column("progress", sa.Float(), nullable=False, server_default="0"),
        sa.Column("priority", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("callback_url", sa.String(), nullable=True),
        sa.Column("backend", sa.String(), nullable=True),
        sa.Column("prompt_id", sa.String(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.Column("dispatched_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("outputs", JSONB(), nullable=False, server_default="[]"),
        sa.Column("error", JSONB(), nullable=True),
        sa.CheckConstraint(f"status IN {STATES!r}", name="jobs_status_valid"),
        sa.CheckConstraint("progress >= 0 AND progress <= 1", name="jobs_progress_range"),
    )
    # The dispatcher's claim: highest priority first, then oldest, among queued jobs only.
    op.create_index(
        "jobs_queued_order",
        "jobs",
        [sa.text("priority DESC"), "created_at"],
        postgresql_where=sa.text("status = 'queued'"),
    )
    op.create_index(
        "jobs_on_backend",
        "jobs",
        ["backend"],
        postgresql_where=sa.text("status IN ('dispatched', 'running', 'uploading')"),
    )
    op.create_index("jobs_status_created", "jobs", ["status", "created_at"])


def downgrade() -> None:
    op.drop_table("jobs")
