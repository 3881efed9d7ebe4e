"""What a crashcheck run tells a person: per failing point, where it is and why; a summary.

The "why" for ext4 comes from the introspection engine (:mod:`blocktrace.ext4.watcher`): it
follows the same log and attributes each file-level event to the record of the JBD2 commit
that made it durable.  For a failing point the report names the last transaction committed at
or before it and the files that transaction changed: where to start looking.
"""

from __future__ import annotations

import json
from typing import Any

from blocktrace.crashcheck.runner import PointResult, RunResult
from blocktrace.errors import BlocktraceError

#: Lines of checker output kept per failing point in the human report (JSON keeps it all).
HUMAN_OUTPUT_LINES = 25
#: Files listed per transaction.
MAX_FILES = 50


def annotate_ext4(results: list[PointResult], base: str, log: str) -> str | None:
    """Fill ``transaction``/``files`` of failing results; returns a note if introspection
    could not follow the log (not ext4, or damaged beyond what it parses)."""
    failing = [r for r in results if not r.passed]
    if not failing:
        return None
    from blocktrace.ext4.watcher import Watcher, log_records

    by_record: dict[int, set[str]] = {}
    errors: list[tuple[int, str]] = []
    try:
        with Watcher(base) as w:
            for event in w.feed(log_records(log), finish=False):
                if event.kind == "error":
                    errors.append((event.record, event.message or ""))
                elif event.path:
                    by_record.setdefault(event.record, set()).add(event.path)
    except BlocktraceError as exc:
        return f"introspection unavailable: {exc}"
    commits = sorted(by_record)
    for r in failing:
        before = [c for c in commits if c <= r.point.index]
        if before:
            r.transaction = before[-1]
            r.files = sorted(by_record[before[-1]])[:MAX_FILES]
        since = r.transaction if r.transaction is not None else -1
        r.anomalies = [f"record {i}: {m}" for i, m in errors if since < i <= r.point.index][
            :MAX_FILES
        ]
    return None


def to_json(run: RunResult, *, fs: str, log: str, base: str, note: str | None) -> str:
    def point(r: PointResult) -> dict[str, Any]:
        return {
            "entry": r.point.index,
            "kind": r.point.kind,
            "mark_before": r.point.mark_before,
            "mark_after": r.point.mark_after,
            "passed": r.passed,
            "stage": r.stage or None,
            "seconds": round(r.seconds, 3),
            "output": r.output if not r.passed else None,
            "transaction": r.transaction,
            "files": r.files,
            "anomalies": r.anomalies,
        }

    doc = {
        "log": log,
        "base": base,
        "check": fs,
        "points": run.points,
        "checked": len(run.results),
        "failed": len(run.failures),
        "bisect": run.bisect,
        "first_failure": run.failures[0].point.index if run.failures else None,
        "seconds": round(run.seconds, 3),
        "peak_space_bytes": run.peak_space,
        "entries_replayed": run.entries_replayed,
        "note": note,
        "results": [point(r) for r in run.results],
    }
    return json.dumps(doc, indent=2)


def render(run: RunResult, *, fs: str, note: str | None, console: Any) -> None:
    """The human report: each failure in detail, then one summary table."""
    from rich.markup import escape
    from rich.table import Table

    for r in sorted(run.failures, key=lambda r: r.point.index):
        p = r.point
        console.print(
            f"[bold red]FAIL[/] entry {p.index} ({p.kind}) -- {r.stage} failed;"
            f" marks around it: {p.mark_before or '(start)'} .. {p.mark_after or '(end)'}"
        )
        if r.transaction is not None:
            files = ", ".join(r.files) or "(no file events)"
            console.print(f"  last transaction before it: record {r.transaction}: {escape(files)}")
        for anomaly in r.anomalies:
            console.print(f"  introspection: {escape(anomaly)}")
        lines = r.output.rstrip().splitlines()
        for line in lines[:HUMAN_OUTPUT_LINES]:
            console.print(f"  | {escape(line)}", highlight=False)
        if len(lines) > HUMAN_OUTPUT_LINES:
            console.print(f"  | ... {len(lines) - HUMAN_OUTPUT_LINES} more lines (see --json)")
    if note:
        console.print(f"note: {note}")
    table = Table(title=f"crashcheck ({fs})", box=None)
    for col in ("points", "checked", "passed", "failed", "first failure", "time", "peak space"):
        table.add_column(col, justify="right")
    first = min((r.point.index for r in run.failures), default=None)
    table.add_row(
        str(run.points),
        str(len(run.results)),
        str(len(run.results) - len(run.failures)),
        str(len(run.failures)),
        "-" if first is None else f"entry {first}",
        f"{run.seconds:.1f}s",
        f"{run.peak_space / 2**20:.1f} MiB",
    )
    console.print(table)
    if run.bisect:
        console.print(
            "bisect assumes failures are monotonic; they need not be (a later write can"
            " repair or hide damage): run without --bisect to check every point"
        )
