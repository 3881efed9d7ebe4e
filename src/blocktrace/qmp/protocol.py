"""Sans-IO QMP server connection: bytes in, commands and rendered replies out.

One :class:`ServerConnection` per client.  It owns the framing (:mod:`.framing`), the
envelope checks of ``qapi/qmp-dispatch.c`` (``execute``/``arguments``/``id``), and the
capabilities negotiation of ``monitor/qmp.c``, all of which are answered without running
anything.  What is left for the caller is a stream of :class:`Execute` requests to dispatch
(see :mod:`.commands`), in input order, interleaved with :class:`Reply` items the core has
already rendered; sending both in that order keeps replies in request order, which id-less
clients (qmp-shell, the legacy API) depend on.

State machine::

    NEGOTIATION --qmp_capabilities ok--> COMMAND
         |                                  |
         +---- fatal parse error -----------+--> CLOSED

Output is one JSON object per message terminated by CRLF, ASCII only, like QEMU.  Events are
rendered only for a client whose negotiation reply has been sent (QEMU sends none before).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from blocktrace.qmp import errors
from blocktrace.qmp.errors import QMPError
from blocktrace.qmp.framing import DEFAULT_MAX_SIZE, ExactNumber, JSONSplitter, ParseError

NO_ID: Any = object()  # sentinel: the request carried no "id"


class State(Enum):
    NEGOTIATION = "negotiation"
    COMMAND = "command"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class Execute:
    """A well-formed command to dispatch.  ``id`` is :data:`NO_ID` when the client sent none."""

    name: str
    arguments: dict[str, Any]
    id: Any = NO_ID


@dataclass(frozen=True, slots=True)
class Reply:
    """A reply the core produced itself.  ``negotiated``: events may flow once it is sent.

    ``close``: the connection must be closed after sending it (unrecoverable input).
    """

    data: bytes
    negotiated: bool = False
    close: bool = False


Event = Execute | Reply


@dataclass(frozen=True, slots=True)
class VersionInfo:
    """``query-version``'s ``VersionInfo``; qmp-shell prints ``qemu.major.minor.micro``."""

    major: int
    minor: int
    micro: int
    package: str = ""

    def to_wire(self) -> dict[str, Any]:
        return {
            "qemu": {"major": self.major, "minor": self.minor, "micro": self.micro},
            "package": self.package,
        }


def render(message: dict[str, Any]) -> bytes:
    """One wire message: JSON, ASCII, CRLF-terminated (qemu.qmp reads with ``readline``)."""
    return json.dumps(message, ensure_ascii=True).encode("ascii") + b"\r\n"


def render_id(id: Any) -> str:
    """A request's ``id`` as JSON text, exactly as received: numbers beyond a double
    (:class:`~blocktrace.qmp.framing.ExactNumber`) are written as their own digits."""
    if isinstance(id, ExactNumber):
        return id.text
    if isinstance(id, dict):
        items = (f"{json.dumps(k, ensure_ascii=True)}: {render_id(v)}" for k, v in id.items())
        return "{" + ", ".join(items) + "}"
    if isinstance(id, list):
        return "[" + ", ".join(render_id(v) for v in id) + "]"
    return json.dumps(id, ensure_ascii=True, allow_nan=False)


def render_return(value: Any, id: Any = NO_ID) -> bytes:
    if id is NO_ID:
        return render({"return": value})
    body = json.dumps({"return": value}, ensure_ascii=True)
    return f'{body[:-1]}, "id": {render_id(id)}}}'.encode("ascii") + b"\r\n"


def render_error(error: QMPError, id: Any = NO_ID) -> bytes:
    # QEMU puts the id first in error replies and last in successful ones.
    if id is NO_ID:
        return render({"error": error.to_wire()})
    body = json.dumps({"error": error.to_wire()}, ensure_ascii=True)
    return f'{{"id": {render_id(id)}, {body[1:]}'.encode("ascii") + b"\r\n"


def timestamp(now: float | None = None) -> dict[str, int]:
    """QMP event timestamp; ``{-1, -1}`` is QEMU's way to say the clock failed."""
    if now is None:
        now = time.time()
    if now < 0:
        return {"seconds": -1, "microseconds": -1}
    seconds, micro = divmod(round(now * 1_000_000), 1_000_000)
    return {"seconds": seconds, "microseconds": micro}


def render_event(name: str, data: dict[str, Any] | None, now: float | None = None) -> bytes:
    msg: dict[str, Any] = {"event": name}
    if data is not None:
        msg["data"] = data
    msg["timestamp"] = timestamp(now)
    return render(msg)


@dataclass
class ServerConnection:
    """The server side of one QMP connection, with no I/O."""

    version: VersionInfo
    capabilities: list[str] = field(default_factory=list)
    max_message: int = DEFAULT_MAX_SIZE
    state: State = State.NEGOTIATION

    def __post_init__(self) -> None:
        self._splitter = JSONSplitter(max_size=self.max_message)

    def greeting(self) -> bytes:
        return render(
            {"QMP": {"version": self.version.to_wire(), "capabilities": list(self.capabilities)}}
        )

    def receive_data(self, data: bytes) -> list[Event]:
        """Feed received bytes; returns what to do, in input order."""
        if self.state is State.CLOSED:
            return []
        out: list[Event] = []
        for item in self._splitter.feed(data):
            if isinstance(item, ParseError):
                # QEMU replies to unparsable input with no id: nothing can be echoed.
                out.append(Reply(render_error(errors.generic(item.desc)), close=item.fatal))
                if item.fatal:
                    self.state = State.CLOSED
                    break
                continue
            out.append(self._request(item.value))
        return out

    def _request(self, obj: Any) -> Event:
        if not isinstance(obj, dict):
            return Reply(render_error(errors.generic(errors.NOT_AN_OBJECT)))
        id = obj.get("id", NO_ID)
        try:
            name, arguments = self._check_envelope(obj)
            if name == "qmp_capabilities":
                return self._negotiate(arguments, id)
            if self.state is State.NEGOTIATION:
                raise errors.expecting_negotiation()
        except QMPError as exc:
            return Reply(render_error(exc, id))
        return Execute(name, arguments, id)

    @staticmethod
    def _check_envelope(obj: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """``qmp_dispatch_check_obj``: same checks, same order, same sentences."""
        name: str | None = None
        for key, value in obj.items():
            if key == "execute":
                if not isinstance(value, str):
                    raise errors.member_must_be("execute", "a string")
                name = value
            elif key == "arguments":
                if not isinstance(value, dict):
                    raise errors.member_must_be("arguments", "an object")
            elif key != "id":
                raise errors.member_unexpected(key)
        if name is None:
            raise errors.lacks_member("execute")
        arguments = obj.get("arguments", {})
        assert isinstance(arguments, dict)
        return name, arguments

    def _negotiate(self, arguments: dict[str, Any], id: Any) -> Reply:
        # As QEMU's marshaller: arguments are checked first (members, then leftovers), then
        # the state.
        enable = arguments.get("enable", [])
        if not isinstance(enable, list):
            raise errors.invalid_parameter_type("enable", "array")
        for i, cap in enumerate(enable):
            if not isinstance(cap, str):
                raise errors.invalid_parameter_type(f"enable[{i}]", "string")
            if cap != "oob":  # QEMU 7.2 names the list item 'null' here
                raise errors.enum_value_refused("null", cap)
        for key in arguments:
            if key != "enable":
                raise errors.parameter_unexpected(key)
        if self.state is not State.NEGOTIATION:
            raise errors.negotiation_complete()
        unavailable = [cap for cap in enable if cap not in self.capabilities]
        if unavailable:
            raise errors.generic(f"Capability {', '.join(unavailable)} not available")
        self.state = State.COMMAND
        return Reply(render_return({}, id), negotiated=True)

    def close(self) -> None:
        self.state = State.CLOSED
