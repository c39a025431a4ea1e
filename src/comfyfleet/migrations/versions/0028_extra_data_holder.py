"""a v2 job submitted with extra_data (a partner-node key, never stored) names the gateway
process that holds it in memory, so that only that process claims the job, and the others
fail it (`extra_data_lost`) when that process is gone before the job is sent
(jobs/extra_data.py)

Revision ID: 0028
Revises: 0027
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

revision = "0028"
down_revision = "0027"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("extra_data_holder", sa.Integer(), nullable=True))
    # What each process's watch reads every second: the queued jobs held by some process
    # (nearly always none).
    op.create_index("jobs_queued_extra_data", "jobs", ["extra_data_holder"],
                    postgresql_where=sa.text("status = 'queued' AND extra_data_holder IS NOT NULL"))


def downgrade() -> None:
    op.drop_index("jobs_queued_extra_data", table_name="jobs")
    op.drop_column("jobs", "extra_data_holder")
