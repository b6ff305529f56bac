# Kubernetes manifests (k8s/) and their static tests (included by the top-level Makefile).
#
#   make k8s-key             create the role keys k8s/base/keys/{producer,consumer,admin}.default
#                            (mode 0600) if absent; never overwrites; an old k8s/base/authkey
#                            becomes admin.default
#   make k8s-render          print the rendered overlay (K8S_OVERLAY=dev|dev-existing-secret|dev-keda|
#                            dev-tls|dev-tls-cert-manager)
#   make k8s-deps            pip install the test tools (requirements/k8s.txt + KEDA and cert-manager models)
#   make k8s-checkov         checkov in its own virtualenv, .cache/checkov-venv
#   make k8s-test            pytest -m k8s tests/k8s (render, schemas, policy, checkov)
#   make k8s-kind-load       kind load docker-image queuekit-*:$(K8S_IMAGE_TAG) (KIND_CLUSTER=...)
#   make k8s-minikube-load   minikube image load queuekit-*:$(K8S_IMAGE_TAG)
#
# k8s-deps and k8s-checkov install only when their pin file changed (stamp files), and only for
# the targets that need them (make test, make k8s-test), never for make lint / make test-fast.

k8s_mk_default_goal := $(.DEFAULT_GOAL)

K8S_PYTHON ?= $(or $(PYTHON),python3)
K8S_OVERLAY ?= dev
K8S_KEYS_DIR := k8s/base/keys
K8S_OLD_KEY_FILE := k8s/base/authkey
K8S_IMAGE_TAG ?= $(or $(QUEUEKIT_IMAGE_TAG),latest)
K8S_IMAGES := queuekit-server queuekit-consumer queuekit-producer
KIND_CLUSTER ?= kind
KUBECTL ?= kubectl
K8S_CHECKOV_VENV := .cache/checkov-venv
K8S_KEDA_MODELS := .cache/keda-models
HOW_KUBECTL := install kubectl (https://kubernetes.io/docs/tasks/tools/) or set KUBECTL=/path/to/kubectl

.PHONY: k8s-key k8s-render k8s-deps k8s-checkov k8s-test k8s-kind-load k8s-minikube-load

# Written under umask 077 to a temporary name, then renamed: never a partial or readable key.
# The old single key (k8s/base/authkey, before keys per role) becomes the admin key, so clients
# still holding it keep working, as admin, until they get their role's key.
k8s-key:
	@$(call need,$(SYSTEM_PYTHON),$(HOW_PYTHON))
	@set -e; umask 077; mkdir -p '$(K8S_KEYS_DIR)'; \
	if [ ! -e '$(K8S_KEYS_DIR)/admin.default' ] && [ -s '$(K8S_OLD_KEY_FILE)' ]; then \
	  cp '$(K8S_OLD_KEY_FILE)' '$(K8S_KEYS_DIR)/admin.default'; chmod 600 '$(K8S_KEYS_DIR)/admin.default'; \
	  echo "$(K8S_KEYS_DIR)/admin.default is the old $(K8S_OLD_KEY_FILE) (an admin key now; the Secret is queuekit-keys)"; \
	fi; \
	for role in producer consumer admin; do \
	  f='$(K8S_KEYS_DIR)/'$$role.default; \
	  if [ -e "$$f" ]; then echo "$$f exists; left as it is"; continue; fi; \
	  tmp="$$f.tmp.$$$$"; \
	  if PYTHONPATH=src $(SYSTEM_PYTHON) -m queuekit keygen > "$$tmp" && [ "$$(wc -c < "$$tmp")" -ge 33 ]; then \
	    chmod 600 "$$tmp"; mv "$$tmp" "$$f"; echo "created $$f (mode 0600, gitignored)"; \
	  else rm -f "$$tmp"; echo "k8s-key: could not create $$f" >&2; exit 1; fi; \
	done

# The output contains the Secret (the key, base64-encoded): do not paste it anywhere.
k8s-render:
	@$(call need,$(KUBECTL),$(HOW_KUBECTL))
	@$(KUBECTL) kustomize k8s/overlays/$(K8S_OVERLAY) || { \
	  echo "k8s-render: failed; if it names a file in $(K8S_KEYS_DIR), run 'make k8s-key' first" >&2; exit 1; }

# Installed on top of the test tools ($(VENV), made by the top-level Makefile).
k8s-deps: $(VENV)/.k8s-tools $(K8S_KEDA_MODELS)/.complete

$(VENV)/.k8s-tools: requirements/k8s.txt $(VENV)/.test-tools
	$(K8S_PYTHON) -m pip install -q -r requirements/k8s.txt
	@touch $@

# Into a side directory (see requirements/keda-models.txt), replaced as a whole.
# cert-manager's and the Prometheus Operator's models too (requirements/cert-manager-models.txt,
# requirements/prometheus-operator-models.txt): they share the cloudcoil package.
$(K8S_KEDA_MODELS)/.complete: requirements/keda-models.txt requirements/cert-manager-models.txt \
  requirements/prometheus-operator-models.txt | $(PYTHON)
	@rm -rf $(K8S_KEDA_MODELS)
	$(K8S_PYTHON) -m pip install -q --no-deps --target $(K8S_KEDA_MODELS) -r requirements/keda-models.txt \
	  -r requirements/cert-manager-models.txt -r requirements/prometheus-operator-models.txt
	@touch $@

k8s-checkov: $(K8S_CHECKOV_VENV)/.complete

$(K8S_CHECKOV_VENV)/.complete: requirements/checkov.txt | $(PYTHON)
	@[ -x $(K8S_CHECKOV_VENV)/bin/python ] || $(K8S_PYTHON) -m venv $(K8S_CHECKOV_VENV)
	$(K8S_CHECKOV_VENV)/bin/python -m pip install -q -r requirements/checkov.txt
	@touch $@

k8s-test: k8s-deps k8s-checkov postgres-wheels
	@$(call need,$(KUBECTL),$(HOW_KUBECTL))
	$(K8S_PYTHON) -m pytest -m k8s tests/k8s

k8s-kind-load:
	@$(call need,kind,install kind: https://kind.sigs.k8s.io/docs/user/quick-start/#installation)
	@for image in $(K8S_IMAGES); do \
	  kind load docker-image --name '$(KIND_CLUSTER)' "$$image:$(K8S_IMAGE_TAG)" || exit 1; \
	done

k8s-minikube-load:
	@$(call need,minikube,install minikube: https://minikube.sigs.k8s.io/docs/start/)
	@for image in $(K8S_IMAGES); do \
	  minikube image load "$$image:$(K8S_IMAGE_TAG)" || exit 1; \
	done

.DEFAULT_GOAL := $(k8s_mk_default_goal)
