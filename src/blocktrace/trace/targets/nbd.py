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
from blocktrace.block.nbd import NBDDevice, parse_nbd_uri
from blocktrace.block.peer import is_own_process
from blocktrace.errors import UsageError
from blocktrace.replica.target import ReplicaTarget
from blocktrace.trace.targets.base import TargetInfo
from blocktrace.trace.targets.replica import common_options


class NBDReplicaTarget(ReplicaTarget):
    """A replica on a remote NBD export."""

    kind = "nbd"

    def __init__(self, uri: str, **kw: Any) -> None:
        parse_nbd_uri(uri)  # a bad URI is an operator error now, not a reconnect loop later
        self.uri = uri
        self._source_export: str | None = None
        super().__init__(f"nbd:{uri}", uri, **kw)

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> NBDReplicaTarget:
        uri = spec.get("uri")
        if not isinstance(uri, str) or not uri:
            raise UsageError("nbd target needs a 'uri'")
        return cls(uri, **common_options(spec, "uri", "nbd"))

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

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "uri": self.uri}
