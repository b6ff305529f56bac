# queuekit — the two commands of the README:
#   make up      build the images and start server + consumers + demo producer (Docker Compose)
#   make test    lint, then every test: unit (also on the images' Python 3.13), process, integration, k8s
#
# Other targets: make dev (tool environment), make lint, make test-fast, make test-py313, make bench,
# make images, make down, make clean, make compose-plugin, make k8s-* (see mk/k8s.mk), make help.

.DEFAULT_GOAL := help
SHELL := /bin/bash

VENV ?= .venv
PYTHON := $(VENV)/bin/python
SYSTEM_PYTHON ?= python3
PYTEST_ARGS ?=
# Tools for tests/k8s use the same virtualenv.
K8S_PYTHON = $(PYTHON)
export CHECKOV_BIN ?= $(abspath .cache/checkov-venv/bin/checkov)

# $(call need,TOOL,HOW): a shell line that stops the recipe with one line naming the missing
# TOOL and how to get it (exit 127, like a shell's "command not found"). HOW must not contain a
# comma (it is a make function argument).
need = command -v $(1) >/dev/null 2>&1 || { echo "error: make $@: '$(1)' not found: $(2)" >&2; exit 127; }
HOW_DOCKER := install Docker Engine (https://docs.docker.com/engine/install/) and check that 'docker info' works
HOW_PYTHON := install Python >= 3.11 (apt-get install python3 python3-venv) or set SYSTEM_PYTHON=/path/to/python3

include mk/*.mk

.PHONY: help dev compose-plugin lint mypy test test-fast test-py313 bench

help:
	@sed -n '2,7p' Makefile | sed 's/^# \{0,1\}//'

# --- tool environments ----------------------------------------------------------------------
# Each set of pinned tools is installed when a target first needs it (and again when its pin
# file changes); a stamp file records it. requirements/*.txt are the only source of the pins.
#   $(VENV)/.test-tools   requirements/dev.txt (+ unit.txt): pytest & co.   make test-fast
#   $(VENV)/.lint-tools   requirements/lint.txt: ruff, mypy, hadolint        make lint
#   $(VENV)/.k8s-tools, .cache/keda-models, .cache/checkov-venv              make test, k8s-test
#   $(VENV)/.installed    test + lint tools (what `make dev` prepares)
$(PYTHON):
	@$(call need,$(SYSTEM_PYTHON),$(HOW_PYTHON))
	@$(SYSTEM_PYTHON) -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
	  || { echo "error: make $@: $(SYSTEM_PYTHON) is older than 3.11 or lacks venv/ensurepip: $(HOW_PYTHON)" >&2; exit 1; }
	$(SYSTEM_PYTHON) -m venv $(VENV)

$(VENV)/.test-tools: requirements/dev.txt requirements/unit.txt requirements/postgres.txt | $(PYTHON)
	$(PYTHON) -m pip install -q -r requirements/dev.txt -r requirements/postgres.txt
	@touch $@

$(VENV)/.lint-tools: requirements/lint.txt | $(PYTHON)
	$(PYTHON) -m pip install -q -r requirements/lint.txt
	@touch $@

$(VENV)/.installed: $(VENV)/.test-tools $(VENV)/.lint-tools
	@touch $@

dev: $(VENV)/.installed compose-plugin

# Docker Compose v2 as a CLI plugin, when the machine lacks it (pinned by hash), into
# COMPOSE_PLUGIN_DIR: the plugin directory of the Docker CLI's config dir, where `docker`
# finds it without any other setting.
COMPOSE_PLUGIN_DIR ?= $(or $(DOCKER_CONFIG),$(HOME)/.docker)/cli-plugins
compose-plugin:
	@$(call need,docker,$(HOW_DOCKER))
	@if ! $(COMPOSE) version >/dev/null 2>&1; then \
	  if [ '$(COMPOSE)' != 'docker compose' ]; then \
	    echo "error: make $@: COMPOSE='$(COMPOSE)' does not run; unset COMPOSE to use the Docker Compose v2 plugin" >&2; exit 127; \
	  fi; \
	  $(call need,$(SYSTEM_PYTHON),$(HOW_PYTHON)); \
	  echo "compose-plugin: 'docker compose' is missing: installing the pinned plugin into $(COMPOSE_PLUGIN_DIR)"; \
	  COMPOSE_PLUGIN_DIR='$(COMPOSE_PLUGIN_DIR)' PYTHON='$(SYSTEM_PYTHON)' scripts/install-compose-plugin; \
	fi

# --- lint and tests -------------------------------------------------------------------------
lint: $(VENV)/.lint-tools compose-plugin
	$(VENV)/bin/ruff check src tests bench
	$(MAKE) --no-print-directory mypy
	$(MAKE) --no-print-directory lint-docker HADOLINT=$(VENV)/bin/hadolint

# The type check alone (settings and the files to check: pyproject.toml, [tool.mypy]).
MYPY_ARGS ?=
mypy: $(VENV)/.lint-tools
	$(VENV)/bin/mypy $(MYPY_ARGS)

# BASE_IMAGE for the test images: what `make base-image` settled on.
test: lint $(VENV)/.test-tools k8s-deps k8s-checkov base-image postgres-wheels postgres-image test-py313
	BASE_IMAGE="$$(cat $(BASE_IMAGE_STAMP))" TC_HOST=127.0.0.1 TESTCONTAINERS_RYUK_DISABLED=true \
	  $(PYTHON) -m pytest $(PYTEST_ARGS)

# Without Docker: unit and loopback process tests only.
test-fast: $(VENV)/.test-tools
	$(PYTHON) -m pytest -m "not integration and not k8s" $(PYTEST_ARGS)

# tests/unit on the images' Python (3.13 in the base image) as well as on the host's: in a
# container from the base image, without network, with the checkout mounted read-only and the
# pinned test tools (requirements/unit.txt) as wheels downloaded on the host for CPython 3.13 on
# this platform. The base image has no pip: a wheel is a zip of site-packages files, so they are
# unzipped into a directory on PYTHONPATH in the container (a tmpfs; exec: hypothesis has a
# compiled extension). It runs as the caller's uid (it reads the checkout), or as the images'
# uid 10001 when the caller is root.
WHEELHOUSE := .cache/wheelhouse
PY313_PYTEST_ARGS ?=
$(WHEELHOUSE)/.complete: requirements/unit.txt | $(PYTHON)
	@rm -rf $(WHEELHOUSE) && mkdir -p $(WHEELHOUSE)
	$(PYTHON) -m pip download -q --only-binary=:all: --python-version 3.13 -d $(WHEELHOUSE) -r requirements/unit.txt
	@touch $@

test-py313: base-image $(WHEELHOUSE)/.complete
	@$(call need,docker,$(HOW_DOCKER))
	docker run --rm --network none --read-only --tmpfs /tmp:exec,size=256m,mode=1777 \
	  --cap-drop ALL --security-opt no-new-privileges:true --user "$$(id -u | sed 's/^0$$/10001/'):$$(id -g | sed 's/^0$$/10001/')" \
	  --label queuekit.test=py313 \
	  -v '$(CURDIR):/repo:ro' -w /repo \
	  -e PYTHONDONTWRITEBYTECODE=1 -e HYPOTHESIS_STORAGE_DIRECTORY=/tmp/hypothesis \
	  --entrypoint /bin/sh "$$(cat $(BASE_IMAGE_STAMP))" -c \
	  'set -e; for w in $(WHEELHOUSE)/*.whl; do python3 -m zipfile -e "$$w" /tmp/site; done; \
	   python3 -c "import sys; print(\"test-py313: Python\", sys.version.split()[0])"; \
	   PYTHONPATH=/tmp/site exec python3 -m pytest -p no:cacheprovider tests/unit $(PY313_PYTEST_ARGS)'

bench:
	@$(call need,$(SYSTEM_PYTHON),$(HOW_PYTHON))
	PYTHONPATH=src $(SYSTEM_PYTHON) bench/throughput.py $(BENCH_ARGS)
