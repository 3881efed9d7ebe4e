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


def qsd_export_argv(img: Path, qmp: Path, nbd: Path) -> list[str]:
    """qemu-storage-daemon serving raw ``img`` as node ``n0`` (file node ``p0``), exported
    writable over NBD on ``nbd`` (``nbd+unix:///n0?socket=NBD``), QMP on ``qmp``: the
    attach tests' stand-in for a VM whose disk is a node behind an export."""
    return ["qemu-storage-daemon",
            "--blockdev", f"driver=file,filename={img},node-name=p0",
            "--blockdev", "driver=raw,file=p0,node-name=n0",
            "--nbd-server", f"addr.type=unix,addr.path={nbd}",
            "--export", "type=nbd,id=e0,node-name=n0,writable=on",
            "--chardev", f"socket,id=m,path={qmp},server=on,wait=off",
            "--monitor", "chardev=m"]  # fmt: skip
