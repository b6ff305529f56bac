"""Policy scan of the rendered overlays with checkov (its own virtualenv: requirements/checkov.txt).

Passes only if every check passes except those skipped in tests/k8s/checkov.yaml, and every
skipped check really fires without its skip (no stale entries). checkov runs offline:
--skip-download (in the config), BC_SKIP_MAPPING and CKV_SKIP_PACKAGE_UPDATE_CHECK.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import k8slib
import pytest

pytestmark = pytest.mark.k8s

CONFIG = Path(__file__).with_name("checkov.yaml")
DEFAULT_VENV_BIN = k8slib.REPO / ".cache" / "checkov-venv" / "bin" / "checkov"
SKIP_LINE = re.compile(r"^\s*-\s*(CKV2?_[A-Z0-9_]+)\s*(?:#\s*(.*\S))?\s*$")


def _find_checkov() -> str:
    for candidate in (os.environ.get("CHECKOV_BIN"), shutil.which("checkov"), str(DEFAULT_VENV_BIN)):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    k8slib.missing_tool(
        "checkov not found (set CHECKOV_BIN, put it on PATH, or `make k8s-checkov` to install "
        "requirements/checkov.txt into .cache/checkov-venv)"
    )


def _skips_with_reasons() -> dict[str, str | None]:
    """skip-check entries of the config and the comment after each."""
    skips: dict[str, str | None] = {}
    in_list = False
    for line in CONFIG.read_text().splitlines():
        if re.match(r"^skip-check:\s*$", line):
            in_list = True
            continue
        if in_list:
            m = SKIP_LINE.match(line)
            if m:
                skips[m.group(1)] = m.group(2)
            elif line.strip() and not line.lstrip().startswith("#"):
                in_list = False
    return skips


def _run(checkov: str, config: Path, scan_dir: Path, cwd: Path) -> dict:
    env = dict(os.environ, BC_SKIP_MAPPING="TRUE", CKV_SKIP_PACKAGE_UPDATE_CHECK="true")
    result = subprocess.run(
        [checkov, "--config-file", str(config), "-d", str(scan_dir), "-o", "json"],
        capture_output=True, text=True, timeout=600, env=env, cwd=cwd, check=False,
    )  # fmt: skip
    try:
        report = json.loads(result.stdout)
    except json.JSONDecodeError:
        pytest.fail(
            f"checkov gave no JSON (exit {result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    reports = report if isinstance(report, list) else [report]
    (k8s,) = [r for r in reports if r.get("check_type") == "kubernetes"]
    k8s["exit_code"] = result.returncode
    return k8s


@pytest.fixture(scope="module")
def scans(renders, tmp_path_factory):
    checkov = _find_checkov()
    work = tmp_path_factory.mktemp("checkov")
    scan_dir = work / "rendered"
    scan_dir.mkdir()
    for name in k8slib.DEPLOYABLE:
        (scan_dir / f"{name}.yaml").write_text(renders.text[name])
    # the same config without its skip list
    text = CONFIG.read_text()
    unskipped = work / "checkov-no-skips.yaml"
    unskipped.write_text(re.sub(r"(?ms)^skip-check:\n(?:[ \t]+.*\n?|[ \t]*#.*\n?)*", "", text))
    assert "skip-check" not in unskipped.read_text()
    return {
        "configured": _run(checkov, CONFIG, scan_dir, work),
        "unskipped": _run(checkov, unskipped, scan_dir, work),
    }


def _failed_ids(report: dict) -> set[str]:
    return {c["check_id"] for c in report["results"]["failed_checks"]}


def test_checkov_passes_with_the_documented_skips(scans):
    report = scans["configured"]
    failures = [
        f"{c['check_id']} {c['check_name']}: {c['resource']} ({c['file_path']})"
        for c in report["results"]["failed_checks"]
    ]
    assert failures == []
    assert report["exit_code"] == 0
    assert report["summary"]["parsing_errors"] == 0
    # it really looked at our objects: every workload of every scanned overlay was checked
    checked = {(c["resource"], c["file_path"]) for c in report["results"]["passed_checks"]}
    for name in k8slib.DEPLOYABLE:
        for resource in ("StatefulSet.queuekit-dev.queuekit-server", "Deployment.queuekit-dev.queuekit-consumer",
                         "Job.queuekit-dev.queuekit-producer"):  # fmt: skip
            assert (resource, f"/{name}.yaml") in checked, (resource, name)
    assert report["summary"]["passed"] > 100


def test_every_skip_is_needed_and_nothing_else_fails(scans):
    skips = set(_skips_with_reasons())
    assert _failed_ids(scans["unskipped"]) == skips


def test_every_skip_has_a_one_line_reason():
    skips = _skips_with_reasons()
    assert skips, "no skip-check entries parsed from checkov.yaml"
    missing = [check for check, reason in skips.items() if not reason or len(reason) < 15]
    assert missing == []
