"""QEMU's block graph as comparable data: what "the graph is as before attach" means."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from blocktrace.qmp.client import QMPClient


def qemu_qmp(path: Path, command: str, args: dict[str, Any] | None = None) -> Any:
    """One command on QEMU's own monitor (blocktrace's client speaks plain QMP)."""
    with QMPClient.connect_to(str(path), timeout=60) as c:
        return c.execute(command, args)


def block_graph(qmp: Path) -> tuple[set[Any], dict[str, Any]]:
    """(edges of ``x-debug-query-block-graph`` by node name, with permissions;
    ``query-named-block-nodes`` by node name without the fields I/O changes)."""
    graph = qemu_qmp(qmp, "x-debug-query-block-graph")
    name = {n["id"]: (n["type"], n.get("name", "")) for n in graph["nodes"]}
    edges = {
        (name[e["parent"]], e["name"], name[e["child"]], tuple(e["perm"]),
         tuple(e["shared-perm"]))
        for e in graph["edges"]
    }  # fmt: skip
    nodes = {}
    for n in qemu_qmp(qmp, "query-named-block-nodes"):
        n = dict(n)
        n["image"] = {k: v for k, v in n["image"].items() if k not in ("actual-size", "dirty-flag")}
        nodes[n["node-name"]] = n
    return edges, nodes
