"""``nbd`` trace target: keep any NBD export (qemu-nbd, nbdkit, another blocktrace) equal to
the traced export.

``{"type": "nbd", "uri": "nbd://HOST:PORT/NAME"}`` or ``nbd+unix:///NAME?socket=PATH``
(``--trace disk=nbd:URI``).  Nothing can be stored beside a remote export, so the metadata
lives on the source's side: ``meta=PATH``, by default ``SOURCE.<hash of URI>.btreplica``
beside the source image.  The engine is :class:`blocktrace.replica.target.ReplicaTarget`;
disconnects turn the target ``degraded`` and it reconnects with backoff (docs/replica.md).
"""

from __future__ import annotations

from typing import Any

from blocktrace.block.device import BlockDevice
from blocktrace.block.peer import is_own_process
from blocktrace.errors import UsageError
from blocktrace.nbd.device import NBDDevice, parse_nbd_uri
from blocktrace.replica.target import ReplicaTarget
from blocktrace.stream.contract import TargetInfo
from blocktrace.stream.schema import Option, TargetType, Text
from blocktrace.targets.replica import REPLICA_OPTIONS, replica_keywords


class NBDReplicaTarget(ReplicaTarget):
    """A replica on a remote NBD export."""

    kind = "nbd"

    def __init__(self, uri: str, **kw: Any) -> None:
        parse_nbd_uri(uri)  # a bad URI is an operator error now, not a reconnect loop later
        self.uri = uri
        self._source_export: str | None = None
        super().__init__(f"nbd:{uri}", uri, **kw)

    async def open(self, info: TargetInfo) -> None:
        self._source_export = info.export
        await super().open(info)

    async def open_device(self) -> BlockDevice:
        dev = await NBDDevice.open(self.uri, timeout=5)
        sock = dev.client.socket if dev.client is not None else None
        export = parse_nbd_uri(self.uri).export
        if (
            self._source_export is not None
            and export in (self._source_export, "")
            and sock is not None
            and is_own_process(sock)
        ):
            # the records it applies would come back into this very trace: an echo, then a
            # deadlock (the trace waits for its target, the target for the trace)
            await dev.close()
            raise UsageError(
                f"nbd target {self.uri} is this server's own export "
                f"{export or self._source_export!r}: a trace cannot replicate into itself"
            )
        return dev

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "uri": self.uri}


TARGET_TYPE = TargetType(
    name="nbd",
    doc="any NBD export kept identical to the export (docs/replica.md)",
    order=30,
    options=(
        Option("uri", Text("URI"), "an NBD URI kept identical to the export", main=True),
        *REPLICA_OPTIONS,
    ),
    factory=lambda v: NBDReplicaTarget(v["uri"], **replica_keywords(v)),
)
