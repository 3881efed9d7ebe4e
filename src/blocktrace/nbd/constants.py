"""NBD protocol constants, named exactly as in the NBD spec (``doc/proto.md``).

Every number the wire carries lives here as an IntEnum/IntFlag so that logs and test failures
print ``NBD_CMD_WRITE`` rather than ``1``; the spec's ``NBD_`` prefix and the group prefix
(``OPT_``, ``REP_``...) are dropped from member names because the class name says it.
Shared by the server, the client and the tests.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag

# -- magics ---------------------------------------------------------------------------------
NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC" (INIT_PASSWD)
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT": newstyle magic, also prefixes every option
NBD_OPT_REPLY_MAGIC = 0x0003E889045565A9
NBD_REQUEST_MAGIC = 0x25609513
NBD_SIMPLE_REPLY_MAGIC = 0x67446698
NBD_STRUCTURED_REPLY_MAGIC = 0x668E33EF

#: Strings (export names, messages) MUST be at most this long.
NBD_MAX_STRING = 4096
#: The IANA-assigned NBD TCP port.
NBD_PORT = 10809
#: Default maximum payload when a server advertises none (spec "Size constraints").
NBD_DEFAULT_MAX_PAYLOAD = 32 * 1024 * 1024


class HandshakeFlag(IntFlag):
    """Server flags in the greeting (u16)."""

    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class ClientFlag(IntFlag):
    """Client flags answering the greeting (u32)."""

    C_FIXED_NEWSTYLE = 1 << 0
    C_NO_ZEROES = 1 << 1


class Opt(IntEnum):
    """``NBD_OPT_*`` option codes."""

    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


class Rep(IntEnum):
    """``NBD_REP_*`` option reply types."""

    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = 0x80000001
    ERR_POLICY = 0x80000002
    ERR_INVALID = 0x80000003
    ERR_PLATFORM = 0x80000004
    ERR_TLS_REQD = 0x80000005
    ERR_UNKNOWN = 0x80000006
    ERR_SHUTDOWN = 0x80000007
    ERR_BLOCK_SIZE_REQD = 0x80000008
    ERR_TOO_BIG = 0x80000009
    ERR_EXT_HEADER_REQD = 0x8000000A

    @property
    def is_error(self) -> bool:
        return bool(self & 0x80000000)


REP_ERROR_BIT = 0x80000000


class Info(IntEnum):
    """``NBD_INFO_*`` types inside ``NBD_REP_INFO``."""

    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class TransmissionFlag(IntFlag):
    """``NBD_FLAG_*`` transmission flags (u16) sent with the export size."""

    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11


class Cmd(IntEnum):
    """``NBD_CMD_*`` request types."""

    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7


class CmdFlag(IntFlag):
    """``NBD_CMD_FLAG_*`` command flags (u16)."""

    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4


class ReplyFlag(IntFlag):
    """``NBD_REPLY_FLAG_*`` structured reply chunk flags."""

    DONE = 1 << 0


class ReplyType(IntEnum):
    """``NBD_REPLY_TYPE_*`` structured reply chunk types."""

    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    ERROR = 0x8001
    ERROR_OFFSET = 0x8002

    @property
    def is_error(self) -> bool:
        return bool(self & 0x8000)


class NBDError(IntEnum):
    """Error values on the wire (they match Linux errno numbers, but only these exist)."""

    OK = 0
    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


class State(IntFlag):
    """``base:allocation`` status flags (``NBD_STATE_*``)."""

    HOLE = 1 << 0
    ZERO = 1 << 1


#: The one metadata context this server offers.
BASE_ALLOCATION = "base:allocation"
