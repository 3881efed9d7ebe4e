"""kill -9 of a process appending and syncing: the log reads cleanly and keeps every synced entry.

The child appends entries of varied sizes (batched small ones and directly written big ones),
syncs every few entries and prints the count each ``sync()`` returned.  The parent kills it
with SIGKILL at varied points, then checks: the log opens and every counted entry passes its
checksum; the super counts at least the last count the child saw acknowledged; every entry's
payload is what the child wrote; the tail after the counted entries is classified, never
misread; reopening for append cuts the tail and the log stays valid.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from blocktrace.logwrites.reader import LogReader
from blocktrace.logwrites.writer import LogWriter

CHILD = r"""
import sys
from blocktrace.logwrites.writer import LogWriter

def payload(i):
    size = (1 + (i * 7919) % 96) * 4096
    return i.to_bytes(4, "little") * (size // 4)

w = LogWriter.create(sys.argv[1])
i = 0
while True:
    w.write((i % 512) * 4096, payload(i), fua=i % 5 == 0)
    i += 1
    if i % 3 == 0:
        w.flush()
    if i % 4 == 0:
        n = w.sync()
        sys.stdout.write(f"{n}\n")
        sys.stdout.flush()
"""


def payload(i: int) -> bytes:
    size = (1 + (i * 7919) % 96) * 4096
    return i.to_bytes(4, "little") * (size // 4)


def run_and_kill(log: Path, syncs: int, delay: float = 0.0) -> int:
    """Run the child until it reported ``syncs`` syncs, let it run ``delay`` more seconds
    (any kill point is valid: the delay only varies where it lands), SIGKILL it; return the
    last count it reported."""
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, os.fspath(log)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    last = 0
    seen = 0
    buf = b""
    deadline = time.monotonic() + 60
    try:
        while seen < syncs:
            assert time.monotonic() < deadline, "child made no progress"
            ready, _, _ = select.select([proc.stdout], [], [], 1.0)
            if not ready:
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                continue
            chunk = os.read(proc.stdout.fileno(), 4096)
            assert chunk, proc.stderr.read() if proc.stderr else "child exited"
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                last = int(line)
                seen += 1
        time.sleep(delay)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        proc.stdout.close()
        if proc.stderr:
            proc.stderr.close()
    return last


def data_entry_payloads_ok(log: Path, *, salvage: bool = False) -> int:
    """Check every entry (checksums are verified by the reader); return the count."""
    n_data = 0
    with LogReader(log) as r:
        for e in r.entries(salvage=salvage):
            if e.is_data:
                assert e.read_data() == payload(n_data), e.index
                assert e.target_offset == (n_data % 512) * 4096
                n_data += 1
        return r.nr_entries


@pytest.mark.parametrize(("syncs", "delay"), [(3, 0.0), (11, 0.003), (25, 0.01), (7, 0.03)])
def test_kill9_keeps_every_synced_entry(tmp_path: Path, syncs: int, delay: float) -> None:
    log = tmp_path / "log"
    acknowledged = run_and_kill(log, syncs, delay)
    assert acknowledged > 0
    counted = data_entry_payloads_ok(log)
    assert counted >= acknowledged
    with LogReader(log) as r:
        tail = r.tail()  # classified, whatever the kill left behind
        assert tail.state in ("clean", "uncounted", "torn")
        assert tail.end_offset <= r.size
    data_entry_payloads_ok(log, salvage=True)  # salvaged entries are whole and in order
    # Reopening cuts whatever was not counted and appends after the counted entries.
    with LogWriter.open(log) as w:
        assert w.nr_entries == counted
        w.mark("after-crash")
    with LogReader(log) as r:
        assert r.nr_entries == counted + 1
        assert r.entry_list()[-1].mark == "after-crash"
        assert r.tail().state == "clean"
