"""A workflow's latest runs on one backend, newest first, walked in an index of their own: the
mean run time on a backend (sql/reads.sql `mean_run_seconds`, a dispatched job's ETA) walked
jobs_run_times (migration 0004, every backend's runs of the workflow) filtering by backend,
every run of the workflow ever stored when the backend had run none (0.2 s per GET of a job on
a backend new to its workflow, at 400,000 runs). One more entry per successful job, as it ends.

Revision ID: 0042
Revises: 0040
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op

revision = "0042"
down_revision = "0040"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        "jobs_run_times_by_backend",
        "jobs",
        ["workflow", "backend", sa.text("finished_at DESC")],
        postgresql_where=sa.text("status = 'succeeded' AND started_at IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("jobs_run_times_by_backend", table_name="jobs")
