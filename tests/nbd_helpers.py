"""A raw NBD client on a blocking socket, for tests that must send what real clients never
would (bad magics, oversized requests, truncated handshakes) and see the exact replies.

Negotiation goes through blocktrace's own sans-IO ClientHandshake; everything after it is
hand-built bytes, so the tests control every field.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from pathlib import Path

from blocktrace.nbd import wire
from blocktrace.nbd.constants import NBD_SIMPLE_REPLY_MAGIC, NBD_STRUCTURED_REPLY_MAGIC
from blocktrace.nbd.events import NEED_DATA, HandshakeDone
from blocktrace.nbd.handshake import ClientHandshake


class RawClient:
    def __init__(self, path: str | os.PathLike[str] | Path, timeout: float = 10) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(os.fspath(path))

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_exact(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise EOFError(f"server closed after {len(out)} of {n} bytes")
            out += chunk
        return bytes(out)

    def handshake(
        self, export: str = "", *, structured: bool = False, contexts: tuple[str, ...] = ()
    ) -> HandshakeDone:
        hs = ClientHandshake(export, structured_replies=structured, meta_contexts=contexts)
        while True:
            out = hs.data_to_send()
            if out:
                self.send(out)
            ev = hs.next_event()
            if ev is not NEED_DATA:
                assert isinstance(ev, HandshakeDone)
                return ev
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("server closed during the handshake")
            hs.receive_data(data)

    def request(
        self,
        cmd: int,
        cookie: int = 1,
        offset: int = 0,
        length: int = 0,
        flags: int = 0,
        data: bytes = b"",
    ) -> None:
        self.send(wire.pack_request(cmd, cookie, offset, length, flags) + data)

    def simple_reply(self, read_length: int = 0) -> tuple[int, int, bytes]:
        """(cookie, error, data); ``read_length`` bytes follow a successful READ reply."""
        magic, error, cookie = wire.SIMPLE_REPLY.unpack(self.recv_exact(16))
        assert magic == NBD_SIMPLE_REPLY_MAGIC, hex(magic)
        data = self.recv_exact(read_length) if read_length and not error else b""
        return cookie, error, data

    def reply(self) -> tuple[int, int, int, int, bytes]:
        """Any one reply: (magic, cookie, type or error, flags, payload)."""
        head = self.recv_exact(4)
        (magic,) = struct.unpack(">I", head)
        if magic == NBD_SIMPLE_REPLY_MAGIC:
            error, cookie = struct.unpack(">IQ", self.recv_exact(12))
            return magic, cookie, error, 0, b""
        assert magic == NBD_STRUCTURED_REPLY_MAGIC, hex(magic)
        flags, rtype, cookie, length = struct.unpack(">HHQI", self.recv_exact(16))
        return magic, cookie, rtype, flags, self.recv_exact(length)

    def wait_closed(self, timeout: float = 10) -> bool:
        """True once the server has closed the connection (EOF or reset) within ``timeout``."""
        deadline = time.monotonic() + timeout
        self.sock.settimeout(0.2)
        while time.monotonic() < deadline:
            try:
                if not self.sock.recv(65536):
                    return True
            except TimeoutError:
                continue
            except ConnectionResetError:
                return True
        return False
