"""Alembic environment of the queue service (run by services.common.migrations.upgrade)."""

from alembic import context

from services.common.migrations import run_env
from services.queue.models import Base

run_env(context, Base.metadata)
