#!/bin/sh
# One database per service, created at the first start of the PostgreSQL container
# (run from /docker-entrypoint-initdb.d by the official image and by deploy/postgres).
set -eu
for db in blixard_jobs blixard_queue blixard_vms; do
  psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
    -c "CREATE DATABASE $db OWNER \"$POSTGRES_USER\""
done
