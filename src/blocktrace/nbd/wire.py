"""Fixed NBD wire layouts as precompiled ``struct.Struct`` objects, plus tiny pack helpers.

No state and no I/O: the handshake and transmission cores, the server and the client all pack
and unpack through these, so each layout is written down exactly once.  Unpacking is always
``unpack_from`` on a buffer and offset (a memoryview of the receive buffer on the hot path), so
parsing never slices or copies.  All integers are big-endian (spec: "network byte order").
"""

from __future__ import annotations

import struct

from blocktrace.nbd.constants import (
    IHAVEOPT,
    NBD_OPT_REPLY_MAGIC,
    NBD_REQUEST_MAGIC,
    NBD_SIMPLE_REPLY_MAGIC,
    NBD_STRUCTURED_REPLY_MAGIC,
    NBDMAGIC,
    Info,
    ReplyFlag,
    ReplyType,
)

# -- handshake ------------------------------------------------------------------------------
#: S: NBDMAGIC, IHAVEOPT, u16 handshake flags
GREETING = struct.Struct(">QQH")
#: C: u32 client flags
CLIENT_FLAGS = struct.Struct(">I")
#: C: IHAVEOPT, u32 option, u32 data length
OPTION = struct.Struct(">QII")
#: S: reply magic, u32 option, u32 reply type, u32 data length
OPTION_REPLY = struct.Struct(">QIII")
#: S: reply to NBD_OPT_EXPORT_NAME: u64 size, u16 transmission flags (+124 zeroes)
EXPORT_NAME_REPLY = struct.Struct(">QH")
EXPORT_NAME_PAD = bytes(124)
#: NBD_INFO_EXPORT payload: u16 type, u64 size, u16 flags
INFO_EXPORT = struct.Struct(">HQH")
#: NBD_INFO_BLOCK_SIZE payload: u16 type, u32 minimum, u32 preferred, u32 maximum
INFO_BLOCK_SIZE = struct.Struct(">HIII")
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")

# -- transmission ---------------------------------------------------------------------------
#: C: magic, u16 flags, u16 type, u64 cookie, u64 offset, u32 length
REQUEST = struct.Struct(">IHHQQI")
#: S: magic, u32 error, u64 cookie
SIMPLE_REPLY = struct.Struct(">IIQ")
#: S: magic, u16 flags, u16 type, u64 cookie, u32 payload length
CHUNK = struct.Struct(">IHHQI")
#: CHUNK + the u64 offset of NBD_REPLY_TYPE_OFFSET_DATA, packed in one call on the read path
CHUNK_OFFSET_DATA = struct.Struct(">IHHQIQ")
#: CHUNK + u64 offset + u32 hole size (NBD_REPLY_TYPE_OFFSET_HOLE)
CHUNK_OFFSET_HOLE = struct.Struct(">IHHQIQI")
#: CHUNK + u32 error + u16 message length (NBD_REPLY_TYPE_ERROR), message follows
CHUNK_ERROR = struct.Struct(">IHHQIIH")
#: CHUNK + u32 context id (NBD_REPLY_TYPE_BLOCK_STATUS), descriptors follow
CHUNK_BLOCK_STATUS = struct.Struct(">IHHQII")
#: one block-status descriptor: u32 length, u32 flags
EXTENT = struct.Struct(">II")
#: payload prefix of error chunks: u32 error, u16 message length
ERROR_PAYLOAD = struct.Struct(">IH")

_DONE = int(ReplyFlag.DONE)


def pack_greeting(flags: int) -> bytes:
    return GREETING.pack(NBDMAGIC, IHAVEOPT, flags)


def pack_option(option: int, data: bytes = b"") -> bytes:
    return OPTION.pack(IHAVEOPT, option, len(data)) + data


def pack_option_reply(option: int, reply: int, data: bytes = b"") -> bytes:
    return OPTION_REPLY.pack(NBD_OPT_REPLY_MAGIC, option, reply, len(data)) + data


def pack_info_export(size: int, flags: int) -> bytes:
    return INFO_EXPORT.pack(Info.EXPORT, size, flags)


def pack_info_block_size(minimum: int, preferred: int, maximum: int) -> bytes:
    return INFO_BLOCK_SIZE.pack(Info.BLOCK_SIZE, minimum, preferred, maximum)


def pack_request(cmd: int, cookie: int, offset: int = 0, length: int = 0, flags: int = 0) -> bytes:
    return REQUEST.pack(NBD_REQUEST_MAGIC, flags, cmd, cookie, offset, length)


def pack_simple_reply(cookie: int, error: int = 0) -> bytes:
    return SIMPLE_REPLY.pack(NBD_SIMPLE_REPLY_MAGIC, error, cookie)


def pack_chunk_none(cookie: int) -> bytes:
    return CHUNK.pack(NBD_STRUCTURED_REPLY_MAGIC, _DONE, ReplyType.NONE, cookie, 0)


def pack_chunk_offset_data_header(
    cookie: int, offset: int, length: int, done: bool = True
) -> bytes:
    """Header of an OFFSET_DATA chunk; ``length`` data bytes must follow it."""
    return CHUNK_OFFSET_DATA.pack(
        NBD_STRUCTURED_REPLY_MAGIC,
        _DONE if done else 0,
        ReplyType.OFFSET_DATA,
        cookie,
        8 + length,
        offset,
    )


def pack_chunk_offset_hole(cookie: int, offset: int, length: int, done: bool = False) -> bytes:
    return CHUNK_OFFSET_HOLE.pack(
        NBD_STRUCTURED_REPLY_MAGIC,
        _DONE if done else 0,
        ReplyType.OFFSET_HOLE,
        cookie,
        12,
        offset,
        length,
    )


def pack_chunk_error(cookie: int, error: int, message: str = "", done: bool = True) -> bytes:
    msg = message.encode()[:NBD_MAX_MESSAGE]
    return (
        CHUNK_ERROR.pack(
            NBD_STRUCTURED_REPLY_MAGIC,
            _DONE if done else 0,
            ReplyType.ERROR,
            cookie,
            6 + len(msg),
            error,
            len(msg),
        )
        + msg
    )


def pack_chunk_block_status(
    cookie: int, context_id: int, extents: list[tuple[int, int]], done: bool = True
) -> bytes:
    """One BLOCK_STATUS chunk for ``context_id``; ``extents`` are (length, flags) pairs."""
    head = CHUNK_BLOCK_STATUS.pack(
        NBD_STRUCTURED_REPLY_MAGIC,
        _DONE if done else 0,
        ReplyType.BLOCK_STATUS,
        cookie,
        4 + 8 * len(extents),
        context_id,
    )
    return head + b"".join(EXTENT.pack(length, flags) for length, flags in extents)


#: Error messages are strings too, and short ones keep error chunks small.
NBD_MAX_MESSAGE = 4096
