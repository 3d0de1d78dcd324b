# One image for every Blixard service; the command picks the service:
#   docker run IMAGE services.jobs | services.queue | services.vms | services.worker
# BASE_IMAGE is any Debian-based image with python3 and python3-venv (default: the
# official slim Python image). The "vms" target adds QEMU for the VM service.
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
RUN python3 -m venv /opt/venv && python3 -m venv /opt/protoc
COPY requirements.txt requirements-protos.txt /src/
RUN /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check -r /src/requirements.txt \
 && /opt/protoc/bin/pip install --no-cache-dir --disable-pip-version-check -r /src/requirements-protos.txt
COPY protos /src/protos
RUN mkdir -p /src/gen \
 && /opt/protoc/bin/python -m grpc_tools.protoc -I/src/protos --python_out=/src/gen \
      --grpc_python_out=/src/gen $(find /src/protos -name '*.proto') \
 && find /src/gen/blixard -type d -exec touch {}/__init__.py \;

FROM ${BASE_IMAGE} AS runtime
RUN useradd --system --create-home --uid 10001 --shell /usr/sbin/nologin blixard \
 && mkdir -p /app/var && chown blixard /app/var
COPY --from=build /opt/venv /opt/venv
COPY --from=build /src/gen /app/gen
COPY services /app/services
COPY tools /app/tools
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app:/app/gen \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /app
USER blixard
ENTRYPOINT ["python3", "-m"]
CMD ["services.jobs"]

# The guest image (Debian's kernel, busybox, the agent), built from Debian packages.
FROM ${BASE_IMAGE} AS vm-image
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      busybox-static cpio gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
COPY vm /src/vm
RUN apt-get update && python3 /src/vm/build_image.py --out /opt/vm-image \
 && rm -rf /var/lib/apt/lists/*

FROM runtime AS vms
USER root
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends qemu-system-x86 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=vm-image /opt/vm-image /opt/vm-image
ENV VMS_IMAGE_DIR=/opt/vm-image
USER blixard
