#!/usr/bin/env bash
# CI cannot pull images, so it builds its own from Debian packages (see shared CI.md):
#   blixard-ci-base:bookworm    minbase Debian with python3, python3-venv, ca-certificates
#   blixard-ci-postgres:15      PostgreSQL 15 from Debian, run like the official image
# Each is built once per machine and kept (rebuilt when this script changes).
set -euo pipefail
cd "$(dirname "$0")/../.."
stamp="$(sha256sum deploy/ci/build-base-images.sh deploy/postgres/Dockerfile deploy/postgres/entrypoint.sh | sha256sum | cut -c1-12)"

if ! docker image inspect "blixard-ci-base:bookworm" --format '{{index .Config.Labels "stamp"}}' 2>/dev/null | grep -qx "$stamp"; then
  rootfs="$(mktemp -d)"
  trap 'rm -rf "$rootfs"' EXIT
  echo "ci: debootstrap a Debian bookworm base (about a minute)"
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$rootfs" http://deb.debian.org/debian >/dev/null
  # The network here goes through an intercepting proxy: trust what the host trusts.
  cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" -c . | docker import --change "LABEL stamp=$stamp" \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    - blixard-ci-base:bookworm >/dev/null
fi

if ! docker image inspect "blixard-ci-postgres:15" --format '{{index .Config.Labels "stamp"}}' 2>/dev/null | grep -qx "$stamp"; then
  echo "ci: building a PostgreSQL image from Debian's package"
  DOCKER_BUILDKIT=0 docker build -q --label "stamp=$stamp" \
    --build-arg BASE_IMAGE=blixard-ci-base:bookworm \
    -t blixard-ci-postgres:15 deploy/postgres >/dev/null
fi
echo "ci: base images ready (blixard-ci-base:bookworm, blixard-ci-postgres:15)"
