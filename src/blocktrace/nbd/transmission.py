"""Sans-IO NBD transmission phase: request parsing and validation, reply encoding.

Server side:

* :class:`RequestParser` frames requests in the caller's receive buffer (``unpack_from`` in
  place, payloads as views, large payloads handed out as "receive N bytes into a buffer of
  their own"): the server's adapter and the unit tests drive the same object.  A bad magic is
  a protocol error: framing is lost and the connection must end.
* :func:`validate_request` is the one place a well-framed request is checked (as nbdkit's
  ``validate_request``): it raises :class:`NBDRequestError` with EINVAL / EROFS / ENOSPC /
  EOVERFLOW, which the server answers and then carries on.  Nothing below it re-checks.
* ``encode_*`` build simple replies or structured chunks for a :class:`Session`.

Client side: :func:`encode_request` and :class:`ReplyParser`, which the client adapter drives
over its receive buffer the same way.
"""

from __future__ import annotations

import errno as E
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from blocktrace.block.device import Extent
from blocktrace.nbd import wire
from blocktrace.nbd.constants import (
    NBD_DEFAULT_MAX_PAYLOAD,
    NBD_REQUEST_MAGIC,
    NBD_SIMPLE_REPLY_MAGIC,
    NBD_STRUCTURED_REPLY_MAGIC,
    Cmd,
    CmdFlag,
    TransmissionFlag,
)
from blocktrace.nbd.errors import NBDRemoteProtocolError, NBDRequestError, nbd_error
from blocktrace.nbd.events import (
    NEED_DATA,
    Need,
    PayloadNeeded,
    PayloadRefused,
    ReplyChunk,
    Request,
    SimpleReply,
)

REQUEST_SIZE = wire.REQUEST.size
#: Largest structured reply chunk a client accepts (a READ chunk is at most a 32 MiB request).
MAX_CHUNK = 64 * 1024 * 1024
_WRITE = int(Cmd.WRITE)
_unpack_request = wire.REQUEST.unpack_from
_new_request = tuple.__new__
_unpack_u32 = wire.U32.unpack_from
_unpack_simple = wire.SIMPLE_REPLY.unpack_from
_unpack_chunk = wire.CHUNK.unpack_from
_SIMPLE_SIZE = wire.SIMPLE_REPLY.size
_CHUNK_SIZE = wire.CHUNK.size
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
    """Server-side request framing, sans-IO and zero-copy: the one the server runs.

    The caller owns the receive buffer and asks :meth:`next_event` about ``buf[pos:end]``; the
    answer is an event and the position after what it consumed:

    * :class:`Request`: a whole request; a WRITE's ``data`` is a view of ``buf`` (valid until
      the caller reuses that part of its buffer).
    * :class:`PayloadNeeded`: a WRITE whose header plus payload exceed ``inline_limit`` (the
      caller's buffer): its payload goes to a buffer of its own, ``first`` being the bytes
      already received; everything up to ``end`` is consumed.
    * :class:`PayloadRefused`: a WRITE longer than ``max_payload``: what is here of its
      payload is consumed, ``skip`` more bytes must be dropped as they arrive, never stored,
      so a header's claim costs no memory (validation then refuses the request).
    * ``NEED_DATA``: wait for more bytes (``pos`` unchanged).

    A bad magic raises :class:`NBDRemoteProtocolError`: framing is lost.
    """

    __slots__ = ("inline_limit", "max_payload")

    def __init__(
        self, max_payload: int = NBD_DEFAULT_MAX_PAYLOAD, inline_limit: int = 512 * 1024
    ) -> None:
        self.max_payload = max_payload
        self.inline_limit = inline_limit

    def next_event(
        self, buf: memoryview, pos: int, end: int
    ) -> tuple[Request | PayloadNeeded | PayloadRefused | Need, int]:
        if end - pos < REQUEST_SIZE:
            return NEED_DATA, pos
        magic, flags, cmd, cookie, offset, length = _unpack_request(buf, pos)
        if magic != NBD_REQUEST_MAGIC:
            raise NBDRemoteProtocolError(f"bad request magic {magic:#x}")
        start = pos + REQUEST_SIZE
        if cmd != _WRITE:
            # tuple.__new__ builds the named tuple in C: half the cost of calling Request()
            return _new_request(Request, (cmd, flags, cookie, offset, length, None)), start
        if length > self.max_payload:
            n = min(length, end - start)
            return PayloadRefused(Request(cmd, flags, cookie, offset, length), length - n), (
                start + n
            )
        stop = start + length
        if stop <= end:
            data = buf[start:stop]
            return _new_request(Request, (cmd, flags, cookie, offset, length, data)), stop
        if REQUEST_SIZE + length <= self.inline_limit:
            return NEED_DATA, pos
        return PayloadNeeded(Request(cmd, flags, cookie, offset, length), buf[start:end]), end

    def frame(self, buf: memoryview, pos: int, end: int) -> tuple[list[Request], int]:
        """Frame every complete in-place request of ``buf[pos:end]`` in one call: the
        :class:`Request` events :meth:`next_event` would return one by one, and the position
        after the last.  It stops before anything else (too few bytes, a bad magic, a WRITE
        whose payload is not all here or is oversized): :meth:`next_event` at the returned
        position answers that.  The server's hot path: one call per receive, not per request.
        """
        out: list[Request] = []
        append = out.append
        max_payload = self.max_payload
        while end - pos >= REQUEST_SIZE:
            magic, flags, cmd, cookie, offset, length = _unpack_request(buf, pos)
            if magic != NBD_REQUEST_MAGIC:
                break
            start = pos + REQUEST_SIZE
            if cmd != _WRITE:
                append(_new_request(Request, (cmd, flags, cookie, offset, length, None)))
                pos = start
                continue
            stop = start + length
            if length > max_payload or stop > end:
                break
            append(_new_request(Request, (cmd, flags, cookie, offset, length, buf[start:stop])))
            pos = stop
        return out, pos


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
    """Client-side reply framing, sans-IO and zero-copy: the one the client runs.

    :meth:`next_event` reads ``buf[pos:end]`` and returns a :class:`SimpleReply` or
    :class:`ReplyChunk` whose data is a view of ``buf`` (copy what must outlive the buffer),
    or ``NEED_DATA``, with the position after what it consumed.  A simple reply carries no
    length, so ``read_length(cookie)`` says how many data bytes a successful one brings (the
    READ's length; 0 for any other request, or an unknown cookie, which the caller refuses).
    ``max_chunk`` bounds a structured chunk's payload: a server cannot make the client buffer
    more than that.
    """

    __slots__ = ("max_chunk", "read_length")

    def __init__(self, read_length: Callable[[int], int], max_chunk: int = MAX_CHUNK) -> None:
        self.read_length = read_length
        self.max_chunk = max_chunk

    def next_event(
        self, buf: memoryview, pos: int, end: int
    ) -> tuple[SimpleReply | ReplyChunk | Need, int]:
        if end - pos < 4:
            return NEED_DATA, pos
        (magic,) = _unpack_u32(buf, pos)
        if magic == NBD_SIMPLE_REPLY_MAGIC:
            if end - pos < _SIMPLE_SIZE:
                return NEED_DATA, pos
            _, error, cookie = _unpack_simple(buf, pos)
            n = self.read_length(cookie) if error == 0 else 0
            start = pos + _SIMPLE_SIZE
            if end - start < n:
                return NEED_DATA, pos
            return SimpleReply(cookie, error, buf[start : start + n] if n else None), start + n
        if magic == NBD_STRUCTURED_REPLY_MAGIC:
            if end - pos < _CHUNK_SIZE:
                return NEED_DATA, pos
            _, flags, rtype, cookie, length = _unpack_chunk(buf, pos)
            if length > self.max_chunk:
                raise NBDRemoteProtocolError(f"reply chunk of {length} bytes is too large")
            start = pos + _CHUNK_SIZE
            if end - start < length:
                return NEED_DATA, pos
            return ReplyChunk(cookie, flags, rtype, buf[start : start + length]), start + length
        raise NBDRemoteProtocolError(f"bad reply magic {magic:#x}")
