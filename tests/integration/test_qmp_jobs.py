"""block-trace as a block job, driven through QMP by qemu.qmp while NBD clients write.

The server is the real Service (NBD on a Unix socket) with the real QMP control socket, in a
thread (tests/qmp_helpers.py); load comes from libnbd (several connections) and fio.  Every
trace's log is replayed with blocktrace's replay and compared with the image.
"""

from __future__ import annotations

import asyncio
import errno
import os
import random
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import nbd
import pytest
from qemu.qmp import ExecuteError, QMPClient

from blocktrace.logwrites.replay import replay
from qmp_helpers import ServerThread
from support import make_image, require, small_tmpfs

MiB = 1024 * 1024
SIZE = 16 * MiB


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return make_image(tmp_path / "disk.img", SIZE, seed=1)


@pytest.fixture
def srv(tmp_path: Path, image: Path) -> Iterator[ServerThread]:
    with ServerThread(tmp_path, [("disk", os.fspath(image))]) as st:
        yield st


def nbd_uri(st: ServerThread, export: str = "disk") -> str:
    return f"nbd+unix:///{export}?socket={st.nbd}"


async def connect(st: ServerThread) -> QMPClient:
    qmp = QMPClient("test")
    await qmp.connect(os.fspath(st.path))
    return qmp


async def next_event(qmp: QMPClient, timeout: float = 30) -> dict[str, Any]:
    ev = await asyncio.wait_for(qmp.events.get(), timeout)
    return dict(ev)


async def events_until(qmp: QMPClient, name: str, timeout: float = 60) -> list[dict[str, Any]]:
    """Every event up to and including the first ``name``."""
    out: list[dict[str, Any]] = []
    while True:
        ev = await next_event(qmp, timeout)
        out.append(ev)
        if ev["event"] == name:
            return out


async def until_null(qmp: QMPClient, job: str, timeout: float = 60) -> list[dict[str, Any]]:
    """Every event up to the job's last status change (``null``)."""
    out: list[dict[str, Any]] = []
    while True:
        ev = await next_event(qmp, timeout)
        out.append(ev)
        if ev["event"] == "JOB_STATUS_CHANGE" and ev["data"] == {"id": job, "status": "null"}:
            return out


def names(events: list[dict[str, Any]]) -> list[str]:
    """Event names, with the status of each JOB_STATUS_CHANGE: QEMU's order is visible."""
    return [
        e["data"]["status"] if e["event"] == "JOB_STATUS_CHANGE" else e["event"] for e in events
    ]


def statuses(events: list[dict[str, Any]], job: str) -> list[str]:
    return [
        e["data"]["status"]
        for e in events
        if e["event"] == "JOB_STATUS_CHANGE" and e["data"]["id"] == job
    ]


def same_content(a: Path, b: Path) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(MiB), fb.read(MiB)
            if x != y:
                return False
            if not x:
                return True


def wait_progress(done: Callable[[], bool], errors: list[BaseException], timeout: float) -> None:
    """Poll a workload's progress until ``done()``, an error in its threads, or ``timeout``;
    then fail on any error (the caller asserts the progress itself, with its own message)."""
    deadline = time.monotonic() + timeout
    while not done() and not errors and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not errors, errors


class Workload:
    """libnbd writers on ``conns`` connections in threads: writes, zeroes, trims, flushes.

    ``pause()`` returns once no request is in flight on any connection, so the image is
    quiescent until ``resume()``.
    """

    def __init__(self, uri: str, conns: int = 2, seed: int = 7) -> None:
        self.uri = uri
        self.stop_flag = threading.Event()
        self.gate = threading.Event()
        self.gate.set()
        self.idle = [threading.Event() for _ in range(conns)]
        self.ops = [0] * conns
        self.errors: list[BaseException] = []
        self.threads = [
            threading.Thread(target=self._run, args=(i, seed + i), daemon=True)
            for i in range(conns)
        ]

    def start(self) -> Workload:
        for t in self.threads:
            t.start()
        return self

    def _run(self, i: int, seed: int) -> None:
        rng = random.Random(seed)
        h = nbd.NBD()
        try:
            h.connect_uri(self.uri)
            while not self.stop_flag.is_set():
                if not self.gate.is_set():
                    self.idle[i].set()
                    self.gate.wait()
                    self.idle[i].clear()
                    continue
                blocks = rng.randint(1, 16)
                off = rng.randrange(0, SIZE // 4096 - blocks) * 4096
                length = blocks * 4096
                op = rng.random()
                if op < 0.75:
                    fua = nbd.CMD_FLAG_FUA if rng.random() < 0.1 else 0
                    h.pwrite(rng.randbytes(length), off, fua)
                elif op < 0.85:
                    h.zero(length, off)
                elif op < 0.95:
                    h.trim(length, off)
                else:
                    h.flush()
                self.ops[i] += 1
        except BaseException as exc:
            self.errors.append(exc)
        finally:
            self.idle[i].set()
            h.shutdown()

    def wait_ops(self, n: int, timeout: float = 30) -> None:
        wait_progress(lambda: sum(self.ops) >= n, self.errors, timeout)
        assert sum(self.ops) >= n, f"workload too slow: {self.ops}"

    def pause(self) -> None:
        self.gate.clear()
        for ev in self.idle:
            assert ev.wait(30)

    def resume(self) -> None:
        for ev in self.idle:
            ev.clear()
        self.gate.set()

    def stop(self) -> None:
        self.stop_flag.set()
        self.gate.set()
        for t in self.threads:
            t.join(30)
        assert not self.errors, self.errors


@pytest.mark.parametrize("copy_mode", ["background", "write-blocking"])
def test_trace_lifecycle_events_and_query(
    srv: ServerThread, tmp_path: Path, image: Path, copy_mode: str
) -> None:
    log = tmp_path / "t.log"
    base = tmp_path / "base.img"
    shutil.copyfile(image, base)  # sync=none: the base is the image at the start

    async def go() -> None:
        qmp = await connect(srv)
        try:
            target = {"type": "log", "filename": str(log)}
            await qmp.execute(
                "block-trace",
                {"job-id": "j0", "device": "disk", "target": target, "copy-mode": copy_mode},
            )
            evs = await events_until(qmp, "BLOCK_JOB_READY")
            assert statuses(evs, "j0") == ["created", "running", "ready"]
            ready = evs[-1]["data"]
            assert ready["type"] == "trace" and ready["device"] == "j0" and ready["speed"] == 0
            (job,) = await qmp.execute("query-block-jobs")
            for key in ("type", "device", "len", "offset", "busy", "paused", "speed",
                        "io-status", "ready", "status"):  # fmt: skip
                assert key in job, key
            assert job["type"] == "trace" and job["device"] == "j0" and job["export"] == "disk"
            assert job["status"] == "ready" and job["ready"] is True and job["paused"] is False
            assert job["io-status"] == "ok" and job["copy-mode"] == copy_mode
            assert job["target"]["type"] == "log"
            (ex,) = await qmp.execute("query-block-exports")
            assert ex["jobs"] == ["j0"]

            def write() -> None:
                h = nbd.NBD()
                h.connect_uri(nbd_uri(srv))
                for i in range(20):
                    h.pwrite(bytes([i + 1]) * 65536, i * 131072)
                h.flush()
                h.shutdown()

            await asyncio.to_thread(write)
            mark = await qmp.execute("block-trace-mark", {"job-id": "j0", "name": "half"})
            assert mark["entry"] > 20
            await asyncio.to_thread(write)
            (job,) = await qmp.execute("query-block-jobs")
            assert job["entries"] >= 42 and job["bytes"] >= 40 * 65536

            with pytest.raises(ExecuteError) as info:
                await qmp.execute("block-export-del", {"id": "disk", "mode": "hard"})
            assert "j0" in str(info.value) and info.value.error_class == "GenericError"

            assert await qmp.execute("block-job-cancel", {"device": "j0"}) == {}
            evs = await until_null(qmp, "j0")
            # QEMU's order: the end event comes before "concluded" (checked on a mirror job)
            assert names(evs) == ["waiting", "pending", "BLOCK_JOB_COMPLETED", "concluded", "null"]
            done = evs[2]["data"]
            assert done["device"] == "j0" and "error" not in done
            assert done["len"] == done["offset"] > 0
            assert await qmp.execute("query-block-jobs") == []
            with pytest.raises(ExecuteError) as info:
                await qmp.execute("block-job-cancel", {"device": "j0"})
            assert info.value.error_class == "DeviceNotActive"
            assert str(info.value) == "Block job 'j0' not found"
        finally:
            await qmp.disconnect()

    asyncio.run(asyncio.wait_for(go(), 120))
    replay(log, base)
    assert same_content(base, image)


def test_trace_started_and_stopped_mid_workload(
    srv: ServerThread, tmp_path: Path, image: Path
) -> None:
    """sync=full started while two connections write; the log alone rebuilds the image at
    the stop (replayed onto an all-zero image)."""
    log = tmp_path / "full.log"
    at_stop = tmp_path / "at-stop.img"
    rebuilt = make_image(tmp_path / "rebuilt.img", SIZE)
    work = Workload(nbd_uri(srv), conns=2).start()

    async def go() -> None:
        qmp = await connect(srv)
        try:
            await asyncio.to_thread(work.wait_ops, 50)
            await qmp.execute(
                "block-trace",
                {
                    "job-id": "full",
                    "device": "disk",
                    "target": {"type": "log", "filename": str(log)},
                    "sync": "full",
                },
            )
            evs = await events_until(qmp, "BLOCK_JOB_READY")
            assert statuses(evs, "full") == ["created", "running", "ready"]
            n = sum(work.ops)
            await asyncio.to_thread(work.wait_ops, n + 100)
            await asyncio.to_thread(work.pause)
            await qmp.execute("block-job-cancel", {"device": "full"})
            evs = await events_until(qmp, "BLOCK_JOB_COMPLETED")
            assert "error" not in evs[-1]["data"]
            shutil.copyfile(image, at_stop)  # quiescent: nothing in flight
            work.resume()
            await asyncio.to_thread(work.wait_ops, sum(work.ops) + 50)
        finally:
            await qmp.disconnect()

    try:
        asyncio.run(asyncio.wait_for(go(), 120))
    finally:
        work.stop()
    replay(log, rebuilt)
    assert same_content(rebuilt, at_stop)
    assert not same_content(rebuilt, image), "writes after the stop should not be in the log"


def test_events_in_order_under_fio(srv: ServerThread, tmp_path: Path) -> None:
    require("fio")
    log = tmp_path / "fio.log"
    fio = subprocess.Popen(
        ["fio", "--name=load", "--ioengine=nbd", f"--uri={nbd_uri(srv)}", "--rw=randwrite",
         "--bs=4k", "--iodepth=8", "--size=8M", "--time_based", "--runtime=60",
         "--output=/dev/null"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip

    async def go() -> None:
        qmp = await connect(srv)
        watcher = await connect(srv)  # a second client must see the same events, in order
        try:
            args = {
                "job-id": "f",
                "device": "disk",
                "target": {"type": "log", "filename": str(log)},
            }
            await qmp.execute("block-trace", args)
            await events_until(qmp, "BLOCK_JOB_READY")
            for i in range(3):
                await qmp.execute("block-trace-mark", {"job-id": "f", "name": f"m{i}"})
                await qmp.execute("block-job-pause", {"device": "f"})
                with pytest.raises(ExecuteError, match="Job is already paused"):
                    await qmp.execute("block-job-pause", {"device": "f"})
                (job,) = await qmp.execute("query-block-jobs")
                assert job["paused"] is True and job["status"] == "standby"
                await qmp.execute("block-job-resume", {"device": "f"})
            with pytest.raises(ExecuteError, match="Can't resume a job that was not paused"):
                await qmp.execute("block-job-resume", {"device": "f"})
            await qmp.execute("job-cancel", {"id": "f"})
            evs = await until_null(qmp, "f")
            expected = ["created", "running", "ready", "BLOCK_JOB_READY",
                        *["standby", "ready"] * 3, "waiting", "pending",
                        "BLOCK_JOB_COMPLETED", "concluded", "null"]  # fmt: skip
            assert names(evs) == expected[4:]
            seen = await until_null(watcher, "f")
            assert names(seen) == expected
            stamps = [(e["timestamp"]["seconds"], e["timestamp"]["microseconds"]) for e in seen]
            assert stamps == sorted(stamps)
        finally:
            await qmp.disconnect()
            await watcher.disconnect()

    try:
        asyncio.run(asyncio.wait_for(go(), 120))
        if fio.poll() is not None:
            err = fio.stderr.read().decode() if fio.stderr else ""
            pytest.fail(f"fio ended early: {err}")
    finally:
        fio.terminate()
        fio.wait(30)
        if fio.stderr:
            fio.stderr.close()


def test_bad_job_commands(srv: ServerThread, tmp_path: Path) -> None:
    log = str(tmp_path / "x.log")
    gone = tmp_path / "no-such.sock"

    async def go() -> None:
        qmp = await connect(srv)

        async def error_of(cmd: str, args: dict[str, Any]) -> tuple[str, str]:
            with pytest.raises(ExecuteError) as info:
                await qmp.execute(cmd, args)
            return info.value.error_class, str(info.value)

        try:
            target = {"type": "log", "filename": log}
            assert await error_of("block-trace", {"device": "nodev", "target": target}) == (
                "GenericError", "Cannot find device='nodev' nor node-name='nodev'")  # fmt: skip
            assert await error_of("block-trace", {"device": "disk"}) == (
                "GenericError", "Parameter 'target' is missing")  # fmt: skip
            no_type = {"device": "disk", "target": {"filename": log}}
            assert await error_of("block-trace", no_type) == (
                "GenericError", "Parameter 'target.type' is missing")  # fmt: skip
            assert await error_of(
                "block-trace", {"device": "disk", "target": target, "sync": "top"}
            ) == ("GenericError", "Parameter 'sync' does not accept value 'top'")
            assert await error_of(
                "block-trace", {"device": "disk", "target": target, "queue-size": "big"}
            ) == ("GenericError", "Invalid parameter type for 'queue-size', expected: integer")
            cls, desc = await error_of(
                "block-trace", {"device": "disk", "target": target, "queue-size": 4096}
            )
            assert cls == "GenericError" and "queue-size" in desc
            cls, desc = await error_of(
                "block-trace",
                {
                    "device": "disk",
                    "target": {"type": "nbd", "uri": f"nbd+unix:///x?socket={gone}"},
                },
            )
            assert cls == "GenericError" and "nbd" in desc, desc
            assert await error_of(
                "block-trace", {"device": "disk", "target": {"type": "nbd", "uri": 5}}
            ) == ("GenericError", "Invalid parameter type for 'target.uri', expected: string")
            cls, desc = await error_of(
                "block-trace",
                {"device": "disk", "target": {"type": "log", "filename": "/nonexistent/d/x.log"}},
            )
            assert cls == "GenericError"
            assert await error_of("block-job-cancel", {"device": "nope"}) == (
                "DeviceNotActive", "Block job 'nope' not found")  # fmt: skip
            assert await error_of("job-cancel", {"id": "nope"}) == ("GenericError", "Job not found")
            assert await error_of("block-trace-mark", {"job-id": "nope", "name": "m"}) == (
                "DeviceNotActive", "Block job 'nope' not found")  # fmt: skip
            # nothing was left behind by the failures
            assert await qmp.execute("query-block-jobs") == []
            # job-id defaults to the device name, as in QEMU
            await qmp.execute("block-trace", {"device": "disk", "target": target})
            (job,) = await qmp.execute("query-block-jobs")
            assert job["device"] == "disk"
            assert await error_of(
                "block-trace", {"job-id": "disk", "device": "disk", "target": target}
            ) == ("GenericError", "Job ID 'disk' already in use")
            assert await error_of("block-job-complete", {"device": "nope"}) == (
                "DeviceNotActive", "Block job 'nope' not found")  # fmt: skip
            cls, desc = await error_of("block-trace-mark", {"job-id": "disk", "name": ""})
            assert cls == "GenericError"
            await qmp.execute("block-job-complete", {"device": "disk"})
            await events_until(qmp, "BLOCK_JOB_COMPLETED")
        finally:
            await qmp.disconnect()

    asyncio.run(asyncio.wait_for(go(), 60))


def test_racing_starts_and_stop_during_start(srv: ServerThread, tmp_path: Path) -> None:
    async def go() -> None:
        clients = [await connect(srv) for _ in range(4)]
        try:
            for round_ in range(5):
                job = f"r{round_}"

                async def start(c: QMPClient, i: int, job: str = job) -> str:
                    target = {"type": "log", "filename": str(tmp_path / f"{job}-{i}.log")}
                    try:
                        await c.execute(
                            "block-trace", {"job-id": job, "device": "disk", "target": target}
                        )
                        return "ok"
                    except ExecuteError as exc:
                        assert str(exc) == f"Job ID '{job}' already in use"
                        return "in-use"

                async def cancel(c: QMPClient, job: str = job) -> str:
                    try:
                        await c.execute("block-job-cancel", {"device": job})
                        return "cancelled"
                    except ExecuteError as exc:
                        assert exc.error_class == "DeviceNotActive"
                        return "not-found"

                results = await asyncio.gather(
                    start(clients[0], 0), start(clients[1], 1), cancel(clients[2]),
                    start(clients[3], 3),
                )  # fmt: skip
                starts = [r for r in results if r in ("ok", "in-use")]
                assert starts.count("ok") == 1, results
                jobs = await clients[0].execute("query-block-jobs")
                if results[2] == "cancelled":
                    # the cancel saw the whole start: the job ends by itself
                    while jobs:
                        await asyncio.sleep(0.01)
                        jobs = await clients[0].execute("query-block-jobs")
                else:
                    assert [j["device"] for j in jobs] == [job]
                    await clients[0].execute("block-job-cancel", {"device": job})
                    while await clients[0].execute("query-block-jobs"):
                        await asyncio.sleep(0.01)
                # exactly one log was created, by the start that won
                logs = sorted(p.name for p in tmp_path.glob(f"{job}-*.log"))
                assert len(logs) == 1, logs
        finally:
            for c in clients:
                await c.disconnect()

    asyncio.run(asyncio.wait_for(go(), 120))


def test_export_add_trace_delete(srv: ServerThread, tmp_path: Path) -> None:
    img = make_image(tmp_path / "extra.img", 2 * MiB)
    log = tmp_path / "extra.log"

    async def go() -> None:
        qmp = await connect(srv)
        try:
            await qmp.execute("block-export-add", {"id": "extra", "filename": str(img),
                                                   "writable": True})  # fmt: skip
            await qmp.execute(
                "block-trace",
                {"job-id": "e", "device": "extra", "target": {"type": "log", "filename": str(log)}},
            )

            def write() -> None:
                h = nbd.NBD()
                h.connect_uri(nbd_uri(srv, "extra"))
                h.pwrite(b"\x5a" * 4096, 8192, nbd.CMD_FLAG_FUA)
                h.shutdown()

            await asyncio.to_thread(write)
            with pytest.raises(ExecuteError, match="block-job-cancel"):
                await qmp.execute("block-export-del", {"id": "extra"})
            with pytest.raises(ExecuteError, match="block-job-cancel"):
                await qmp.execute("block-export-del", {"id": "extra", "mode": "hard"})
            await qmp.execute("block-job-cancel", {"device": "e"})
            await events_until(qmp, "BLOCK_JOB_COMPLETED")
            while await qmp.execute("query-block-jobs"):
                await asyncio.sleep(0.01)
            # an NBD client is connected: "safe" refuses, "hard" disconnects it
            client = nbd.NBD()
            await asyncio.to_thread(client.connect_uri, nbd_uri(srv, "extra"))
            with pytest.raises(ExecuteError, match="Export 'extra' still in use"):
                await qmp.execute("block-export-del", {"id": "extra"})
            await qmp.execute("block-export-del", {"id": "extra", "mode": "hard"})
            with pytest.raises(nbd.Error):
                await asyncio.to_thread(client.pread, 4096, 0)
            evs = await events_until(qmp, "BLOCK_EXPORT_DELETED")
            assert evs[-1]["data"] == {"id": "extra"}
            ids = [e["id"] for e in await qmp.execute("query-block-exports")]
            assert ids == ["disk"]
        finally:
            await qmp.disconnect()

    asyncio.run(asyncio.wait_for(go(), 60))
    rebuilt = make_image(tmp_path / "r.img", 2 * MiB)
    replay(log, rebuilt)
    assert same_content(rebuilt, img)


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 512 KiB tmpfs: a log on it fails with ENOSPC after a few hundred KiB."""
    with small_tmpfs(tmp_path / "small", "512k") as mnt:
        yield mnt


@pytest.mark.parametrize("policy", ["break", "report"])
def test_target_failure_events(srv: ServerThread, small_fs: Path, policy: str) -> None:
    log = small_fs / "full.log"

    def write_until_error(limit: int = 64) -> str | None:
        """Write 64 KiB blocks; the errno name of the first failed write, or None."""
        h = nbd.NBD()
        h.connect_uri(nbd_uri(srv))
        try:
            for i in range(limit):
                try:
                    h.pwrite(bytes([i % 250 + 1]) * 65536, (i % 128) * 65536)
                    h.flush()
                except nbd.Error as exc:
                    code = exc.errno
                    return errno.errorcode.get(code, str(code)) if isinstance(code, int) else code
            return None
        finally:
            h.shutdown()

    async def go() -> None:
        qmp = await connect(srv)
        try:
            await qmp.execute(
                "block-trace",
                {"job-id": "small", "device": "disk", "on-target-error": policy,
                 "target": {"type": "log", "filename": str(log)}},
            )  # fmt: skip
            await events_until(qmp, "BLOCK_JOB_READY")
            failed = await asyncio.to_thread(write_until_error)
            evs = await events_until(qmp, "BLOCK_JOB_ERROR")
            err = evs[-1]["data"]
            assert err["device"] == "small" and err["operation"] == "write"
            if policy == "break":
                # clients carry on; the job ends, COMPLETED carries the reason
                assert err["action"] == "ignore"
                assert failed is None
                evs = await until_null(qmp, "small")
                assert names(evs)[-4:] == ["aborting", "BLOCK_JOB_COMPLETED", "concluded", "null"]
                assert "No space left on device" in evs[-3]["data"]["error"]
            else:
                # writes fail with EIO until the trace is stopped; nothing diverges silently
                assert err["action"] == "report"
                if failed is None:  # the failing record may have been the last write's
                    failed = await asyncio.to_thread(write_until_error, 4)
                assert failed == "EIO"
                (job,) = await qmp.execute("query-block-jobs")
                assert job["io-status"] == "nospace" and "No space" in job["error"]
                await qmp.execute("block-job-cancel", {"device": "small"})
                evs = await events_until(qmp, "BLOCK_JOB_COMPLETED")
                assert "No space left on device" in evs[-1]["data"]["error"]
            while await qmp.execute("query-block-jobs"):
                await asyncio.sleep(0.01)
            assert await asyncio.to_thread(write_until_error, 4) is None
        finally:
            await qmp.disconnect()

    asyncio.run(asyncio.wait_for(go(), 120))


def test_cancel_before_ready_is_cancelled(tmp_path: Path) -> None:
    """A sync=full trace stopped before its copy finished ends with BLOCK_JOB_CANCELLED
    (its log cannot rebuild the device); pause before ready gives 'paused', not 'standby'."""
    img = make_image(tmp_path / "big.img", 32 * MiB, seed=5)
    log = tmp_path / "early.log"
    with ServerThread(tmp_path, [("big", os.fspath(img))]) as st:

        async def go() -> None:
            qmp = await connect(st)
            try:
                target = {"type": "log", "filename": str(log)}
                start = {"job-id": "early", "device": "big", "sync": "full",
                         "queue-size": MiB, "target": target}  # fmt: skip
                # pipelined: the pause is executed right after the start returns
                await asyncio.gather(
                    qmp.execute("block-trace", start),
                    qmp.execute("block-job-pause", {"device": "early"}),
                )
                (job,) = await qmp.execute("query-block-jobs")
                assert job["status"] == "paused" and job["ready"] is False, job
                assert job["len"] > job["offset"]
                await qmp.execute("block-job-cancel", {"device": "early"})
                evs = await until_null(qmp, "early")
                assert names(evs) == ["created", "running", "paused", "aborting",
                                      "BLOCK_JOB_CANCELLED", "concluded", "null"]  # fmt: skip
                assert evs[4]["data"]["device"] == "early"
                assert "error" not in evs[4]["data"]
            finally:
                await qmp.disconnect()

        asyncio.run(asyncio.wait_for(go(), 60))


def test_flooding_client_does_not_hurt_others(srv: ServerThread) -> None:
    """A client that pipelines commands forever and never reads stalls only itself; once it
    is too far behind to take an event, it is disconnected."""
    import socket as socket_mod

    flood = socket_mod.socket(socket_mod.AF_UNIX)
    flood.connect(os.fspath(srv.path))
    flood.sendall(b'{"execute":"qmp_capabilities"}')
    flood.setblocking(False)
    cmd = b'{"execute":"query-block-exports","id":"flood"}' * 64
    sent = 0
    try:
        while sent < 64 * MiB:
            sent += flood.send(cmd)
    except BlockingIOError:
        pass  # the server stopped reading from it: backpressure
    assert sent < 64 * MiB, "the server kept reading a client that never reads"

    async def go() -> None:
        qmp = await connect(srv)
        try:
            for _ in range(20):
                assert (await qmp.execute("query-version"))["qemu"]["major"] == 0
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30
            n = 0
            while await asyncio.to_thread(srv.client_count) > 1:
                assert loop.time() < deadline, "the flooding client was never disconnected"
                await asyncio.to_thread(srv.emit, "TEST_EVENT", {"n": n})
                n += 1
            for i in range(n):
                ev = await next_event(qmp)
                assert ev["data"] == {"n": i}
        finally:
            await qmp.disconnect()

    try:
        asyncio.run(asyncio.wait_for(go(), 60))
    finally:
        flood.close()


class RegionWorkload:
    """Each of ``conns`` libnbd connections writes only its own region, recording every
    operation *before* issuing it.  With disjoint regions the image at any instant is fixed by
    how many operations of each connection were applied, so a trace's replay can be checked
    against the workload's own history without stopping it."""

    def __init__(self, uri: str, conns: int, seed: int = 11) -> None:
        self.uri = uri
        self.region = SIZE // conns
        self.history: list[list[tuple[str, int, int, bytes]]] = [[] for _ in range(conns)]
        self.acked = [0] * conns
        self.stop_flag = threading.Event()
        self.errors: list[BaseException] = []
        self.threads = [
            threading.Thread(target=self._run, args=(i, seed + i), daemon=True)
            for i in range(conns)
        ]
        for t in self.threads:
            t.start()

    def _run(self, i: int, seed: int) -> None:
        rng = random.Random(seed)
        h = nbd.NBD()
        try:
            h.connect_uri(self.uri)
            base = i * self.region
            while not self.stop_flag.is_set():
                blocks = rng.randint(1, 8)
                off = base + rng.randrange(0, self.region // 4096 - blocks) * 4096
                length = blocks * 4096
                r = rng.random()
                if r < 0.8:
                    data = rng.randbytes(length)
                    self.history[i].append(("write", off, length, data))
                    h.pwrite(data, off, nbd.CMD_FLAG_FUA if r < 0.05 else 0)
                elif r < 0.9:
                    self.history[i].append(("zero", off, length, b""))
                    h.zero(length, off)
                else:
                    self.history[i].append(("trim", off, length, b""))
                    h.trim(length, off)
                self.acked[i] += 1
        except BaseException as exc:
            self.errors.append(exc)
        finally:
            h.shutdown()

    def wait_acked(self, n: int, timeout: float = 30) -> None:
        wait_progress(lambda: min(self.acked) >= n, self.errors, timeout)
        assert min(self.acked) >= n, f"workload too slow: {self.acked}"

    def stop(self) -> None:
        self.stop_flag.set()
        for t in self.threads:
            t.join(30)
        assert not self.errors, self.errors

    def cut(self, i: int, initial: bytes, image: bytes, low: int, high: int) -> int:
        """The k in [low, high] such that region i of ``image`` is ``initial`` with the first k
        operations of connection i applied; fails if there is none."""
        base = i * self.region
        model = bytearray(initial[base : base + self.region])
        target = image[base : base + self.region]
        ops = self.history[i]
        for k in range(len(ops) + 1):
            if k > high:
                break
            if k >= low and model == target:
                return k
            if k < len(ops):
                _, off, length, data = ops[k]
                model[off - base : off - base + length] = data or bytes(length)
        pytest.fail(f"region {i}: not a prefix of its operations in [{low}, {high}]")


def test_stop_under_load_is_a_consistent_cut(
    srv: ServerThread, tmp_path: Path, image: Path
) -> None:
    """Start (sync=full) and stop a trace while 4 connections keep writing, never pausing
    them: the replayed log is the image at one instant, between the last write acknowledged
    before block-job-cancel was sent and the first issued after BLOCK_JOB_COMPLETED."""
    initial = image.read_bytes()
    log = tmp_path / "cut.log"
    rebuilt = make_image(tmp_path / "rebuilt.img", SIZE)
    work = RegionWorkload(nbd_uri(srv), conns=4)
    bounds: dict[str, list[int]] = {}

    async def go() -> None:
        qmp = await connect(srv)
        try:
            await asyncio.to_thread(work.wait_acked, 20)
            target = {"type": "log", "filename": str(log)}
            await qmp.execute(
                "block-trace", {"job-id": "cut", "device": "disk", "sync": "full", "target": target}
            )
            await events_until(qmp, "BLOCK_JOB_READY")
            await asyncio.to_thread(work.wait_acked, min(work.acked) + 30)
            bounds["low"] = list(work.acked)
            await qmp.execute("block-job-cancel", {"device": "cut"})
            evs = await events_until(qmp, "BLOCK_JOB_COMPLETED")
            bounds["high"] = [len(h) for h in work.history]
            assert "error" not in evs[-1]["data"]
            await asyncio.to_thread(work.wait_acked, max(bounds["high"]) + 10)
        finally:
            await qmp.disconnect()

    try:
        asyncio.run(asyncio.wait_for(go(), 120))
    finally:
        work.stop()
    replay(log, rebuilt)
    traced = rebuilt.read_bytes()
    final = image.read_bytes()
    for i in range(4):
        k = work.cut(i, initial, traced, bounds["low"][i], bounds["high"][i])
        assert k < len(work.history[i]), "writes after the stop reached the log"
        n = len(work.history[i])
        assert work.cut(i, initial, final, n, n) == n  # and the server applied everything


def test_start_racing_export_delete(srv: ServerThread, tmp_path: Path) -> None:
    """block-trace and block-export-del on one export from two clients: exactly one wins,
    the other gets its error, and the state is what the winner made it."""

    async def go() -> None:
        a, b = await connect(srv), await connect(srv)
        try:
            for n in range(6):
                img = make_image(tmp_path / f"race{n}.img", MiB)
                await a.execute("block-export-add", {"id": "race", "filename": str(img),
                                                     "writable": True})  # fmt: skip
                target = {"type": "log", "filename": str(tmp_path / f"race{n}.log")}
                start = a.execute("block-trace", {"job-id": "race", "device": "race",
                                                  "target": target})  # fmt: skip
                delete = b.execute("block-export-del", {"id": "race"})
                if n % 2:
                    start, delete = delete, start  # vary who is sent first
                results = await asyncio.gather(start, delete, return_exceptions=True)
                errs = [str(r) for r in results if isinstance(r, ExecuteError)]
                assert len(errs) == 1, results
                exports = [e["id"] for e in await a.execute("query-block-exports")]
                jobs = [j["device"] for j in await a.execute("query-block-jobs")]
                if errs[0] == "Cannot find device='race' nor node-name='race'":
                    assert "race" not in exports and jobs == []  # the delete won
                else:
                    assert "in use by trace job 'race'" in errs[0]  # the start won
                    assert "race" in exports and jobs == ["race"]
                    await a.execute("block-job-cancel", {"device": "race"})
                    await until_null(a, "race")
                    await a.execute("block-export-del", {"id": "race"})
        finally:
            await a.disconnect()
            await b.disconnect()

    asyncio.run(asyncio.wait_for(go(), 120))
