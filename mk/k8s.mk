# Kubernetes manifests (k8s/) and their static tests (included by the top-level Makefile).
#
#   make k8s-key             create k8s/base/authkey (mode 0600) if absent; never overwrites
#   make k8s-render          print the rendered overlay (K8S_OVERLAY=dev|dev-existing-secret|keda)
#   make k8s-deps            pip install the test tools (requirements/k8s.txt + KEDA models)
#   make k8s-checkov         checkov in its own virtualenv, .cache/checkov-venv
#   make k8s-test            pytest -m k8s tests/k8s (render, schemas, policy, checkov)
#   make k8s-kind-load       kind load docker-image queuekit-*:$(K8S_IMAGE_TAG) (KIND_CLUSTER=...)
#   make k8s-minikube-load   minikube image load queuekit-*:$(K8S_IMAGE_TAG)

k8s_mk_default_goal := $(.DEFAULT_GOAL)

K8S_PYTHON ?= $(or $(PYTHON),python3)
K8S_OVERLAY ?= dev
K8S_KEY_FILE := k8s/base/authkey
K8S_IMAGE_TAG ?= $(or $(QUEUEKIT_IMAGE_TAG),latest)
K8S_IMAGES := queuekit-server queuekit-consumer queuekit-producer
KIND_CLUSTER ?= kind
KUBECTL ?= kubectl
K8S_CHECKOV_VENV := .cache/checkov-venv
K8S_KEDA_MODELS := .cache/keda-models

.PHONY: k8s-key k8s-render k8s-deps k8s-checkov k8s-test k8s-kind-load k8s-minikube-load

# Written under umask 077 to a temporary name, then renamed: never a partial or readable key.
k8s-key:
	@if [ -e '$(K8S_KEY_FILE)' ]; then \
	  echo "$(K8S_KEY_FILE) exists; left as it is (delete it to make a new key)"; \
	else \
	  umask 077 && tmp='$(K8S_KEY_FILE).tmp.'$$$$ && \
	  PYTHONPATH=src $(K8S_PYTHON) -m queuekit keygen > "$$tmp" && \
	  [ "$$(wc -c < "$$tmp")" -ge 33 ] && chmod 600 "$$tmp" && mv "$$tmp" '$(K8S_KEY_FILE)' \
	  && echo "created $(K8S_KEY_FILE) (mode 0600, gitignored)" \
	  || { rm -f "$$tmp"; echo "k8s-key: could not create $(K8S_KEY_FILE)" >&2; exit 1; }; \
	fi

# The output contains the Secret (the key, base64-encoded): do not paste it anywhere.
k8s-render:
	@$(KUBECTL) kustomize k8s/overlays/$(K8S_OVERLAY) || { \
	  echo "k8s-render: failed; if it names $(K8S_KEY_FILE), run 'make k8s-key' first" >&2; exit 1; }

k8s-deps:
	$(K8S_PYTHON) -m pip install -r requirements/k8s.txt
	$(K8S_PYTHON) -m pip install --no-deps --target $(K8S_KEDA_MODELS) -r requirements/keda-models.txt

k8s-checkov:
	@[ -x $(K8S_CHECKOV_VENV)/bin/python ] || $(K8S_PYTHON) -m venv $(K8S_CHECKOV_VENV)
	$(K8S_CHECKOV_VENV)/bin/python -m pip install -r requirements/checkov.txt

k8s-test:
	$(K8S_PYTHON) -m pytest -m k8s tests/k8s

k8s-kind-load:
	@for image in $(K8S_IMAGES); do \
	  kind load docker-image --name '$(KIND_CLUSTER)' "$$image:$(K8S_IMAGE_TAG)" || exit 1; \
	done

k8s-minikube-load:
	@for image in $(K8S_IMAGES); do \
	  minikube image load "$$image:$(K8S_IMAGE_TAG)" || exit 1; \
	done

.DEFAULT_GOAL := $(k8s_mk_default_goal)
