"""The write stream, neutral ground between the packages that produce and consume it.

* :mod:`.records`: :class:`Record`, :class:`RecordKind` (the one record type);
* :mod:`.contract`: :class:`Target` (and :class:`TargetInfo`, :class:`SyncMode`), the
  capability interfaces :class:`DirectWrites`, :class:`StateReporter` and
  :class:`ReadsImageAsOfRecord`, and the
  :class:`RecordSource` protocol;
* :mod:`.prior`: :class:`~.prior.PriorContents`, an image as of a consumer's record;
* :mod:`.apply`: the one applier of records to a block device;
* :mod:`.schema`: :class:`TargetType` and :class:`Option`, one declaration per target type;
* :mod:`.registry`: the target types, discovered in :mod:`blocktrace.targets`.

Layering (enforced by tests/test_layering.py): this package depends only on ``errors``,
``outfile`` and ``block``; ``trace``, ``replica``, ``logwrites`` and ``ext4`` depend on it and
not on each other; ``targets`` composes them.
"""

from __future__ import annotations

from blocktrace.stream.contract import (
    DirectWrites,
    Done,
    ReadsImageAsOfRecord,
    RecordSource,
    StateListener,
    StateReporter,
    SyncMode,
    Target,
    TargetInfo,
    served_images,
)
from blocktrace.stream.records import DATA_KINDS, RECORD_OVERHEAD, Record, RecordKind

__all__ = [
    "DATA_KINDS",
    "RECORD_OVERHEAD",
    "DirectWrites",
    "Done",
    "ReadsImageAsOfRecord",
    "Record",
    "RecordKind",
    "RecordSource",
    "StateListener",
    "StateReporter",
    "SyncMode",
    "Target",
    "TargetInfo",
    "served_images",
]
