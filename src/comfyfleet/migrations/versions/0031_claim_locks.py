"""the claim's take is one statement: claim_locks() takes a backend's lock (and a tenant's) and
reads, after them, what they guard, which the statement around it cannot (sql/claim.sql
`claim`, named `take` when this was written)

Revision ID: 0031
Revises: 0030
Create Date: 2026-12-07
"""

from alembic import op

revision = "0031"
down_revision = "0030"
branch_labels = None
depends_on = None

# A statement reads what was committed when it began, and a lock taken within it does not move
# that on: a claim committed while the take waited for the backend's lock would be missed by
# the take's own count, and the backend given one prompt too many. A VOLATILE function's
# statements each begin afresh: these read after the locks, so they see every claim, move and
# removal of the backend (and every claim of the tenant) committed before. The states that
# hold a backend's slot and a tenant's max_concurrent are those of migrations 0017 and 0011.
CLAIM_LOCKS = """
CREATE FUNCTION claim_locks(
    backend text, tenant text, ended text[],
    OUT accepting boolean, OUT on_gpu bigint, OUT tenant_on_backends bigint
) LANGUAGE sql VOLATILE AS $$
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
           CASE WHEN claim_locks.tenant IS NOT NULL THEN
               (SELECT count(*) FROM jobs
                WHERE (api_key_hash = nullif(claim_locks.tenant, '')
                       OR (claim_locks.tenant = '' AND api_key_hash IS NULL))
                  AND status IN ('dispatched', 'running', 'uploading')) END;
$$
"""


def upgrade() -> None:
    op.execute(CLAIM_LOCKS)


def downgrade() -> None:
    op.execute("DROP FUNCTION claim_locks(text, text, text[])")
