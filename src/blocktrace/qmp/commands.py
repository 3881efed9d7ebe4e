"""The QMP command table: name -> argument schema + handler, and QEMU-exact argument checks.

Arguments are checked against a small QAPI-like schema before a handler runs, the way QEMU's
generated marshallers run ``qobject-input-visitor``: members in schema order (a missing one is
``Parameter 'x' is missing``, a wrong JSON type ``Invalid parameter type for 'x', expected:
string``), then leftovers (``Parameter 'x' is unexpected``); nested members are named
``target.filename``, list items ``enable[0]``; flat unions pick their variant with a
discriminator member.  A handler therefore receives a complete, well-typed dict with defaults
filled in and never re-checks types; it only checks meaning (no such export, id in use).

Handlers are ``async def handler(ctx, args) -> return value`` and raise
:class:`~blocktrace.qmp.errors.QMPError` to fail.  The table itself does no I/O.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from blocktrace.qmp import errors


class Type:
    """A schema type: ``check`` returns the (normalised) value or raises QMPError."""

    expected = "any"
    doc = "any"

    def check(self, value: Any, name: str) -> Any:
        return value


class Str(Type):
    expected = doc = "string"

    def check(self, value: Any, name: str) -> Any:
        if not isinstance(value, str):
            raise errors.invalid_parameter_type(name, self.expected)
        return value


class Bool(Type):
    expected = doc = "boolean"

    def check(self, value: Any, name: str) -> Any:
        if not isinstance(value, bool):
            raise errors.invalid_parameter_type(name, self.expected)
        return value


@dataclass(frozen=True)
class Int(Type):
    """An integer in ``[minimum, maximum]``; ``kind`` names the range in QEMU's words."""

    minimum: int = -(1 << 63)
    maximum: int = (1 << 63) - 1
    kind: str = "int"
    expected = "integer"

    @property
    def doc(self) -> str:  # type: ignore[override]
        return self.kind

    def check(self, value: Any, name: str) -> Any:
        if isinstance(value, bool) or not isinstance(value, int):
            raise errors.invalid_parameter_type(name, self.expected)
        if not self.minimum <= value <= self.maximum:
            raise errors.invalid_parameter_value(name, self.kind)
        return value


@dataclass(frozen=True)
class Enum(Type):
    name: str
    values: tuple[str, ...]
    expected = "string"

    @property
    def doc(self) -> str:  # type: ignore[override]
        return self.name

    def check(self, value: Any, name: str) -> Any:
        if not isinstance(value, str):
            raise errors.invalid_parameter_type(name, self.expected)
        if value not in self.values:
            raise errors.enum_value_refused(name, value)
        return value


@dataclass(frozen=True)
class ListOf(Type):
    item: Type
    expected = "array"

    @property
    def doc(self) -> str:  # type: ignore[override]
        return f"[{self.item.doc}]"

    def check(self, value: Any, name: str) -> Any:
        if not isinstance(value, list):
            raise errors.invalid_parameter_type(name, self.expected)
        return [self.item.check(v, f"{name}[{i}]") for i, v in enumerate(value)]


@dataclass(frozen=True)
class Member:
    """One struct member; optional members absent from the input get ``default``."""

    name: str
    type: Type
    optional: bool = False
    default: Any = None
    doc: str = ""


def _visit_members(
    members: tuple[Member, ...], value: dict[str, Any], prefix: str, out: dict[str, Any]
) -> None:
    for m in members:
        full = prefix + m.name
        if m.name in value:
            out[m.name] = m.type.check(value[m.name], full)
        elif m.optional:
            out[m.name] = m.default
        else:
            raise errors.parameter_missing(full)


def _object_prefix(value: Any, name: str, expected: str) -> str:
    """Check that ``value`` is a JSON object; return the prefix its members' names take."""
    if not isinstance(value, dict):
        raise errors.invalid_parameter_type(name, expected)
    return f"{name}." if name else ""


def _reject_unexpected(value: dict[str, Any], out: dict[str, Any], prefix: str) -> None:
    """QEMU refuses members the schema does not name, after checking the named ones."""
    for key in value:
        if key not in out:
            raise errors.parameter_unexpected(prefix + key)


@dataclass(frozen=True)
class Struct(Type):
    """A QAPI struct (also the type of a command's ``arguments``)."""

    name: str
    members: tuple[Member, ...] = ()
    expected = "object"

    @property
    def doc(self) -> str:  # type: ignore[override]
        return self.name

    def check(self, value: Any, name: str) -> Any:
        prefix = _object_prefix(value, name, self.expected)
        out: dict[str, Any] = {}
        _visit_members(self.members, value, prefix, out)
        _reject_unexpected(value, out, prefix)
        return out


@dataclass(frozen=True)
class Union(Type):
    """A QAPI flat union: ``base`` members, one of which (the discriminator) picks a variant."""

    name: str
    discriminator: Member
    variants: dict[str, tuple[Member, ...]] = field(default_factory=dict)
    expected = "object"

    @property
    def doc(self) -> str:  # type: ignore[override]
        return self.name

    def check(self, value: Any, name: str) -> Any:
        prefix = _object_prefix(value, name, self.expected)
        out: dict[str, Any] = {}
        _visit_members((self.discriminator,), value, prefix, out)
        _visit_members(self.variants[out[self.discriminator.name]], value, prefix, out)
        _reject_unexpected(value, out, prefix)
        return out


Handler = Callable[[Any, dict[str, Any]], Awaitable[Any]]


@dataclass(frozen=True)
class Command:
    name: str
    arguments: Struct
    handler: Handler
    doc: str = ""
    returns: str = "{}"


class CommandTable:
    """The commands one server offers, in registration order (``query-commands`` order)."""

    def __init__(self) -> None:
        self._commands: dict[str, Command] = {}

    def add(
        self,
        name: str,
        handler: Handler,
        members: tuple[Member, ...] = (),
        *,
        doc: str = "",
        returns: str = "{}",
    ) -> Command:
        if name in self._commands:
            raise ValueError(f"command {name} registered twice")
        cmd = Command(name, Struct(f"{name}-arguments", members), handler, doc, returns)
        self._commands[name] = cmd
        return cmd

    def command(
        self, name: str, *members: Member, doc: str = "", returns: str = "{}"
    ) -> Callable[[Handler], Handler]:
        """Decorator form of :meth:`add`."""

        def register(fn: Handler) -> Handler:
            self.add(name, fn, members, doc=doc or (fn.__doc__ or "").strip(), returns=returns)
            return fn

        return register

    def lookup(self, name: str) -> Command:
        try:
            return self._commands[name]
        except KeyError:
            raise errors.command_not_found(name) from None

    def __iter__(self) -> Iterator[Command]:
        return iter(list(self._commands.values()))

    def __contains__(self, name: object) -> bool:
        return name in self._commands

    def names(self) -> list[str]:
        return list(self._commands)

    def validate(self, name: str, arguments: dict[str, Any]) -> tuple[Command, dict[str, Any]]:
        """Look up and check arguments: the command and its complete argument dict."""
        cmd = self.lookup(name)
        args = cmd.arguments.check(arguments, "")
        assert isinstance(args, dict)
        return cmd, args

    async def dispatch(self, ctx: Any, name: str, arguments: dict[str, Any]) -> Any:
        cmd, args = self.validate(name, arguments)
        return await cmd.handler(ctx, args)
