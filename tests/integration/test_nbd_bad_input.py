"""Bad input never crashes the server nor corrupts an image (issue 2, item 5).

Each test sends, over a raw socket, what a broken or hostile client would, checks the exact
error the NBD spec names (or a clean disconnect where the spec says so), and then checks
that the server still serves others and the image holds what it held.
"""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from blocktrace.nbd import wire
from blocktrace.nbd.constants import Cmd, CmdFlag, NBDError, Opt, Rep, ReplyType
from blocktrace.nbd.errors import NBDRemoteProtocolError
from blocktrace.nbd.handshake import encode_info_request
from nbd_helpers import RawClient
from support import MiB, ServerProcess, make_image

SIZE = 8 * MiB


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("nbd-bad")


@pytest.fixture(scope="module")
def srv(workdir: Path) -> Iterator[ServerProcess]:
    with ServerProcess(workdir, [make_image(workdir / "disk.img", SIZE, seed=3)]) as s:
        yield s
    assert "Traceback" not in s.stderr(), s.stderr()


@pytest.fixture(scope="module")
def ro_srv(workdir: Path) -> Iterator[ServerProcess]:
    image = make_image(workdir / "ro.img", SIZE, seed=4)
    with ServerProcess(workdir, [image], ["--read-only"], name="ro") as s:
        yield s
    assert "Traceback" not in s.stderr(), s.stderr()


def image_bytes(workdir: Path, name: str = "disk.img") -> bytes:
    return (workdir / name).read_bytes()


def still_serves(srv: ServerProcess, workdir: Path) -> None:
    """Another client can read the image, and sees exactly what is on disk."""
    with RawClient(srv.socket) as c:
        c.handshake("disk")
        c.request(Cmd.READ, 99, 4096, 4096)
        cookie, error, data = c.simple_reply(4096)
        assert (cookie, error) == (99, 0)
        assert data == image_bytes(workdir)[4096:8192]


@pytest.mark.parametrize(
    ("cmd", "offset", "length", "flags", "error"),
    [
        (Cmd.READ, SIZE - 512, 1024, 0, NBDError.EINVAL),
        (Cmd.READ, (1 << 64) - 512, 1024, 0, NBDError.EINVAL),  # offset + length overflows
        (Cmd.READ, 0, 0, 0, NBDError.EINVAL),
        (Cmd.TRIM, SIZE, 512, 0, NBDError.EINVAL),
        (Cmd.WRITE_ZEROES, SIZE - 512, 1024, 0, NBDError.ENOSPC),
        (Cmd.WRITE_ZEROES, 0, 512, CmdFlag.DF, NBDError.EINVAL),  # flag of another command
        (Cmd.READ, 0, 512, 0x8000, NBDError.EINVAL),  # unknown flag
        (42, 0, 512, 0, NBDError.EINVAL),  # unknown command
        (Cmd.FLUSH, 1, 0, 0, NBDError.EINVAL),
        (Cmd.BLOCK_STATUS, 0, 512, 0, NBDError.EINVAL),  # no metadata context negotiated
        (Cmd.READ, 0, 64 * MiB, 0, NBDError.EOVERFLOW),  # beyond the maximum payload
    ],
)
def test_bad_requests_get_the_spec_error_and_the_connection_continues(
    srv: ServerProcess, workdir: Path, cmd: int, offset: int, length: int, flags: int, error: int
) -> None:
    before = image_bytes(workdir)
    with RawClient(srv.socket) as c:
        c.handshake("disk")
        c.request(cmd, 7, offset, length, flags)
        assert c.simple_reply() == (7, error, b"")
        c.request(Cmd.READ, 8, 0, 512)
        assert c.simple_reply(512) == (8, 0, before[:512])
    assert image_bytes(workdir) == before


def test_write_past_the_end_is_enospc_and_nothing_is_written(
    srv: ServerProcess, workdir: Path
) -> None:
    before = image_bytes(workdir)
    with RawClient(srv.socket) as c:
        c.handshake("disk")
        c.request(Cmd.WRITE, 1, SIZE - 512, 1024, data=b"\xee" * 1024)
        assert c.simple_reply() == (1, NBDError.ENOSPC, b"")
        c.request(Cmd.WRITE, 2, (1 << 64) - 512, 1024, data=b"\xee" * 1024)
        assert c.simple_reply() == (2, NBDError.ENOSPC, b"")
    assert image_bytes(workdir) == before


def test_structured_read_errors_are_error_chunks(srv: ServerProcess) -> None:
    with RawClient(srv.socket) as c:
        done = c.handshake("disk", structured=True)
        assert done.structured_replies
        c.request(Cmd.READ, 5, SIZE, 512)
        _, cookie, rtype, flags, payload = c.reply()
        assert (cookie, rtype, flags) == (5, ReplyType.ERROR, 1)
        err, mlen = struct.unpack_from(">IH", payload)
        assert err == NBDError.EINVAL and b"beyond the end" in payload[6 : 6 + mlen]
        c.request(Cmd.READ, 6, 512, 512)
        _, cookie, rtype, flags, payload = c.reply()
        assert (cookie, rtype, flags) == (6, ReplyType.OFFSET_DATA, 1)
        assert struct.unpack_from(">Q", payload)[0] == 512 and len(payload) == 8 + 512


def test_write_to_read_only_export_is_eperm(ro_srv: ServerProcess, workdir: Path) -> None:
    before = image_bytes(workdir, "ro.img")
    with RawClient(ro_srv.socket) as c:
        done = c.handshake("ro")
        assert done.export.flags & 2  # NBD_FLAG_READ_ONLY
        c.request(Cmd.WRITE, 1, 0, 4096, data=b"\x00" * 4096)
        assert c.simple_reply() == (1, NBDError.EPERM, b"")
        c.request(Cmd.TRIM, 2, 0, 4096)
        assert c.simple_reply() == (2, NBDError.EPERM, b"")
        c.request(Cmd.WRITE_ZEROES, 3, 0, 4096)
        assert c.simple_reply() == (3, NBDError.EPERM, b"")
        c.request(Cmd.READ, 4, 0, 4096)
        assert c.simple_reply(4096) == (4, 0, before[:4096])
    assert image_bytes(workdir, "ro.img") == before


def test_oversized_write_payload_is_consumed_and_refused(srv: ServerProcess, workdir: Path) -> None:
    before = image_bytes(workdir)
    length = 32 * MiB + 4096
    with RawClient(srv.socket) as c:
        c.handshake("disk")
        c.request(Cmd.WRITE, 1, 0, length)
        chunk = b"\xab" * MiB
        sent = 0
        while sent < length:
            n = min(len(chunk), length - sent)
            c.send(chunk[:n])
            sent += n
        assert c.simple_reply() == (1, NBDError.EOVERFLOW, b"")
        c.request(Cmd.READ, 2, 0, 512)
        assert c.simple_reply(512) == (2, 0, before[:512])
    assert image_bytes(workdir) == before


def test_bad_request_magic_disconnects_only_that_client(srv: ServerProcess, workdir: Path) -> None:
    with RawClient(srv.socket) as bystander, RawClient(srv.socket) as c:
        bystander.handshake("disk")
        c.handshake("disk")
        c.send(b"\x12\x56\x09\x53" + bytes(24))  # a reserved, wrong magic
        assert c.wait_closed()
        bystander.request(Cmd.READ, 1, 0, 512)
        assert bystander.simple_reply(512) == (1, 0, image_bytes(workdir)[:512])


@pytest.mark.parametrize(
    "data",
    [
        b"\xff\xff\xff\xff",  # unknown client flags
        b"\x00\x00\x00\x03GARBAGE!" + bytes(8),  # bad option magic
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    ],
)
def test_garbage_handshake_disconnects(srv: ServerProcess, workdir: Path, data: bytes) -> None:
    with RawClient(srv.socket) as c:
        assert c.recv_exact(18)[:8] == b"NBDMAGIC"
        c.send(data)
        assert c.wait_closed()
    still_serves(srv, workdir)


def test_truncated_handshake_and_early_close(srv: ServerProcess, workdir: Path) -> None:
    for cut in (0, 2, 10, 30):
        with RawClient(srv.socket) as c:
            c.recv_exact(18)
            data = b"\x00\x00\x00\x03" + wire.pack_option(Opt.GO, encode_info_request("disk", []))
            c.send(data[:cut])
    still_serves(srv, workdir)


def test_unknown_export_name(srv: ServerProcess, workdir: Path) -> None:
    with RawClient(srv.socket) as c, pytest.raises(NBDRemoteProtocolError, match="ERR_UNKNOWN"):
        c.handshake("nope")
    # NBD_OPT_EXPORT_NAME cannot carry an error: the server closes the connection
    with RawClient(srv.socket) as c:
        c.recv_exact(18)
        c.send(b"\x00\x00\x00\x03" + wire.pack_option(Opt.EXPORT_NAME, b"nope"))
        assert c.wait_closed()
    # INFO for an unknown name, then LIST: haggling continues after the error
    with RawClient(srv.socket) as c:
        c.recv_exact(18)
        c.send(b"\x00\x00\x00\x03" + wire.pack_option(Opt.INFO, encode_info_request("x", [])))
        _, opt, rep, length = wire.OPTION_REPLY.unpack(c.recv_exact(20))
        assert (opt, rep) == (Opt.INFO, Rep.ERR_UNKNOWN)
        c.recv_exact(length)
        c.send(wire.pack_option(Opt.LIST))
        _, opt, rep, length = wire.OPTION_REPLY.unpack(c.recv_exact(20))
        assert (opt, rep) == (Opt.LIST, Rep.SERVER)
        assert c.recv_exact(length)[4:] == b"disk"
    still_serves(srv, workdir)


def test_disconnect_mid_request_applies_nothing(srv: ServerProcess, workdir: Path) -> None:
    before = image_bytes(workdir)
    for payload_sent in (0, 1000, 300 * 1024, MiB - 1):
        with RawClient(srv.socket) as c:
            c.handshake("disk")
            c.request(Cmd.WRITE, 1, MiB, MiB, data=b"\x99" * payload_sent)
    with RawClient(srv.socket) as c:  # half a header
        c.handshake("disk")
        c.send(wire.pack_request(Cmd.WRITE, 1, 0, 512)[:13])
    still_serves(srv, workdir)
    assert image_bytes(workdir) == before


def test_client_that_never_reads_replies(srv: ServerProcess, workdir: Path) -> None:
    """A client pipelining READs without reading replies gets throttled (the server stops
    reading its requests once its replies back up), stays bounded in memory, and another
    client keeps working meanwhile."""
    hog = RawClient(srv.socket)
    try:
        hog.handshake("disk")
        hog.sock.settimeout(1.0)
        request = wire.pack_request(Cmd.READ, 1, 0, 64 * 1024)
        burst = request * 256  # 16 MiB of replies per burst
        bursts = 0
        stalled = False
        while bursts < 400:  # 6.4 GiB of replies if nothing pushed back
            try:
                hog.sock.sendall(burst)
            except TimeoutError:
                stalled = True
                break
            bursts += 1
        assert stalled, "server kept reading requests whose replies nobody reads"
        assert srv.proc is not None
        rss_kib = rss_of(srv.proc.pid)
        assert rss_kib < 300 * 1024, f"server RSS {rss_kib} KiB"
        with RawClient(srv.socket) as c:
            c.handshake("disk")
            for i in range(50):
                c.request(Cmd.READ, i, i * 4096, 4096)
                assert c.simple_reply(4096)[:2] == (i, 0)
    finally:
        hog.sock.shutdown(socket.SHUT_RDWR)
        hog.close()
    still_serves(srv, workdir)


def rss_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_many_clients_at_once(srv: ServerProcess, workdir: Path) -> None:
    expected = image_bytes(workdir)
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            with RawClient(srv.socket) as c:
                c.handshake("disk")
                for i in range(20):
                    off = ((k * 20 + i) * 4096) % SIZE
                    c.request(Cmd.READ, i, off, 4096)
                    assert c.simple_reply(4096) == (i, 0, expected[off : off + 4096])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
