"""Sans-IO NBD transmission phase: request parsing and validation, reply encoding.

Server side:

* :func:`parse_request_header` reads one 28-byte request header with ``unpack_from`` on the
  caller's buffer (the server's receive buffer; no copy).  A bad magic is a protocol error:
  framing is lost and the connection must end.
* :func:`validate_request` is the one place a well-framed request is checked (as nbdkit's
  ``validate_request``): it raises :class:`NBDRequestError` with EINVAL / EROFS / ENOSPC /
  EOVERFLOW, which the server answers and then carries on.  Nothing below it re-checks.
* ``encode_*`` build simple replies or structured chunks for a :class:`Session`.

Client side: :func:`encode_request` and :class:`ReplyParser`.  :class:`RequestParser` is the
generic (copying) request parser used by tests and any non-hot-path user; the server's adapter
uses the same header parser and validator directly on its own buffer.
"""

from __future__ import annotations

import errno as E
from collections.abc import Iterable
from dataclasses import dataclass, field

from blocktrace.block.device import Extent
from blocktrace.nbd import wire
from blocktrace.nbd.constants import (
    NBD_REQUEST_MAGIC,
    NBD_SIMPLE_REPLY_MAGIC,
    NBD_STRUCTURED_REPLY_MAGIC,
    Cmd,
    CmdFlag,
    TransmissionFlag,
)
from blocktrace.nbd.errors import NBDRemoteProtocolError, NBDRequestError, nbd_error
from blocktrace.nbd.events import NEED_DATA, Need, ReplyChunk, Request, SimpleReply

REQUEST_SIZE = wire.REQUEST.size
#: Hard cap on block-status descriptors per chunk (spec: SHOULD NOT exceed 2^20).
MAX_EXTENTS = 1 << 20

_WRITE_CLASS = frozenset({Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES})
_RANGE_CMDS = frozenset(
    {Cmd.READ, Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES, Cmd.CACHE, Cmd.BLOCK_STATUS}
)
_NO_SPACE_CMDS = frozenset({Cmd.WRITE, Cmd.WRITE_ZEROES})
_PAYLOAD_CMDS = frozenset({Cmd.READ, Cmd.WRITE})


def cmd_name(cmd: int) -> str:
    try:
        return f"NBD_CMD_{Cmd(cmd).name}"
    except ValueError:
        return f"command {cmd}"


@dataclass(slots=True)
class Session:
    """Per-connection transmission settings, fixed once negotiation ends (nbdkit's cached
    ``can_*``): what validation and reply encoding depend on."""

    size: int
    flags: TransmissionFlag
    structured: bool = False
    meta_contexts: dict[int, str] = field(default_factory=dict)
    min_block: int = 1
    max_block: int = 32 * 1024 * 1024
    read_only: bool = field(init=False)
    allowed_flags: dict[int, int] = field(init=False)

    def __post_init__(self) -> None:
        f = self.flags
        self.read_only = bool(f & TransmissionFlag.READ_ONLY)
        fua = int(CmdFlag.FUA) if f & TransmissionFlag.SEND_FUA else 0
        allowed = {
            Cmd.READ: fua | (int(CmdFlag.DF) if f & TransmissionFlag.SEND_DF else 0),
            Cmd.WRITE: fua,
            Cmd.DISC: fua,
            Cmd.FLUSH: fua,
            Cmd.CACHE: fua,  # accepted even unadvertised: "some clients send CACHE without it"
        }
        if f & TransmissionFlag.SEND_TRIM:
            allowed[Cmd.TRIM] = fua
        if f & TransmissionFlag.SEND_WRITE_ZEROES:
            zf = int(CmdFlag.NO_HOLE)
            if f & TransmissionFlag.SEND_FAST_ZERO:
                zf |= int(CmdFlag.FAST_ZERO)
            allowed[Cmd.WRITE_ZEROES] = fua | zf
        if self.structured and self.meta_contexts:
            allowed[Cmd.BLOCK_STATUS] = fua | int(CmdFlag.REQ_ONE)
        self.allowed_flags = {int(k): v for k, v in allowed.items()}


# -- server: requests ------------------------------------------------------------------------


def parse_request_header(
    buf: bytes | bytearray | memoryview, pos: int = 0
) -> tuple[int, int, int, int, int]:
    """Return ``(flags, cmd, cookie, offset, length)`` of the header at ``buf[pos:]``."""
    magic, flags, cmd, cookie, offset, length = wire.REQUEST.unpack_from(buf, pos)
    if magic != NBD_REQUEST_MAGIC:
        raise NBDRemoteProtocolError(f"bad request magic {magic:#x}")
    return flags, cmd, cookie, offset, length


def validate_request(s: Session, cmd: int, flags: int, offset: int, length: int) -> None:
    """Raise :class:`NBDRequestError` if the request must be refused; the order of checks
    decides which error a doubly-bad request gets (read-only beats out-of-range)."""
    if s.read_only and cmd in _WRITE_CLASS:
        raise NBDRequestError(E.EROFS, f"invalid request: {cmd_name(cmd)}: read-only export")
    allowed = s.allowed_flags.get(cmd)
    if allowed is None:
        raise NBDRequestError(E.EINVAL, f"invalid request: {cmd_name(cmd)}: not supported")
    if flags & ~allowed:
        raise NBDRequestError(
            E.EINVAL, f"invalid request: {cmd_name(cmd)}: unsupported flags {flags:#x}"
        )
    if cmd not in _RANGE_CMDS:  # FLUSH, DISC
        if offset or length:
            raise NBDRequestError(
                E.EINVAL, f"invalid request: {cmd_name(cmd)}: offset and length must be 0"
            )
        return
    if length == 0:
        raise NBDRequestError(E.EINVAL, f"invalid request: {cmd_name(cmd)}: length is 0")
    if cmd in _PAYLOAD_CMDS and length > s.max_block:
        raise NBDRequestError(
            E.EOVERFLOW,
            f"invalid request: {cmd_name(cmd)}: length {length} exceeds maximum {s.max_block}",
        )
    if offset + length > s.size:
        raise NBDRequestError(
            E.ENOSPC if cmd in _NO_SPACE_CMDS else E.EINVAL,
            f"invalid request: {cmd_name(cmd)}: offset {offset} + length {length} "
            f"is beyond the end of the export ({s.size})",
        )
    mb = s.min_block
    if mb > 1 and (offset % mb or length % mb):
        raise NBDRequestError(
            E.EINVAL, f"invalid request: {cmd_name(cmd)}: not aligned to {mb} bytes"
        )


class RequestParser:
    """Generic request parser: bytes in, :class:`Request` events out.

    WRITE payloads longer than ``max_payload`` are read and discarded (``data`` is None), so a
    client cannot make the server buffer an arbitrary amount; validation then refuses them.
    """

    def __init__(self, max_payload: int = 32 * 1024 * 1024) -> None:
        self.max_payload = max_payload
        self._buf = bytearray()
        self._discard = 0
        self._pending: Request | None = None

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        self._buf += data

    def next_event(self) -> Request | Need:
        buf = self._buf
        if self._discard:
            n = min(self._discard, len(buf))
            del buf[:n]
            self._discard -= n
            if self._discard:
                return NEED_DATA
            req, self._pending = self._pending, None
            assert req is not None
            return req
        if len(buf) < REQUEST_SIZE:
            return NEED_DATA
        flags, cmd, cookie, offset, length = parse_request_header(buf, 0)
        if cmd != Cmd.WRITE:
            del buf[:REQUEST_SIZE]
            return Request(cmd, flags, cookie, offset, length)
        if length > self.max_payload:
            del buf[:REQUEST_SIZE]
            self._discard = length
            self._pending = Request(cmd, flags, cookie, offset, length)
            return self.next_event()
        end = REQUEST_SIZE + length
        if len(buf) < end:
            return NEED_DATA
        data = bytes(buf[REQUEST_SIZE:end])
        del buf[:end]
        return Request(cmd, flags, cookie, offset, length, data)


# -- server: replies -------------------------------------------------------------------------


def encode_ok(s: Session, cookie: int) -> bytes:
    """Success without data (every command except READ and BLOCK_STATUS)."""
    return wire.pack_simple_reply(cookie)


def encode_read_header(s: Session, cookie: int, offset: int, length: int) -> bytes:
    """Header preceding ``length`` bytes of READ data: simple reply, or one OFFSET_DATA chunk
    flagged DONE (the data is already in hand, so no error can follow)."""
    if s.structured:
        return wire.pack_chunk_offset_data_header(cookie, offset, length)
    return wire.pack_simple_reply(cookie)


def encode_error(s: Session, cookie: int, cmd: int, errno: int, message: str = "") -> bytes:
    """Error reply for ``errno``.  READ (and BLOCK_STATUS) replies must be structured once
    structured replies are negotiated; others may stay simple, which every client accepts."""
    code = nbd_error(errno)
    if s.structured and cmd in (Cmd.READ, Cmd.BLOCK_STATUS):
        return wire.pack_chunk_error(cookie, code, message)
    return wire.pack_simple_reply(cookie, code)


def block_status_descriptors(
    extents: Iterable[Extent], length: int, req_one: bool
) -> list[tuple[int, int]]:
    """Turn device extents into (length, flags) descriptors for ``length`` bytes: merged,
    clipped to the request, no zero lengths, one only with REQ_ONE, each under 2^32."""
    out: list[tuple[int, int]] = []
    left = length
    for ext in extents:
        n = min(ext.length, left)
        if n <= 0:
            continue
        flags = int(ext.flags) & 3
        if out and out[-1][1] == flags and out[-1][0] + n < 1 << 32:
            out[-1] = (out[-1][0] + n, flags)
        else:
            out.append((n, flags))
        left -= n
        if left == 0:
            break
    if not out:
        out = [(length, 0)]  # device said nothing: "unknown" (allocated data) is always safe
    if req_one:
        return out[:1]
    return out[:MAX_EXTENTS]


def encode_block_status(s: Session, cookie: int, descriptors: list[tuple[int, int]]) -> bytes:
    """One BLOCK_STATUS chunk per selected context; the last one carries DONE."""
    ids = list(s.meta_contexts)
    return b"".join(
        wire.pack_chunk_block_status(cookie, ctx, descriptors, done=i == len(ids) - 1)
        for i, ctx in enumerate(ids)
    )


# -- client ----------------------------------------------------------------------------------


def encode_request(
    cmd: int,
    cookie: int,
    offset: int = 0,
    length: int = 0,
    flags: int = 0,
) -> bytes:
    """A request header (the WRITE payload, if any, is sent after it by the caller)."""
    return wire.pack_request(cmd, cookie, offset, length, flags)


class ReplyParser:
    """Client-side reply parser: bytes in, :class:`SimpleReply` / :class:`ReplyChunk` out.

    A simple reply carries no length, so the caller registers every READ it sends with
    :meth:`expect_read` (``cookie -> length``); a simple reply to a cookie not registered has no
    payload.  ``max_chunk`` bounds structured chunk payloads.
    """

    def __init__(self, max_chunk: int = 64 * 1024 * 1024) -> None:
        self.max_chunk = max_chunk
        self._buf = bytearray()
        self._reads: dict[int, int] = {}

    def expect_read(self, cookie: int, length: int) -> None:
        self._reads[cookie] = length

    def forget(self, cookie: int) -> None:
        """The request with ``cookie`` is complete (call on the DONE chunk or simple reply)."""
        self._reads.pop(cookie, None)

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        self._buf += data

    def next_event(self) -> SimpleReply | ReplyChunk | Need:
        buf = self._buf
        if len(buf) < 4:
            return NEED_DATA
        (magic,) = wire.U32.unpack_from(buf, 0)
        if magic == NBD_SIMPLE_REPLY_MAGIC:
            if len(buf) < wire.SIMPLE_REPLY.size:
                return NEED_DATA
            _, error, cookie = wire.SIMPLE_REPLY.unpack_from(buf, 0)
            n = self._reads.get(cookie, 0) if error == 0 else 0
            end = wire.SIMPLE_REPLY.size + n
            if len(buf) < end:
                return NEED_DATA
            data = bytes(buf[wire.SIMPLE_REPLY.size : end]) if n else None
            del buf[:end]
            self._reads.pop(cookie, None)
            return SimpleReply(cookie, error, data)
        if magic == NBD_STRUCTURED_REPLY_MAGIC:
            if len(buf) < wire.CHUNK.size:
                return NEED_DATA
            _, flags, rtype, cookie, length = wire.CHUNK.unpack_from(buf, 0)
            if length > self.max_chunk:
                raise NBDRemoteProtocolError(f"reply chunk of {length} bytes is too large")
            end = wire.CHUNK.size + length
            if len(buf) < end:
                return NEED_DATA
            payload = bytes(buf[wire.CHUNK.size : end])
            del buf[:end]
            return ReplyChunk(cookie, flags, rtype, payload)
        raise NBDRemoteProtocolError(f"bad reply magic {magic:#x}")
