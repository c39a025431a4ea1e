"""a tenant's charge is settled by the job's end of executing (`uploading_at`), whichever
statement records it: the job's end records it too now when its outputs are stored soon, and a
job that ran while no process heard its start (settled from its backend's history) kept its
estimate only when `uploading` was written on its own; it was refunded when the job's end
carried it

Revision ID: 0033
Revises: 0031
Create Date: 2026-12-07
"""

import importlib

from alembic import op

revision = "0033"
down_revision = "0031"
branch_labels = None
depends_on = None

# As 0017's, but the run ends at `uploading_at` when the statement records it (the upload is
# no GPU time), and a job with an end of executing and no start ran unseen whatever state the
# statement writes. (The claim clears `uploading_at`: it is always the current attempt's.)
SETTLE = """
CREATE OR REPLACE FUNCTION settle_tenant_charge() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE tenant_shares
    SET unsettled_seconds = unsettled_seconds - OLD.charged_seconds,
        virtual_seconds = virtual_seconds + (
        CASE WHEN NEW.started_at IS NOT NULL
                 THEN greatest(extract(epoch FROM coalesce(NEW.uploading_at, NEW.finished_at,
                                                           now())
                                                  - NEW.started_at), 0)
             -- It ran, unseen (its events missed, settled from the backend's history).
             WHEN NEW.uploading_at IS NOT NULL THEN OLD.charged_seconds
             ELSE 0 END
        - OLD.charged_seconds
    ) / coalesce((SELECT weight FROM api_keys WHERE key_hash = NEW.api_key_hash), 1)
    WHERE tenant = coalesce(NEW.api_key_hash, '');
    RETURN NULL;
END
$$
"""



def upgrade() -> None:
    op.execute(SETTLE)


def downgrade() -> None:
    fair_share = importlib.import_module("comfyfleet.migrations.versions.0017_fair_share")
    op.execute(fair_share.SETTLE.replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", 1))
