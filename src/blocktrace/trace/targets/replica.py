"""``replica`` trace target: keep a local raw image equal to the traced export.

``{"type": "replica", "filename": PATH}`` (``--trace disk=replica:PATH``).  The image is
created, sparse and of the source's size, if it does not exist.  Metadata lives beside it in
``PATH.btreplica`` unless ``meta=`` says otherwise.  All the logic is the shared engine,
:class:`blocktrace.replica.target.ReplicaTarget`; see docs/replica.md.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from blocktrace.block.device import BlockDevice
from blocktrace.block.file import FileDevice
from blocktrace.errors import UsageError
from blocktrace.replica.meta import META_SUFFIX, Fingerprint, file_fingerprint
from blocktrace.replica.target import ReplicaTarget
from blocktrace.trace.options import parse_size

_BOOL = {"on": True, "true": True, "yes": True, "1": True, "off": False, "false": False}
_BOOL |= {"no": False, "0": False}


def parse_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    try:
        return _BOOL[str(value).lower()]
    except KeyError:
        raise UsageError(f"{key} must be on|off, not {value!r}") from None


#: keys every replica-type target accepts besides its main argument
COMMON_KEYS = ("meta", "force", "on-disconnect", "granularity", "reconnect-max")


def common_options(spec: dict[str, Any], main: str, kind: str) -> dict[str, Any]:
    """Validate ``spec``'s keys and turn the shared ones into ReplicaTarget keywords."""
    unknown = set(spec) - {"type", main, *COMMON_KEYS}
    if unknown:
        raise UsageError(f"{kind} target: unknown option(s) {', '.join(sorted(unknown))}")
    kw: dict[str, Any] = {}
    if spec.get("meta"):
        kw["meta_path"] = Path(str(spec["meta"]))
    if "force" in spec:
        kw["force"] = parse_bool("force", spec["force"])
    if "on-disconnect" in spec:
        kw["on_disconnect"] = str(spec["on-disconnect"])
    if "granularity" in spec:
        g = parse_size(spec["granularity"], "granularity")
        if g < 512 or g & (g - 1):
            raise UsageError(f"granularity must be a power of two >= 512, not {g}")
        kw["granularity"] = g
    if "reconnect-max" in spec:
        try:
            kw["reconnect_max"] = max(0.05, float(spec["reconnect-max"]))
        except ValueError:
            raise UsageError("reconnect-max must be a number of seconds") from None
    return kw


class LocalReplicaTarget(ReplicaTarget):
    """A replica in a local raw image (a file or a block device)."""

    kind = "replica"

    def __init__(self, filename: str, **kw: Any) -> None:
        self.filename = filename
        super().__init__(f"replica:{filename}", os.path.realpath(filename), **kw)
        if self.meta_path is None:
            self.meta_path = Path(filename + META_SUFFIX)

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> LocalReplicaTarget:
        filename = spec.get("filename")
        if not isinstance(filename, str) or not filename:
            raise UsageError("replica target needs a 'filename'")
        return cls(filename, **common_options(spec, "filename", "replica"))

    async def open_device(self) -> BlockDevice:
        if not os.path.exists(self.filename):
            with open(self.filename, "xb") as f:
                f.truncate(self.size)
        return FileDevice(self.filename)

    def replica_fingerprint(self) -> Fingerprint | None:
        return file_fingerprint(self.filename)

    def replica_exists(self) -> bool:
        return os.path.exists(self.filename)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "filename": self.filename}
