# Development TLS certificates (included by the top-level Makefile).
#
#   make certs [CERTS_DIR=secrets/tls] [FORCE=1]
#       a development CA (ca.crt, ca.key: never mounted anywhere), a server certificate for the
#       Compose service `server`, the Kubernetes Services queuekit-server(-headless) in
#       K8S_NAMESPACE (default queuekit-dev), localhost and 127.0.0.1, and a client certificate
#       for mutual TLS, with the openssl command. Keeps existing files (FORCE=1 renews them all).
#       Modes: certificates 0644, ca.key 0600, the directory 0700; server.key and client.key are
#       read by the containers' uid 10001 as the role keys of `make secrets` are: as root owned by
#       10001:10001 (0600), otherwise 0640 in your group (the containers' group_add).

certs_mk_default_goal := $(.DEFAULT_GOAL)

CERTS_DIR ?= $(or $(SECRETS_DIR),secrets)/tls
HOW_OPENSSL := install it (apt-get install openssl)

.PHONY: certs

certs:
	@$(call need,openssl,$(HOW_OPENSSL))
	@CERTS_DIR='$(CERTS_DIR)' FORCE='$(FORCE)' K8S_NAMESPACE='$(or $(CERTS_K8S_NAMESPACE),queuekit-dev)' \
	  APP_UID_GID='$(or $(APP_UID_GID),10001:10001)' scripts/make-certs '$(CERTS_DIR)'

.DEFAULT_GOAL := $(certs_mk_default_goal)
