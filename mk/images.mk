# Container images and the Docker Compose stack (included by the top-level Makefile).
#
#   make up [CONSUMERS=3]   secrets + base image + images, then the single-host stack, detached
#                           (installs the pinned Docker Compose v2 plugin first if it is missing)
#   make logs | ps | stats  follow the logs / list containers / queue counts from the server
#   make down               stop and remove the stack (the server's data volume is kept)
#   make clean              as down, and remove the data volume too
#   make images             build queuekit-{server,consumer,producer}:$(QUEUEKIT_IMAGE_TAG)
#   make base-image         make sure $(BASE_IMAGE) exists (pull it, or build queuekit/base:*)
#   make secrets            create secrets/queuekit_authkey if absent (dir 0700, file 0644)
#   make lint-docker        hadolint on the Dockerfiles, `docker compose config` on every file
#
# Settings: make VAR=... > environment > .env (KEY=value lines, as `cp .env.example .env` makes)
# > defaults. Compose gets the same .env through --env-file (it would otherwise look in compose/).
# Every target that runs Compose depends on compose-plugin (Makefile): on a Docker without
# `docker compose` it installs the pinned plugin, as `make test` does.

# A fragment must not pick the default goal for the top-level Makefile: remember it (restored
# at the end of this file).
images_mk_default_goal := $(.DEFAULT_GOAL)

ENV_FILE ?= .env
# Last `KEY=value` of $(ENV_FILE) for KEY=$(1), surrounding quotes removed; empty when absent.
dotenv = $(shell [ -f '$(ENV_FILE)' ] && sed -n -e "s/^[[:space:]]*$(1)=[\"']\{0,1\}\([^\"']*\)[\"']\{0,1\}[[:space:]]*$$/\1/p" '$(ENV_FILE)' | tail -n 1)

# default_setting VAR,DEFAULT: unless VAR comes from the command line or the environment, set it
# (once, simply expanded) from $(ENV_FILE), else DEFAULT.
default_setting = $(if $(filter undefined default,$(origin $(1))),$(eval $(1) := $(or $(call dotenv,$(1)),$(2))))

DEFAULT_BASE_IMAGE := python:3.13-slim
AIRGAP_BASE_IMAGE := queuekit/base:trixie
$(call default_setting,BASE_IMAGE,$(DEFAULT_BASE_IMAGE))
$(call default_setting,QUEUEKIT_IMAGE_TAG,latest)
$(call default_setting,CONSUMERS,3)
HADOLINT ?= hadolint
COMPOSE ?= docker compose

# Image metadata (OCI labels), handed to the builds as build args.
$(call default_setting,QUEUEKIT_VERSION,$(or $(shell sed -n 's/^version *= *"\(.*\)"/\1/p' pyproject.toml 2>/dev/null),0.0.0-dev))
$(call default_setting,QUEUEKIT_REVISION,$(or $(shell git rev-parse --short HEAD 2>/dev/null),unknown))
$(call default_setting,QUEUEKIT_SOURCE,$(or $(shell git remote get-url origin 2>/dev/null),unknown))

# The base image actually used: `make base-image` writes it here (it can differ from BASE_IMAGE
# when python:3.13-slim cannot be pulled and queuekit/base:trixie is built instead).
BASE_IMAGE_STAMP := .cache/base-image
COMPOSE_FILES := compose/compose.yaml compose/compose.server.yaml compose/compose.workers.yaml
STACK = $(COMPOSE) $(if $(wildcard $(ENV_FILE)),--env-file $(ENV_FILE)) -f compose/compose.yaml
# Prefix for the compose commands that build or create containers: the same base image, tag and
# labels as `make images` (the environment wins over --env-file in Compose).
IMAGE_ENV = BASE_IMAGE="$$(cat $(BASE_IMAGE_STAMP))" QUEUEKIT_IMAGE_TAG='$(QUEUEKIT_IMAGE_TAG)' \
	QUEUEKIT_VERSION='$(QUEUEKIT_VERSION)' QUEUEKIT_REVISION='$(QUEUEKIT_REVISION)' \
	QUEUEKIT_SOURCE='$(QUEUEKIT_SOURCE)'

.PHONY: base-image images secrets up down clean logs ps stats lint-docker

base-image:
	@$(call need,docker,$(HOW_DOCKER))
	@mkdir -p $(dir $(BASE_IMAGE_STAMP)); \
	want='$(BASE_IMAGE)'; \
	if docker image inspect "$$want" >/dev/null 2>&1; then \
	  use="$$want"; \
	else case "$$want" in \
	  queuekit/base:*) scripts/build-base-image "$$want" && use="$$want" || exit 1 ;; \
	  *) if docker pull "$$want"; then use="$$want"; \
	     elif [ "$$want" = '$(DEFAULT_BASE_IMAGE)' ]; then \
	       echo "base-image: $$want cannot be pulled (no registry?): building $(AIRGAP_BASE_IMAGE) from the Debian archive instead"; \
	       echo "base-image: set BASE_IMAGE=$(AIRGAP_BASE_IMAGE) in .env to skip the pull attempt"; \
	       scripts/build-base-image '$(AIRGAP_BASE_IMAGE)' && use='$(AIRGAP_BASE_IMAGE)' || exit 1; \
	     else \
	       echo "error: base image $$want is neither present nor pullable." >&2; \
	       echo "       Without a registry, build one from the Debian archive: make images BASE_IMAGE=$(AIRGAP_BASE_IMAGE)" >&2; \
	       exit 1; \
	     fi ;; \
	esac; fi; \
	echo "$$use" > $(BASE_IMAGE_STAMP); \
	echo "base-image: using $$use"

# Built through Compose so that the build definitions live in one place (compose/compose.yaml);
# Compose builds with BuildKit through the engine API, no buildx plugin needed.
images: compose-plugin base-image
	@echo "images: building queuekit-{server,consumer,producer}:$(QUEUEKIT_IMAGE_TAG) FROM $$(cat $(BASE_IMAGE_STAMP))"
	@$(IMAGE_ENV) $(STACK) build

secrets:
	@$(call need,$(SYSTEM_PYTHON),$(HOW_PYTHON))
	@install -d -m 0700 secrets
	@if [ ! -s secrets/queuekit_authkey ]; then \
	  umask 077; PYTHONPATH=src $(SYSTEM_PYTHON) -m queuekit keygen > secrets/queuekit_authkey.tmp \
	    && [ -s secrets/queuekit_authkey.tmp ] \
	    && mv secrets/queuekit_authkey.tmp secrets/queuekit_authkey \
	    && echo "secrets: created secrets/queuekit_authkey" \
	    || { rm -f secrets/queuekit_authkey.tmp; echo "error: queuekit keygen failed" >&2; exit 1; }; \
	fi
	@# 0644 so that uid 10001 can read the bind-mounted secret; the 0700 dir keeps host users out.
	@chmod 0644 secrets/queuekit_authkey

up: compose-plugin secrets images
	@echo "up: starting the server, $(CONSUMERS) consumers and the demo producer"
	@$(IMAGE_ENV) $(STACK) up -d --scale consumer=$(CONSUMERS)
	@$(STACK) ps
	@echo "queuekit is up: 'make logs' to follow, 'make stats' for queue counts, 'make down' to stop."

down: compose-plugin
	$(STACK) down --remove-orphans

clean: compose-plugin
	$(STACK) down --remove-orphans --volumes

logs: compose-plugin
	$(STACK) logs -f

ps: compose-plugin
	$(STACK) ps -a

stats: compose-plugin
	$(STACK) exec -T server python3 -m queuekit stats

# Compose files are checked with the defaults only (not the local .env), plus the variables the
# multi-host files require.
lint-docker: compose-plugin
	@$(call need,$(HADOLINT),pip install -r requirements/lint.txt (make lint installs it into $(VENV)))
	$(HADOLINT) images/Dockerfile
	@set -e; for f in $(COMPOSE_FILES); do \
	  echo "docker compose config -q $$f"; \
	  QUEUEKIT_SERVER=queuekit-server.invalid:50000 QUEUEKIT_PUBLISH_ADDR=127.0.0.1 \
	    $(COMPOSE) --env-file /dev/null -f $$f config -q; \
	done

.DEFAULT_GOAL := $(images_mk_default_goal)
