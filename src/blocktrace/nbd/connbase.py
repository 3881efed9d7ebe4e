"""The state one NBD connection's parts share, and the limits they enforce.

:class:`~.connection.NBDConnection` is one object (an asyncio ``BufferedProtocol``) whose code
is split by responsibility, each part a class over this base:

* :mod:`.connection`: the protocol callbacks, negotiation (driving the sans-IO
  :class:`~.handshake.ServerHandshake`) and the connection's lifecycle;
* :mod:`.receiving`: the receive buffer, WRITE payloads, and the framing loop (driving the
  sans-IO :class:`~.transmission.RequestParser`);
* :mod:`.serving`: one request to the device and its reply (validated and encoded by
  :mod:`.transmission`), replies gathered per receive.

Parts, not separate objects: the hot path (a 4 KiB READ or WRITE) reads this state on every
request, and one object keeps that to plain attribute loads (``bench/nbd_request_cpu.py``
measured the split neutral, docs/performance.md).  What one part calls in another is declared
here, abstract, so mypy checks each part alone.
"""

from __future__ import annotations

import abc
import asyncio
import logging
from typing import TYPE_CHECKING, Any

from blocktrace.block.device import BlockDevice
from blocktrace.exports import Export
from blocktrace.nbd import transmission as tx
from blocktrace.nbd import wire
from blocktrace.nbd.constants import (
    NBD_SIMPLE_REPLY_MAGIC,
    NBD_STRUCTURED_REPLY_MAGIC,
    Cmd,
    CmdFlag,
    ReplyFlag,
    ReplyType,
)
from blocktrace.nbd.dispatch import PayloadBuffer
from blocktrace.nbd.events import (
    Request,
)
from blocktrace.nbd.handshake import ServerHandshake

if TYPE_CHECKING:
    from blocktrace.nbd.server import NBDServer

log = logging.getLogger("blocktrace.nbd")

#: Receive buffer per connection; WRITE payloads up to about this size are parsed in place.
BUFFER_SIZE = 512 * 1024
#: Receive buffer while negotiating: the 512 KiB one is allocated only once a client has
#: finished the handshake, so connections that never do cost little (issue 10).
HANDSHAKE_BUFFER_SIZE = 4096
#: Requests in flight (suspended in the device) before a connection stops reading.
MAX_INFLIGHT = 256
#: Payload bytes held by suspended requests (their own large buffers, and retired receive
#: buffers they still pin) before a connection stops reading: with MAX_INFLIGHT alone, 256
#: suspended 32 MiB writes (a trace's queue at its cap, a slow remote device) could hold 8 GiB.
MAX_HELD_BYTES = 32 * 1024 * 1024
#: Transport write buffer limits: above HIGH we stop reading the client's requests.
WRITE_HIGH = 4 * 1024 * 1024
WRITE_LOW = 1024 * 1024
#: READs up to this size reserve no payload budget: what they hold is already bounded per
#: connection by the transport's high-water mark, and 4 KiB reads are the hot path.
_READ_UNRESERVED = 64 * 1024
#: Replies smaller than this are joined with their header into one write on the stock loop.
_JOIN_LIMIT = 64 * 1024
_DISCARD_CHUNK = 256 * 1024
#: Largest large-WRITE buffer kept for reuse per connection.
_SPARE_MAX = 4 * 1024 * 1024
#: Gathered reply bytes after which the batch is written out mid-parse (back-pressure).
_BATCH_LIMIT = 256 * 1024

_pack_simple = wire.SIMPLE_REPLY.pack
_SIMPLE_MAGIC = NBD_SIMPLE_REPLY_MAGIC
# A READ reply's structured header, packed inline on the small-READ path (as
# tx.encode_read_header does: one OFFSET_DATA chunk flagged DONE).
_pack_data_header = wire.CHUNK_OFFSET_DATA.pack
_STRUCTURED_MAGIC = NBD_STRUCTURED_REPLY_MAGIC
_DONE = int(ReplyFlag.DONE)
_OFFSET_DATA = int(ReplyType.OFFSET_DATA)
_REQUEST_SIZE = tx.REQUEST_SIZE
_FUA = int(CmdFlag.FUA)
_NO_HOLE = int(CmdFlag.NO_HOLE)
_FAST_ZERO = int(CmdFlag.FAST_ZERO)
_REQ_ONE = int(CmdFlag.REQ_ONE)
_READ, _WRITE, _DISC, _FLUSH, _TRIM, _CACHE, _ZERO, _STATUS = (
    Cmd.READ,
    Cmd.WRITE,
    Cmd.DISC,
    Cmd.FLUSH,
    Cmd.TRIM,
    Cmd.CACHE,
    Cmd.WRITE_ZEROES,
    Cmd.BLOCK_STATUS,
)


class ConnectionBase(abc.ABC):
    """The state of one client connection (see the module docstring)."""

    def __init__(self, server: NBDServer, conn_id: int) -> None:
        self.server = server
        self.id = conn_id
        self.export: Export | None = None
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.requests = 0
        self._handshake: ServerHandshake | None = ServerHandshake(
            server.lookup, server.list_exports
        )
        self._deadline: asyncio.TimerHandle | None = None
        self._session: tx.Session | None = None
        self._parser: tx.RequestParser | None = None
        self._device: BlockDevice | None = None
        self._owned = False  # the device keeps the payload being received: owned bytes
        self._budget = server.budget
        self._buf = bytearray(HANDSHAKE_BUFFER_SIZE)
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0
        self._pins = 0  # suspended requests holding views of the current receive buffer
        # receive buffers replaced while pinned -> how many suspended requests still pin them
        self._retired: dict[int, int] = {}
        self._held = 0  # see MAX_HELD_BYTES
        # a WRITE payload too big for the receive buffer gets a buffer of its own
        self._payload: PayloadBuffer | None = None
        self._payload_req: Request | None = None
        self._payload_reserved = 0  # budget bytes the payload being received holds
        self._spare: bytearray | None = None  # reusable large-WRITE buffer (budget-counted)
        self._spare_held = 0
        # an oversized or refused WRITE payload is read into scratch space and dropped
        self._discard = 0
        self._discard_req: Request | None = None
        self._scratch: memoryview | None = None
        self._inflight = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._write_paused = False
        self._budget_wait = False  # stopped parsing until the payload budget has room
        self._reads_batched = 0  # budget bytes of READ replies in the current batch
        self._tx_held = 0  # budget bytes of READ replies sitting in a paused transport
        self._reading_paused = False
        self._stopping = False  # DISC received or server shutting down: parse no more
        self._closed = False
        self._writelines = False
        self._loop: asyncio.AbstractEventLoop | None = None
        # Replies produced while parsing one batch of received bytes, written in one go.
        self._batch: list[Any] | None = None
        self._batch_bytes = 0

    # -- what one part calls in another ---------------------------------------------------------

    @abc.abstractmethod
    def _safe(self, fn: Any, *args: Any) -> None:
        """Run ``fn``; a protocol error or bug ends this connection only (connection)."""

    @abc.abstractmethod
    def _negotiate(self) -> None:
        """Feed received bytes to the handshake (connection)."""

    @abc.abstractmethod
    def _update_reading(self) -> None:
        """Pause or resume reading from the client as the limits say (connection)."""

    @abc.abstractmethod
    def _maybe_finished(self) -> bool:
        """Close once stopping and idle; True once closed or closing (connection)."""

    @abc.abstractmethod
    def _process(self) -> None:
        """Parse and start every complete request received (receiving)."""

    @abc.abstractmethod
    def _wait_for_budget(self) -> None:
        """Stop parsing until the payload budget has room (receiving)."""

    @abc.abstractmethod
    def _request(self, req: Request, *, pin: bool, own: int = 0) -> bool | None:
        """Validate and start one request (serving)."""

    @abc.abstractmethod
    def _flush_batch(self) -> None:
        """Write the replies gathered while parsing (serving)."""
