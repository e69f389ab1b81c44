# Set-up, run, test, lint and bench for transcoder.
#
# `make run` and `make test` each do all their own set-up on a fresh Debian 12 machine:
# the system commands the service runs (apt-get, only when one is missing; `make test` adds
# PostgreSQL for the store tests and nginx for the deployment docs' test), a virtualenv in
# .venv (only when missing) and the project installed into it (only when pyproject.toml is
# newer than the stamp left by the last install).

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
# apt-get and pip must not run at the same time as each other or as the command they set up.
.NOTPARALLEL:

PYTHON ?= python3
VENV := .venv
VENV_PY := $(VENV)/bin/python
# Inside the venv, so that a venv made anew always gets the project installed again.
STAMP := $(VENV)/.transcoder-installed
# The same for the `postgres` extra, which only `make test` needs.
PG_STAMP := $(VENV)/.transcoder-postgres-installed

BENCH_VENV := bench/.venv
BENCH_PY := $(BENCH_VENV)/bin/python
BENCH_STAMP := $(BENCH_VENV)/.bench-installed

PYTEST_ARGS ?=
# make run's address and data directory: make run LISTEN=tcp:8081:interface=127.0.0.1
LISTEN ?= tcp:8080:interface=127.0.0.1
DATA_DIR ?= ./data
SIZE_MIB ?= 1024
ROUNDS ?= 5

# command:debian-package pairs; a package is installed when its command is not on PATH.
RUNTIME_CMDS := mencoder:mencoder ffmpeg:ffmpeg ffprobe:ffmpeg curl:curl
BENCH_CMDS := nginx:nginx socat:socat curl:curl
# The store tests start a throwaway PostgreSQL cluster (tests/pg.py).  Debian keeps its
# server commands off PATH, so this is a glob: the package is installed when none matches.
TEST_POSTGRES := /usr/lib/postgresql/*/bin/initdb

# Shell snippet: apt-get install the Debian packages named in $$pkgs, as root directly or
# through sudo, or fail saying what to install.
define apt_install
if [ "$$(id -u)" = 0 ]; then as_root=""; \
elif command -v sudo >/dev/null 2>&1; then as_root="sudo"; \
else \
  echo "error: missing system packages: $$pkgs" >&2; \
  echo "       run this as root, install sudo, or run as root: apt-get install $$pkgs" >&2; \
  exit 1; \
fi; \
echo "installing system packages: $$pkgs"; \
$$as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q; \
$$as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$pkgs
endef

# $(call ensure_cmds,command:package ...): install the packages whose command is not on
# PATH; no apt-get at all when every command is there.
define ensure_cmds
pkgs=""; \
for pair in $(1); do \
  command -v "$${pair%%:*}" >/dev/null 2>&1 || pkgs="$$pkgs $${pair#*:}"; \
done; \
pkgs=$$(printf '%s\n' $$pkgs | sort -u | tr '\n' ' '); \
if [ -n "$${pkgs// }" ]; then $(apt_install); fi
endef

.PHONY: help setup sysdeps test-sysdeps venv test-venv run test lint bench bench-deps vendor

help:
	@echo "make run     set up, then serve on 127.0.0.1:8080 with data in ./data (LISTEN=..., DATA_DIR=...)"
	@echo "make test    set up (PostgreSQL, nginx and the postgres extra too), then lint and run pytest"
	@echo "             (extra arguments: PYTEST_ARGS='...')"
	@echo "make lint    ruff check, ruff format --check, mypy"
	@echo "make bench   uploads against nginx, aiohttp and stock twisted.web, the job engine's"
	@echo "             overhead, downloads against nginx, and the load test; see docs/performance.md"
	@echo "make bench-cluster  several nodes on one PostgreSQL: drain rate, statements per job,"
	@echo "             claim latency (not part of make bench; CLUSTER_ARGS='...')"
	@echo "make setup   only the set-up that run and test do"
	@echo "make vendor  refresh the web page's tus-js-client from npm (ui/package-lock.json; needs npm)"

setup: sysdeps venv

sysdeps:
	@$(call ensure_cmds,$(RUNTIME_CMDS))

# `make run` needs no PostgreSQL: only the tests install it.  nginx too: a test checks the
# nginx blocks of docs/deployment.md with `nginx -t` (with a certificate made by openssl);
# the doc check runs docs/api.md's examples, which use jq; node and npm: tests/test_tus_js.py
# runs tus-js-client (pinned in tests/js/package-lock.json).  Chromium: the web page's tests
# drive Debian's build through Playwright (never `playwright install`, which downloads one).
TEST_CMDS := nginx:nginx openssl:openssl jq:jq node:nodejs npm:npm chromium:chromium
TEST_JS := tests/js

test-sysdeps: sysdeps
	@if ! compgen -G '$(TEST_POSTGRES)' >/dev/null; then pkgs=postgresql; $(apt_install); fi
	@$(call ensure_cmds,$(TEST_CMDS))
	@# Only when missing; --prefer-offline uses npm's cache when the registry is out of reach.
	@if [ ! -d $(TEST_JS)/node_modules ]; then \
	  npm ci --prefix $(TEST_JS) --prefer-offline --no-audit --no-fund; \
	fi

# The stamp alone cannot tell that the project was uninstalled since: then install again.
venv: $(STAMP)
	@test -x $(VENV)/bin/transcoder || { rm -f $(STAMP); $(MAKE) --no-print-directory $(STAMP); }

$(VENV_PY):
	@if ! $(PYTHON) -c 'import venv, ensurepip' >/dev/null 2>&1; then \
	  if [ "$$(command -v $(PYTHON))" = /usr/bin/$(PYTHON) ]; then \
	    pkgs=python3-venv; $(apt_install); \
	  else \
	    echo "error: $(PYTHON) cannot make a virtualenv (no venv/ensurepip module)" >&2; exit 1; \
	  fi; \
	fi
	$(PYTHON) -m venv $(VENV)

# Make compares the stamp with pyproject.toml: a venv made by hand without the project
# installed has no stamp, so it gets the install too.
$(STAMP): pyproject.toml | $(VENV_PY)
	@echo "installing the project into $(VENV) (not installed yet, or pyproject.toml changed)"
	$(VENV_PY) -m pip install --disable-pip-version-check -q -e '.[test]'
	touch $@

test-venv: venv $(PG_STAMP)
	@$(VENV_PY) -c 'import psycopg, psycopg_pool' 2>/dev/null || { rm -f $(PG_STAMP); $(MAKE) --no-print-directory $(PG_STAMP); }

$(PG_STAMP): pyproject.toml | $(STAMP)
	@echo "installing the project with its postgres extra into $(VENV)"
	$(VENV_PY) -m pip install --disable-pip-version-check -q -e '.[test,postgres]'
	touch $@

run: setup
	$(VENV)/bin/transcoder serve --listen $(LISTEN) --data-dir $(DATA_DIR)

# Lint first: it takes seconds, and type or format slips fail here as in review.
test: test-sysdeps test-venv lint
	$(VENV)/bin/pytest $(PYTEST_ARGS)

# The web page's browser library, committed under the package so that `make run` needs no
# Node: refreshed from npm exactly as ui/package-lock.json pins it (`npm ci`), with its licence.
UI_VENDOR := transcoder/http/ui/static/vendor
TUS_DIST := ui/node_modules/tus-js-client/dist

vendor:
	cd ui && npm ci --ignore-scripts --no-audit --no-fund
	install -m 644 $(TUS_DIST)/tus.min.js $(TUS_DIST)/tus.min.js.map $(UI_VENDOR)/
	install -m 644 ui/node_modules/tus-js-client/LICENSE $(UI_VENDOR)/tus-js-client.LICENSE.txt
	rm -rf ui/node_modules

# The upload bench's copied scripts are kept byte for byte as they were handed over.
LINT_EXCLUDE := $(foreach f,upload_bench.py peers/aiohttp_upload.py peers/twisted_naive.py,--extend-exclude bench/$(f))

lint: venv
	$(VENV)/bin/ruff check $(LINT_EXCLUDE) .
	$(VENV)/bin/ruff format --check $(LINT_EXCLUDE) .
	$(VENV)/bin/mypy

bench-deps: setup $(BENCH_STAMP)
	@$(call ensure_cmds,$(BENCH_CMDS))

# The peers (aiohttp, stock twisted.web) run from their own venv, so the project's test
# venv never holds packages the project does not declare.
$(BENCH_PY):
	$(PYTHON) -m venv $(BENCH_VENV)

$(BENCH_STAMP): bench/requirements.txt | $(BENCH_PY)
	$(BENCH_PY) -m pip install --disable-pip-version-check -q -r bench/requirements.txt
	touch $@

# The whole bench, in this order: uploads, the job engine, downloads, the load test (when
# bench/load_test.py exists).  Each step can run alone and installs what it needs.  The engine
# and download steps take the upload bench's lock, so no two benches measure each other.
ENGINE_SECONDS ?= 60
ENGINE_ROUNDS ?= 3
DOWNLOAD_MIB ?= 1024
LOAD_TEST_ARGS ?=
BENCH_LOCK = flock "$${TMPDIR:-/tmp}/transcoder-upload-bench.lock"

.PHONY: bench-upload bench-engine bench-download bench-load bench-cluster

bench: bench-upload bench-engine bench-download bench-load

bench-upload: bench-deps
	SIZE_MIB=$(SIZE_MIB) ROUNDS=$(ROUNDS) bench/run_upload_bench.sh

bench-engine: setup
	$(BENCH_LOCK) $(VENV_PY) bench/engine_bench.py --seconds $(ENGINE_SECONDS) --rounds $(ENGINE_ROUNDS)

bench-download: setup
	@$(call ensure_cmds,nginx:nginx curl:curl)
	$(BENCH_LOCK) $(VENV_PY) bench/download_bench.py --size-mib $(DOWNLOAD_MIB) --rounds $(ROUNDS)

bench-load: setup
	@if [ -f bench/load_test.py ]; then \
	  echo "$(VENV_PY) bench/load_test.py $(LOAD_TEST_ARGS)"; \
	  $(BENCH_LOCK) $(VENV_PY) bench/load_test.py $(LOAD_TEST_ARGS); \
	else \
	  echo "bench/load_test.py does not exist yet: load test skipped"; \
	fi

# Several nodes on one throwaway PostgreSQL (issue 16): it needs what the store tests need
# (PostgreSQL, the postgres extra), so it is set up as `make test` is.  Not part of `make bench`.
CLUSTER_ARGS ?=

bench-cluster: test-sysdeps test-venv
	$(BENCH_LOCK) $(VENV_PY) bench/cluster_bench.py $(CLUSTER_ARGS)
