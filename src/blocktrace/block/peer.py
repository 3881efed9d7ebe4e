"""Is the other end of a connected socket this very process?

An ``nbd:`` replica pointed at the traced export itself would feed every record it applies
back into the trace it comes from (an echo that fills the log, then a deadlock: the trace
waits for its target, the target waits for the trace).  Names cannot tell: a Unix socket has
many paths, a TCP server many addresses (127.0.0.1, 127.0.0.2, ::1, localhost).  The kernel
can: for a Unix socket ``SO_PEERCRED`` gives the server's pid; for TCP, the listening socket
the connection reached is ours if its inode is among this process's file descriptors
(``/proc/net/tcp*`` maps ports to inodes).  Linux only, as the project is; anywhere the
kernel does not say, the answer is False (not known to be us).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct

_LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp's hex state column


def is_own_process(sock: socket.socket) -> bool:
    """True if ``sock``'s peer is a socket this process serves."""
    if sock.family == socket.AF_UNIX:
        try:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        except OSError:
            return False
        pid: int = struct.unpack("3i", creds)[0]
        return pid == os.getpid()
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            host, port = sock.getpeername()[:2]
        except OSError:
            return False
        return _own_listener(ipaddress.ip_address(host), port)
    return False


def _own_inodes() -> set[str]:
    inodes: set[str] = set()
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return inodes
    for fd in fds:
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    return inodes


def _own_listener(host: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> bool:
    """A listening TCP socket of this process accepts connections to ``host:port``."""
    if isinstance(host, ipaddress.IPv6Address) and host.ipv4_mapped is not None:
        host = host.ipv4_mapped
    mine = _own_inodes()
    for table, width in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
        try:
            with open(table, encoding="ascii") as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or fields[3] != _LISTEN or fields[9] not in mine:
                continue
            addr_hex, port_hex = fields[1].split(":")
            if int(port_hex, 16) != port:
                continue
            bound = _proc_address(addr_hex, width)
            if bound.is_unspecified or bound == host:
                return True
            if isinstance(bound, ipaddress.IPv6Address) and bound.ipv4_mapped == host:
                return True
    return False


def _proc_address(hexaddr: str, width: int) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """/proc/net/tcp* print addresses as host-order 32-bit words in hex."""
    raw = bytes.fromhex(hexaddr)
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, width, 4))
    return ipaddress.ip_address(words)
