"""Keep each VM's NBD connections on its own attach process (several VMs on one host).

QEMU's ``nbd`` node finds blocktrace again by *socket path* and *export name* only: after
``kill -9`` of an attach process its QEMU keeps reconnecting to that path for
``reconnect-delay`` seconds, so that ``attach --resume`` can take the VM back.  Export names
are device ids, and those repeat across VMs (libvirt calls every VM's first disk
``virtio-disk0``; QEMU checks nothing else it would notice when sizes match).  Any other
blocktrace that binds the path in that window (an attach for another VM left on the default
``--socket``, or a resume given the wrong one) receives the first VM's writes into the second
VM's image and trace: seen on QEMU 7.2, one VM's 64 KiB write landed in the other VM's image.

Two rules close that, both checked before anything in QEMU changes:

* a new attach (no ``--resume``) refuses a ``--socket`` path that exists at all.  A clean
  exit removes the socket, so an existing one is either another server's (live) or an attach
  process that died, whose VM may still be reconnecting to it;
* ``--resume`` serves only the socket the disk's ``nbd`` node connects to.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import parse_qs, urlsplit

from blocktrace.attach.monitor import AttachError


def check_new_socket(path: str) -> None:
    """Refuse an NBD socket path that exists (see the module docstring for why)."""
    if os.path.lexists(path):
        raise AttachError(
            f"{path}: exists (another server, or an attach process that died: its VM may "
            "still reconnect to it); give each attach its own --socket, or --resume that VM"
        )


def nbd_node_socket(node: dict[str, Any]) -> str | None:
    """The Unix socket path an ``nbd`` node connects to, from its file name as QEMU reports
    it (``nbd+unix:///EXPORT?socket=PATH``); ``None`` for anything else."""
    url = urlsplit(str(node.get("file", "")))
    if url.scheme != "nbd+unix":
        return None
    paths = parse_qs(url.query).get("socket", [])
    return paths[0] if len(paths) == 1 else None


def check_resume_socket(node: dict[str, Any] | None, socket: str, spec: str) -> None:
    """``--resume`` only on the socket QEMU's ``nbd`` node reconnects to."""
    where = nbd_node_socket(node) if node is not None else None
    if where is None or os.path.abspath(where) != os.path.abspath(socket):
        raise AttachError(
            f"device {spec!r}: its blocktrace node connects to {where or 'an unknown socket'}, "
            f"not {socket}; resume with that --socket"
        )
