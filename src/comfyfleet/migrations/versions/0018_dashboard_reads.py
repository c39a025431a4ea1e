"""the dashboard's reads walk an index, however many jobs and deliveries there are: the job
list newest first (whole, by workflow, over a time range, page after page), the jobs finished
in the last hour, and the webhook deliveries in trouble newest first

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

revision = "0018"
down_revision = "0017"
branch_labels = None
depends_on = None

TROUBLED = "status IN ('dead', 'failed') OR (status = 'pending' AND attempts > 0)"


def upgrade() -> None:
    op.create_index("jobs_newest", "jobs", [sa.text("created_at DESC"), sa.text("id DESC")])
    op.create_index("jobs_by_workflow_newest", "jobs",
                    ["workflow", sa.text("created_at DESC"), sa.text("id DESC")])
    op.create_index("jobs_finished", "jobs", ["finished_at"],
                    postgresql_where=sa.text("finished_at IS NOT NULL"))
    op.create_index("webhook_deliveries_troubled", "webhook_deliveries",
                    [sa.text("created_at DESC")], postgresql_where=sa.text(TROUBLED))


def downgrade() -> None:
    op.drop_index("webhook_deliveries_troubled", table_name="webhook_deliveries")
    op.drop_index("jobs_finished", table_name="jobs")
    op.drop_index("jobs_by_workflow_newest", table_name="jobs")
    op.drop_index("jobs_newest", table_name="jobs")
