"""Alembic environment of the jobs service (run by services.common.migrations.upgrade)."""

from alembic import context

from services.common.migrations import run_env
from services.jobs.models import Base

run_env(context, Base.metadata)
