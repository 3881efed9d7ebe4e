"""``HOST:PORT`` listener addresses, parsed the same way for every ``--*listen`` option.

One function so that NBD's ``--listen`` and QMP's ``--qmp-listen`` (and ``blocktrace qmp
--tcp``) cannot drift apart again: they used to treat brackets differently.
"""

from __future__ import annotations

from blocktrace.errors import UsageError

#: The host a listener binds when the spec names none: loopback, never every interface.
DEFAULT_HOST = "127.0.0.1"


def parse_listen(spec: str, option: str = "--listen") -> tuple[str, int]:
    """``HOST:PORT``, ``:PORT``, ``PORT`` or ``[V6ADDR]:PORT``; the host defaults to loopback.

    Brackets must enclose the whole host (``[::1]:80``); a stray one is an error rather than
    being stripped, so ``[::1:80`` is refused instead of binding somewhere unexpected.
    """
    host, sep, port_s = spec.rpartition(":")
    if not sep:
        host, port_s = "", spec
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if "[" in host or "]" in host:
        raise UsageError(f"{option} {spec!r}: unbalanced brackets around the host")
    try:
        port = int(port_s)
    except ValueError:
        raise UsageError(f"{option} {spec!r}: expected HOST:PORT") from None
    if not 0 <= port <= 65535:
        raise UsageError(f"{option} {spec!r}: port out of range")
    return host or DEFAULT_HOST, port
