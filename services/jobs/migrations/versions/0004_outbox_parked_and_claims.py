"""outbox: parked messages (parked_at) and relay claims (claimed_by)

A message that can never apply is parked (kept, no longer delivered); on PostgreSQL each
relay claims the rows it reads for a short lease (claimed_by, until next_attempt_at), so
two replicas never send the same row.

Revision ID: 0005a7c3e1f2
Revises: 9c861f6e5e38
Create Date: 2026-12-03 12:00:00

"""

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0005a7c3e1f2"
down_revision: Union[str, Sequence[str], None] = "9c861f6e5e38"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.add_column(sa.Column("parked_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("claimed_by", sa.String(length=64), nullable=True))
    # Only parked rows are in it: listing and counting them never reads the backlog.
    op.create_index(
        "ix_outbox_parked",
        "outbox",
        ["id"],
        sqlite_where=sa.text("parked_at IS NOT NULL"),
        postgresql_where=sa.text("parked_at IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_outbox_parked", table_name="outbox")
    # A parked message goes back to being retried, as before parking existed.
    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.drop_column("claimed_by")
        batch_op.drop_column("parked_at")
