"""Fixtures for tests/k8s: each kustomization rendered once per session, from a copy of k8s/."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import k8slib
import pytest


@dataclass(frozen=True)
class Renders:
    tree: Path  # the temporary copy of k8s/
    key: bytes  # the throwaway key written into it
    docs: dict[str, list[dict]]  # kustomization name -> rendered objects
    text: dict[str, str]  # kustomization name -> rendered YAML


@pytest.fixture(scope="session")
def kubectl() -> str:
    return k8slib.find_kubectl()


@pytest.fixture(scope="session")
def renders(kubectl: str, tmp_path_factory: pytest.TempPathFactory) -> Renders:
    key = k8slib.throwaway_key()
    tree = k8slib.copy_k8s_tree(tmp_path_factory.mktemp("render"), key)
    docs: dict[str, list[dict]] = {}
    text: dict[str, str] = {}
    for name, rel in k8slib.KUSTOMIZATIONS.items():
        result = k8slib.kustomize(kubectl, tree / rel)
        if result.returncode != 0:
            pytest.fail(f"kubectl kustomize {rel} failed ({result.returncode}):\n{result.stderr}")
        text[name] = result.stdout
        docs[name] = k8slib.load_docs(result.stdout)
    return Renders(tree=tree, key=key, docs=docs, text=text)
