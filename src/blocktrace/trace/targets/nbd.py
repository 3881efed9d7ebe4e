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
from blocktrace.errors import UsageError
from blocktrace.replica.target import ReplicaTarget
from blocktrace.trace.targets.replica import common_options


class NBDReplicaTarget(ReplicaTarget):
    """A replica on a remote NBD export."""

    kind = "nbd"

    def __init__(self, uri: str, **kw: Any) -> None:
        parse_nbd_uri(uri)  # a bad URI is an operator error now, not a reconnect loop later
        self.uri = uri
        super().__init__(f"nbd:{uri}", uri, **kw)

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> NBDReplicaTarget:
        uri = spec.get("uri")
        if not isinstance(uri, str) or not uri:
            raise UsageError("nbd target needs a 'uri'")
        return cls(uri, **common_options(spec, "uri", "nbd"))

    async def open_device(self) -> BlockDevice:
        return await NBDDevice.open(self.uri, timeout=5)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "uri": self.uri}
