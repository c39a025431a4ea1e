"""tenants: each key's weight and limits in the keys table (NULL: the env default), and the
per-key counts that admission and the claim make by key and state

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-08
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

UNFINISHED = "status IN ('queued', 'dispatched', 'running', 'uploading')"


def upgrade() -> None:
    op.add_column("api_keys", sa.Column("weight", sa.Integer(), nullable=False,
                                        server_default="1"))
    op.add_column("api_keys", sa.Column("max_concurrent", sa.Integer(), nullable=True))
    op.add_column("api_keys", sa.Column("max_queued", sa.Integer(), nullable=True))
    op.create_check_constraint("api_keys_weight_positive", "api_keys", "weight >= 1")
    op.create_check_constraint("api_keys_max_concurrent_positive", "api_keys",
                               "max_concurrent >= 1")
    op.create_check_constraint("api_keys_max_queued_positive", "api_keys", "max_queued >= 1")
    # A submit counts its key's queued jobs, a claim the keys' jobs on backends: by key and
    # state, from the index alone.
    op.create_index("jobs_unfinished_by_key_status", "jobs", ["api_key_hash", "status"],
                    postgresql_where=sa.text(UNFINISHED))
    op.drop_index("jobs_unfinished_by_key", table_name="jobs")
    # GET /tenants sums the GPU time of the jobs that ran in the last hour (or run now).
    op.create_index("jobs_gpu_time", "jobs", ["finished_at"],
                    postgresql_where=sa.text("started_at IS NOT NULL"))


def downgrade() -> None:
    op.drop_index("jobs_gpu_time", table_name="jobs")
    op.create_index("jobs_unfinished_by_key", "jobs", ["api_key_hash"],
                    postgresql_where=sa.text(UNFINISHED))
    op.drop_index("jobs_unfinished_by_key_status", table_name="jobs")
    op.drop_column("api_keys", "max_queued")
    op.drop_column("api_keys", "max_concurrent")
    op.drop_column("api_keys", "weight")
