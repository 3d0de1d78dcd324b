# Blixard: `make run` starts the suite, `make test` runs every test. Both set themselves up.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
INSTALLED := $(VENV)/.installed
PROTOS := $(shell find protos -name '*.proto')
STUBS := gen/.stamp

.PHONY: help venv protos run test test-fast lint fmt bench bench-all bench-peers migration up down logs clean

help:
	@echo "make run     start jobs, queue and VM services and a worker on SQLite under ./var/"
	@echo "make test    run the whole test suite"
	@echo "make lint    ruff, mypy and buf lint"
	@echo "make protos  generate the gRPC stubs into gen/"
	@echo "make bench   the end-to-end benchmark (bench/README.md); make bench-peers: beside Celery and PgQueuer"

$(INSTALLED): requirements.txt requirements-dev.txt requirements-protos.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	$(PY) -c "import sysconfig, pathlib; pathlib.Path(sysconfig.get_paths()['purelib'], 'blixard-dev.pth').write_text('$(CURDIR)\n$(CURDIR)/gen\n')"
	@touch $@

venv: $(INSTALLED)

$(STUBS): $(INSTALLED) $(PROTOS)
	rm -rf gen && mkdir -p gen
	PATH="$(CURDIR)/$(BIN):$$PATH" $(PY) -m grpc_tools.protoc -Iprotos --python_out=gen --grpc_python_out=gen \
		--mypy_out=gen --mypy_grpc_out=gen $(PROTOS)
	find gen/blixard -type d -exec touch {}/__init__.py \;
	@touch $@

protos: $(STUBS)

# The guest image for the VM service (Debian's kernel, busybox, the agent); cached, rebuilt
# only when its inputs change. `make run` builds it where QEMU is installed.
vm-image:
	$(PYTHON) vm/build_image.py --out var/vm-image

run: $(STUBS) $(if $(shell command -v qemu-system-x86_64 2>/dev/null),vm-image)
	$(PY) -m tools.run_suite

test: $(STUBS)
	$(PY) -m pytest

test-fast: $(STUBS)
	$(PY) -m pytest tests/unit tests/grpc

lint: $(STUBS)
	$(BIN)/ruff check services tools tests bench
	$(BIN)/ruff format --check services tools tests bench
	$(BIN)/mypy
	cd protos && ../$(BIN)/buf lint
	@# buf breaking: the contracts must stay compatible with the previous commit's.
	@if git cat-file -e HEAD~1:protos/buf.yaml 2>/dev/null; then \
		cd protos && ../$(BIN)/buf breaking --against '../.git#ref=HEAD~1,subdir=protos'; \
	else echo "buf breaking: no earlier protos to compare with"; fi

fmt: $(INSTALLED)
	$(BIN)/ruff format services tools tests bench
	$(BIN)/ruff check --fix services tools tests bench

# Benchmarks (bench/README.md). `make bench`: the suite end to end, the peers' method
# (BENCH_ARGS=--quick for a short run; BENCH_N, BENCH_REPS, BENCH_LAT_N as the peers').
# `make bench-peers`: Celery and PgQueuer (../shared/peers/run.sh) and Blixard in one
# invocation, one table with ratios and issue 16's targets; small knobs, overridable.
PEERS_DIR ?= ../shared/peers
BENCH_RESULTS ?= $(CURDIR)/var/bench-results

bench: $(STUBS)
	BENCH_RESULTS="$(BENCH_RESULTS)" $(PY) -m bench.e2e $(BENCH_ARGS)

bench-all: bench
	$(PY) -m bench.jobs_bench $(BENCH_ARGS)
	$(PY) -m bench.queue_bench $(BENCH_ARGS)
	$(PY) -m bench.worker_bench $(BENCH_ARGS)

# The knobs' defaults are the shell's (a target-specific ?= would stop make from passing
# BENCH_N from the environment to `make bench`).
bench-peers: $(STUBS)
	@test -x "$(PEERS_DIR)/run.sh" || { echo "make bench-peers: no $(PEERS_DIR)/run.sh (the shared peers benchmark beside this checkout); set PEERS_DIR=/path/to/shared/peers" >&2; exit 1; }
	@rc=0; \
	export BENCH_N=$${BENCH_N:-2000} BENCH_REPS=$${BENCH_REPS:-1} BENCH_LAT_N=$${BENCH_LAT_N:-100} \
		CELERY_SETTINGS=$${CELERY_SETTINGS:-prefork-c2} \
		PGQUEUER_SETTINGS=$${PGQUEUER_SETTINGS:-2proc-batch10} BENCH_RESULTS="$(BENCH_RESULTS)"; \
	echo "== peers: $(PEERS_DIR)/run.sh celery pgqueuer (BENCH_N=$$BENCH_N BENCH_REPS=$$BENCH_REPS BENCH_LAT_N=$$BENCH_LAT_N)"; \
	"$(PEERS_DIR)/run.sh" celery pgqueuer || rc=$$?; \
	echo "== Blixard: bench/e2e.py $(BENCH_ARGS)"; \
	$(PY) -m bench.e2e $(BENCH_ARGS) || rc=$$?; \
	exit $$rc

COMPOSE := $(PY) -m tools.compose

# Needs the venv (its python), not newer than it: an existing .env is never rewritten.
.env: | $(INSTALLED)
	$(PY) -m tools.dotenv

up: $(INSTALLED) .env
	$(COMPOSE) up -d --build --wait

# `make down ARGS=-v` also deletes the data volumes (PostgreSQL's, the VM service's).
down: $(INSTALLED)
	$(COMPOSE) down $(ARGS)

logs: $(INSTALLED)
	$(COMPOSE) logs -f --tail=200

migration: $(INSTALLED)
	$(PY) -m tools.new_migration $(SERVICE) "$(MESSAGE)"

clean:
	rm -rf gen .venv var .pytest_cache .mypy_cache .ruff_cache
