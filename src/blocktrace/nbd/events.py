"""Value objects the NBD cores exchange with their I/O adapters (server and client).

Frozen and slotted, as in h11: an event is data, built once, never mutated.  The server's hot
path parses request headers straight from its receive buffer and never builds a
:class:`Request` per I/O; the event classes serve the generic parsers, the client and tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from blocktrace.nbd.constants import NBD_DEFAULT_MAX_PAYLOAD, Cmd, TransmissionFlag


class Need(Enum):
    """Sentinel returned by ``next_event()`` when more bytes must arrive first."""

    NEED_DATA = "NEED_DATA"


NEED_DATA = Need.NEED_DATA


@dataclass(frozen=True, slots=True)
class ExportInfo:
    """What negotiation tells a client about one export (server: offered; client: received)."""

    name: str
    size: int
    flags: TransmissionFlag
    description: str = ""
    min_block: int = 1
    preferred_block: int = 4096
    max_block: int = NBD_DEFAULT_MAX_PAYLOAD


@dataclass(frozen=True, slots=True)
class HandshakeDone:
    """Option haggling finished; the transmission phase starts with these settings."""

    export: ExportInfo
    structured_replies: bool
    #: Selected metadata contexts: id -> name (empty unless SET_META_CONTEXT succeeded).
    meta_contexts: dict[int, str] = field(default_factory=dict)
    #: True if the client used NBD_OPT_EXPORT_NAME rather than NBD_OPT_GO.
    via_export_name: bool = False


@dataclass(frozen=True, slots=True)
class HandshakeAborted:
    """The client sent NBD_OPT_ABORT (or the server refused EXPORT_NAME): close the socket."""

    reason: str


@dataclass(frozen=True, slots=True)
class Request:
    """A transmission-phase request; ``data`` is the WRITE payload (a view, not a copy)."""

    command: Cmd | int
    flags: int
    cookie: int
    offset: int
    length: int
    data: bytes | memoryview | None = None


@dataclass(frozen=True, slots=True)
class SimpleReply:
    """A simple reply; ``data`` is the READ payload when ``error == 0``."""

    cookie: int
    error: int
    data: bytes | memoryview | None = None


@dataclass(frozen=True, slots=True)
class ReplyChunk:
    """One structured reply chunk; ``payload`` is raw and decoded by the caller per type."""

    cookie: int
    flags: int
    type: int
    payload: bytes
