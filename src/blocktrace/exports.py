"""The set of exports a server offers, shared by the NBD server and the QMP control socket.

An :class:`Export` names the device stack NBD clients see.  The stack is built once, when the
export is added, by :func:`open_export`; tracing attaches to the stack at runtime (the trace
issue wraps every export's device in an idle trace filter), so clients are never disturbed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from blocktrace.block.device import BlockDevice
from blocktrace.block.file import FileDevice
from blocktrace.errors import UsageError
from blocktrace.trace.filter import TraceFilter

MAX_EXPORT_NAME = 4096  # NBD strings are at most 4096 bytes


@dataclass(eq=False)
class Export:
    """One named export: the device stack served to clients and where it came from."""

    name: str
    device: BlockDevice
    filename: str = ""
    description: str = ""
    #: Open NBD connections using this export (maintained by the NBD server).
    connections: int = field(default=0)

    @property
    def read_only(self) -> bool:
        return self.device.read_only


def default_export_name(path: str | os.PathLike[str]) -> str:
    """An image's export name defaults to its file stem: ``disk.img`` -> ``disk``."""
    return Path(path).stem


def open_export(name: str, path: str | os.PathLike[str], *, read_only: bool = False) -> Export:
    """Open ``path`` as a raw image and build the device stack for export ``name``."""
    if not name or len(name.encode()) > MAX_EXPORT_NAME:
        raise UsageError(f"invalid export name {name!r}")
    # Every export carries an idle trace filter, so a trace can attach at runtime.
    device: BlockDevice = TraceFilter(FileDevice(path, read_only=read_only, lock=True))
    return Export(name=name, device=device, filename=os.fspath(path))


class ExportRegistry:
    """Name -> :class:`Export`.  The server exports exactly what is registered here."""

    def __init__(self) -> None:
        self._exports: dict[str, Export] = {}

    def add(self, export: Export) -> None:
        if export.name in self._exports:
            raise UsageError(f"export {export.name!r} already exists")
        self._exports[export.name] = export

    def remove(self, name: str) -> Export:
        try:
            return self._exports.pop(name)
        except KeyError:
            raise UsageError(f"no export named {name!r}") from None

    def get(self, name: str) -> Export | None:
        return self._exports.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._exports

    def __iter__(self) -> Iterator[Export]:
        return iter(list(self._exports.values()))

    def __len__(self) -> int:
        return len(self._exports)

    @property
    def default(self) -> Export | None:
        """The export an empty NBD export name selects: the first one added."""
        return next(iter(self._exports.values()), None)
