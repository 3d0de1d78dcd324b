"""next_generations: a job's next generation waits here while its current one holds a lease

Revision ID: 0c7a11ce5e07
Revises: 3d9a6b1c5e20
Create Date: 2026-12-03 11:45:00

"""

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0c7a11ce5e07"
down_revision: Union[str, Sequence[str], None] = "3d9a6b1c5e20"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table(
        "next_generations",
        sa.Column("job_id", sa.String(length=64), nullable=False),
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("cancelled", sa.Boolean(), nullable=False),
        sa.Column("spec", sa.LargeBinary(), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("run_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("worker_types", sa.String(length=600), nullable=False),
        sa.Column("labels", sa.Text(), nullable=False),
        sa.Column("trace_context", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("job_id"),
    )


def downgrade() -> None:
    op.drop_table("next_generations")
