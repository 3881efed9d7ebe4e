"""Value objects the NBD cores exchange with their I/O adapters (server and client).

Frozen and slotted, as in h11: an event is data, built once, never mutated.  The server's hot
path drives :class:`~blocktrace.nbd.transmission.RequestParser` over its receive buffer, and
the client drives :class:`~blocktrace.nbd.transmission.ReplyParser` over its own: payloads are
views of those buffers, not copies.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import NamedTuple

from blocktrace.nbd.constants import NBD_DEFAULT_MAX_PAYLOAD, TransmissionFlag


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


class Request(NamedTuple):
    """A transmission-phase request; ``data`` is the WRITE payload (a view of the server's
    receive buffer, not a copy) when the payload arrived with the header.

    A named tuple, unlike the other events: one is built per request on the server's hot
    path, where building and unpacking a tuple costs a fraction of a dataclass.
    """

    command: int
    flags: int
    cookie: int
    offset: int
    length: int
    data: bytes | memoryview | None = None


@dataclass(frozen=True, slots=True)
class PayloadNeeded:
    """A WRITE whose payload is too large to wait for in the receive buffer: the adapter
    receives ``request.length`` bytes into a buffer of their own (``first`` are the ones
    already here), then dispatches ``request`` with them."""

    request: Request
    first: memoryview


@dataclass(frozen=True, slots=True)
class PayloadRefused:
    """A WRITE longer than the maximum payload: ``skip`` more payload bytes must be read and
    dropped (never stored), then ``request`` answered with an error (validation refuses it)."""

    request: Request
    skip: int


@dataclass(slots=True)
class SimpleReply:
    """A simple reply; ``data`` is the READ payload when ``error == 0`` (not frozen: one per
    reply on the client's hot path, see :class:`Request`)."""

    cookie: int
    error: int
    data: bytes | memoryview | None = None


@dataclass(slots=True)
class ReplyChunk:
    """One structured reply chunk; ``payload`` is raw and decoded by the caller per type
    (not frozen, as :class:`SimpleReply`)."""

    cookie: int
    flags: int
    type: int
    payload: bytes | memoryview
