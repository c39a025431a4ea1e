"""claim_locks() and the tenant charge's settlement plan their statements once per connection,
not once per call: each claim's take spent more of PostgreSQL's CPU planning claim_locks' counts
(0.3 ms) than running them (0.05 ms), and each job's end replanned the settlement's UPDATE

Revision ID: 0038
Revises: 0036
Create Date: 2026-12-07
"""

import importlib

from alembic import op

revision = "0038"
down_revision = "0036"
branch_labels = None
depends_on = None

# PostgreSQL keeps a plan for each statement of a function, but by default (plan_cache_mode
# auto) it plans afresh with the call's arguments as constants whenever the generic plan looks
# no cheaper than those custom plans, as it did for both functions here: one plan for the
# session, whatever the arguments, is what the SET below asks for. So that claim_locks'
# generic plan still counts a tenant's jobs by index (jobs_unfinished_by_key_status, its
# key first), the tenant's count is two statements, one for the jobs of no key ('') and one
# for a key's, instead of one with an OR only a custom plan could resolve. As 0031's otherwise.
CLAIM_LOCKS = """
CREATE OR REPLACE FUNCTION claim_locks(
    backend text, tenant text, ended text[],
    OUT accepting boolean, OUT on_gpu bigint, OUT tenant_on_backends bigint
) LANGUAGE sql VOLATILE SET plan_cache_mode = force_generic_plan AS $$
    -- The backend's lock, then the tenant's (null: none), always in this order. (Parameters
    -- by the function's name: a column of the same name would win over a bare one.)
    SELECT pg_advisory_xact_lock(hashtext(claim_locks.backend));
    SELECT pg_advisory_xact_lock(hashtext('concurrent:' || claim_locks.tenant))
    WHERE claim_locks.tenant IS NOT NULL;
    -- Whether the backend takes work; the prompts on it but the `ended` ones (their ends
    -- read by the caller, not recorded yet); the tenant's jobs on backends (null: no tenant).
    SELECT EXISTS (SELECT 1 FROM backends WHERE name = claim_locks.backend AND NOT draining),
           (SELECT count(*) FROM jobs
            WHERE jobs.backend = claim_locks.backend AND status IN ('dispatched', 'running')
              AND (prompt_id = ANY(claim_locks.ended)) IS NOT TRUE),
           CASE WHEN claim_locks.tenant = '' THEN
               (SELECT count(*) FROM jobs
                WHERE api_key_hash IS NULL AND status IN ('dispatched', 'running', 'uploading'))
           WHEN claim_locks.tenant IS NOT NULL THEN
               (SELECT count(*) FROM jobs
                WHERE api_key_hash = claim_locks.tenant
                  AND status IN ('dispatched', 'running', 'uploading')) END;
$$
"""


def upgrade() -> None:
    op.execute(CLAIM_LOCKS)
    op.execute("ALTER FUNCTION settle_tenant_charge() SET plan_cache_mode = force_generic_plan")


def downgrade() -> None:
    op.execute("ALTER FUNCTION settle_tenant_charge() RESET plan_cache_mode")
    claim_locks = importlib.import_module("comfyfleet.migrations.versions.0031_claim_locks")
    op.execute(claim_locks.CLAIM_LOCKS.replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", 1))
