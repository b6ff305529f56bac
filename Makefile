# queuekit — the two commands of the README:
#   make up      build the images and start server + consumers + demo producer (Docker Compose)
#   make test    lint, then every test: unit, process (loopback), integration (Docker), k8s
#
# Other targets: make dev (tool environment), make lint, make bench, make images, make down,
# make clean, make k8s-* (see mk/k8s.mk), make help.

.DEFAULT_GOAL := help
SHELL := /bin/bash

VENV ?= .venv
PYTHON := $(VENV)/bin/python
SYSTEM_PYTHON ?= python3
PYTEST_ARGS ?=
# Tools for tests/k8s use the same virtualenv.
K8S_PYTHON = $(PYTHON)
export CHECKOV_BIN ?= $(abspath .cache/checkov-venv/bin/checkov)

include mk/*.mk

.PHONY: help dev compose-plugin lint test test-fast bench

help:
	@sed -n '2,7p' Makefile | sed 's/^# \{0,1\}//'

# The virtualenv with the pinned dev/test tools (idempotent: reinstalls when a pin file changes).
$(VENV)/.installed: requirements/dev.txt requirements/k8s.txt requirements/lint.txt requirements/keda-models.txt requirements/checkov.txt
	@[ -x $(PYTHON) ] || $(SYSTEM_PYTHON) -m venv $(VENV)
	$(PYTHON) -m pip install -q -r requirements/dev.txt -r requirements/k8s.txt -r requirements/lint.txt
	$(MAKE) --no-print-directory k8s-deps k8s-checkov K8S_PYTHON=$(PYTHON) >/dev/null
	@touch $@

dev: $(VENV)/.installed compose-plugin

# Docker Compose v2 as a CLI plugin, when the machine lacks it (pinned by hash).
compose-plugin:
	@docker compose version >/dev/null 2>&1 || scripts/install-compose-plugin

lint: dev
	$(VENV)/bin/ruff check src tests bench
	$(MAKE) --no-print-directory lint-docker HADOLINT=$(VENV)/bin/hadolint

# BASE_IMAGE for the test images: what `make base-image` settled on.
test: lint base-image
	BASE_IMAGE="$$(cat $(BASE_IMAGE_STAMP))" TC_HOST=127.0.0.1 TESTCONTAINERS_RYUK_DISABLED=true \
	  $(PYTHON) -m pytest $(PYTEST_ARGS)

# Without Docker: unit and loopback process tests only.
test-fast: dev
	$(PYTHON) -m pytest -m "not integration and not k8s" $(PYTEST_ARGS)

bench:
	PYTHONPATH=src $(SYSTEM_PYTHON) bench/throughput.py $(BENCH_ARGS)
