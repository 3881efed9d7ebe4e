"""``replica`` trace target: keep a local raw image equal to the traced export.

``{"type": "replica", "filename": PATH}`` (``--trace disk=replica:PATH``).  The image is
created, sparse and of the source's size, if it does not exist.  Metadata lives beside it in
``PATH.btreplica`` unless ``meta=`` says otherwise.  All the logic is the shared engine,
:class:`blocktrace.replica.target.ReplicaTarget`; see docs/replica.md.

The image is locked like a writable export (QEMU's image locks,
:mod:`blocktrace.block.locking`) from the target's open to its close, streaming, resyncing,
comparing, and degraded too: QEMU, qemu-img, qemu-nbd, another replica, a replay or a live
log on the same file refuse it and are refused (whatever path names it), and a served image
is refused as a replica by device and inode with a reason of its own.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from blocktrace.block.device import BlockDevice
from blocktrace.block.file import FileDevice
from blocktrace.block.locking import WRITABLE, lock_image
from blocktrace.errors import UsageError
from blocktrace.outfile import FileId, Protected, output_mode
from blocktrace.replica.bitmap import DEFAULT_GRANULARITY
from blocktrace.replica.meta import META_SUFFIX, Fingerprint, file_fingerprint
from blocktrace.replica.target import ReplicaTarget
from blocktrace.stream.contract import TargetInfo, served_images
from blocktrace.stream.schema import Choice, Flag, Integer, Option, Seconds, TargetType, Text

#: options every replica-type target accepts besides its main argument (docs/replica.md)
REPLICA_OPTIONS: tuple[Option, ...] = (
    Option("meta", Text("PATH"), "the replica metadata file (default: docs/replica.md)"),
    Option("force", Flag(), "overwrite a diverged or foreign replica", default=False),
    Option(
        "on-disconnect",
        Choice(("degrade", "fail")),
        "degrade: track dirty regions and reconnect; fail: fail the trace",
        default="degrade",
    ),
    Option(
        "granularity",
        Integer(512, 1 << 30, kind="uint32", size=True, power_of_two=True),
        "dirty bitmap unit",
        default=DEFAULT_GRANULARITY,
    ),
    Option("reconnect-max", Seconds(1, 3600), "reconnect backoff cap, seconds", default=5),
)


def replica_keywords(values: Mapping[str, Any]) -> dict[str, Any]:
    """The shared options as :class:`ReplicaTarget` keywords."""
    return {
        "meta_path": Path(values["meta"]) if values["meta"] else None,
        "force": values["force"],
        "on_disconnect": values["on-disconnect"],
        "granularity": values["granularity"],
        "reconnect_max": float(values["reconnect-max"]),
    }


#: how a refused replica image ends its error line
REPLICA_ADVICE = "stop it or name another replica image"


class LocalReplicaTarget(ReplicaTarget):
    """A replica in a local raw image (a file or a block device)."""

    kind = "replica"

    def __init__(self, filename: str, **kw: Any) -> None:
        self.filename = filename
        self._served: list[Protected] = []
        #: the image's identity and the descriptor holding its QEMU locks (:meth:`_hold_lock`)
        self._image_lock: tuple[FileId, int] | None = None
        self._new_mode = output_mode(None)
        super().__init__(f"replica:{filename}", os.path.realpath(filename), **kw)
        if self.meta_path is None:
            self.meta_path = Path(filename + META_SUFFIX)

    async def open(self, info: TargetInfo) -> None:
        self._served = served_images(info)
        # a new replica holds the disk's data: created like every output (0600, never
        # wider than the source image)
        self._new_mode = output_mode(info.filename)
        try:
            await super().open(info)
        except BaseException:  # a target whose open failed is not closed: drop the lock now
            self._release_lock()
            raise

    async def close(self, *, clean: bool) -> None:
        try:
            await super().close(clean=clean)
        finally:
            self._release_lock()

    async def open_device(self) -> BlockDevice:
        if not os.path.exists(self.filename):
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(self.filename, flags, self._new_mode)
            try:
                os.ftruncate(fd, self.size)
            finally:
                os.close(fd)
        dev = FileDevice(self.filename)  # locked by _hold_lock, for the target's whole life
        try:
            me = FileId.of(os.fstat(dev.fd))
            self._refuse_served(me)  # before the lock: a served image, say why, not who
            self._hold_lock(dev.fd, me)
        except BaseException:
            await dev.close()
            raise
        return dev

    def _hold_lock(self, fd: int, me: FileId) -> None:
        """Lock the image for the target's life, not the device's: a replica that degrades
        (ENOSPC, EIO) closes its device but keeps the image locked, so nothing writes it
        behind the dirty bitmap's back before the resync; released by :meth:`close`.  The
        lock is taken on a second open file description of the file ``fd`` has open (the
        same inode, not the path again), and moves if the image was replaced meanwhile."""
        if self._image_lock is not None and self._image_lock[0] == me:
            return
        lock_fd = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            lock_image(lock_fd, self.filename, WRITABLE, advice=REPLICA_ADVICE)
        except BaseException:
            os.close(lock_fd)
            raise
        self._release_lock()
        self._image_lock = (me, lock_fd)

    def _release_lock(self) -> None:
        if self._image_lock is not None:
            os.close(self._image_lock[1])
            self._image_lock = None

    def _refuse_served(self, me: FileId) -> None:
        for p in self._served:
            if p.id == me:
                raise UsageError(f"{self.name}: refusing to write to {p.what}")

    def replica_fingerprint(self) -> Fingerprint | None:
        return file_fingerprint(self.filename)

    def replica_exists(self) -> bool:
        return os.path.exists(self.filename)

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "filename": self.filename}


TARGET_TYPE = TargetType(
    name="replica",
    doc="a local raw image kept identical to the export (docs/replica.md)",
    order=20,
    options=(
        Option("filename", Text("PATH"), "a raw image kept identical to the export", main=True),
        *REPLICA_OPTIONS,
    ),
    factory=lambda v: LocalReplicaTarget(v["filename"], **replica_keywords(v)),
)
