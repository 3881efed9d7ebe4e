"""``blocktrace serve IMAGE [NAME=IMAGE ...]``: export raw images over NBD until stopped.

Argument handling only: options become a :class:`~blocktrace.service.ServiceConfig`, and
:class:`~blocktrace.service.Service` does the work.  Other parts add their options here (a
decorator, a config field, a hook registration in :func:`serve`).
"""

from __future__ import annotations

import logging
import os

import click

from blocktrace.errors import UsageError
from blocktrace.exports import default_export_name
from blocktrace.listen import parse_listen
from blocktrace.nbd.limits import (
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS,
    ServerLimits,
)
from blocktrace.service import DEFAULT_SOCKET, Service, ServiceConfig, run
from blocktrace.trace.options import parse_size
from blocktrace.trace.startup import install_traces


def parse_image_arg(arg: str) -> tuple[str, str]:
    """``NAME=IMAGE`` or ``IMAGE`` (name = file stem).  A path that exists as given wins
    over splitting at ``=``, so images with ``=`` in their names still work."""
    if "=" in arg and not os.path.exists(arg):
        name, _, path = arg.partition("=")
        if not name:
            raise UsageError(f"{arg!r}: empty export name")
        if not path:
            raise UsageError(f"{arg!r}: missing image path")
        return name, path
    return default_export_name(arg), arg


def build_config(
    images: tuple[str, ...],
    socket_path: str | None,
    listen: tuple[str, ...],
    read_only: bool,
    limits: ServerLimits | None = None,
) -> ServiceConfig:
    pairs = [parse_image_arg(a) for a in images]
    seen: set[str] = set()
    for name, _ in pairs:
        if name in seen:
            raise UsageError(f"duplicate export name {name!r} (use NAME=IMAGE)")
        seen.add(name)
    # A Unix socket unless only TCP was asked for.
    if socket_path is None and not listen:
        socket_path = DEFAULT_SOCKET
    return ServiceConfig(
        images=pairs,
        socket=socket_path or None,
        listen=[parse_listen(spec) for spec in listen],
        read_only=read_only,
        limits=limits or ServerLimits(),
    )


@click.command()
@click.argument("images", nargs=-1, required=True, metavar="IMAGE [NAME=IMAGE]...")
@click.option(
    "--socket",
    "socket_path",
    metavar="PATH",
    default=None,
    help=f"NBD Unix socket (mode 0600; default {DEFAULT_SOCKET} unless only --listen is given).",
)
@click.option(
    "--listen",
    multiple=True,
    metavar="HOST:PORT",
    help="Also serve NBD over TCP (HOST defaults to 127.0.0.1; repeatable).",
)
@click.option("--read-only", is_flag=True, help="Export every image read-only.")
@click.option(
    "--max-connections",
    type=click.IntRange(min=1),
    default=DEFAULT_MAX_CONNECTIONS,
    show_default=True,
    help="NBD connections open at once; one more is closed on arrival (and logged).",
)
@click.option(
    "--handshake-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=DEFAULT_HANDSHAKE_TIMEOUT,
    show_default=True,
    metavar="SECONDS",
    help="Close an NBD connection that has not finished negotiating by then.",
)
@click.option(
    "--payload-memory",
    default="256M",
    show_default=True,
    metavar="SIZE",
    help="Memory all NBD connections together may hold for WRITE payloads and READ data "
    "(K/M/G suffixes; at least 32M); past it clients wait.  See docs/nbd-server.md.",
)
@click.option(
    "--trace",
    "traces",
    multiple=True,
    metavar="[EXPORT=]TYPE:ARG[,OPT=VAL...]",
    help="Trace an export from the start; TYPE:ARG is log:PATH (dm-log-writes log), "
    "replica:PATH (raw image), nbd:URI (remote export) or introspect:PATH (ext4 events as "
    "JSON lines).  Options: sync=none|full, copy-mode=background|write-blocking, "
    "on-target-error=report|break, queue-size=64M, sector-size=512, job-id=ID, force=on "
    "(replace an existing log or events file); repeatable.  "
    "See docs/trace.md.",
)
@click.option(
    "--qmp",
    "qmp_path",
    metavar="PATH",
    default=None,
    help="QMP control socket (Unix, mode 0600): block-trace jobs, exports.  See docs/qmp.md.",
)
@click.option(
    "--qmp-listen",
    "qmp_listen",
    multiple=True,
    metavar="HOST:PORT",
    help="Also serve QMP over TCP (HOST defaults to 127.0.0.1; no authentication).",
)
def serve(
    images: tuple[str, ...],
    socket_path: str | None,
    listen: tuple[str, ...],
    read_only: bool,
    traces: tuple[str, ...] = (),
    qmp_path: str | None = None,
    qmp_listen: tuple[str, ...] = (),
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
    payload_memory: str = "256M",
) -> None:
    """Serve raw disk images over NBD; the first image is the default export.

    Runs in the foreground, logs one line per connection, and stops cleanly on SIGINT or
    SIGTERM (in-flight requests finished, devices flushed, sockets removed).
    """
    logger = logging.getLogger("blocktrace")
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    limits = ServerLimits(
        max_connections=max_connections,
        handshake_timeout=handshake_timeout,
        payload_memory=parse_size(payload_memory, "--payload-memory"),
    )
    config = build_config(images, socket_path, listen, read_only, limits)
    service = Service(config)
    install_traces(service, traces)
    if qmp_path or qmp_listen:
        from blocktrace.qmp.control import install as install_qmp

        tcp = [parse_listen(s, "--qmp-listen") for s in qmp_listen]
        install_qmp(service, unix=qmp_path, tcp=tcp)
    run(service.run())
