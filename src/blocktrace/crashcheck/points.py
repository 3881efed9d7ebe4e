"""Which crash points to check: a ``--points`` spec turned into entry indexes of a log.

A crash point ``p`` is the disk after entries ``0..p`` (inclusive) were applied: the state a
power cut right after entry ``p`` completed leaves when the device honours flushes.  ``flush``
points are entries with the FLUSH flag (the device promised durability of everything before
them), ``fua`` points FUA writes, ``mark`` points the workload's own marks; ``every-N`` every
N-th entry and ``all`` every entry (each in-order prefix of the log).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from blocktrace.errors import UsageError
from blocktrace.logwrites.format import LogFlag
from blocktrace.logwrites.reader import LogReader

KINDS = ("flush", "fua", "mark", "all")


@dataclass(frozen=True, slots=True)
class CrashPoint:
    """The disk after entry ``index``; ``kind`` says why it was chosen; the marks nearest
    before (at or before ``index``) and after it locate it in the workload's phases."""

    index: int
    kind: str
    mark_before: str | None = None
    mark_after: str | None = None


@dataclass(frozen=True, slots=True)
class PointSpec:
    """A parsed ``--points`` value plus an optional entry window."""

    kinds: frozenset[str]
    every: int = 0
    first: int = 0
    last: int | None = None

    @classmethod
    def parse(cls, text: str, window: str | None = None) -> PointSpec:
        kinds: set[str] = set()
        every = 0
        for part in filter(None, (p.strip() for p in text.split(","))):
            m = re.fullmatch(r"every-(\d+)", part)
            if m:
                every = int(m.group(1))
                if every < 1:
                    raise UsageError("--points every-N: N must be at least 1")
            elif part in KINDS:
                kinds.add(part)
            else:
                raise UsageError(
                    f"--points {part!r}: expected flush, fua, mark, every-N or all"
                    " (comma-separated)"
                )
        if not kinds and not every:
            raise UsageError("--points: nothing selected")
        first, last = 0, None
        if window:
            m = re.fullmatch(r"(\d*):(\d*)", window)
            if not m:
                raise UsageError(f"--entries {window!r}: expected FIRST:LAST (either may be empty)")
            first = int(m.group(1) or 0)
            last = int(m.group(2)) if m.group(2) else None
        return cls(frozenset(kinds), every, first, last)

    def wants(self, index: int, flags: int) -> str | None:
        """The kind that selects entry ``index`` (None: not a point)."""
        if index < self.first or (self.last is not None and index > self.last):
            return None
        if "flush" in self.kinds and flags & LogFlag.FLUSH:
            return "flush"
        if "fua" in self.kinds and flags & LogFlag.FUA:
            return "fua"
        if "mark" in self.kinds and flags & LogFlag.MARK:
            return "mark"
        if "all" in self.kinds or (self.every and (index + 1) % self.every == 0):
            return "entry"
        return None


def select_points(log: str | os.PathLike[str], spec: PointSpec) -> list[CrashPoint]:
    """Walk the log's headers once (no data, no checksums: the replay verifies) and return
    the chosen points in log order, each with its neighbouring marks."""
    chosen: list[tuple[int, str, str | None]] = []
    marks: list[tuple[int, str]] = []
    last_mark: str | None = None
    with LogReader(log, verify=False) as reader:
        for entry in reader.entries():
            if entry.mark is not None:
                last_mark = entry.mark
                marks.append((entry.index, entry.mark))
            kind = spec.wants(entry.index, entry.flags)
            if kind is not None:
                chosen.append((entry.index, kind, last_mark))
    points: list[CrashPoint] = []
    m = 0
    for index, kind, before in chosen:
        while m < len(marks) and marks[m][0] <= index:
            m += 1
        after = marks[m][1] if m < len(marks) else None
        points.append(CrashPoint(index, kind, before, after))
    return points
