"""A dm-log-writes log as a stream source: its entries as :class:`~blocktrace.stream.Record`.

Whoever wrote the log (the kernel's dm-log-writes, QEMU's blklogwrites, blocktrace), each
entry becomes the stream's one record type, so every consumer (ext4 introspection, replay,
the applier) reads a recorded log and a live trace the same way:

==========================  ======================================================
entry                       records (``seq`` = the entry's index)
==========================  ======================================================
MARK                        MARK (``name`` = the mark)
data, no DISCARD            WRITE (``fua`` from the FUA flag)
DISCARD with our ZEROES     ZERO (blocktrace logged a WRITE_ZEROES)
other DISCARD               TRIM
FLUSH flag                  FLUSH, after the entry's data record if it has one
==========================  ======================================================

An entry that is both data and FLUSH gives two records with the same ``seq``: the data is
applied before the flush covers it.  A data entry larger than ``CHUNK_BYTES`` gives several
consecutive WRITE records with the same ``seq`` (FUA on the last), so a hostile entry size
never makes a consumer hold the whole payload.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator

from blocktrace.logwrites.format import BadSuperBlock, LogFlag
from blocktrace.logwrites.reader import CHUNK_BYTES, LogEntry, LogReader
from blocktrace.logwrites.writer import END_MARK
from blocktrace.stream.records import Record, RecordKind

#: plain ints: ``int & IntFlag`` goes through enum's Python ``__and__`` (per record)
_FUA, _FLUSH, _DISCARD, _MARK = (
    int(f) for f in (LogFlag.FUA, LogFlag.FLUSH, LogFlag.DISCARD, LogFlag.MARK)
)
_WRITE, _ZERO, _TRIM = RecordKind.WRITE, RecordKind.ZERO, RecordKind.TRIM


def entry_records(e: LogEntry) -> Iterator[Record]:
    """The records of one log entry (see the module table)."""
    header = e.header
    flags = header.flags
    if flags & _MARK:
        yield Record(e.index, RecordKind.MARK, name=e.mark or "")
        return
    if header.nr_sectors:
        if flags & _DISCARD:
            yield Record(e.index, _ZERO if e.is_zeroes else _TRIM, e.target_offset, e.length)
        elif e.length <= CHUNK_BYTES:
            yield Record(
                e.index, _WRITE, e.target_offset, e.length, bool(flags & _FUA), e.read_data()
            )
        else:
            # an entry's size is the log's claim: a large one becomes consecutive WRITE
            # records of at most CHUNK_BYTES (same seq, FUA on the last), never held whole
            last = e.length - CHUNK_BYTES
            for at, piece in e.data_chunks():
                data = bytes(piece)
                fua = bool(flags & _FUA) and at >= last
                yield Record(e.index, _WRITE, e.target_offset + at, len(data), fua, data)
    if flags & _FLUSH:
        yield Record(e.index, RecordKind.FLUSH)


class LogSource:
    """A log file as a :class:`~blocktrace.stream.contract.RecordSource`.

    ``follow``: the log is still being written (``tail -f``): yield entries as its super block
    counts them (a writer counts entries when it syncs, i.e. at the guest's flushes), until
    the ``dm-log-writes-end`` mark or until ``stop()`` is true.  Each refresh re-reads the
    super block and walks the entry headers from the start (the reader's public API), so a
    refresh costs O(entries); it happens only when the count grew.  A log without a super
    block yet (QEMU writes it at the first flush) is waited for.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        verify: bool = True,
        follow: bool = False,
        poll: float = 0.2,
        stop: Callable[[], bool] | None = None,
    ) -> None:
        self.path = path
        self.verify = verify
        self.follow = follow
        self.poll = poll
        self.stop = stop

    def records(self) -> Iterator[Record]:
        if not self.follow:
            with LogReader(self.path, verify=self.verify) as whole:
                for entry in whole.entries(with_data=True):
                    yield from entry_records(entry)
            return
        done = 0
        while True:
            reader: LogReader | None = None
            if os.path.exists(self.path):
                with contextlib.suppress(BadSuperBlock):  # no super block yet: wait
                    reader = LogReader(self.path, verify=self.verify)
            if reader is not None:
                with reader:
                    if reader.nr_entries > done:
                        for entry in reader.entries(done, with_data=True):
                            yield from entry_records(entry)
                            done = entry.index + 1
                            if entry.mark == END_MARK:
                                return
            if self.stop is not None and self.stop():
                return
            time.sleep(self.poll)


def log_records(path: str | os.PathLike[str], *, verify: bool = True) -> Iterator[Record]:
    """The records of a finished log."""
    return LogSource(path, verify=verify).records()


def follow_log_records(
    path: str | os.PathLike[str],
    *,
    verify: bool = True,
    poll: float = 0.2,
    stop: Callable[[], bool] | None = None,
) -> Iterator[Record]:
    """The records of a log still being written (see :class:`LogSource`, ``follow``)."""
    return LogSource(path, verify=verify, follow=True, poll=poll, stop=stop).records()
