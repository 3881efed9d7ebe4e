"""Recognising the filter a killed attach left (sans-IO): names *and* shape, or one line.

The graphs are what QEMU 7.2's ``x-debug-query-block-graph`` and
``query-named-block-nodes`` answer (trimmed to the fields read), for a raw disk ``fmt0`` on
``proto0`` with ``blocktrace attach --mechanism filter`` inserted.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from blocktrace.attach.monitor import AttachError, Disk
from blocktrace.attach.recover import DrainSink, stale_filter

SOCK = "/run/bt/attach-nbd.sock"
DISK = Disk("disk0", "fmt0", "disk0", 1 << 26, "raw", "json:{...}", {})


def left_by_blocktrace() -> tuple[dict[str, Any], list[dict[str, Any]]]:
    names = ["disk0", "fmt0", "blocktrace-blw-disk0-log", "proto0", "blocktrace-log-disk0-log"]
    nodes = [{"id": i, "name": n, "type": "block-driver"} for i, n in enumerate(names)]
    nodes[0]["type"] = "block-backend"
    edges = [
        {"parent": 0, "child": 1, "name": "root"},
        {"parent": 1, "child": 2, "name": "file"},
        {"parent": 2, "child": 3, "name": "file"},
        {"parent": 2, "child": 4, "name": "log"},
    ]
    info = [
        {"node-name": "fmt0", "drv": "raw"},
        {"node-name": "blocktrace-blw-disk0-log", "drv": "blklogwrites"},
        {"node-name": "proto0", "drv": "file", "file": "/vm/disk.raw"},
        {
            "node-name": "blocktrace-log-disk0-log",
            "drv": "nbd",
            "file": f"nbd+unix:///disk0-log?socket={SOCK}",
        },
    ]
    return {"nodes": nodes, "edges": edges}, info


def test_the_graph_a_killed_filter_attach_leaves_is_recognised() -> None:
    graph, info = left_by_blocktrace()
    stale = stale_filter(DISK, graph, info)
    assert (stale.proto, stale.sink, stale.socket) == ("proto0", "disk0-log", SOCK)
    assert stale.filter_node == "blocktrace-blw-disk0-log"
    assert stale.log_node == "blocktrace-log-disk0-log"


def rename(graph: dict[str, Any], old: str, new: str) -> None:
    for n in graph["nodes"]:
        if n["name"] == old:
            n["name"] = new


@pytest.mark.parametrize(
    "damage",
    [
        "other filter name",
        "other log name",
        "log of another sink",
        "second user of the filter",
        "second user of the log",
        "log not nbd",
        "filter not blklogwrites",
        "not on a file",
        "log over tcp",
        "no filter",
        "qcow2",
    ],
)
def test_anything_else_is_refused_in_one_line(damage: str) -> None:
    graph, info = left_by_blocktrace()
    graph, info = copy.deepcopy(graph), copy.deepcopy(info)
    by_name = {n["node-name"]: n for n in info}
    disk = DISK
    if damage == "other filter name":
        rename(graph, "blocktrace-blw-disk0-log", "blw")
    elif damage == "other log name":
        rename(graph, "blocktrace-log-disk0-log", "lg")
    elif damage == "log of another sink":
        rename(graph, "blocktrace-log-disk0-log", "blocktrace-log-disk1-log")
        by_name["blocktrace-log-disk0-log"]["node-name"] = "blocktrace-log-disk1-log"
    elif damage == "second user of the filter":
        graph["edges"].append({"parent": 3, "child": 2, "name": "backing"})
    elif damage == "second user of the log":
        graph["nodes"].append({"id": 9, "name": "x", "type": "block-driver"})
        graph["edges"].append({"parent": 9, "child": 4, "name": "file"})
    elif damage == "log not nbd":
        by_name["blocktrace-log-disk0-log"]["drv"] = "file"
    elif damage == "filter not blklogwrites":
        by_name["blocktrace-blw-disk0-log"]["drv"] = "copy-before-write"
    elif damage == "not on a file":
        by_name["proto0"]["drv"] = "nbd"
    elif damage == "log over tcp":
        by_name["blocktrace-log-disk0-log"]["file"] = "nbd://127.0.0.1:10809/disk0-log"
    elif damage == "no filter":
        graph["edges"][1]["child"] = 3
    elif damage == "qcow2":
        disk = Disk("disk0", "fmt0", "disk0", 1 << 26, "qcow2", "x", {})
    with pytest.raises(AttachError) as err:
        stale_filter(disk, graph, info)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("device 'disk0': "), msg
    assert msg.endswith("nothing changed"), msg


def test_a_pivot_disk_is_pointed_to_attach_resume() -> None:
    graph, info = left_by_blocktrace()
    pivot = Disk("disk0", "blocktrace-disk0", "disk0", 1 << 26, "nbd", "nbd+unix://", {})
    with pytest.raises(AttachError, match="attach --resume"):
        stale_filter(pivot, graph, info)


def test_the_drain_acknowledges_and_keeps_nothing() -> None:
    import asyncio

    async def main() -> None:
        d = DrainSink()
        await d.write(1 << 40, b"x" * 4096)
        await d.write_zeroes(0, 1 << 30)
        await d.flush()
        assert bytes(await d.read(1 << 40, 16)) == bytes(16)
        assert d.dropped == 4096 + (1 << 30)

    asyncio.run(main())
