"""next_generations: a job's next generation waits here while its current one holds a lease

Revision ID: 0c7a11ce5e07
Revises: 6e17bcc13aaf
Create Date: 2026-12-03 11:45:00

"""

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0c7a11ce5e07"
down_revision: Union[str, Sequence[str], None] = "6e17bcc13aaf"
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
    # Without the table a next generation replaces its item at once, as it did before
    # (the old execution may still be running): held ones are not lost.
    bind = op.get_bind()
    held = sa.table(
        "next_generations",
        *(
            sa.column(name)
            for name in (
                "job_id",
                "generation",
                "cancelled",
                "spec",
                "priority",
                "max_attempts",
                "run_at",
                "worker_types",
                "labels",
                "trace_context",
                "created_at",
            )
        ),
    )
    items = sa.table(
        "items",
        *(
            sa.column(name)
            for name in (
                "job_id",
                "generation",
                "spec",
                "state",
                "priority",
                "run_at",
                "max_attempts",
                "attempt",
                "worker_types",
                "labels",
                "lease_token",
                "lease_deadline",
                "worker_id",
                "version",
                "cancel_requested",
                "exit_code",
                "output_tail",
                "error",
                "report_seq",
                "trace_context",
                "updated_at",
            )
        ),
    )
    for row in bind.execute(sa.select(held)).all():
        bind.execute(
            sa.update(items)
            .where(items.c.job_id == row.job_id)
            .values(
                generation=row.generation,
                spec=row.spec,
                state="CANCELLED" if row.cancelled else "WAITING",
                priority=row.priority,
                run_at=row.run_at or row.created_at,
                max_attempts=row.max_attempts or 3,
                attempt=0,
                worker_types=row.worker_types,
                labels=row.labels,
                lease_token=None,
                lease_deadline=None,
                worker_id="",
                version=items.c.version + 1,
                cancel_requested=bool(row.cancelled),
                exit_code=None,
                output_tail="",
                error="",
                report_seq=0,
                trace_context=row.trace_context,
                updated_at=row.created_at,
            )
        )
    op.drop_table("next_generations")
