# postfach — every target creates .venv and installs into it, so it works on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DATA   ?= var
# Debian programs the interop tests drive (real clients, as users run them).
DEBIAN_TOOLS := swaks mbsync fetchmail mpop curl
DEBIAN_PKGS  := swaks isync fetchmail mpop curl ca-certificates
PYTEST_ARGS ?=

.PHONY: install demo serve test test-sqlite test-pg lint bench clean tools

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || { \
	  echo "creating the virtualenv failed: on Debian/Ubuntu run 'apt-get install python3-venv'"; exit 1; }
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,dev,bench]'
	@touch $(STAMP)

## make demo: set up a dev instance (demo domain, account, self-signed certificate) and run it.
demo: $(STAMP)
	$(BIN)/postfach demo --data $(DATA)

serve: $(STAMP)
	$(BIN)/postfach serve --data $(DATA)

## Install the Debian clients the interop tests use, when missing (needs root or sudo).
tools:
	@missing=""; for t in $(DEBIAN_TOOLS); do command -v $$t >/dev/null 2>&1 || missing="$$missing $$t"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages for the interop tests (missing:$$missing)"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $(DEBIAN_PKGS) >/dev/null; \
	fi

## make test: the whole suite on both store backends (the embedded SQLite store, then PostgreSQL).
## The PostgreSQL pass needs the server at 127.0.0.1:5432 (or $$POSTFACH_TEST_PG); without it the pass
## is skipped with a message locally, and fails when $$CI is set.
test: $(STAMP) tools
	@rc=0; \
	$(MAKE) --no-print-directory test-sqlite || rc=1; \
	$(MAKE) --no-print-directory test-pg || rc=1; \
	exit $$rc

test-sqlite: $(STAMP) tools
	PYTHONDONTWRITEBYTECODE=1 $(BIN)/pytest -n 2 -p no:cacheprovider --store=sqlite $(PYTEST_ARGS)

test-pg: $(STAMP) tools
	@if why=$$($(BIN)/python -m tests.backends 2>&1); then \
	  echo "PYTHONDONTWRITEBYTECODE=1 $(BIN)/pytest -n 2 -p no:cacheprovider --store=postgres $(PYTEST_ARGS)"; \
	  PYTHONDONTWRITEBYTECODE=1 $(BIN)/pytest -n 2 -p no:cacheprovider --store=postgres $(PYTEST_ARGS); \
	elif [ -n "$$CI" ]; then \
	  echo "FAIL: the PostgreSQL pass cannot run (CI is set): $$why" >&2; exit 1; \
	else \
	  echo "*** SKIPPING THE POSTGRESQL PASS: $$why ***"; \
	  echo "*** (start PostgreSQL, or set POSTFACH_TEST_PG=postgresql://user@host:port/db, then make test-pg) ***"; \
	fi

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python bench/run.py $(if $(QUICK),--quick,) $(if $(COMPARE),--compare $(COMPARE),)

include mk/reliability.mk

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
