"""The target registry: every target type, found as plug-in modules.

Target types live in the :mod:`blocktrace.targets` package, one module each; a module that
defines ``TARGET_TYPE`` (a :class:`~blocktrace.stream.schema.TargetType`) is a target type.
Adding a type is therefore adding one module (and its tests): the CLI, QMP and ``--help``
read the registry, nothing else lists the types.

The stream package names that package as a string and imports its modules on first use
(plug-in discovery, like entry points): the layers below (trace, qmp) ask the registry for a
type by name and never import a target module, so a target may depend on anything below it
(logwrites, replica, ext4) without creating an import cycle.  Every target module is imported
when the registry is first read, so a module imports optional dependencies lazily (in its
factory or ``open``).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterator, Mapping
from typing import Any

from blocktrace.errors import UsageError
from blocktrace.stream.contract import Target
from blocktrace.stream.schema import TargetType

#: the package whose modules are target types
TARGET_PACKAGE = "blocktrace.targets"


class TargetRegistry:
    """Target types by name, in declaration order (``TargetType.order``, then name)."""

    def __init__(self, types: tuple[TargetType, ...] = ()) -> None:
        self._types: dict[str, TargetType] = {}
        for t in types:
            self.register(t)

    def register(self, ttype: TargetType) -> None:
        if ttype.name in self._types:
            raise ValueError(f"target type {ttype.name!r} registered twice")
        self._types[ttype.name] = ttype
        ordered = sorted(self._types.values(), key=lambda t: (t.order, t.name))
        self._types = {t.name: t for t in ordered}

    def __iter__(self) -> Iterator[TargetType]:
        return iter(self._types.values())

    def __contains__(self, name: object) -> bool:
        return name in self._types

    def names(self) -> tuple[str, ...]:
        return tuple(self._types)

    def get(self, name: Any) -> TargetType:
        """The type ``name``; a one-line :class:`UsageError` naming the supported ones if not."""
        ttype = self._types.get(name) if isinstance(name, str) else None
        if ttype is None:
            if not isinstance(name, str):
                raise UsageError("trace target needs a 'type'")
            known = ", ".join(self._types)
            raise UsageError(f"trace target type {name!r} is not supported (supported: {known})")
        return ttype

    def create(self, spec: Mapping[str, Any]) -> Target:
        """Build an unopened target from ``{"type": ..., options...}``."""
        return self.get(spec.get("type")).create(spec)

    def help_text(self) -> str:
        """Every type with its options, for ``--help``."""
        return "\n".join(t.usage() for t in self)


def discover(package: str = TARGET_PACKAGE) -> TargetRegistry:
    """A registry of every ``TARGET_TYPE`` in ``package``'s modules."""
    pkg = importlib.import_module(package)
    registry = TargetRegistry()
    for info in pkgutil.iter_modules(pkg.__path__):
        module = importlib.import_module(f"{package}.{info.name}")
        ttype = module.__dict__.get("TARGET_TYPE")
        if isinstance(ttype, TargetType):
            registry.register(ttype)
    return registry


_default: TargetRegistry | None = None


def targets() -> TargetRegistry:
    """The registry of the installed target types (discovered once)."""
    global _default
    if _default is None:
        _default = discover()
    return _default


def create_target(spec: Mapping[str, Any]) -> Target:
    """Build an unopened target from its description (``{"type": "log", "filename": ...}``)."""
    return targets().create(spec)
