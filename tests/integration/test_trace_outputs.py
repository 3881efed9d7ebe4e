"""The files a trace writes (logs, introspect events files) are only the ones it was asked for.

Through both ways a trace starts (``serve --trace`` in a real server process, QMP
``block-trace`` against the real service): the served image itself (also by another name: a
hard link) is refused, a running trace's log is not wiped by a second trace, an existing file
or a symlink is not truncated without ``force``, symlinks are never followed even with it,
and new files are created 0600 whatever the umask, as the image is (docs/trace.md, FILES).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ext4_recording import mkfs

from blocktrace.logwrites.reader import LogReader
from qmp_helpers import RawClient, ServerThread, wait_until
from support import ServerProcess, blocktrace, make_image

MiB = 1024 * 1024


@pytest.fixture(autouse=True)
def _restore_umask() -> Iterator[None]:
    old = os.umask(0o022)
    os.umask(old)
    yield
    os.umask(old)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    img = make_image(tmp_path / "disk.img", 4 * MiB, seed=7)
    img.chmod(0o600)
    return img


@pytest.fixture
def qmp(tmp_path: Path, image: Path) -> Iterator[RawClient]:
    with ServerThread(tmp_path, [("disk", str(image))]) as st:
        client = RawClient(st.path)
        try:
            yield client
        finally:
            client.close()


def start(client: RawClient, job: str, target: dict[str, Any]) -> Any:
    return client.cmd("block-trace", {"job-id": job, "device": "disk", "target": target})


def error_of(reply: Any) -> str:
    assert "error" in reply, reply
    desc = reply["error"]["desc"]
    assert "\n" not in desc
    return str(desc)


def test_serve_trace_refuses_the_served_image_and_a_hard_link_to_it(
    tmp_path: Path, image: Path
) -> None:
    before = image.read_bytes()
    link = tmp_path / "other-name.log"
    os.link(image, link)
    for target in (image, link):
        r = blocktrace(
            "serve",
            image,
            "--socket",
            tmp_path / "s.sock",
            "--trace",
            f"log:{target},force=on",
            check=False,
        )
        assert r.returncode != 0
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "refusing to write to a served image" in lines[0], r.stderr
    assert image.read_bytes() == before


def test_serve_trace_existing_file_needs_force_and_new_logs_are_0600(
    tmp_path: Path, image: Path
) -> None:
    old = tmp_path / "old.log"
    old.write_bytes(b"keep me")
    old.chmod(0o644)
    r = blocktrace(
        "serve", image, "--socket", tmp_path / "s.sock", "--trace", f"log:{old}", check=False
    )
    assert r.returncode != 0 and "refusing to overwrite it without force=on" in r.stderr
    assert old.read_bytes() == b"keep me"
    os.umask(0o022)
    new = tmp_path / "new.log"
    with ServerProcess(tmp_path, [image], ["--trace", f"log:{new}"]):
        pass
    assert stat.S_IMODE(new.stat().st_mode) == 0o600
    with ServerProcess(tmp_path, [image], ["--trace", f"log:{old},force=on"], name="n2"):
        pass
    assert stat.S_IMODE(old.stat().st_mode) == 0o600  # overwritten: owner only now
    with LogReader(old) as reader:  # a log now, not "keep me"
        assert reader.nr_entries >= 1


def test_block_trace_log_refusals(tmp_path: Path, image: Path, qmp: RawClient) -> None:
    before = image.read_bytes()
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    link = tmp_path / "link.log"
    link.symlink_to(victim)
    img_link = tmp_path / "img.log"
    img_link.symlink_to(image)
    assert "served image" in error_of(
        start(qmp, "a", {"type": "log", "filename": str(image), "force": True})
    )
    assert "symbolic link" in error_of(
        start(qmp, "b", {"type": "log", "filename": str(img_link), "force": True})
    )
    assert "symbolic link" in error_of(
        start(qmp, "c", {"type": "log", "filename": str(link), "force": True})
    )
    assert "without force=on" in error_of(start(qmp, "d", {"type": "log", "filename": str(victim)}))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert "not a regular file" in error_of(
        start(qmp, "e", {"type": "log", "filename": str(fifo), "force": True})
    )
    assert victim.read_bytes() == b"precious" and link.is_symlink()
    assert image.read_bytes() == before and image.stat().st_size == 4 * MiB
    assert qmp.cmd("query-block-jobs") == {"return": []}


def test_second_trace_on_a_live_log_is_refused(tmp_path: Path, image: Path, qmp: RawClient) -> None:
    log = tmp_path / "live.log"
    assert start(qmp, "j1", {"type": "log", "filename": str(log)}) == {"return": {}}
    assert qmp.cmd("block-trace-mark", {"job-id": "j1", "name": "one"}).get("return")
    reply = start(qmp, "j2", {"type": "log", "filename": str(log), "force": True})
    assert "in use by a running trace" in error_of(reply)
    assert qmp.cmd("block-job-cancel", {"device": "j1"}) == {"return": {}}
    wait_until(lambda: qmp.cmd("query-block-jobs") == {"return": []}, what="j1 to end")
    with LogReader(log) as reader:
        marks = [e.mark for e in reader.entries() if e.mark is not None]
    assert "one" in marks  # j1's entries survived j2's attempt


def test_new_log_mode_follows_the_image_and_never_exceeds_0600(
    tmp_path: Path, image: Path, qmp: RawClient
) -> None:
    os.umask(0)
    image.chmod(0o644)  # a readable image still gets an owner-only log
    log = tmp_path / "a.log"
    assert start(qmp, "a", {"type": "log", "filename": str(log)}) == {"return": {}}
    assert stat.S_IMODE(log.stat().st_mode) == 0o600
    image.chmod(0o200)  # the owner cannot read the image: nor the log
    log2 = tmp_path / "b.log"
    assert start(qmp, "b", {"type": "log", "filename": str(log2)}) == {"return": {}}
    assert stat.S_IMODE(log2.stat().st_mode) == 0o200
    image.chmod(0o600)


def test_block_trace_introspect_events_file_rules(tmp_path: Path) -> None:
    img = mkfs(tmp_path / "fs.img", 16, options=("-b", "4096"))
    img.chmod(0o600)
    before = img.read_bytes()
    existing = tmp_path / "events.jsonl"
    existing.write_text("old events\n")
    sym = tmp_path / "sym.jsonl"
    sym.symlink_to(existing)
    with ServerThread(tmp_path, [("disk", str(img))]) as st:
        qmp = RawClient(st.path)
        try:
            t = {"type": "introspect"}
            assert "served image" in error_of(start(qmp, "a", {**t, "filename": str(img)}))
            assert "without force=on" in error_of(start(qmp, "b", {**t, "filename": str(existing)}))
            assert "symbolic link" in error_of(
                start(qmp, "c", {**t, "filename": str(sym), "force": True})
            )
            assert existing.read_text() == "old events\n"
            os.umask(0o022)
            new = tmp_path / "new.jsonl"
            assert start(qmp, "d", {**t, "filename": str(new)}) == {"return": {}}
            assert stat.S_IMODE(new.stat().st_mode) == 0o600
            assert start(qmp, "e", {**t, "filename": str(existing), "force": True}) == {
                "return": {}
            }
            assert existing.read_text() == ""  # force: replaced, not appended to
            assert stat.S_IMODE(existing.stat().st_mode) == 0o600
        finally:
            qmp.close()
    assert img.read_bytes() == before


def test_trace_start_cli_passes_force(tmp_path: Path, image: Path) -> None:
    qmp_sock = tmp_path / "qmp.sock"
    old = tmp_path / "old.log"
    old.write_bytes(b"keep")
    with ServerProcess(tmp_path, [image], ["--qmp", str(qmp_sock)]):
        r = blocktrace("trace", "start", f"disk=log:{old}", "-s", qmp_sock, check=False)
        assert r.returncode != 0 and "without force=on" in r.stderr
        assert old.read_bytes() == b"keep"
        r = blocktrace("trace", "start", f"disk=log:{old},force=on", "-s", qmp_sock)
        assert "started" in r.stdout
        blocktrace("trace", "stop", "disk", "-s", qmp_sock)
    with LogReader(old) as reader:
        assert reader.nr_entries >= 1
