"""a delivery written already leased (to the process whose statement writes it, which sends it
at once: jobs/deliveries.py `DeliverySlots`) wakes no webhook worker: only an unleased one,
due for any worker's pass, is notified on `comfyfleet_webhooks`

Revision ID: 0030
Revises: 0028
Create Date: 2026-12-06
"""

from alembic import op

revision = "0030"
down_revision = "0028"
branch_labels = None
depends_on = None

# As 0019's, but a woken worker would only run a pass that finds the leased delivery taken
# (a transaction for nothing, in every process listening).
ENQUEUE = """
CREATE OR REPLACE FUNCTION enqueue_webhook(job uuid, delivery jsonb) RETURNS void
LANGUAGE sql STRICT VOLATILE AS $$
    INSERT INTO webhook_deliveries
    SELECT * FROM jsonb_populate_record(NULL::webhook_deliveries,
                                        delivery || jsonb_build_object('job_id', job));
    SELECT pg_notify('comfyfleet_webhooks', '')
    WHERE delivery->>'lease_token' IS NULL;
$$
"""

ENQUEUE_0019 = """
CREATE OR REPLACE FUNCTION enqueue_webhook(job uuid, delivery jsonb) RETURNS void
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
    op.execute(ENQUEUE_0019)
