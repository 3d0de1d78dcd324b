"""workers remember a drain (drained), so one that went offline comes back draining

Revision ID: 3d9a6b1c5e20
Revises: 7c1f0e2a9b34
Create Date: 2026-12-01 03:40:00

"""

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "3d9a6b1c5e20"
down_revision: Union[str, Sequence[str], None] = "7c1f0e2a9b34"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    with op.batch_alter_table("workers", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("drained", sa.Boolean(), nullable=False, server_default=sa.false())
        )
    # Workers draining before the upgrade stay drained.
    workers = sa.table("workers", sa.column("state", sa.String), sa.column("drained", sa.Boolean))
    op.get_bind().execute(
        sa.update(workers).where(workers.c.state == "DRAINING").values(drained=True)
    )


def downgrade() -> None:
    # Without the column, only the state can say a worker is drained.
    workers = sa.table("workers", sa.column("state", sa.String), sa.column("drained", sa.Boolean))
    op.get_bind().execute(
        sa.update(workers)
        .where(workers.c.drained, workers.c.state == "OFFLINE")
        .values(state="DRAINING")
    )
    with op.batch_alter_table("workers", schema=None) as batch_op:
        batch_op.drop_column("drained")
