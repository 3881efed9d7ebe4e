"""The socket an nbd node reconnects to, as attach --resume reads it (blocktrace.attach.guard)."""

from __future__ import annotations

from pathlib import Path

import pytest

from blocktrace.attach.guard import check_new_socket, check_resume_socket, nbd_node_socket
from blocktrace.attach.monitor import AttachError


def test_nbd_node_socket_from_qemu_file_name() -> None:
    node = {"file": "nbd+unix:///virtio-disk0?socket=/run/bt/vm1.nbd"}
    assert nbd_node_socket(node) == "/run/bt/vm1.nbd"
    assert nbd_node_socket({"file": "nbd://127.0.0.1:10809/disk0"}) is None
    assert nbd_node_socket({"file": "/var/lib/vm.qcow2"}) is None
    assert nbd_node_socket({}) is None
    assert nbd_node_socket({"file": "nbd+unix:///d?socket=/a&socket=/b"}) is None


def test_resume_only_on_the_nodes_own_socket(tmp_path: Path) -> None:
    node = {"file": f"nbd+unix:///disk0?socket={tmp_path / 'a.sock'}"}
    check_resume_socket(node, str(tmp_path / "a.sock"), "disk0")
    with pytest.raises(AttachError, match=r"connects to .*a\.sock, not .*b\.sock"):
        check_resume_socket(node, str(tmp_path / "b.sock"), "disk0")
    with pytest.raises(AttachError, match="unknown socket"):
        check_resume_socket(None, str(tmp_path / "a.sock"), "disk0")


def test_new_attach_refuses_any_existing_socket_path(tmp_path: Path) -> None:
    check_new_socket(str(tmp_path / "fresh.sock"))
    (tmp_path / "stale.sock").write_bytes(b"")
    with pytest.raises(AttachError, match="exists"):
        check_new_socket(str(tmp_path / "stale.sock"))
    (tmp_path / "link.sock").symlink_to(tmp_path / "nowhere")
    with pytest.raises(AttachError, match="exists"):
        check_new_socket(str(tmp_path / "link.sock"))
