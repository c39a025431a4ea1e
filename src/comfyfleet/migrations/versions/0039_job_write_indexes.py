"""fewer index entries per write of a job or a webhook delivery: no change of a job's status is
a HOT update (status is in most of the tables' indexes, as a key or in a predicate), so each
writes an entry into every index of the table whose predicate its new row meets. Three indexes
that no read needs are dropped, and two narrowed to the rows their reads look for: a job's
claim, and each state it passes through on its backend, write none of them

Revision ID: 0039
Revises: 0038
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op

revision = "0039"
down_revision = "0038"
branch_labels = None
depends_on = None

OFF_BACKENDS = "status IN ('queued', 'succeeded', 'failed', 'cancelled')"


def upgrade() -> None:
    # The queued jobs in priority order: no read needs that order but after the tenant
    # (jobs_queued_by_tenant, migration 0017, the claim's). Any queued? How many? Each one's
    # place? The planner reads them as fast from that index or jobs_unfinished_by_key_status.
    op.drop_index("jobs_queued_order", table_name="jobs")
    # The jobs that ran in the last hour: jobs_finished (0018) finds them by the same
    # finished_at, and the jobs running now come from the unfinished ones' indexes; this one
    # took an entry as each job started, and again as it ended.
    op.drop_index("jobs_gpu_time", table_name="jobs")
    # A page of jobs in one state, newest first: of a state off the backends only. Those on
    # them are as many as the backends' slots (jobs_on_backend finds them all), and an entry
    # for each, as a job is claimed and at every state it passes through there, bought none of
    # these pages a better plan. (Queued jobs stay in: their last page, past jobs_newest's
    # newest rows, would walk every older job.)
    op.drop_index("jobs_status_created", table_name="jobs")
    op.create_index("jobs_by_status_newest", "jobs",
                    ["status", sa.text("created_at DESC"), sa.text("id DESC")],
                    postgresql_where=sa.text(OFF_BACKENDS))
    # Reuse looks a job up by its fingerprint: a job without one (v2's graphs) needs no entry.
    op.drop_index("jobs_reusable", table_name="jobs")
    op.create_index("jobs_reusable", "jobs", ["fingerprint"], postgresql_where=sa.text(
        "status = 'succeeded' AND reused_from IS NULL AND fingerprint IS NOT NULL"))
    # A delivery's message_id (its `webhook-id`) is a fresh UUID4 (jobs/deliveries.py), and no
    # statement looks a delivery up by it: the unique index only took an entry at the
    # delivery's every write (its insert and its outcome's update).
    op.drop_constraint("webhook_deliveries_message_id_key", "webhook_deliveries", type_="unique")


def downgrade() -> None:
    op.create_unique_constraint("webhook_deliveries_message_id_key", "webhook_deliveries",
                                ["message_id"])
    op.drop_index("jobs_reusable", table_name="jobs")
    op.create_index("jobs_reusable", "jobs", ["fingerprint"],
                    postgresql_where=sa.text("status = 'succeeded' AND reused_from IS NULL"))
    op.drop_index("jobs_by_status_newest", table_name="jobs")
    op.create_index("jobs_status_created", "jobs", ["status", "created_at"])
    op.create_index("jobs_gpu_time", "jobs", ["finished_at"],
                    postgresql_where=sa.text("started_at IS NOT NULL"))
    op.create_index("jobs_queued_order", "jobs", [sa.text("priority DESC"), "created_at"],
                    postgresql_where=sa.text("status = 'queued'"))
