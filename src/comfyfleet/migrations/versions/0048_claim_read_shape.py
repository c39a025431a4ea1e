"""The claim's read gives in full only the jobs the caller does not hold (`claim_job`), and of
those it holds their place in the ids it sent; each job's overtaken count in an array, and its
tenant's start in virtual time, weight, limit and whether its backlog goes on past the read once
a tenant (`claim_tenant`), not with every job. At saturation a read is the same 50 jobs but
one at every claim: the caller decoded 50 `claim_head` values (their unchanging columns null:
43 us of its CPU in a micro-benchmark, against 4 for two arrays of 50 integers) and made 50
new QueuedJobs (about 37 us) for the one job new to it, since the tenant's start, on every
job, moves with every charge (sql/claim.sql `claim`).

Revision ID: 0048
Revises: 0047
Create Date: 2026-12-07
"""

import importlib

from alembic import op

revision = "0048"
down_revision = "0047"
branch_labels = None
depends_on = None

_CLAIM_HEAD = importlib.import_module("comfyfleet.migrations.versions.0040_claim_head")


def upgrade() -> None:
    op.execute("DROP TYPE claim_head")
    # Field by field as the claim's read gives them (repository.py `QueuedJob`, `TenantHead`).
    op.execute("""
        CREATE TYPE claim_job AS (
            id uuid, workflow text, prompt text, priority integer, created_at timestamptz,
            tenant text)
    """)
    op.execute("""
        CREATE TYPE claim_tenant AS (
            tenant text, start float8, weight integer, limited boolean, beyond boolean)
    """)


def downgrade() -> None:
    op.execute("DROP TYPE claim_tenant")
    op.execute("DROP TYPE claim_job")
    op.execute(_CLAIM_HEAD.CLAIM_HEAD)
