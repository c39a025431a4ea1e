"""fair share: each tenant's virtual time (GPU-seconds run / weight), what each claim charged
its job, the settlement of that charge against the real run when the job leaves the GPU,
and the index the claim walks the backlog tenant by tenant with

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None

# The states that hold a backend's slot: the GPU is the job's from its claim until it leaves
# them (its outputs are uploaded from a backend already free).
ON_GPU = "('dispatched', 'running')"

# A charge is settled in the statement that takes its job off the GPU, whichever it is (run to
# its end and uploading, failed, cancelled, requeued, released) and whichever process runs it:
# so a crash anywhere leaves every tenant's virtual time matching the jobs' rows. The seconds
# the job ran (from its start until then) replace what the claim charged; a job that never
# started is refunded, and one that ran while no process heard it keeps the estimate.
SETTLE = """
CREATE FUNCTION settle_tenant_charge() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE tenant_shares
    SET unsettled_seconds = unsettled_seconds - OLD.charged_seconds,
        virtual_seconds = virtual_seconds + (
        CASE WHEN NEW.started_at IS NOT NULL
                 THEN greatest(extract(epoch FROM coalesce(NEW.finished_at, now())
                                                  - NEW.started_at), 0)
             -- It ran, unseen (its events missed, settled from the backend's history).
             WHEN NEW.status = 'uploading' THEN OLD.charged_seconds
             ELSE 0 END
        - OLD.charged_seconds
    ) / coalesce((SELECT weight FROM api_keys WHERE key_hash = NEW.api_key_hash), 1)
    WHERE tenant = coalesce(NEW.api_key_hash, '');
    RETURN NULL;
END
$$
"""
SETTLE_ON_LEAVING = f"""
CREATE TRIGGER jobs_settle_tenant_charge
AFTER UPDATE OF status ON jobs FOR EACH ROW
WHEN (OLD.status IN {ON_GPU} AND NEW.status NOT IN {ON_GPU}
      AND OLD.charged_seconds IS NOT NULL)
EXECUTE FUNCTION settle_tenant_charge()
"""


def upgrade() -> None:
    # One row per tenant ('' for the jobs of no key). virtual_seconds: the GPU-seconds its
    # jobs were charged (estimated at claim, settled at the end) over its weight; last_start:
    # where its latest claimed job started in that time. The largest last_start is the
    # fleet's virtual clock: a tenant arriving (or back after idling) starts there.
    # unsettled_seconds: the estimates charged for its jobs on GPUs now (0 when none).
    op.create_table(
        "tenant_shares",
        sa.Column("tenant", sa.String(64), primary_key=True),
        sa.Column("virtual_seconds", sa.Float(), nullable=False),
        sa.Column("last_start", sa.Float(), nullable=False),
        sa.Column("unsettled_seconds", sa.Float(), nullable=False),
    )
    # The estimated run seconds the claim charged the job's tenant for its current attempt.
    op.add_column("jobs", sa.Column("charged_seconds", sa.Float(), nullable=True))
    # The claim finds the tenants with queued work (a skip scan) and each one's head jobs.
    op.create_index(
        "jobs_queued_by_tenant", "jobs",
        [sa.text("coalesce(api_key_hash, '')"), sa.text("priority DESC"), "created_at"],
        postgresql_where=sa.text("status = 'queued'"),
    )
    op.execute(SETTLE)
    op.execute(SETTLE_ON_LEAVING)


def downgrade() -> None:
    op.execute("DROP TRIGGER jobs_settle_tenant_charge ON jobs")
    op.execute("DROP FUNCTION settle_tenant_charge()")
    op.drop_index("jobs_queued_by_tenant", table_name="jobs")
    op.drop_column("jobs", "charged_seconds")
    op.drop_table("tenant_shares")
