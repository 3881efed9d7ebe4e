"""Real NBD clients against ``blocktrace serve``: qemu-img, qemu-io, QEMU's nbd block driver,
nbdinfo, nbdcopy (multi-conn), nbdsh / libnbd-python, fio with crc32c verification.

One server per module keeps the suite fast; each test uses its own export region or image.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from support import MiB, ServerProcess, make_image, require, run, wait_for_socket

SIZE = 32 * MiB


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("nbd-clients")


@pytest.fixture(scope="module")
def server(workdir: Path) -> Iterator[ServerProcess]:
    images = [
        make_image(workdir / "disk.img", SIZE),
        make_image(workdir / "copy.img", SIZE),
        make_image(workdir / "fio.img", 16 * MiB),
        make_image(workdir / "qemu.img", SIZE),
    ]
    with ServerProcess(workdir, images) as srv:
        yield srv
    assert "Traceback" not in srv.stderr(), srv.stderr()


def nbdsh_env() -> dict[str, str]:
    """nbdsh execs ``python3 -mnbd`` from PATH; Debian's libnbd module belongs to
    /usr/bin/python3, so put /usr/bin first."""
    require("nbdsh")
    return {**os.environ, "PATH": "/usr/bin:" + os.environ.get("PATH", "")}


def qemu_image_opts(srv: ServerProcess, export: str) -> str:
    return f"driver=nbd,server.type=unix,server.path={srv.socket},export={export}"


def test_qemu_img_info_convert_compare(server: ServerProcess, workdir: Path) -> None:
    require("qemu-img")
    uri = server.uri("copy")
    info = json.loads(run(["qemu-img", "info", "--output=json", uri]).stdout)
    assert info["virtual-size"] == SIZE
    src = make_image(workdir / "random.img", SIZE, seed=1)
    # leave a hole in the source so convert exercises zero detection on the way back
    with open(src, "r+b") as f:
        f.seek(8 * MiB)
        f.write(bytes(4 * MiB))
    run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", src, uri])
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", src, uri])
    back = workdir / "back.img"
    run(["qemu-img", "convert", "-f", "raw", "-O", "raw", uri, back])
    assert back.read_bytes() == src.read_bytes()
    # compare really compares: a different image is reported as different (exit 1)
    other = make_image(workdir / "other.img", SIZE, seed=2)
    assert (
        run(["qemu-img", "compare", "-f", "raw", "-F", "raw", other, uri], check=False).returncode
        == 1
    )


def test_qemu_io_commands(server: ServerProcess, workdir: Path) -> None:
    require("qemu-io")
    uri = server.uri("disk")
    cmds = [
        "write -P 0xab 0 1M",
        "write -P 0xcd -f 1M 64k",  # FUA
        "read -P 0xab 0 1M",
        "read -P 0xcd 1M 64k",
        "write -z 2M 1M",
        "read -P 0 2M 1M",
        "discard 4M 1M",
        "flush",
    ]
    args = ["qemu-io", "-f", "raw"]
    for c in cmds:
        args += ["-c", c]
    out = run([*args, uri]).stdout
    assert "Pattern verification failed" not in out
    assert out.count("read ") == 3
    # a wrong pattern is detected, so the reads above really checked the data
    bad = run(["qemu-io", "-f", "raw", "-c", "read -P 0x11 0 4k", uri], check=False).stdout
    assert "Pattern verification failed" in bad
    assert (workdir / "disk.img").read_bytes()[: 1 * MiB] == b"\xab" * MiB


def test_qemu_nbd_block_driver(server: ServerProcess) -> None:
    """QEMU's own nbd driver via --image-opts and a json: pseudo-URI, with write-zeroes
    (may-unmap and no-hole) and block status."""
    require("qemu-io", "qemu-img")
    opts = qemu_image_opts(server, "qemu")
    run(
        [
            "qemu-io",
            "--image-opts",
            "-c",
            "write -P 0x5a 0 2M",
            "-c",
            "write -z -u 512k 512k",
            "-c",
            "read -P 0 512k 512k",
            "-c",
            "read -P 0x5a 1M 1M",
            "-c",
            "flush",
            opts,
        ]
    )
    spec = {
        "driver": "raw",
        "file": {
            "driver": "nbd",
            "server": {"type": "unix", "path": os.fspath(server.socket)},
            "export": "qemu",
        },
    }
    out = run(["qemu-img", "map", "--output=json", "json:" + json.dumps(spec)]).stdout
    extents = json.loads(out)
    assert extents[0]["start"] == 0 and extents[0]["data"] is True
    assert any(not e["data"] and e["zero"] for e in extents)  # the unallocated tail


def test_qemu_storage_daemon_exports_via_nbd_driver(server: ServerProcess, workdir: Path) -> None:
    """qemu-storage-daemon opens our export with -blockdev driver=nbd and re-exports it; a
    write through the daemon lands in our image."""
    require("qemu-storage-daemon", "qemu-io")
    sock2 = workdir / "qsd.sock"
    proc = subprocess.Popen(
        [
            "qemu-storage-daemon",
            "--blockdev",
            f"driver=nbd,node-name=remote,server.type=unix,server.path={server.socket},export=qemu",
            "--nbd-server",
            f"addr.type=unix,addr.path={sock2}",
            "--export",
            "type=nbd,id=e0,node-name=remote,name=via,writable=on",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for_socket(sock2, None, timeout=15)
        run(
            [
                "qemu-io",
                "-f",
                "raw",
                "-c",
                "write -P 0x77 8M 64k",
                "-c",
                "flush",
                f"nbd+unix:///via?socket={sock2}",
            ]
        )
    finally:
        proc.terminate()
        proc.wait(15)
    data = (workdir / "qemu.img").read_bytes()[8 * MiB : 8 * MiB + 65536]
    assert data == b"\x77" * 65536


def test_nbdinfo_and_map(server: ServerProcess) -> None:
    require("nbdinfo")
    uri = server.uri("disk")
    out = json.loads(run(["nbdinfo", "--json", uri]).stdout)
    exp = out["exports"][0]
    assert exp["export-size"] == SIZE
    assert exp["can_multi_conn"] and exp["can_trim"] and exp["can_zero"] and exp["can_fua"]
    assert exp["can_fast_zero"] and exp["can_cache"] and exp["can_df"]
    assert not exp["is_read_only"]
    assert "base:allocation" in exp["contexts"]
    assert exp["block_size_maximum"] == 32 * MiB
    # write data at 16M..17M; leave 20M.. as a hole
    run(["nbdsh", "-u", uri, "-c", "h.pwrite(b'\\x01' * (1 << 20), 16 << 20)"], env=nbdsh_env())
    entries = json.loads(run(["nbdinfo", "--map", "--json", uri]).stdout)

    def state_at(off: int) -> int:
        for e in entries:
            if e["offset"] <= off < e["offset"] + e["length"]:
                return int(e["type"])
        raise AssertionError(f"no extent covers {off}")

    assert state_at(16 * MiB) == 0  # data
    assert state_at(20 * MiB) == 3  # hole, zero
    listing = run(["nbdinfo", "--list", "--json", server.uri()]).stdout
    names = {e["export-name"] for e in json.loads(listing)["exports"]}
    assert names == {"disk", "copy", "fio", "qemu"}


def test_nbdcopy_multi_conn_roundtrip(server: ServerProcess, workdir: Path) -> None:
    require("nbdcopy")
    src = make_image(workdir / "src.img", SIZE, seed=7)
    uri = server.uri("copy")
    run(["nbdcopy", "--connections=4", "--requests=16", src, uri], timeout=60)
    dst = workdir / "dst.img"
    run(["nbdcopy", "--connections=4", uri, dst], timeout=60)
    assert dst.read_bytes() == src.read_bytes()


def test_libnbd_python(server: ServerProcess) -> None:
    nbd = pytest.importorskip("nbd")
    uri = server.uri("disk")
    h = nbd.NBD()
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(uri)
    try:
        assert h.get_size() == SIZE and h.can_multi_conn()
        h.pwrite(b"A" * 4096, 24 * MiB, nbd.CMD_FLAG_FUA)
        assert h.pread(4096, 24 * MiB) == b"A" * 4096
        h.zero(4096, 24 * MiB, nbd.CMD_FLAG_NO_HOLE)
        assert h.pread(4096, 24 * MiB) == bytes(4096)
        h.pwrite(b"B" * 8192, 24 * MiB)
        h.trim(8192, 24 * MiB)
        assert h.pread(8192, 24 * MiB) == bytes(8192)
        assert h.can_df()
        chunks: list[int] = []
        data = h.pread_structured(
            8192,
            24 * MiB,
            lambda sub, off, status, err: chunks.append(status) or 0,
            nbd.CMD_FLAG_DF,
        )
        assert data == bytes(8192) and chunks == [nbd.READ_DATA]  # one chunk, as DF asks
        h.cache(4096, 0)
        h.flush()
        seen: list[tuple[str, list[int]]] = []
        h.block_status(
            1 * MiB, 30 * MiB, lambda ctx, off, ents, err: seen.append((ctx, list(ents))) or 0
        )
        assert seen and seen[0][0] == "base:allocation"
        h.set_strict_mode(0)  # let bad requests reach the server instead of failing in libnbd
        with pytest.raises(nbd.Error) as info:
            h.pread(4096, SIZE - 1024)
        assert info.value.errno == "EINVAL"  # from the server
        with pytest.raises(nbd.Error) as info:
            h.pwrite(b"x" * 4096, SIZE - 1024)
        assert info.value.errno == "ENOSPC"
    finally:
        h.shutdown()


def test_libnbd_simple_replies_and_pipelining(server: ServerProcess) -> None:
    """Kernel-like client: no structured replies, 512-byte aligned I/O, 64 requests in
    flight at once, replies matched by cookie whatever their order."""
    nbd = pytest.importorskip("nbd")
    h = nbd.NBD()
    h.set_request_structured_replies(False)
    h.connect_uri(server.uri("disk"))
    try:
        assert not h.get_structured_replies_negotiated()
        bufs = []
        for i in range(64):
            buf = nbd.Buffer.from_bytearray(bytearray([i]) * 512)
            bufs.append(buf)
            h.aio_pwrite(buf, 28 * MiB + i * 512)
        while h.aio_in_flight() > 0:
            h.poll(-1)
        for i in range(64):
            assert h.pread(512, 28 * MiB + i * 512) == bytes([i]) * 512
    finally:
        h.shutdown()


def test_multi_conn_flush_covers_other_connections(server: ServerProcess, workdir: Path) -> None:
    """Write on one connection, FLUSH on a second, read on a third: the CAN_MULTI_CONN
    contract (one shared device, so the data is visible and the flush covers it)."""
    nbd = pytest.importorskip("nbd")
    hs = []
    for _ in range(3):
        h = nbd.NBD()
        h.connect_uri(server.uri("disk"))
        hs.append(h)
    try:
        hs[0].pwrite(b"M" * 65536, 30 * MiB)
        hs[1].flush()
        assert hs[2].pread(65536, 30 * MiB) == b"M" * 65536
    finally:
        for h in hs:
            h.shutdown()
    with open(workdir / "disk.img", "rb") as f:
        f.seek(30 * MiB)
        assert f.read(65536) == b"M" * 65536


def test_nbdsh_command_line(server: ServerProcess) -> None:
    out = run(
        [
            "nbdsh",
            "-u",
            server.uri("disk"),
            "-c",
            "h.pwrite(b'nbdsh!', 0); print(h.pread(6, 0).decode())",
        ],
        env=nbdsh_env(),
    ).stdout
    assert out.strip() == "nbdsh!"


def test_fio_nbd_engine_with_crc32c_verify(server: ServerProcess) -> None:
    require("fio")
    out = run(
        [
            "fio",
            "--name=verify",
            "--ioengine=nbd",
            f"--uri={server.uri('fio')}",
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            "--size=8M",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--verify_state_save=0",  # no local-*-verify.state left in the cwd
            "--output-format=json",
        ],
        timeout=120,
    ).stdout
    job = json.loads(out[out.index("{") :])["jobs"][0]
    assert job["error"] == 0
    assert job["write"]["io_bytes"] == 8 * MiB
    assert job["read"]["io_bytes"] == 8 * MiB  # the verification pass read everything back
