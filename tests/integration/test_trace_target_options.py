"""Target options on every face of a real server: ``serve --trace``, QMP ``block-trace`` and
``blocktrace trace start`` accept the same documented options (generated from the target's
schema) and ``query-block-jobs`` shows them under the same names.

Regression for #10 item 17: QMP refused the log target's documented ``direct`` option
("Parameter 'target.direct' is unexpected").
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nbd

from support import ServerProcess, blocktrace, make_image

MiB = 1024 * 1024


def test_log_options_on_every_face(tmp_path: Path) -> None:
    img = make_image(tmp_path / "disk.img", 8 * MiB, seed=5)
    base = tmp_path / "base.img"
    shutil.copyfile(img, base)
    qmp = tmp_path / "qmp.sock"
    logs = {job: tmp_path / f"{job}.log" for job in ("served", "qmp", "cli")}
    served = f"disk=log:{logs['served']},direct=off,zeroes=data,sector-size=4K,job-id=served"
    with ServerProcess(tmp_path, [img], ["--qmp", str(qmp), "--trace", served]) as srv:
        target = {
            "type": "log",
            "filename": str(logs["qmp"]),
            "direct": False,
            "zeroes": "data",
            "sector-size": 4096,
        }
        args = json.dumps({"device": "disk", "job-id": "qmp", "target": target})
        assert blocktrace("qmp", "block-trace", "-s", qmp, args).stdout == ""
        spec = f"disk=log:{logs['cli']},direct=off,zeroes=data,sector-size=4K"
        blocktrace("trace", "start", spec, "--job-id", "cli", "-s", qmp)
        jobs = json.loads(blocktrace("trace", "list", "-s", qmp, "--json").stdout)
        shown = {j["device"]: j["target"] for j in jobs}
        assert set(shown) == set(logs)
        for job, log in logs.items():
            assert shown[job] == {
                "type": "log",
                "filename": str(log),
                "sector-size": 4096,
                "zeroes": "data",
                "direct": False,
            }, job
        h = nbd.NBD()
        h.connect_uri(srv.uri("disk"))
        for i in range(8):
            h.pwrite(bytes([0x30 + i]) * 8192, i * 65536 + 512)
        h.zero(64 * 1024, 3 * MiB)
        h.flush()
        h.shutdown()
        for job in ("qmp", "cli"):
            blocktrace("trace", "stop", job, "-s", qmp)
    for log in logs.values():
        work = tmp_path / "work.img"
        shutil.copyfile(base, work)
        blocktrace("replay", log, work)
        assert work.read_bytes() == img.read_bytes(), log
