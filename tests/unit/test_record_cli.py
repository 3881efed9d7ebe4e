"""``blocktrace record``'s exit status: 1 when the workload or any crash point failed (the
spec: exit 1 when any point fails, as ``crashcheck`` does), 0 only when everything passed."""

from __future__ import annotations

from typing import Any

import pytest
from click.testing import CliRunner

import blocktrace.cli.crashcheck as cli_crashcheck
import blocktrace.cli.record as cli_record
from blocktrace.crashcheck.points import CrashPoint
from blocktrace.crashcheck.record import Recording
from blocktrace.crashcheck.runner import PointResult, RunResult


def _run(monkeypatch: pytest.MonkeyPatch, workload: int, passed: list[bool]) -> int:
    def fake_record(out: str, command: list[str], **kwargs: Any) -> Recording:
        return Recording(f"{out}/trace.log", f"{out}/base.img", f"{out}/disk.img", workload)

    def fake_check(log: str, base: str, **kwargs: Any) -> RunResult:
        results = [
            PointResult(CrashPoint(i, "flush"), ok, "" if ok else "xfs_repair: bad", "fsck")
            for i, ok in enumerate(passed)
        ]
        return RunResult(len(results), results, 0.0, 0, len(results))

    monkeypatch.setattr(cli_record, "do_record", fake_record)
    monkeypatch.setattr(cli_crashcheck, "check_and_report", fake_check)
    res = CliRunner().invoke(cli_record.record, ["-o", "out", "--fs", "xfs", "--", "true"])
    assert res.exception is None or isinstance(res.exception, SystemExit), res.output
    return res.exit_code


@pytest.mark.parametrize(
    ("workload", "passed", "status"),
    [
        (0, [True, True], 0),
        (0, [True, False], 1),  # a failing point fails the run, as crashcheck's exit 1
        (0, [False], 1),
        (3, [True], 1),  # the workload failed
    ],
)
def test_record_exit_status(
    monkeypatch: pytest.MonkeyPatch, workload: int, passed: list[bool], status: int
) -> None:
    assert _run(monkeypatch, workload, passed) == status
