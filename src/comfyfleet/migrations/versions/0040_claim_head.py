"""The claim's read gives each job near the head of the backlog as a `claim_head`, a named
composite type, not an anonymous record: asyncpg decodes an anonymous record's fields looking
each one's type up by the OID it carries, value by value, and a named type's by the codecs it
made once for the statement. Decoding a read of 50 jobs took the claiming process 150 us of
CPU as records and 80 us as `claim_head` values, at every claim (sql/claim.sql `claim`).

And a tenant's jobs on backends are counted by one function, jobs_on_backends(), in
claim_locks() (after its locks) and in the claim's read (for the tenants with a limit), which
wrote the same two counts each.

Revision ID: 0040
Revises: 0039
Create Date: 2026-12-07
"""

import importlib

from alembic import op

revision = "0040"
down_revision = "0039"
branch_labels = None
depends_on = None

# Two statements, one for the jobs of no key ('') and one for a key's, so that each plan, one
# for the session (as 0038 has claim_locks' statements planned), counts by index
# (jobs_unfinished_by_key_status, its key first); PL/pgSQL, whose plans are kept for the
# session. STABLE: it reads as the statement calling it does (claim_locks' last statement,
# begun after its locks; the claim's read, its snapshot). The states that hold a tenant's
# max_concurrent are those of migration 0011. Null for no tenant (STRICT).
JOBS_ON_BACKENDS = """
CREATE FUNCTION jobs_on_backends(tenant text) RETURNS bigint
LANGUAGE plpgsql STABLE STRICT SET plan_cache_mode = force_generic_plan AS $$
BEGIN
    IF jobs_on_backends.tenant = '' THEN
        RETURN (SELECT count(*) FROM jobs
                WHERE api_key_hash IS NULL AND status IN ('dispatched', 'running', 'uploading'));
    END IF;
    RETURN (SELECT count(*) FROM jobs
            WHERE api_key_hash = jobs_on_backends.tenant
              AND status IN ('dispatched', 'running', 'uploading'));
END
$$
"""
_GENERIC_PLANS = importlib.import_module("comfyfleet.migrations.versions.0038_generic_plans")
# As 0038's, the tenant's count (its last column, two cases) by jobs_on_backends().
_TENANT_COUNT = "CASE WHEN claim_locks.tenant = ''"
assert _GENERIC_PLANS.CLAIM_LOCKS.count(_TENANT_COUNT) == 1
CLAIM_LOCKS = (_GENERIC_PLANS.CLAIM_LOCKS.split(_TENANT_COUNT)[0]
               + "jobs_on_backends(claim_locks.tenant);\n$$\n")


# Field by field as the claim's read gives them (repository.py `QueuedJob` and `limited`).
CLAIM_HEAD = """
CREATE TYPE claim_head AS (
    id uuid, workflow text, prompt text, priority integer, overtaken integer,
    created_at timestamptz, tenant text, start float8, weight integer, beyond boolean,
    limited boolean)
"""


def upgrade() -> None:
    op.execute(CLAIM_HEAD)
    op.execute(JOBS_ON_BACKENDS)
    op.execute(CLAIM_LOCKS)


def downgrade() -> None:
    op.execute(_GENERIC_PLANS.CLAIM_LOCKS)
    op.execute("DROP FUNCTION jobs_on_backends(text)")
    op.execute("DROP TYPE claim_head")
