"""every write to the fleet's table notifies `comfyfleet_fleet`, so that each process takes
up a backend added, drained, enabled or removed through another as it commits (peers.py)

Revision ID: 0025
Revises: 0018
Create Date: 2026-12-06
"""

from alembic import op

revision = "0025"
down_revision = "0021"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Once per statement, whatever it touched: the listeners re-read the whole (small) table.
    op.execute("""
CREATE FUNCTION notify_fleet_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('comfyfleet_fleet', '');
    RETURN NULL;
END
$$
""")
    op.execute("""
CREATE TRIGGER backends_notify_fleet_changed
AFTER INSERT OR UPDATE OR DELETE ON backends
FOR EACH STATEMENT
EXECUTE FUNCTION notify_fleet_changed()
""")


def downgrade() -> None:
    op.execute("DROP TRIGGER backends_notify_fleet_changed ON backends")
    op.execute("DROP FUNCTION notify_fleet_changed()")
