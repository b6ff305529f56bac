"""The documentation keeps up with the code.

Fails when a ``QUEUEKIT_*`` variable named in ``src/queuekit`` is missing from docs/reference.md or
.env.example, when a long flag of the ``queuekit`` command line is missing from docs/reference.md,
when a relative link in the documentation points to a file (or heading) that does not exist, or
when README.md grows past the front-door size. See tests/README.md, "The documentation check".
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from queuekit import cli

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src" / "queuekit"
REFERENCE = ROOT / "docs" / "reference.md"
ENV_EXAMPLE = ROOT / ".env.example"
README = ROOT / "README.md"
README_MAX_LINES = 220

# QUEUEKIT_* names read in src/ that must NOT appear in .env.example, each with the reason.
# Keep it short: a setting an operator can set belongs in .env.example, commented if need be.
ENV_EXAMPLE_EXEMPT: dict[str, str] = {}

SETTING_NAME = re.compile(r"\bQUEUEKIT_[A-Z0-9]+(?:_[A-Z0-9]+)*\b")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$", re.MULTILINE)
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def _setting_names_in_src() -> set[str]:
    names: set[str] = set()
    for path in sorted(SRC.rglob("*.py")):
        names.update(SETTING_NAME.findall(path.read_text(encoding="utf-8")))
    return names


def _mentions(text: str, word: str) -> bool:
    """``word`` appears on its own, not as part of a longer name (QUEUEKIT_HTTP vs QUEUEKIT_HTTP_PORT)."""
    return re.search(rf"(?<![A-Za-z0-9_-]){re.escape(word)}(?![A-Za-z0-9_-])", text) is not None


def _long_flags(parser: argparse.ArgumentParser) -> set[str]:
    flags: set[str] = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                flags |= _long_flags(sub)
        flags.update(opt for opt in action.option_strings if opt.startswith("--"))
    return flags


def _doc_files() -> list[Path]:
    files = [README, *(ROOT / d / "README.md" for d in ("compose", "k8s", "tests", "bench"))]
    files += sorted((ROOT / "docs").glob("*.md"))
    return files


def _github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: rendered text, lower case, punctuation dropped, spaces to -."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links: their text
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(markdown: str) -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    for line in FENCE.sub("", markdown).splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = _github_slug(m.group(1))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def _relative_links(path: Path) -> list[str]:
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    targets = INLINE_LINK.findall(text) + REFERENCE_LINK.findall(text)
    return [t for t in targets if not SCHEME.match(t) and not t.startswith("//")]


# -- the checks ---------------------------------------------------------------------------------


def test_the_scans_find_what_they_look_for():
    """Guards the checks below against passing vacuously (a scan that finds nothing checks nothing)."""
    assert {"QUEUEKIT_AUTHKEY_FILE", "QUEUEKIT_SERVER", "QUEUEKIT_DATA_DIR"} <= _setting_names_in_src()
    assert {"--server", "--handler", "--data-dir", "--generate"} <= _long_flags(cli.build_parser())
    assert len(_doc_files()) >= 7 and all(p.is_file() for p in _doc_files()), _doc_files()
    assert any(_relative_links(p) for p in _doc_files())


def test_every_setting_read_in_src_is_in_the_reference():
    text = REFERENCE.read_text(encoding="utf-8")
    missing = sorted(name for name in _setting_names_in_src() if not _mentions(text, name))
    assert not missing, f"add these to docs/reference.md (Settings): {', '.join(missing)}"


def test_every_setting_read_in_src_is_in_env_example():
    text = ENV_EXAMPLE.read_text(encoding="utf-8")
    listed = set(re.findall(r"^[ \t]*#?[ \t]*(QUEUEKIT_[A-Z0-9_]+)=", text, re.MULTILINE))
    names = _setting_names_in_src()
    missing = sorted(names - listed - ENV_EXAMPLE_EXEMPT.keys())
    assert not missing, (
        f"add these to .env.example as `NAME=default` lines (commented out if Compose does not pass them): "
        f"{', '.join(missing)}"
    )
    stale = sorted(set(ENV_EXAMPLE_EXEMPT) - names)
    assert not stale, f"ENV_EXAMPLE_EXEMPT names no longer read in src/: {', '.join(stale)}"
    wrongly_listed = sorted(set(ENV_EXAMPLE_EXEMPT) & listed)
    assert not wrongly_listed, f"exempt from .env.example but listed there: {', '.join(wrongly_listed)}"


def test_every_cli_long_flag_is_in_the_reference():
    text = REFERENCE.read_text(encoding="utf-8")
    missing = sorted(flag for flag in _long_flags(cli.build_parser()) if not _mentions(text, flag))
    assert not missing, f"add these flags to docs/reference.md (Flags): {', '.join(missing)}"


@pytest.mark.parametrize("doc", _doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_existing_files(doc: Path):
    broken = []
    for target in _relative_links(doc):
        file_part, _, anchor = target.partition("#")
        dest = (doc.parent / file_part).resolve() if file_part else doc
        if not dest.exists():
            broken.append(f"{target} (no such file: {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest})")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest.read_text(encoding="utf-8")):
            broken.append(f"{target} (no heading #{anchor} in {dest.relative_to(ROOT)})")
    assert not broken, f"broken links in {doc.relative_to(ROOT)}: " + "; ".join(broken)


def test_readme_stays_a_front_door():
    lines = len(README.read_text(encoding="utf-8").splitlines())
    assert lines <= README_MAX_LINES, (
        f"README.md has {lines} lines (at most {README_MAX_LINES}): move details next to what they describe"
    )
