"""a job records when its prompt finished executing and its outputs began to upload, so that
its timeline (the dashboard's job page, GET /jobs/{id}) shows every step with its time

Revision ID: 0026
Revises: 0025
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

revision = "0026"
down_revision = "0025"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("uploading_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column("jobs", "uploading_at")
