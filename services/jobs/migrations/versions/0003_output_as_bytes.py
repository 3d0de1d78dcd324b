"""jobs keep a job's output tail as bytes, its error and its events' reasons as UTF-8 bytes

Job output is bytes from arbitrary programs, and an error (and the reason of an event,
which may quote it) can hold any text: in text columns a NUL made PostgreSQL refuse the
whole batch of status reports, and bytes that are not UTF-8 were replaced. These columns
become BLOB / bytea; existing text is kept as its UTF-8. Undoing it keeps the text,
without NUL and with invalid UTF-8 replaced (text cannot hold more).

Revision ID: 9c861f6e5e38
Revises: 0ac222120c8f
Create Date: 2026-12-03 12:00:00

"""

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "9c861f6e5e38"
down_revision: Union[str, Sequence[str], None] = "0ac222120c8f"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

# (table, its key, a type the key compares as, the columns that become bytes)
TABLES = (
    ("jobs", "job_id", sa.String, ("output_tail", "error")),
    ("job_events", "id", sa.BigInteger, ("reason",)),
)
PAGE = 5_000


def upgrade() -> None:
    for table, _, _, columns in TABLES:
        with op.batch_alter_table(table, schema=None) as batch_op:
            for name in columns:
                batch_op.alter_column(
                    name,
                    existing_type=sa.Text(),
                    type_=sa.LargeBinary(),
                    existing_nullable=False,
                    postgresql_using=f"convert_to({name}, 'UTF8')",
                )


def _as_text(data: bytes) -> bytes:
    return data.decode("utf-8", errors="replace").replace("\x00", "").encode()


def _make_text(name: str, key: str, key_type: type, columns: tuple[str, ...]) -> None:
    """Rewrite, page by page, the values that text cannot hold."""
    table = sa.table(
        name, sa.column(key, key_type), *(sa.column(c, sa.LargeBinary) for c in columns)
    )
    connection = op.get_bind()
    after: object = None
    while True:
        query = sa.select(table.c[key], *(table.c[c] for c in columns)).order_by(table.c[key])
        if after is not None:
            query = query.where(table.c[key] > after)
        page = connection.execute(query.limit(PAGE)).all()
        if not page:
            return
        for row_key, *values in page:
            clean = [_as_text(bytes(v)) for v in values]
            if clean != [bytes(v) for v in values]:
                connection.execute(
                    sa.update(table)
                    .where(table.c[key] == row_key)
                    .values(dict(zip(columns, clean, strict=True)))
                )
        after = page[-1][0]


def downgrade() -> None:
    for table, key, key_type, columns in TABLES:
        _make_text(table, key, key_type, columns)
        with op.batch_alter_table(table, schema=None) as batch_op:
            for name in columns:
                batch_op.alter_column(
                    name,
                    existing_type=sa.LargeBinary(),
                    type_=sa.Text(),
                    existing_nullable=False,
                    postgresql_using=f"convert_from({name}, 'UTF8')",
                )
