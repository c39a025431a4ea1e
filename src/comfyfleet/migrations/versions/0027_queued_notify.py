"""a job put back in the backlog (requeued, released, by any statement) notifies
`comfyfleet_queued`, so that every process's dispatcher claims it as it commits, not at its
next safety pass (peers.py; a job submitted is told by the process it was submitted to)

Revision ID: 0027
Revises: 0026
Create Date: 2026-12-06
"""

from alembic import op

revision = "0027"
down_revision = "0026"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A trigger, so that no way a job is put back (every statement that does it, now or
    # later) goes unheard. A row trigger with a WHEN: a write that queues nothing (progress,
    # the claim itself) calls no function. The notification has no payload, so PostgreSQL
    # sends it once per transaction however many jobs it queued. Not on INSERT: a NOTIFY
    # serialises the commits of the transactions that send one, which would cost concurrent
    # submits a third of their rate; the process a job is submitted to tells the others,
    # a burst at once (peers.py).
    op.execute("""
CREATE FUNCTION notify_job_queued() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('comfyfleet_queued', '');
    RETURN NULL;
END
$$
""")
    op.execute("""
CREATE TRIGGER jobs_notify_queued_again
AFTER UPDATE OF status ON jobs
FOR EACH ROW WHEN (NEW.status = 'queued' AND OLD.status <> 'queued')
EXECUTE FUNCTION notify_job_queued()
""")


def downgrade() -> None:
    op.execute("DROP TRIGGER jobs_notify_queued_again ON jobs")
    op.execute("DROP FUNCTION notify_job_queued()")
