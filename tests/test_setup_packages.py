"""scripts/setup.sh must install every system tool the suite and the server use.

A developer's machine hides a missing install step (the tool happens to be there); CI on a
*minimal* Debian 12 does not.  This test maps each tool to its Debian package with dpkg and
requires the package to be in setup.sh's apt list, or of priority ``required`` (present on
every Debian system).  It caught ``file``: nbdinfo runs it, and without it ``nbdinfo --json``
printed invalid UTF-8.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SETUP = ROOT / "scripts" / "setup.sh"

#: Tools that are optional by design (their tests skip by name where they are absent).
OPTIONAL = {"replay-log"}

#: Packages the tools need at run time without naming them as commands.
INDIRECT = {"file": "nbdinfo classifies the export's content with file(1)"}


def apt_packages() -> set[str]:
    text = SETUP.read_text()
    block = re.search(r"APT_PACKAGES=\((.*?)\n\)", text, re.S)
    assert block is not None, "setup.sh has no APT_PACKAGES list"
    words: set[str] = set()
    for line in block.group(1).splitlines():
        words.update(line.split("#", 1)[0].split())
    return words


def required_tools() -> set[str]:
    """Every tool a test declares with ``require(...)``."""
    tools: set[str] = set()
    for path in (ROOT / "tests").rglob("*.py"):
        for call in re.findall(r"require\(([^)]*)\)", path.read_text()):
            tools.update(re.findall(r'"([A-Za-z0-9._+-]+)"', call))
    return tools - OPTIONAL


def package_of(tool: str) -> str | None:
    where = shutil.which(tool)
    if where is None:
        return None
    real = str(Path(where).resolve())
    candidates = {where, real}
    for p in list(candidates):  # Debian 12 is usrmerged: dpkg knows /sbin, /bin paths too
        if p.startswith("/usr/"):
            candidates.add(p[len("/usr") :])
    for p in candidates:
        out = subprocess.run(["dpkg", "-S", p], capture_output=True, text=True)
        if out.returncode == 0:
            return out.stdout.split(":", 1)[0].strip()
    return None


def priority(package: str) -> str:
    out = subprocess.run(
        ["dpkg-query", "-W", "-f=${Priority}", package], capture_output=True, text=True
    )
    return out.stdout.strip()


def test_every_required_tool_is_installed_by_setup() -> None:
    if shutil.which("dpkg") is None:
        pytest.skip("not a Debian system")
    listed = apt_packages()
    missing = []
    for tool in sorted(required_tools()):
        pkg = package_of(tool)
        if pkg is None:
            continue  # absent here: its own test skips; nothing to map
        if pkg not in listed and priority(pkg) != "required":
            missing.append(f"{tool} (package {pkg})")
    assert not missing, f"scripts/setup.sh does not install: {', '.join(missing)}"


def test_indirect_runtime_packages_are_installed_by_setup() -> None:
    listed = apt_packages()
    for pkg, why in INDIRECT.items():
        assert pkg in listed, f"setup.sh must install {pkg}: {why}"
