"""dm-log-writes logs: the on-disk format, a crash-safe writer, a reader and a replayer.

The format is the one the Linux ``dm-log-writes`` target, QEMU's ``blklogwrites`` driver and
xfstests' ``replay-log`` share; see ``docs/logwrites.md`` for our extensions (a per-entry checksum
in bytes every other tool ignores) and for the crash-safety guarantee of :mod:`.writer`.
"""

from __future__ import annotations
