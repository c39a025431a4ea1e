"""an idempotency key is one caller's and one API's: a job's client_task_id is unique per API
key (the null hash without keys) and source (v1's catalog jobs, v2's graph jobs), no longer
across the whole service; and a request in flight under a key claims it, so that a concurrent
retry is told to wait (Comfy API v2: 409 idempotency_conflict)

Revision ID: 0021
Revises: 0018
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

revision = "0021"
down_revision = "0019"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_constraint("jobs_client_task_id_key", "jobs", type_="unique")
    op.create_index("jobs_by_idempotency_key", "jobs",
                    [sa.text("coalesce(api_key_hash, '')"), "source", "client_task_id"],
                    unique=True, postgresql_where=sa.text("client_task_id IS NOT NULL"))
    # Unlogged: a claim lives as long as one request; after a crash of the database none is
    # in flight any more, which is what an emptied table says.
    op.create_table(
        "idempotency_claims",
        sa.Column("tenant", sa.String(), nullable=False),  # the API key's hash; '' without
        sa.Column("scope", sa.String(16), nullable=False),  # which API's keys
        sa.Column("key", sa.String(), nullable=False),
        sa.Column("token", sa.String(36), nullable=False),  # the holder's, to let go of it
        # A holder that died lets go of its claim then.
        sa.Column("held_until", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("tenant", "scope", "key"),
        prefixes=["UNLOGGED"],
    )


def downgrade() -> None:
    op.drop_table("idempotency_claims")
    op.drop_index("jobs_by_idempotency_key", table_name="jobs")
    # Fails while two callers' jobs share a key: which one keeps it is not the schema's call.
    op.create_unique_constraint("jobs_client_task_id_key", "jobs", ["client_task_id"])
