"""Fixtures for tests/k8s: each kustomization rendered once per session, from a copy of k8s/."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import k8slib
import pytest


@dataclass(frozen=True)
class Renders:
    tree: Path  # the temporary copy of k8s/
    keys: dict[str, bytes]  # the throwaway keys written into it, by the Secret's key
    docs: dict[str, list[dict]]  # kustomization name -> rendered objects
    text: dict[str, str]  # kustomization name -> rendered YAML

    @property
    def key(self) -> bytes:
        """The admin key (what the tests' own host-side clients use)."""
        return self.keys[k8slib.ROLE_KEYS["admin"]]


@pytest.fixture(scope="session")
def kubectl() -> str:
    return k8slib.find_kubectl()


@pytest.fixture(scope="session")
def renders(kubectl: str, tmp_path_factory: pytest.TempPathFactory) -> Renders:
    keys = k8slib.throwaway_keys()
    tree = k8slib.copy_k8s_tree(tmp_path_factory.mktemp("render"), keys)
    docs: dict[str, list[dict]] = {}
    text: dict[str, str] = {}
    for name, rel in k8slib.KUSTOMIZATIONS.items():
        result = k8slib.kustomize(kubectl, tree / rel)
        if result.returncode != 0:
            pytest.fail(f"kubectl kustomize {rel} failed ({result.returncode}):\n{result.stderr}")
        text[name] = result.stdout
        docs[name] = k8slib.load_docs(result.stdout)
    return Renders(tree=tree, keys=keys, docs=docs, text=text)


# --- Docker (test_manifests_on_docker.py) ------------------------------------------------------


@pytest.fixture(scope="session")
def docker_images() -> Iterator[dict[str, str]]:
    """This session's queuekit images, by repository name as the manifests write it
    (``queuekit-server`` -> ``queuekit-server:test-<session>``), built by tests/support/dockerkit.py.

    No Docker engine: skip locally, fail under CI=true. Everything labelled with the session is
    removed at the end of the session, even after failures.
    """
    from support import dockerkit as dk

    dk.configure_env()
    reason = dk.docker_unavailable_reason()
    if reason:
        k8slib.missing_tool(f"{reason} (the manifests are executed on Docker)")
    try:
        yield {f"queuekit-{name}": ref for name, ref in dk.build_images().items()}
    finally:
        dk.sweep()
