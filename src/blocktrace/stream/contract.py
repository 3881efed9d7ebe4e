"""The source and target contracts of a write stream, with their capabilities declared.

A **target** consumes one stream of :class:`~blocktrace.stream.records.Record` values: a
dm-log-writes log, a replica, ext4 introspection, a network stream.  It is driven by exactly
one delivery worker (:mod:`blocktrace.trace.delivery`), so its methods are never called
concurrently and need no locking.  The worker hands over records in stream order, in batches,
so a target can turn a batch into one large append.

What a target must do for each promise the trace makes to its clients:

* **held** (``copy-mode=write-blocking`` acknowledges a write once its record is held):
  :meth:`Target.deliver` returns only once a reader of the target would see the records.
* **durable** (FUA writes and FLUSH are acknowledged once their record is durable, in every
  copy mode): :meth:`Target.make_durable` returns only once every delivered record survives a
  crash of this process and of the machine.
* **aligned**: :attr:`Target.alignment` is the byte alignment every data record must have;
  the trace filter widens unaligned operations to it.

Optional capabilities are declared by inheriting an interface below, never discovered by
probing attributes, so mypy checks both sides:

* :class:`DirectWrites`: the write-blocking fast path (a record sent from the client's own
  request, completion reported from the target's reply handler);
* :class:`StateReporter`: the target reports connection/sync state changes (replicas), which
  QMP turns into ``BLOCK_TRACE_REPLICA_STATE`` events.

A **source** produces a stream: :class:`RecordSource` for finished streams read back (a log,
:class:`blocktrace.logwrites.records.LogSource`), and the trace filter for live ones (it
pushes records into each trace's delivery queue).

Lifecycle of a target: ``open(info)`` once, then any number of ``deliver(batch)`` and
``make_durable()``, then ``close(clean=...)`` once (also after a failure).  Any method may
raise; the delivery layer turns the exception into the trace's error and applies
``on-target-error``.  Raise :class:`~blocktrace.errors.TargetError` with a one-line reason
("No space left on device" is what an operator needs to read), chaining the ``OSError``.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from blocktrace.outfile import Protected, protect_path
from blocktrace.stream.records import Record

if TYPE_CHECKING:
    from blocktrace.block.device import BlockDevice
    from blocktrace.stream.prior import PriorContents


class SyncMode(enum.Enum):
    """Where a stream starts: what the base image of a replay is."""

    NONE = "none"  #: the stream holds only operations after the start; base = image at start
    FULL = "full"  #: the stream starts with the whole device; base = an all-zero image


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
    #: where the stream starts (``sync`` option)
    sync: SyncMode = SyncMode.NONE
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
    """A consumer of one trace's records."""

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
    async def deliver(self, records: Sequence[Record]) -> None:
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

    def mark_entry(self, seq: int) -> int | None:
        """Where the target stored the mark record ``seq``, in its own numbering, once it
        holds it: a log answers the entry index that ``blocktrace log list`` shows, so what
        ``trace mark`` reports and what the log lists agree.  None for targets with no
        numbering of their own (the stream position is reported instead)."""
        return None

    #: option values a schema gave this target (:meth:`declare`); None if built directly
    _settings: dict[str, Any] | None = None

    def declare(self, type_name: str, values: dict[str, Any]) -> None:
        """Remember the type and option values this target was made from (called by
        :meth:`TargetType.create <blocktrace.stream.schema.TargetType.create>`)."""
        self._settings = {"type": type_name}
        self._settings.update((k, v) for k, v in values.items() if v is not None)

    def settings(self) -> dict[str, Any]:
        """The target's option values, keyed by their schema names (``type``, ``filename``,
        ``sector-size``...): what ``query-block-jobs`` shows before :meth:`status`.  A target
        overrides it to show effective values (a default resolved at ``open``)."""
        return dict(self._settings) if self._settings is not None else {}

    def status(self) -> dict[str, Any]:
        """Run-time fields for ``query-block-jobs`` (a replica's state, lag...)."""
        return {}

    def describe(self) -> dict[str, Any]:
        """The target as ``query-block-jobs`` shows it: settings, then status."""
        return {**self.settings(), **self.status()}


#: ``done(None)`` once the target holds a record, ``done(exc)`` if the trace must fail
Done = Callable[[BaseException | None], None]


class DirectWrites(abc.ABC):
    """Capability: the ``copy-mode=write-blocking`` fast path.

    When the record is the only one not yet held (the delivery worker idle), the delivery
    layer offers it to :meth:`start_direct` from the client's own request; the target sends
    it and reports from its completion handler, saving the worker's wake-up and hand-back.
    """

    @abc.abstractmethod
    def start_direct(self, rec: Record, done: Done) -> bool:
        """Send ``rec`` now and call ``done`` once it is held; False, with nothing done, when
        this path does not apply (the record then goes through ``deliver``).  The target must
        not return from ``deliver``/``make_durable``/``close`` while a record handed over this
        way is in flight, so stream order and the held position stay exact."""


class ReadsImageAsOfRecord(abc.ABC):
    """Capability: the target reads the traced image itself while it works through the
    stream (the live ``introspect`` target's ext4 engine), so it must see the image as of the
    record it is at, not as later operations already left it.  The trace filter saves, before
    each operation changes the image, what it overwrites (:mod:`blocktrace.stream.prior`)."""

    @property
    @abc.abstractmethod
    def prior_contents(self) -> PriorContents | None:
        """Where the filter saves prior contents (valid after ``open``; None: not needed)."""


#: ``listener(target, state, details)``
StateListener = Callable[[Any, str, dict[str, Any]], None]


class StateReporter(abc.ABC):
    """Capability: the target reports state changes (a replica connecting, syncing,
    degrading), which QMP publishes as ``BLOCK_TRACE_REPLICA_STATE``."""

    @abc.abstractmethod
    def add_listener(self, listener: StateListener) -> None:
        """Call ``listener(target, state, details)`` on every state change (from the loop)."""


class RecordSource(Protocol):
    """A finished stream read back (a dm-log-writes log): records in stream order."""

    def records(self) -> Iterator[Record]:
        """Yield the stream's records in order (``seq`` never decreasing)."""
        ...
