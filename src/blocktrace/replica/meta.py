"""Persistent replica state: the metadata sidecar, the source's generation record, the attach check.

Two small files, modelled on DRBD's meta-data (``peers.md`` section 3):

* **Replica metadata** (``REPLICA.btreplica`` beside a local replica; for an NBD replica the
  ``meta=PATH`` option, by default beside the source image): which source the replica belongs
  to (``source-id``), its data generation (a UUID, with older ones in ``history``), the record
  number the replica holds (``applied-seq``), whether its content is consistent (a resync in
  progress leaves a mix of old and new regions, as DRBD's *Inconsistent*), whether the last
  session closed cleanly, and the dirty-region bitmap of what the replica lacks.
* **Source record** (``SOURCE.btsource`` beside the source image): the source's own UUID and,
  per replica, the generation it last handed that replica plus the one before it.

On-disk format of the metadata file (all one file, so one rename replaces all of it)::

    "BTREPLM1"  u32 json-length  u32 bitmap-length  json  bitmap  u32 crc32(everything before)

Crash safety: every save writes ``PATH.tmp``, ``fsync``\\ s it, ``rename``\\ s it over ``PATH``
and ``fsync``\\ s the directory, so a crash leaves the old or the new file, never a torn one; a
file whose CRC does not match is reported as corrupt, never half-used.  The source record is
written (and made durable) *before* the replica metadata that names a new generation, and the
check accepts the generation before the current one, so a crash between the two writes is not
mistaken for split brain.

:func:`plan_attach` is the whole decision table (tested in ``tests/unit/test_replica_meta.py``).
"""

from __future__ import annotations

import json
import os
import struct
import time
import uuid
import zlib
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from blocktrace.block.file import fsync_dir
from blocktrace.errors import FormatError, TargetError, UsageError
from blocktrace.replica.bitmap import DEFAULT_GRANULARITY, DirtyBitmap

MAGIC = b"BTREPLM1"
HEADER = struct.Struct(">8sII")
CRC = struct.Struct(">I")
META_SUFFIX = ".btreplica"
SOURCE_SUFFIX = ".btsource"
HISTORY_LEN = 8

#: (size, mtime_ns) of a file: cheap evidence that nobody wrote it since we looked.
Fingerprint = tuple[int, int]


class SplitBrainError(TargetError):
    """The replica belongs to another source or diverged from this one; it is not touched."""


class AttachMode(Enum):
    """How much of the device an attach must copy before streaming alone keeps it equal."""

    NONE = "none"  #: nothing: the operator says both start from the same base
    BITMAP = "bitmap"  #: only the regions the persisted dirty bitmap names
    COMPARE = "compare"  #: read both sides, copy the regions that differ (unclean stop)
    FULL = "full"  #: copy everything (new replica, or forced over another source's)


@dataclass
class AttachPlan:
    mode: AttachMode
    reason: str


@dataclass
class ReplicaMeta:
    """The replica metadata's JSON part (the bitmap travels beside it)."""

    source_id: str
    generation: str
    target: str
    size: int
    granularity: int = DEFAULT_GRANULARITY
    history: list[str] = field(default_factory=list)
    applied_seq: int = -1
    consistent: bool = False
    clean: bool = False
    #: the local replica file's fingerprint at the last clean close (None for NBD replicas)
    fingerprint: list[int] | None = None
    updated: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {k.replace("_", "-"): v for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> ReplicaMeta:
        try:
            kw = {k.replace("-", "_"): v for k, v in obj.items()}
            return cls(**kw)
        except TypeError as exc:
            raise FormatError(f"replica metadata has bad fields: {exc}") from None


def atomic_write(path: Path, data: bytes, tmp_suffix: str = ".tmp") -> None:
    """Replace ``path`` by ``data`` so that a crash leaves the old or the new content.

    Concurrent writers must use distinct ``tmp_suffix`` values."""
    tmp = path.with_name(path.name + tmp_suffix)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def file_fingerprint(path: str | os.PathLike[str]) -> Fingerprint | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns)


# -- replica metadata file ----------------------------------------------------------------------


def encode_meta(meta: ReplicaMeta, bitmap: DirtyBitmap) -> bytes:
    js = json.dumps(meta.to_json(), sort_keys=True).encode()
    raw = bitmap.to_bytes()
    body = HEADER.pack(MAGIC, len(js), len(raw)) + js + raw
    return body + CRC.pack(zlib.crc32(body))


def decode_meta(data: bytes, what: str = "replica metadata") -> tuple[ReplicaMeta, DirtyBitmap]:
    if len(data) < HEADER.size + CRC.size:
        raise FormatError(f"{what}: truncated ({len(data)} bytes)")
    magic, jlen, blen = HEADER.unpack_from(data, 0)
    if magic != MAGIC:
        raise FormatError(f"{what}: bad magic {magic!r}")
    end = HEADER.size + jlen + blen
    if len(data) != end + CRC.size:
        raise FormatError(f"{what}: length {len(data)} does not match header ({end + CRC.size})")
    (crc,) = CRC.unpack_from(data, end)
    if zlib.crc32(data[:end]) != crc:
        raise FormatError(f"{what}: checksum mismatch (torn or corrupt file)")
    try:
        obj = json.loads(data[HEADER.size : HEADER.size + jlen])
    except ValueError as exc:
        raise FormatError(f"{what}: bad JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise FormatError(f"{what}: JSON is not an object")
    meta = ReplicaMeta.from_json(obj)
    try:
        bitmap = DirtyBitmap.from_bytes(meta.size, meta.granularity, data[HEADER.size + jlen : end])
    except ValueError as exc:
        raise FormatError(f"{what}: {exc}") from None
    return meta, bitmap


def load_meta(path: Path) -> tuple[ReplicaMeta, DirtyBitmap] | None:
    """The metadata at ``path``, or None if there is none yet."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise UsageError(f"{path}: {exc.strerror}") from None
    return decode_meta(data, str(path))


def save_meta(path: Path, meta: ReplicaMeta, bitmap: DirtyBitmap) -> None:
    meta.updated = time.time()
    atomic_write(path, encode_meta(meta, bitmap))


# -- source record ------------------------------------------------------------------------------


@dataclass
class SourceRecord:
    """``SOURCE.btsource``: the source's UUID and, per replica key, its generation pair."""

    source_id: str
    #: replica key -> {"generation": G, "previous": G_before, "fingerprint": [size, mtime] | None}
    replicas: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path | None) -> SourceRecord:
        """Read the record, creating a fresh identity when there is none (or no path)."""
        if path is None:
            return cls(source_id=str(uuid.uuid4()))
        try:
            obj = json.loads(path.read_bytes())
        except FileNotFoundError:
            return cls(source_id=str(uuid.uuid4()))
        except (OSError, ValueError) as exc:
            raise FormatError(f"{path}: unreadable source record: {exc}") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("source-id"), str):
            raise FormatError(f"{path}: not a blocktrace source record")
        reps = obj.get("replicas", {})
        return cls(source_id=obj["source-id"], replicas=reps if isinstance(reps, dict) else {})

    def save(self, path: Path | None) -> None:
        if path is None:
            return
        data = {"source-id": self.source_id, "replicas": self.replicas}
        atomic_write(path, json.dumps(data, indent=1, sort_keys=True).encode())


def new_generation() -> str:
    return str(uuid.uuid4())


# -- the decision table -------------------------------------------------------------------------


def plan_attach(
    meta: ReplicaMeta | None,
    bitmap: DirtyBitmap | None,
    source: SourceRecord,
    key: str,
    *,
    size: int,
    sync: str = "full",
    force: bool = False,
    replica_fingerprint: Fingerprint | None = None,
    source_fingerprint: Fingerprint | None = None,
) -> AttachPlan:
    """Decide how to bring the replica up to date, or raise :class:`SplitBrainError`.

    ``sync`` is the operator's ``full`` (copy what is needed) or ``none`` (the replica starts
    from the same base: trust it).  ``force`` overwrites a replica that belongs to another
    source or diverged, as DRBD's ``--discard-my-data`` on the victim.
    """
    if meta is None:
        if sync == "none":
            return AttachPlan(AttachMode.NONE, "new replica, sync=none: same base assumed")
        return AttachPlan(AttachMode.FULL, "new replica: no metadata")
    if meta.source_id != source.source_id:
        if force:
            return AttachPlan(AttachMode.FULL, f"forced over source {meta.source_id}")
        raise SplitBrainError(
            key,
            f"replica belongs to source {meta.source_id}, not {source.source_id}: "
            "refusing to overwrite it (force=on overwrites)",
        )
    if meta.size != size:
        return AttachPlan(AttachMode.FULL, f"source size changed ({meta.size} -> {size})")
    rec = source.replicas.get(key)
    known = {rec.get("generation"), rec.get("previous")} - {None} if rec else set()
    if meta.generation not in known:
        if force:
            return AttachPlan(AttachMode.COMPARE, "forced over a diverged replica")
        expect = rec.get("generation") if rec else "none recorded"
        raise SplitBrainError(
            key,
            f"replica is at generation {meta.generation}, but this source last "
            f"handed it {expect}: source and replica diverged (split brain); refusing to "
            "overwrite it (force=on overwrites)",
        )
    if (
        meta.clean
        and meta.fingerprint is not None
        and replica_fingerprint is not None
        and tuple(meta.fingerprint) != tuple(replica_fingerprint)
    ):
        if force:
            return AttachPlan(AttachMode.COMPARE, "forced over a replica modified out of band")
        raise SplitBrainError(
            key,
            "replica was modified after it was last detached cleanly "
            "(split brain); refusing to overwrite it (force=on overwrites)",
        )
    # From here on the metadata knows this replica, and it decides, whatever ``sync`` says:
    # ``sync=none`` vouches only for a replica with no history.  After an unclean stop the
    # bitmap misses the records still queued at the crash, and a source changed offline is
    # in no bitmap at all; trusting either would report ``consistent`` for a replica that
    # differs.
    if not meta.clean:
        return AttachPlan(AttachMode.COMPARE, "last session did not close cleanly")
    rec_fp = rec.get("fingerprint") if rec else None
    if (
        rec_fp is not None
        and source_fingerprint is not None
        and tuple(rec_fp) != tuple(source_fingerprint)
    ):
        return AttachPlan(AttachMode.COMPARE, "source changed while no replica was attached")
    dirty = bitmap.dirty_bytes() if bitmap is not None else 0
    return AttachPlan(AttachMode.BITMAP, f"resume: {dirty} dirty bytes")


def rotate_generation(meta: ReplicaMeta, source: SourceRecord, key: str) -> str:
    """Start a new data generation for this (source, replica) pair; returns it.

    The caller saves the source record first, then the metadata (see module docstring).
    """
    gen = new_generation()
    source.replicas[key] = {"generation": gen, "previous": meta.generation, "fingerprint": None}
    meta.history = [meta.generation, *meta.history][:HISTORY_LEN]
    meta.generation = gen
    return gen
