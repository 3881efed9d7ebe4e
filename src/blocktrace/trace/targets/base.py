"""The target protocol: where a trace's records go.

A target is driven by exactly one delivery worker (:mod:`blocktrace.trace.delivery`), so its
methods are never called concurrently and need no locking.  The worker hands over records in
stream order, in batches, so a target can turn a batch into one large append.

Lifecycle: ``open(info)`` once, then any number of ``deliver(batch)`` and ``make_durable()``,
then ``close(clean=...)`` once (also after a failure).  Any method may raise; the delivery
layer turns the exception into the trace's error and applies ``on-target-error``.  Raise
:class:`~blocktrace.errors.TargetError` with a one-line reason ("No space left on device"
is what an operator needs to read), chaining the underlying ``OSError``.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from blocktrace.outfile import Protected, protect_path
from blocktrace.trace.records import TraceRecord

if TYPE_CHECKING:
    from blocktrace.block.device import BlockDevice


@dataclass(frozen=True, slots=True)
class TargetInfo:
    """What a target learns about the traced export when it opens."""

    export: str
    #: traced device size in bytes
    size: int
    #: the export's logical block size (``min_block_size``, at least 512)
    block_size: int
    #: the trace's job id, for targets that persist metadata
    job_id: str = ""
    #: the traced device, for targets that read the source (replica resync); reads only
    device: BlockDevice | None = None
    #: the export's image path ("" if none), for targets that keep state beside the source
    filename: str = ""
    #: the trace's ``sync`` option (``full`` | ``none``)
    sync: str = "none"
    #: image files of every export of the server: a target must never write to them
    served: tuple[str, ...] = ()


def served_images(info: TargetInfo) -> list[Protected]:
    """The files a target's output must not be (by device and inode): every served image."""
    out: list[Protected] = []
    for path in dict.fromkeys((info.filename, *info.served)):
        if path:
            out += protect_path(path, f"a served image ({path})")
    return out


class Target(abc.ABC):
    """A consumer of one trace's records (a dm-log-writes log, a replica, ext4 introspection)."""

    #: short human/QMP name, e.g. ``log:/var/tmp/disk.log``; set in ``__init__``
    name: str = "target"
    #: True for targets that bring themselves up to date by reading the source (replicas):
    #: the trace then skips its own sync=full copy and is ready once
    #: :meth:`wait_synchronized` returns
    synchronizes: bool = False

    def attached(self) -> None:  # noqa: B027 - optional hook
        """Called once the trace records every operation: from here on a target may read the
        source (``TargetInfo.device``) and rely on the stream for every later change."""

    async def wait_synchronized(self) -> None:  # noqa: B027 - optional hook
        """For ``synchronizes`` targets: return once the target equals the source."""

    @property
    def alignment(self) -> int:
        """Byte alignment every WRITE/ZERO/TRIM record must have (a log's sector size).

        Valid after ``open``.  The filter widens unaligned operations to it; must be a power of
        two.  1 means any alignment is fine.
        """
        return 1

    @abc.abstractmethod
    async def open(self, info: TargetInfo) -> None:
        """Create or open the target.  Errors here make the trace fail to start."""

    @abc.abstractmethod
    async def deliver(self, records: Sequence[TraceRecord]) -> None:
        """Take ``records`` (in stream order).  On return the target *holds* them: a replay or
        a reader of the target sees them, though not necessarily after a crash."""

    @abc.abstractmethod
    async def make_durable(self) -> None:
        """On return, every record delivered so far survives a crash of this process and of
        the machine (fsync), and a reader after a crash finds them."""

    @abc.abstractmethod
    async def close(self, *, clean: bool) -> None:
        """Finish the target.  ``clean``: every record was delivered and the trace ended
        normally (a log appends its end mark); otherwise just make what is there readable."""

    def check_mark(self, name: str) -> None:  # noqa: B027 - optional hook
        """Raise :class:`~blocktrace.errors.UsageError` if ``name`` cannot be stored as a
        mark (too long for a log sector, whitespace...).  Called before the mark is queued."""

    def describe(self) -> dict[str, Any]:
        """Target fields for ``query-block-jobs`` (``{"type": "log", "filename": ...}``)."""
        return {"type": "unknown", "name": self.name}
