"""One declaration per target type: its options, from which every front end is generated.

A target module declares a :class:`TargetType`: name, one-line doc, a tuple of
:class:`Option` (name, type, default, doc, validation) and a factory.  From that one table:

* ``serve --trace EXPORT=TYPE:ARG,key=value`` parses and validates (:meth:`TargetType.parse`
  on text values; ``ARG`` is the option marked ``main``);
* QMP ``block-trace`` builds its ``BlockTraceTarget`` union (member types, ranges, enum values
  and docs come from :attr:`Option.type`; see ``blocktrace.qmp.jobs``), then the same
  :meth:`TargetType.parse` checks meaning (a power of two...) on the JSON values;
* ``query-block-jobs`` shows the target's effective settings under the same names;
* ``--help`` lists every type with its options (:func:`help_text`).

So an option cannot exist on one face and not another, and the CLI and QMP refuse the same
values with the same one-line reasons (:class:`~blocktrace.errors.UsageError`).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from blocktrace.errors import UsageError
from blocktrace.stream.contract import Target


def parse_size(value: Any, what: str = "size") -> int:
    """``65536``, ``64K``, ``64M``, ``1G`` (binary units) -> bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise UsageError(f"{what}: negative size {value!r}")
        return value
    text = str(value).strip().upper().removesuffix("B").removesuffix("I")
    mult = 1
    for suffix, m in (("K", 1 << 10), ("M", 1 << 20), ("G", 1 << 30), ("T", 1 << 40)):
        if text.endswith(suffix):
            text, mult = text[:-1], m
            break
    try:
        n = int(text) * mult
    except ValueError:
        raise UsageError(f"{what}: not a size: {value!r}") from None
    if n < 0:
        raise UsageError(f"{what}: negative size {value!r}")
    return n


_BOOL = {"on": True, "true": True, "yes": True, "1": True}
_BOOL |= {"off": False, "false": False, "no": False, "0": False}


def parse_bool(key: str, value: Any) -> bool:
    """``on|off`` (also true/false, yes/no, 1/0) or a JSON boolean."""
    if isinstance(value, bool):
        return value
    try:
        return _BOOL[str(value).lower()]
    except KeyError:
        raise UsageError(f"{key} must be on|off, not {value!r}") from None


class OptionType(abc.ABC):
    """How an option's value is spelled and checked.  ``parse`` takes the command line's
    text or QMP's JSON value (already of :attr:`json` type) and returns the Python value."""

    #: the JSON type QMP checks first: ``string``, ``integer``, ``boolean`` or ``enum``
    json: str = "string"

    @abc.abstractmethod
    def parse(self, key: str, value: Any) -> Any: ...

    def to_json(self, value: Any) -> Any:
        """A parsed value as QMP spells it."""
        return value

    @property
    @abc.abstractmethod
    def metavar(self) -> str:
        """How ``--help`` spells a value (``PATH``, ``on|off``, ``SIZE``)."""


@dataclass(frozen=True)
class Text(OptionType):
    """A non-empty string (a path, a URI)."""

    placeholder: str = "TEXT"
    json = "string"

    def parse(self, key: str, value: Any) -> Any:
        if not isinstance(value, str) or not value:
            raise UsageError(f"{key} must be a non-empty string")
        return value

    @property
    def metavar(self) -> str:
        return self.placeholder


@dataclass(frozen=True)
class Flag(OptionType):
    """``on|off`` on the command line, a boolean in QMP."""

    json = "boolean"

    def parse(self, key: str, value: Any) -> Any:
        return parse_bool(key, value)

    @property
    def metavar(self) -> str:
        return "on|off"


@dataclass(frozen=True)
class Choice(OptionType):
    """One of ``values`` (a QMP enum)."""

    values: tuple[str, ...]
    json = "enum"

    def parse(self, key: str, value: Any) -> Any:
        if value not in self.values:
            raise UsageError(f"{key} must be {'|'.join(self.values)}, not {value!r}")
        return value

    @property
    def metavar(self) -> str:
        return "|".join(self.values)


@dataclass(frozen=True)
class Integer(OptionType):
    """An integer in ``[minimum, maximum]``; ``size``: the command line takes ``64K`` too;
    ``power_of_two``: must be one.  ``kind`` names the QMP range (``uint32``, ``uint64``)."""

    minimum: int = 0
    maximum: int = (1 << 63) - 1
    kind: str = "uint64"
    size: bool = False
    power_of_two: bool = False
    json = "integer"

    def parse(self, key: str, value: Any) -> Any:
        if self.size:
            n = parse_size(value, key)
        elif isinstance(value, int) and not isinstance(value, bool):
            n = value
        else:
            try:
                n = int(str(value), 10)
            except ValueError:
                raise UsageError(f"{key} must be an integer, not {value!r}") from None
        if self.power_of_two and (n < max(1, self.minimum) or n & (n - 1)):
            raise UsageError(f"{key} must be a power of two >= {self.minimum}, not {n}")
        if not self.minimum <= n <= self.maximum:
            raise UsageError(f"{key} must be in [{self.minimum}, {self.maximum}], not {n}")
        return n

    @property
    def metavar(self) -> str:
        return "SIZE" if self.size else "N"


@dataclass(frozen=True)
class Seconds(OptionType):
    """A duration in seconds: an integer in QMP (``[minimum, maximum]``, QEMU has no
    fractions here), and the command line also takes fractions down to ``floor``."""

    minimum: int = 1
    maximum: int = 3600
    floor: float = 0.05
    json = "integer"

    def parse(self, key: str, value: Any) -> Any:
        try:
            n = float(value)
        except (TypeError, ValueError):
            raise UsageError(f"{key} must be a number of seconds, not {value!r}") from None
        if not n <= self.maximum:
            raise UsageError(f"{key} must be at most {self.maximum} seconds, not {value!r}")
        return max(self.floor, n)

    def to_json(self, value: Any) -> Any:
        return int(value) if float(value).is_integer() else value

    @property
    def metavar(self) -> str:
        return "SECONDS"


@dataclass(frozen=True)
class Option:
    """One option of a target type."""

    name: str
    type: OptionType
    doc: str
    #: value when absent; None: absent stays absent (the target decides, e.g. at open)
    default: Any = None
    #: must be given (the ``main`` option always is)
    required: bool = False
    #: the ``ARG`` of ``--trace EXPORT=TYPE:ARG``
    main: bool = False


Factory = Callable[[Mapping[str, Any]], Target]


@dataclass(frozen=True)
class TargetType:
    """A target type: its options and how to build one from their parsed values."""

    name: str
    doc: str
    options: tuple[Option, ...]
    #: called with :meth:`parse`'s result (every option name present; absent ones None)
    factory: Factory
    #: extra lines for ``--help`` (examples, where the full description lives)
    help: str = ""
    #: position in listings (QMP's enum, ``--help``): lower first, then by name
    order: int = 100
    _by_name: dict[str, Option] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {o.name: o for o in self.options})
        mains = [o for o in self.options if o.main]
        if len(mains) != 1:
            raise ValueError(f"target type {self.name}: exactly one main option, not {mains}")

    @property
    def main(self) -> Option:
        return next(o for o in self.options if o.main)

    def option(self, name: str) -> Option | None:
        return self._by_name.get(name)

    def parse(self, spec: Mapping[str, Any]) -> dict[str, Any]:
        """Check ``spec`` (``{"type": ..., option: value...}``; text or JSON values; None means
        absent) and return every option's value (defaults filled in, absent ones None)."""
        for key in spec:
            if key != "type" and key not in self._by_name:
                raise UsageError(f"{self.name} target: unknown option {key!r}")
        out: dict[str, Any] = {}
        for opt in self.options:
            value = spec.get(opt.name)
            if value is None:
                if opt.required or opt.main:
                    raise UsageError(f"{self.name} target needs a {opt.name!r}")
                out[opt.name] = opt.default
                continue
            out[opt.name] = opt.type.parse(opt.name, value)
        return out

    def to_json(self, spec: Mapping[str, Any]) -> dict[str, Any]:
        """``spec`` (command-line text values) as QMP's ``block-trace`` target object: the
        options given, parsed and spelled as JSON (``blocktrace trace start``)."""
        values = self.parse(spec)
        out: dict[str, Any] = {"type": self.name}
        for opt in self.options:
            if spec.get(opt.name) is not None:
                out[opt.name] = opt.type.to_json(values[opt.name])
        return out

    def create(self, spec: Mapping[str, Any]) -> Target:
        """An unopened target from its description (CLI or QMP shape)."""
        values = self.parse(spec)
        target = self.factory(values)
        target.declare(self.name, values)
        return target

    def usage(self) -> str:
        """``TYPE:ARG[,option=VALUE...]`` plus one line per option, for ``--help``."""
        lines = [f"{self.name}:{self.main.type.metavar}  {self.doc}"]
        for opt in self.options:
            if opt.main:
                continue
            default = "" if opt.default is None else f" (default {_spell(opt.default)})"
            lines.append(f"    {opt.name}={opt.type.metavar}  {opt.doc}{default}")
        if self.help:
            lines.append(f"    {self.help}")
        return "\n".join(lines)


def _spell(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)
