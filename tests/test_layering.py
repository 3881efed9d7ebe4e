"""The package layering, enforced: every import inside ``blocktrace`` goes down the table.

Each row may import the rows above it (and itself), never a row below or a sibling in the
same row: so there are no cycles between packages, and the stream's producers and consumers
(``trace``, ``replica``, ``logwrites``, ``ext4``, ``jetstream``) meet only in ``stream``.
Every import counts: module level, inside functions, and under ``TYPE_CHECKING``.  Target
types (``targets``) are reached by the registry's plug-in discovery, never imported below
them.
See docs/architecture.md, "Layers".
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "blocktrace"

#: lowest first; packages in one row are independent of each other
LAYERS: list[tuple[str, ...]] = [
    ("errors",),
    ("sockets", "outfile", "listen"),
    ("block",),
    ("stream",),
    ("logwrites", "replica", "ext4", "jetstream"),
    ("trace",),
    ("exports",),
    ("nbd",),
    ("targets", "service"),
    ("qmp", "verify", "crashcheck", "attach"),
    ("cli",),
    ("__main__",),
]
RANK = {pkg: i for i, row in enumerate(LAYERS) for pkg in row}


def package_of(path: Path) -> str:
    rel = path.relative_to(SRC)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def imports(path: Path, text: str | None = None) -> list[tuple[int, str]]:
    """(line, blocktrace subpackage) of every absolute or relative import in ``path`` (or in
    ``text``, as if it were ``path``)."""
    out: list[tuple[int, str]] = []
    pkg_parts = path.relative_to(SRC).with_suffix("").parts
    source = path.read_text() if text is None else text
    for node in ast.walk(ast.parse(source, str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = list(pkg_parts[: len(pkg_parts) - node.level])
                names = [".".join(["blocktrace", *base, *(node.module or "").split(".")])]
            else:
                names = [node.module or ""]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "blocktrace" and len(parts) > 1 and parts[1]:
                out.append((node.lineno, parts[1]))
    return out


def test_every_package_has_a_layer() -> None:
    packages = {package_of(p) for p in SRC.rglob("*.py")} - {"__init__"}
    assert packages <= set(RANK), f"add {sorted(packages - set(RANK))} to LAYERS"


def test_imports_go_down_the_layers() -> None:
    bad = []
    for path in sorted(SRC.rglob("*.py")):
        pkg = package_of(path)
        if pkg == "__init__":
            continue
        for line, dep in imports(path):
            if dep == pkg:
                continue
            if dep not in RANK or RANK[dep] >= RANK[pkg]:
                bad.append(f"{path.relative_to(SRC)}:{line}: {pkg} imports {dep}")
    assert not bad, "layering violated:\n" + "\n".join(bad)


def test_the_checker_sees_violations() -> None:
    """Imports in functions, under TYPE_CHECKING and relative ones are all seen."""
    text = (
        "if TYPE_CHECKING:\n    from blocktrace.trace import x\n"
        "def f():\n    import blocktrace.qmp.jobs\n"
        "from ..replica import meta\n"
    )
    found = [d for _, d in imports(SRC / "stream" / "records.py", text)]
    assert sorted(found) == ["qmp", "replica", "trace"]
