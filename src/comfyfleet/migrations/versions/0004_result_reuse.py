"""result reuse: each job's fingerprint, the job a reused one took its outputs from, and the
run times the ETA of a job's events is taken from

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-24
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import UUID

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # SHA-256 (hex) of the workflow's definition and the typed parameters (images by content).
    op.add_column("jobs", sa.Column("fingerprint", sa.String(64), nullable=True))
    # No foreign key: the outputs' keys are copied, the row is only named.
    op.add_column("jobs", sa.Column("reused_from", UUID(as_uuid=True), nullable=True))
    # A reusing submit looks for the jobs that ran this work on a GPU and succeeded.
    op.create_index(
        "jobs_reusable",
        "jobs",
        ["fingerprint"],
        postgresql_where=sa.text("status = 'succeeded' AND reused_from IS NULL"),
    )
    # Every state event of GET /jobs/{id}/events averages a workflow's latest run times.
    op.create_index(
        "jobs_run_times",
        "jobs",
        ["workflow", sa.text("finished_at DESC")],
        postgresql_where=sa.text("status = 'succeeded' AND started_at IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("jobs_run_times", table_name="jobs")
    op.drop_index("jobs_reusable", table_name="jobs")
    op.drop_column("jobs", "reused_from")
    op.drop_column("jobs", "fingerprint")
