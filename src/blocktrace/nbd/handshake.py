"""Sans-IO fixed-newstyle NBD handshake, for both roles.

Bytes in (``receive_data``), bytes out (``data_to_send``), events out (``next_event``): no
sockets, no asyncio, so every branch is unit-testable with byte vectors, and the server adapter
and the NBD client are thin.  The option handlers are one table per role
(:data:`ServerHandshake.HANDLERS` keyed by ``NBD_OPT_*``; the client is a short chain of
states), and every option we do not implement falls through to ``NBD_REP_ERR_UNSUP`` with its
data consumed, as the spec's baseline requires ("MUST NOT fail to parse the next message").

Errors: a byte stream that cannot be parsed (bad magic, unknown client flags, an
``EXPORT_NAME`` too long to read) raises :class:`NBDRemoteProtocolError` and the object moves
to an error state; every later call raises again.  A well-framed option with bad contents gets
an ``NBD_REP_ERR_*`` reply and haggling continues.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import replace
from enum import Enum, auto

from blocktrace.nbd import wire
from blocktrace.nbd.constants import (
    BASE_ALLOCATION,
    IHAVEOPT,
    NBD_MAX_STRING,
    NBD_OPT_REPLY_MAGIC,
    NBDMAGIC,
    ClientFlag,
    HandshakeFlag,
    Info,
    Opt,
    Rep,
    TransmissionFlag,
)
from blocktrace.nbd.errors import NBDLocalProtocolError, NBDRemoteProtocolError
from blocktrace.nbd.events import (
    NEED_DATA,
    ExportInfo,
    HandshakeAborted,
    HandshakeDone,
    Need,
)

#: Option data above this is read and discarded, answered with NBD_REP_ERR_TOO_BIG.
MAX_OPTION_DATA = 64 * 1024
#: Context id we hand out for base:allocation after SET_META_CONTEXT.
BASE_ALLOCATION_ID = 1

ServerEvent = Need | HandshakeDone | HandshakeAborted
ClientEvent = Need | HandshakeDone


class _OptionRefused(Exception):
    """Internal: answer the current option with an NBD_REP_ERR_* reply and continue."""

    def __init__(self, reply: Rep, message: str) -> None:
        self.reply = reply
        super().__init__(message)


def _decode_string(raw: bytes | bytearray | memoryview, what: str) -> str:
    if len(raw) > NBD_MAX_STRING:
        raise _OptionRefused(Rep.ERR_INVALID, f"{what} longer than {NBD_MAX_STRING} bytes")
    try:
        text = bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise _OptionRefused(Rep.ERR_INVALID, f"{what} is not UTF-8") from None
    if "\0" in text:
        raise _OptionRefused(Rep.ERR_INVALID, f"{what} contains NUL")
    return text


def encode_info_request(name: str, infos: Iterable[int]) -> bytes:
    """Data of NBD_OPT_INFO / NBD_OPT_GO: u32 name length, name, u16 count, u16 info types."""
    raw = name.encode()
    req = list(infos)
    return (
        wire.U32.pack(len(raw))
        + raw
        + wire.U16.pack(len(req))
        + b"".join(wire.U16.pack(i) for i in req)
    )


def decode_info_request(data: bytes) -> tuple[str, list[int]]:
    """Parse NBD_OPT_INFO / NBD_OPT_GO data; raises _OptionRefused(ERR_INVALID)."""
    if len(data) < 6:
        raise _OptionRefused(Rep.ERR_INVALID, "option data too short")
    (namelen,) = wire.U32.unpack_from(data, 0)
    if namelen > len(data) - 6:
        raise _OptionRefused(Rep.ERR_INVALID, "export name length exceeds option data")
    name = _decode_string(data[4 : 4 + namelen], "export name")
    (count,) = wire.U16.unpack_from(data, 4 + namelen)
    if len(data) != 6 + namelen + 2 * count:
        raise _OptionRefused(Rep.ERR_INVALID, "information request count mismatch")
    infos = [wire.U16.unpack_from(data, 6 + namelen + 2 * i)[0] for i in range(count)]
    return name, infos


def encode_meta_context_request(name: str, queries: Iterable[str]) -> bytes:
    """Data of NBD_OPT_LIST/SET_META_CONTEXT: u32 len, name, u32 count, {u32 len, query}..."""
    raw = name.encode()
    qs = [q.encode() for q in queries]
    return (
        wire.U32.pack(len(raw))
        + raw
        + wire.U32.pack(len(qs))
        + b"".join(wire.U32.pack(len(q)) + q for q in qs)
    )


def decode_meta_context_request(data: bytes) -> tuple[str, list[str]]:
    """Parse LIST/SET_META_CONTEXT data; raises _OptionRefused(ERR_INVALID)."""
    if len(data) < 8:
        raise _OptionRefused(Rep.ERR_INVALID, "option data too short")
    (namelen,) = wire.U32.unpack_from(data, 0)
    if namelen > len(data) - 8:
        raise _OptionRefused(Rep.ERR_INVALID, "export name length exceeds option data")
    name = _decode_string(data[4 : 4 + namelen], "export name")
    pos = 4 + namelen
    (count,) = wire.U32.unpack_from(data, pos)
    pos += 4
    queries: list[str] = []
    for _ in range(count):
        if pos + 4 > len(data):
            raise _OptionRefused(Rep.ERR_INVALID, "query count exceeds option data")
        (qlen,) = wire.U32.unpack_from(data, pos)
        pos += 4
        if qlen > len(data) - pos:
            raise _OptionRefused(Rep.ERR_INVALID, "query length exceeds option data")
        queries.append(_decode_string(data[pos : pos + qlen], "query"))
        pos += qlen
    if pos != len(data):
        raise _OptionRefused(Rep.ERR_INVALID, "trailing bytes after queries")
    return name, queries


class _S(Enum):
    CLIENT_FLAGS = auto()
    OPTIONS = auto()
    DONE = auto()
    ERROR = auto()


Lookup = Callable[[str], ExportInfo | None]
Lister = Callable[[], Iterable[ExportInfo]]


class ServerHandshake:
    """The server side of fixed-newstyle negotiation.

    ``lookup(name)`` returns the :class:`ExportInfo` a name selects (``""`` = the default
    export) or None; ``list_exports()`` feeds NBD_OPT_LIST.  The greeting is queued at
    construction, so ``data_to_send()`` is non-empty before any byte arrives.
    """

    def __init__(self, lookup: Lookup, list_exports: Lister) -> None:
        self._lookup = lookup
        self._list = list_exports
        self._buf = bytearray()
        self._out = bytearray(
            wire.pack_greeting(HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES)
        )
        self._events: deque[HandshakeDone | HandshakeAborted] = deque()
        self._state = _S.CLIENT_FLAGS
        self._discard = 0
        self._discard_option = 0
        self.no_zeroes = False
        self.structured = False
        self._contexts: dict[int, str] = {}
        self._contexts_export: str | None = None

    # -- public API ------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        if self._state is _S.ERROR:
            raise NBDRemoteProtocolError("handshake already failed")
        if self._state is _S.DONE:
            self._buf += data  # belongs to the transmission phase
            return
        self._buf += data
        try:
            self._process()
        except NBDRemoteProtocolError:
            self._state = _S.ERROR
            raise

    def next_event(self) -> ServerEvent:
        if self._state is _S.ERROR and not self._events:
            raise NBDRemoteProtocolError("handshake already failed")
        return self._events.popleft() if self._events else NEED_DATA

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    @property
    def done(self) -> bool:
        return self._state is _S.DONE

    def trailing_data(self) -> bytes:
        """Bytes received after the handshake finished (the start of transmission)."""
        return bytes(self._buf)

    # -- parsing ---------------------------------------------------------------------------

    def _process(self) -> None:
        buf = self._buf
        while self._state is not _S.DONE:
            if self._state is _S.CLIENT_FLAGS:
                if len(buf) < 4:
                    return
                (cflags,) = wire.CLIENT_FLAGS.unpack_from(buf, 0)
                del buf[:4]
                known = int(ClientFlag.C_FIXED_NEWSTYLE | ClientFlag.C_NO_ZEROES)
                if cflags & ~known:
                    raise NBDRemoteProtocolError(f"unknown client flags {cflags:#x}")
                self.no_zeroes = bool(cflags & ClientFlag.C_NO_ZEROES)
                self._state = _S.OPTIONS
                continue
            if self._discard:
                n = min(self._discard, len(buf))
                del buf[:n]
                self._discard -= n
                if self._discard:
                    return
                self._reply(self._discard_option, Rep.ERR_TOO_BIG, b"option data too large")
                continue
            if len(buf) < wire.OPTION.size:
                return
            magic, option, length = wire.OPTION.unpack_from(buf, 0)
            if magic != IHAVEOPT:
                raise NBDRemoteProtocolError(f"bad option magic {magic:#x}")
            if length > MAX_OPTION_DATA:
                if option == Opt.EXPORT_NAME:
                    raise NBDRemoteProtocolError("NBD_OPT_EXPORT_NAME data too large")
                del buf[: wire.OPTION.size]
                self._discard, self._discard_option = length, option
                continue
            end = wire.OPTION.size + length
            if len(buf) < end:
                return
            data = bytes(buf[wire.OPTION.size : end])
            del buf[:end]
            handler = self.HANDLERS.get(option, ServerHandshake._opt_unsupported)
            try:
                handler(self, option, data)
            except _OptionRefused as exc:
                self._reply(option, exc.reply, str(exc).encode())

    def _reply(self, option: int, reply: int, data: bytes = b"") -> None:
        self._out += wire.pack_option_reply(option, reply, data)

    def _export(self, name: str) -> ExportInfo:
        info = self._lookup(name)
        if info is None:
            raise _OptionRefused(Rep.ERR_UNKNOWN, f"export {name!r} not available")
        return self._with_df(info)

    def _with_df(self, info: ExportInfo) -> ExportInfo:
        """Advertise NBD_FLAG_SEND_DF once structured replies are on: every READ reply is one
        chunk anyway, so "don't fragment" costs nothing (the spec forbids the flag otherwise)."""
        if self.structured and not info.flags & TransmissionFlag.SEND_DF:
            return replace(info, flags=info.flags | TransmissionFlag.SEND_DF)
        return info

    def _finish(self, info: ExportInfo, via_export_name: bool) -> None:
        contexts = dict(self._contexts) if self._contexts_export == info.name else {}
        self._state = _S.DONE
        self._events.append(HandshakeDone(info, self.structured, contexts, via_export_name))

    # -- option handlers (one per NBD_OPT_*) -----------------------------------------------

    def _opt_unsupported(self, option: int, data: bytes) -> None:
        raise _OptionRefused(Rep.ERR_UNSUP, f"option {option} not supported")

    def _opt_export_name(self, option: int, data: bytes) -> None:
        try:
            name = _decode_string(data, "export name")
        except _OptionRefused as exc:
            raise NBDRemoteProtocolError(str(exc)) from None
        found = self._lookup(name)
        if found is None:
            # No way to report an error here: the spec says to close the connection.
            self._state = _S.DONE
            self._events.append(HandshakeAborted(f"unknown export {name!r}"))
            return
        info = self._with_df(found)
        self._out += wire.EXPORT_NAME_REPLY.pack(info.size, info.flags)
        if not self.no_zeroes:
            self._out += wire.EXPORT_NAME_PAD
        self._finish(info, via_export_name=True)

    def _opt_abort(self, option: int, data: bytes) -> None:
        self._reply(option, Rep.ACK)
        self._state = _S.DONE
        self._events.append(HandshakeAborted("client sent NBD_OPT_ABORT"))

    def _opt_list(self, option: int, data: bytes) -> None:
        if data:
            raise _OptionRefused(Rep.ERR_INVALID, "NBD_OPT_LIST takes no data")
        for info in self._list():
            raw = info.name.encode()
            self._reply(
                option, Rep.SERVER, wire.U32.pack(len(raw)) + raw + info.description.encode()
            )
        self._reply(option, Rep.ACK)

    def _opt_info_go(self, option: int, data: bytes) -> None:
        name, infos = decode_info_request(data)
        info = self._export(name)
        self._reply(option, Rep.INFO, wire.pack_info_export(info.size, info.flags))
        if Info.NAME in infos:
            self._reply(option, Rep.INFO, wire.U16.pack(Info.NAME) + info.name.encode())
        if Info.DESCRIPTION in infos and info.description:
            self._reply(
                option, Rep.INFO, wire.U16.pack(Info.DESCRIPTION) + info.description.encode()
            )
        # Sent even when not requested (allowed): it tells every client our limits.
        self._reply(
            option,
            Rep.INFO,
            wire.pack_info_block_size(info.min_block, info.preferred_block, info.max_block),
        )
        self._reply(option, Rep.ACK)
        if option == Opt.GO:
            self._finish(info, via_export_name=False)

    def _opt_structured_reply(self, option: int, data: bytes) -> None:
        if data:
            raise _OptionRefused(Rep.ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")
        self.structured = True
        self._reply(option, Rep.ACK)

    def _opt_meta_context(self, option: int, data: bytes) -> None:
        if option == Opt.SET_META_CONTEXT:
            self._contexts, self._contexts_export = {}, None
        if not self.structured:
            raise _OptionRefused(Rep.ERR_INVALID, "structured replies not negotiated")
        name, queries = decode_meta_context_request(data)
        info = self._export(name)
        if option == Opt.LIST_META_CONTEXT:
            wanted = not queries or any(q in ("base:", BASE_ALLOCATION) for q in queries)
            if wanted:
                self._reply(option, Rep.META_CONTEXT, wire.U32.pack(0) + BASE_ALLOCATION.encode())
        elif BASE_ALLOCATION in queries:
            self._contexts = {BASE_ALLOCATION_ID: BASE_ALLOCATION}
            self._contexts_export = info.name
            self._reply(
                option,
                Rep.META_CONTEXT,
                wire.U32.pack(BASE_ALLOCATION_ID) + BASE_ALLOCATION.encode(),
            )
        self._reply(option, Rep.ACK)

    HANDLERS: dict[int, Callable[[ServerHandshake, int, bytes], None]] = {
        Opt.EXPORT_NAME: _opt_export_name,
        Opt.ABORT: _opt_abort,
        Opt.LIST: _opt_list,
        Opt.INFO: _opt_info_go,
        Opt.GO: _opt_info_go,
        Opt.STRUCTURED_REPLY: _opt_structured_reply,
        Opt.LIST_META_CONTEXT: _opt_meta_context,
        Opt.SET_META_CONTEXT: _opt_meta_context,
    }


# -----------------------------------------------------------------------------------------
# client side


class _C(Enum):
    GREETING = auto()
    STRUCTURED_REPLY = auto()
    META_CONTEXT = auto()
    GO = auto()
    EXPORT_NAME = auto()
    DONE = auto()
    ERROR = auto()


class ClientHandshake:
    """The client side: request structured replies and ``meta_contexts``, then ``GO``.

    Falls back to plain replies when STRUCTURED_REPLY is refused, to no contexts when
    SET_META_CONTEXT is refused, and to ``EXPORT_NAME`` when GO is unsupported.  An export the
    server refuses raises :class:`NBDRemoteProtocolError` naming the server's reason.
    """

    def __init__(
        self,
        export_name: str = "",
        *,
        structured_replies: bool = True,
        meta_contexts: Iterable[str] = (BASE_ALLOCATION,),
    ) -> None:
        self.export_name = export_name
        self._want_structured = structured_replies
        self._want_contexts = list(meta_contexts)
        self._buf = bytearray()
        self._out = bytearray()
        self._state = _C.GREETING
        self._no_zeroes = False
        self._structured = False
        self._contexts: dict[int, str] = {}
        self._size: int | None = None
        self._flags = TransmissionFlag(0)
        self._block = (1, 4096, 32 * 1024 * 1024)
        self._name = export_name
        self._description = ""
        self._event: HandshakeDone | None = None

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        if self._state is _C.ERROR:
            raise NBDRemoteProtocolError("handshake already failed")
        self._buf += data
        if self._state is _C.DONE:
            return
        try:
            self._process()
        except NBDRemoteProtocolError:
            self._state = _C.ERROR
            raise

    def next_event(self) -> ClientEvent:
        if self._state is _C.ERROR:
            raise NBDRemoteProtocolError("handshake already failed")
        ev, self._event = self._event, None
        return ev if ev is not None else NEED_DATA

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def trailing_data(self) -> bytes:
        return bytes(self._buf)

    # -- internals -------------------------------------------------------------------------

    def _send(self, option: Opt, data: bytes = b"") -> None:
        self._out += wire.pack_option(option, data)

    def _send_next_after_structured(self) -> None:
        if self._structured and self._want_contexts:
            self._state = _C.META_CONTEXT
            self._send(
                Opt.SET_META_CONTEXT,
                encode_meta_context_request(self.export_name, self._want_contexts),
            )
        else:
            self._send_go()

    def _send_go(self) -> None:
        self._state = _C.GO
        infos = [Info.BLOCK_SIZE, Info.NAME, Info.DESCRIPTION]
        self._send(Opt.GO, encode_info_request(self.export_name, infos))

    def _process(self) -> None:
        buf = self._buf
        while self._state is not _C.DONE:
            if self._state is _C.GREETING:
                if len(buf) < wire.GREETING.size:
                    return
                magic, opt_magic, flags = wire.GREETING.unpack_from(buf, 0)
                del buf[: wire.GREETING.size]
                if magic != NBDMAGIC or opt_magic != IHAVEOPT:
                    raise NBDRemoteProtocolError("not a newstyle NBD server")
                if not flags & HandshakeFlag.FIXED_NEWSTYLE:
                    raise NBDRemoteProtocolError("server does not support fixed newstyle")
                self._no_zeroes = bool(flags & HandshakeFlag.NO_ZEROES)
                cflags = ClientFlag.C_FIXED_NEWSTYLE
                if self._no_zeroes:
                    cflags |= ClientFlag.C_NO_ZEROES
                self._out += wire.CLIENT_FLAGS.pack(cflags)
                if self._want_structured:
                    self._state = _C.STRUCTURED_REPLY
                    self._send(Opt.STRUCTURED_REPLY)
                else:
                    self._send_go()
                continue
            if self._state is _C.EXPORT_NAME:
                need = wire.EXPORT_NAME_REPLY.size + (0 if self._no_zeroes else 124)
                if len(buf) < need:
                    return
                self._size, flags = wire.EXPORT_NAME_REPLY.unpack_from(buf, 0)
                self._flags = TransmissionFlag(flags)
                del buf[:need]
                self._complete()
                continue
            if len(buf) < wire.OPTION_REPLY.size:
                return
            magic, option, reply, length = wire.OPTION_REPLY.unpack_from(buf, 0)
            if magic != NBD_OPT_REPLY_MAGIC:
                raise NBDRemoteProtocolError(f"bad option reply magic {magic:#x}")
            if length > MAX_OPTION_DATA:
                raise NBDRemoteProtocolError("option reply too large")
            end = wire.OPTION_REPLY.size + length
            if len(buf) < end:
                return
            data = bytes(buf[wire.OPTION_REPLY.size : end])
            del buf[:end]
            self._on_reply(option, reply, data)

    def _on_reply(self, option: int, reply: int, data: bytes) -> None:
        state = self._state
        expected = {
            _C.STRUCTURED_REPLY: Opt.STRUCTURED_REPLY,
            _C.META_CONTEXT: Opt.SET_META_CONTEXT,
            _C.GO: Opt.GO,
        }[state]
        if option != expected:
            raise NBDRemoteProtocolError(f"reply for option {option}, expected {expected.name}")
        if reply == Rep.ACK and data:
            raise NBDRemoteProtocolError("NBD_REP_ACK with data")
        error = bool(reply & 0x80000000)
        if state is _C.STRUCTURED_REPLY:
            if reply == Rep.ACK or error:
                self._structured = reply == Rep.ACK
                self._send_next_after_structured()
            else:
                raise NBDRemoteProtocolError(f"unexpected reply {reply:#x} to STRUCTURED_REPLY")
        elif state is _C.META_CONTEXT:
            if reply == Rep.META_CONTEXT:
                if len(data) < 4:
                    raise NBDRemoteProtocolError("short NBD_REP_META_CONTEXT")
                (ctx_id,) = wire.U32.unpack_from(data, 0)
                self._contexts[ctx_id] = data[4:].decode(errors="replace")
            elif reply == Rep.ACK or error:
                if error:
                    self._contexts = {}
                self._send_go()
            else:
                raise NBDRemoteProtocolError(f"unexpected reply {reply:#x} to SET_META_CONTEXT")
        else:
            if reply == Rep.INFO:
                self._on_info(data)
            elif reply == Rep.ACK:
                if self._size is None:
                    raise NBDRemoteProtocolError("server omitted NBD_INFO_EXPORT")
                self._complete()
            elif reply == Rep.ERR_UNSUP:
                self._state = _C.EXPORT_NAME
                self._send(Opt.EXPORT_NAME, self.export_name.encode())
            elif error:
                msg = data.decode(errors="replace")
                name = Rep(reply).name if reply in Rep._value2member_map_ else hex(reply)
                raise NBDRemoteProtocolError(
                    f"server refused export {self.export_name!r}: {name} {msg}".rstrip()
                )
            else:
                raise NBDRemoteProtocolError(f"unexpected reply {reply:#x} to GO")

    def _on_info(self, data: bytes) -> None:
        if len(data) < 2:
            raise NBDRemoteProtocolError("short NBD_REP_INFO")
        (kind,) = wire.U16.unpack_from(data, 0)
        if kind == Info.EXPORT:
            if len(data) != wire.INFO_EXPORT.size:
                raise NBDRemoteProtocolError("bad NBD_INFO_EXPORT length")
            _, self._size, flags = wire.INFO_EXPORT.unpack_from(data, 0)
            self._flags = TransmissionFlag(flags)
        elif kind == Info.BLOCK_SIZE:
            if len(data) != wire.INFO_BLOCK_SIZE.size:
                raise NBDRemoteProtocolError("bad NBD_INFO_BLOCK_SIZE length")
            _, mn, pref, mx = wire.INFO_BLOCK_SIZE.unpack_from(data, 0)
            self._block = (mn, pref, mx)
        elif kind == Info.NAME:
            self._name = data[2:].decode(errors="replace")
        elif kind == Info.DESCRIPTION:
            self._description = data[2:].decode(errors="replace")
        # unknown info types are ignored, as the spec requires

    def _complete(self) -> None:
        if self._size is None:
            raise NBDLocalProtocolError("completing without an export size")
        if not self._flags & TransmissionFlag.HAS_FLAGS:
            raise NBDRemoteProtocolError("transmission flags lack NBD_FLAG_HAS_FLAGS")
        info = ExportInfo(
            name=self._name,
            size=self._size,
            flags=self._flags,
            description=self._description,
            min_block=self._block[0],
            preferred_block=self._block[1],
            max_block=self._block[2],
        )
        via_export_name = self._state is _C.EXPORT_NAME
        self._state = _C.DONE
        self._event = HandshakeDone(info, self._structured, dict(self._contexts), via_export_name)
