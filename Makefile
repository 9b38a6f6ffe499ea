# The one place the MinIO server is pinned. The Go module proxy serves MinIO under this pseudo-version
# (it refuses the RELEASE.* tag names); `go version -m .bin/minio` shows it back.
MINIO_VERSION := v0.0.0-20260212201848-7aac2a2c5b7c
MIN_GO := 1.24

SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
MAKEFLAGS += --no-builtin-rules

ROOT := $(abspath $(dir $(lastword $(MAKEFILE_LIST))))
VENV := $(ROOT)/.venv
PY := $(VENV)/bin/python
VENV_STAMP := $(VENV)/.installed
BIN := $(ROOT)/.bin
MINIO_BIN := $(BIN)/minio
MINIO_STAMP := $(BIN)/minio.version
PYTEST_ARGS ?=
BENCH_ARGS ?=

# The first interpreter >= 3.11 that really runs (pyenv has shims for versions that are not active).
PYTHON ?= $(shell for p in python3 python3.13 python3.12 python3.11; do \
	"$$p" -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1 && { command -v "$$p"; break; }; \
	done; true)
GO ?= $(shell command -v go || { test -x /usr/local/go/bin/go && echo /usr/local/go/bin/go; } || true)

.PHONY: help venv minio print-minio-version run test lint chaos bench fmt clean distclean

help:
	@echo "make venv        .venv with the project and its dev tools (again only when pyproject.toml changes)"
	@echo "make minio       build .bin/minio $(MINIO_VERSION) with Go >= $(MIN_GO) (once per version)"
	@echo "make run         PostgreSQL + MinIO + the reactor on loopback, state in .stack/ (Ctrl-C stops all)"
	@echo "make test        unit, integration and fast chaos tests (real PostgreSQL and MinIO)"
	@echo "make chaos       every chaos test, slow ones included"
	@echo "make bench       throughput/latency table vs raw, seed-style, procrastinate (BENCH_ARGS=--quick: smoke run)"
	@echo "make lint        ruff check, ruff format --check, mypy --strict"
	@echo "make fmt         ruff format and ruff check --fix"
	@echo "make clean       caches and build leftovers (keeps .venv, .bin, .stack); distclean removes those too"
	@echo "make print-minio-version"

venv: $(VENV_STAMP)

$(VENV_STAMP): $(ROOT)/pyproject.toml
	@if [ -z "$(PYTHON)" ]; then \
		echo "error: Python >= 3.11 is needed: put python3.11 (or newer) on PATH, or make PYTHON=/path/to/python3.11" >&2; \
		exit 1; \
	fi
	@if [ -x "$(PY)" ] && ! "$(PY)" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then \
		echo "--> $(VENV) has Python < 3.11: recreating it"; rm -rf "$(VENV)"; \
	fi
	@if [ ! -x "$(PY)" ]; then echo "--> creating $(VENV) with $(PYTHON)"; "$(PYTHON)" -m venv "$(VENV)"; fi
	cd "$(ROOT)" && "$(PY)" -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch "$@"

print-minio-version:
	@echo "$(MINIO_VERSION)"

# Up to date when the binary exists and the stamp names this version. A binary built by hand with the
# same version (go version -m shows it) is adopted instead of rebuilt. GOMODCACHE/GOCACHE: Go's defaults.
minio:
	@if [ -n "$${REACTOR_MINIO_BIN:-}" ]; then \
		echo "--> using REACTOR_MINIO_BIN=$$REACTOR_MINIO_BIN, not building"; exit 0; \
	fi; \
	if [ -x "$(MINIO_BIN)" ] && [ "$$(cat "$(MINIO_STAMP)" 2>/dev/null)" = "$(MINIO_VERSION)" ]; then \
		echo "--> $(MINIO_BIN) is $(MINIO_VERSION): up to date"; exit 0; \
	fi; \
	if [ -x "$(MINIO_BIN)" ] && [ -n "$(GO)" ] && "$(GO)" version -m "$(MINIO_BIN)" 2>/dev/null \
		| grep -Eq "^[[:space:]]+mod[[:space:]]+github.com/minio/minio[[:space:]]+$(MINIO_VERSION)([[:space:]]|$$)"; then \
		echo "$(MINIO_VERSION)" > "$(MINIO_STAMP)"; echo "--> $(MINIO_BIN) is $(MINIO_VERSION): up to date"; exit 0; \
	fi; \
	if [ -z "$(GO)" ]; then \
		if [ -n "$${REACTOR_MINIO_ENDPOINT:-}" ]; then \
			echo "--> no Go; make run will use the MinIO at REACTOR_MINIO_ENDPOINT=$$REACTOR_MINIO_ENDPOINT"; exit 0; \
		fi; \
		echo "error: building MinIO needs Go >= $(MIN_GO) (https://go.dev/doc/install; apt-get install golang-go" \
			"if your distribution ships >= $(MIN_GO)), or set REACTOR_MINIO_ENDPOINT to an existing MinIO" \
			"(make run only; the tests start their own) or REACTOR_MINIO_BIN to a minio binary" >&2; \
		exit 1; \
	fi; \
	gover="$$("$(GO)" env GOVERSION)"; gover="$${gover#go}"; \
	if ! printf '%s\n%s\n' "$(MIN_GO)" "$$gover" | sort -V -C; then \
		echo "error: $(GO) is Go $$gover; building MinIO needs Go >= $(MIN_GO): install a newer Go, or set" \
			"REACTOR_MINIO_ENDPOINT to an existing MinIO (make run only) or REACTOR_MINIO_BIN to a minio binary" >&2; \
		exit 1; \
	fi; \
	echo "--> building MinIO $(MINIO_VERSION) into $(BIN) with Go $$gover (several minutes the first time)"; \
	mkdir -p "$(BIN)"; \
	rm -f "$(MINIO_STAMP)"; \
	GOBIN="$(BIN)" "$(GO)" install "github.com/minio/minio@$(MINIO_VERSION)"; \
	echo "$(MINIO_VERSION)" > "$(MINIO_STAMP)"; \
	echo "--> built $(MINIO_BIN)"

run: venv minio
	cd "$(ROOT)" && "$(PY)" -m reactor.devstack run

# pytest exits 5 when it ran no test: make treats that like any other failure.
test: venv minio
	cd "$(ROOT)" && "$(VENV)/bin/pytest" tests/unit tests/integration tests/chaos -m "not slow" $(PYTEST_ARGS)

chaos: venv minio
	cd "$(ROOT)" && "$(VENV)/bin/pytest" tests/chaos $(PYTEST_ARGS)

# Starts its own PostgreSQL and MinIO on free loopback ports; results in bench/results/ (see bench/README.md).
bench: venv minio
	cd "$(ROOT)" && "$(PY)" -m bench.run $(BENCH_ARGS)

lint: venv
	cd "$(ROOT)" && "$(VENV)/bin/ruff" check .
	cd "$(ROOT)" && "$(VENV)/bin/ruff" format --check .
	cd "$(ROOT)" && "$(VENV)/bin/mypy"

fmt: venv
	cd "$(ROOT)" && "$(VENV)/bin/ruff" format .
	cd "$(ROOT)" && "$(VENV)/bin/ruff" check --fix .

clean:
	cd "$(ROOT)" && rm -rf .mypy_cache .ruff_cache .pytest_cache build dist *.egg-info
	cd "$(ROOT)" && find . -path ./.venv -prune -o -type d -name __pycache__ -prune -exec rm -rf {} +

distclean: clean
	rm -rf "$(VENV)" "$(BIN)" "$(ROOT)/.stack"
