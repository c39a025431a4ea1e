"""the webhook outbox's write has one definition, enqueue_webhook(), that every statement
writing a job and its webhook together calls (sql/jobs.sql)

Revision ID: 0019
Revises: 0018
Create Date: 2026-12-06
"""

from alembic import op

revision = "0019"
down_revision = "0018"
branch_labels = None
depends_on = None

# Put the delivery `delivery` (a webhook_deliveries row as a JSON object) in the outbox as the
# job `job`'s, and wake the webhook workers (webhooks/worker.py listens; the notification is
# sent when the transaction commits). A statement calls it on the row it wrote, LATERAL, so it
# runs once for each job written and never when the fence held nothing; with no delivery
# (null) it does nothing (STRICT). The body is parsed when first run, not here: a column added
# to webhook_deliveries is written without a new definition.
ENQUEUE = """
CREATE FUNCTION enqueue_webhook(job uuid, delivery jsonb) RETURNS void
LANGUAGE sql STRICT VOLATILE AS $$
    INSERT INTO webhook_deliveries
    SELECT * FROM jsonb_populate_record(NULL::webhook_deliveries,
                                        delivery || jsonb_build_object('job_id', job));
    SELECT pg_notify('comfyfleet_webhooks', '');
$$
"""


def upgrade() -> None:
    op.execute(ENQUEUE)


def downgrade() -> None:
    op.execute("DROP FUNCTION enqueue_webhook(uuid, jsonb)")
