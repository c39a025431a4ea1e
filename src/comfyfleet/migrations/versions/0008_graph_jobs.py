"""jobs of a client's own graph (Comfy API v2): where a job's prompt came from, and the
string labels its client gave it

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

SOURCES = ("catalog", "graph")


def upgrade() -> None:
    # catalog: a workflow of the catalog filled with parameters; graph: the client's own
    # API-format graph, run as it was sent (its `workflow` is a label of the graph's shape).
    op.add_column("jobs", sa.Column("source", sa.String(16), nullable=False,
                                    server_default="catalog"))
    op.create_check_constraint("jobs_source_valid", "jobs", f"source IN {SOURCES!r}")
    op.add_column("jobs", sa.Column("labels", JSONB(), nullable=True))


def downgrade() -> None:
    op.drop_column("jobs", "labels")
    op.drop_constraint("jobs_source_valid", "jobs")
    op.drop_column("jobs", "source")
