"""Trace targets, and the factory that builds one from its QMP-shaped description.

``create_target({"type": "log", "filename": "/tmp/d.log", "sector-size": 512})`` returns an
unopened :class:`~blocktrace.trace.targets.base.Target`.  Each type's module is imported only
when used.  To add a type, add one line to :data:`TARGET_TYPES`; the class needs a
``from_spec(spec: dict) -> Target`` classmethod that validates its keys (raising
:class:`~blocktrace.errors.UsageError` with a one-line message for bad or unknown ones).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from blocktrace.errors import UsageError
from blocktrace.trace.targets.base import Target, TargetInfo

__all__ = ["TARGET_TYPES", "Target", "TargetInfo", "create_target"]

#: target type -> "module:Class" (the class has ``from_spec``)
TARGET_TYPES: dict[str, str] = {
    "log": "blocktrace.trace.targets.logwrites:LogTarget",
    "replica": "blocktrace.trace.targets.replica:LocalReplicaTarget",
    "nbd": "blocktrace.trace.targets.nbd:NBDReplicaTarget",
    "introspect": "blocktrace.trace.targets.introspect:IntrospectTarget",
    "stream": "blocktrace.trace.targets.stream:StreamTarget",
}


def create_target(spec: Mapping[str, Any]) -> Target:
    """Build an unopened target from ``{"type": ..., type-specific keys...}``."""
    ttype = spec.get("type")
    if not isinstance(ttype, str):
        raise UsageError("trace target needs a 'type'")
    where = TARGET_TYPES.get(ttype)
    if where is None:
        known = ", ".join(sorted(TARGET_TYPES))
        raise UsageError(f"trace target type {ttype!r} is not supported (supported: {known})")
    module, _, attr = where.partition(":")
    cls = getattr(importlib.import_module(module), attr)
    target = cls.from_spec(dict(spec))
    assert isinstance(target, Target)
    return target
