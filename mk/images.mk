# Container images and the Docker Compose stack (included by the top-level Makefile).
#
#   make up [CONSUMERS=3]   secrets + base image + images, then the single-host stack, detached
#                           (installs the pinned Docker Compose v2 plugin first if it is missing)
#   make logs | ps | stats  follow the logs / list containers / queue counts from the server
#   make down               stop and remove the stack (the server's data volume is kept)
#   make clean              as down, and remove the data volume too
#   make images             build queuekit-{server,consumer,producer}:$(QUEUEKIT_IMAGE_TAG)
#   make base-image         make sure $(BASE_IMAGE) exists (pull it, or build queuekit/base:*)
#   make secrets            create the role keys secrets/keys/{producer,consumer,admin}.default if
#                           absent and set their modes (see the target below)
#   make lint-docker        hadolint on the Dockerfiles, `docker compose config` on every file
#   make up TLS=1           the TLS variant: compose/compose.tls.yaml on top (mutual TLS with the
#                           certificates of $(SECRETS_DIR)/tls, made by `make certs`); pass TLS=1 to
#                           logs/ps/stats/down too, or put TLS=1 in .env
#   make up TLS=1 TUNNEL=1  and compose/compose.tunnel.yaml: the seed's stock BaseManager client
#                           reaches the TLS server through a `queuekit tunnel` sidecar (it replaces
#                           the demo producer)
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
# Role key files (in $(SECRETS_DIR)/keys) the consumers, the demo producer and `make stats` use.
$(call default_setting,QUEUEKIT_CONSUMER_KEY,consumer.default)
$(call default_setting,QUEUEKIT_PRODUCER_KEY,producer.default)
$(call default_setting,QUEUEKIT_ADMIN_KEY,admin.default)
# Group the containers are given (group_add) to read the keys; empty: the keys directory's group.
$(call default_setting,QUEUEKIT_KEYS_GID,)
# TLS=1: the stack with compose/compose.tls.yaml (mutual TLS on the queue port).
$(call default_setting,TLS,)
TLS_ON := $(filter 1 yes true on,$(TLS))
TLS_FILES := ca.crt server.crt server.key client.crt client.key
# TUNNEL=1 (with TLS=1): compose/compose.tunnel.yaml, a stock client behind a tunnel sidecar.
$(call default_setting,TUNNEL,)
TUNNEL_ON := $(filter 1 yes true on,$(TUNNEL))
SECRETS_DIR ?= secrets
# The uid:gid every image runs as (images/Dockerfile): the owner of the keys when made by root.
APP_UID_GID := 10001:10001
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
STACK = $(COMPOSE) $(if $(wildcard $(ENV_FILE)),--env-file $(ENV_FILE)) -f compose/compose.yaml \
	$(if $(TLS_ON),-f compose/compose.tls.yaml) $(if $(TUNNEL_ON),-f compose/compose.tunnel.yaml)
# Prefix for the compose commands that build or create containers: the same base image, tag and
# labels as `make images` (the environment wins over --env-file in Compose).
IMAGE_ENV = BASE_IMAGE="$$(cat $(BASE_IMAGE_STAMP))" QUEUEKIT_IMAGE_TAG='$(QUEUEKIT_IMAGE_TAG)' \
	QUEUEKIT_VERSION='$(QUEUEKIT_VERSION)' QUEUEKIT_REVISION='$(QUEUEKIT_REVISION)' \
	QUEUEKIT_SOURCE='$(QUEUEKIT_SOURCE)' $(KEYS_ENV)
# The key files' names and the group that reads them, for the commands that create containers.
KEYS_ENV = QUEUEKIT_CONSUMER_KEY='$(QUEUEKIT_CONSUMER_KEY)' QUEUEKIT_PRODUCER_KEY='$(QUEUEKIT_PRODUCER_KEY)' \
	QUEUEKIT_KEYS_GID="$(or $(QUEUEKIT_KEYS_GID),$$(ls -nd '$(SECRETS_DIR)/keys' 2>/dev/null | awk '{print $$4}'))"

.PHONY: base-image images secrets tls-files up down clean logs ps stats lint-docker postgres-wheels postgres-image

# psycopg wheels for the server image (the PostgreSQL journal), for the images' CPython 3.13, from
# the one pin file; images/Dockerfile unpacks them with no network.
PG_WHEELHOUSE := .cache/wheelhouse-postgres
$(PG_WHEELHOUSE)/.complete: requirements/postgres.txt | $(PYTHON)
	@rm -rf $(PG_WHEELHOUSE) && mkdir -p $(PG_WHEELHOUSE)
	$(PYTHON) -m pip download -q --only-binary=:all: --python-version 3.13 -d $(PG_WHEELHOUSE) -r requirements/postgres.txt
	@touch $@
postgres-wheels: $(PG_WHEELHOUSE)/.complete

# PostgreSQL for the journal, built from the Debian archive (no registry): queuekit/postgres:$(POSTGRES_SUITE).
POSTGRES_SUITE ?= trixie
postgres-image:
	@$(call need,docker,$(HOW_DOCKER))
	SUITE='$(POSTGRES_SUITE)' scripts/build-postgres-image 'queuekit/postgres:$(POSTGRES_SUITE)'

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
images: compose-plugin base-image postgres-wheels
	@echo "images: building queuekit-{server,consumer,producer}:$(QUEUEKIT_IMAGE_TAG) FROM $$(cat $(BASE_IMAGE_STAMP))"
	@$(IMAGE_ENV) $(STACK) build

# The role keys (issue 11): the server mounts $(SECRETS_DIR)/keys as its keys directory
# (QUEUEKIT_KEYS_DIR), each consumer only consumer.default, the demo producer only producer.default;
# admin.default is the operator's (make stats). An old single $(SECRETS_DIR)/queuekit_authkey becomes
# admin.default, so clients still holding it keep working (as admin) until they are given a role key.
# Modes: Compose bind-mounts the files as they are (it ignores a secret's uid/gid/mode), and the
# containers run as uid 10001. As root: keys owned by 10001:10001, files 0400, directory 0500, so
# only uid 10001 (and root) can read them. As another user, who cannot give files away: files 0640
# and directory 0750 in your group, which the containers get as a supplementary group (group_add,
# QUEUEKIT_KEYS_GID). Run it again after adding a key file: it sets the new file's mode too.
secrets:
	@$(call need,$(SYSTEM_PYTHON),$(HOW_PYTHON))
	@set -e; dir='$(SECRETS_DIR)'; keys="$$dir/keys"; \
	install -d -m 0700 "$$dir"; \
	[ -d "$$keys" ] || install -d -m 0700 "$$keys"; \
	if [ ! -s "$$keys/admin.default" ] && [ -s "$$dir/queuekit_authkey" ]; then \
	  (umask 077; cp "$$dir/queuekit_authkey" "$$keys/admin.default.tmp") && mv "$$keys/admin.default.tmp" "$$keys/admin.default"; \
	  echo "secrets: $$keys/admin.default is the old $$dir/queuekit_authkey (an admin key now; give clients role keys)"; \
	fi; \
	for role in producer consumer admin; do \
	  f="$$keys/$$role.default"; \
	  [ -s "$$f" ] && continue; \
	  if (umask 077; PYTHONPATH=src $(SYSTEM_PYTHON) -m queuekit keygen > "$$f.tmp") && [ -s "$$f.tmp" ]; then \
	    mv "$$f.tmp" "$$f"; echo "secrets: created $$f"; \
	  else rm -f "$$f.tmp"; echo "error: queuekit keygen failed" >&2; exit 1; fi; \
	done; \
	if [ "$$(id -u)" = 0 ]; then \
	  chown -R '$(APP_UID_GID)' "$$keys"; find "$$keys" -type f -exec chmod 0400 {} +; chmod 0500 "$$keys"; \
	else \
	  find "$$keys" -type f -exec chmod 0640 {} +; chmod 0750 "$$keys"; \
	fi

# TLS=1: the five files compose/compose.tls.yaml mounts must exist (ca.key is never mounted).
tls-files:
	@set -e; $(if $(and $(TUNNEL_ON),$(if $(TLS_ON),,1)),echo "error: TUNNEL=1 needs TLS=1 (the tunnel forwards to a TLS server)" >&2; exit 1;) \
	missing=''; for f in $(TLS_FILES); do [ -s '$(SECRETS_DIR)/tls/'$$f ] || missing="$$missing $$f"; done; \
	if [ -n "$$missing" ]; then \
	  echo "error: make up TLS=1: missing in $(SECRETS_DIR)/tls:$$missing (run 'make certs' first)" >&2; exit 1; \
	fi

up: compose-plugin secrets $(if $(or $(TLS_ON),$(TUNNEL_ON)),tls-files) images
	@echo "up: starting the server, $(CONSUMERS) consumers and $(if $(TUNNEL_ON),the stock client behind the tunnel sidecar,the demo producer)$(if $(TLS_ON), (mutual TLS))"
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

# With the admin key from the server's keys directory (no other container holds one).
stats: compose-plugin
	$(STACK) exec -T server python3 -m queuekit stats --authkey-file '/run/secrets/queuekit_keys/$(QUEUEKIT_ADMIN_KEY)'

# Compose files are checked with the defaults only (not the local .env), plus the variables the
# multi-host files require; the TLS override on top of compose.yaml.
lint-docker: compose-plugin
	@$(call need,$(HADOLINT),pip install -r requirements/lint.txt (make lint installs it into $(VENV)))
	$(HADOLINT) images/Dockerfile
	@set -e; for f in $(COMPOSE_FILES); do \
	  echo "docker compose config -q $$f"; \
	  QUEUEKIT_SERVER=queuekit-server.invalid:50000 QUEUEKIT_PUBLISH_ADDR=127.0.0.1 \
	    $(COMPOSE) --env-file /dev/null -f $$f config -q; \
	done; \
	echo "docker compose config -q compose/compose.yaml + compose/compose.tls.yaml"; \
	$(COMPOSE) --env-file /dev/null -f compose/compose.yaml -f compose/compose.tls.yaml config -q; \
	echo "docker compose config -q compose/compose.yaml + compose/compose.tls.yaml + compose/compose.tunnel.yaml"; \
	$(COMPOSE) --env-file /dev/null -f compose/compose.yaml -f compose/compose.tls.yaml -f compose/compose.tunnel.yaml config -q; \
	echo "docker compose config -q compose/compose.yaml + compose/compose.ha.yaml"; \
	$(COMPOSE) --env-file /dev/null -f compose/compose.yaml -f compose/compose.ha.yaml config -q

.DEFAULT_GOAL := $(images_mk_default_goal)
