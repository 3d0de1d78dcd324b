"""Alembic environment of the VM service (run by services.common.migrations.upgrade)."""

from alembic import context

from services.common.migrations import run_env
from services.vms.models import Base

run_env(context, Base.metadata)
