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
from blocktrace.stream.registry import targets
from blocktrace.stream.schema import parse_size
from blocktrace.trace.options import TraceSpec, parse_trace_spec


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


def targets_epilog() -> str:
    """``--trace`` target types and their options, from the target registry (the schemas)."""
    lines = ["Trace targets (--trace [EXPORT=]TYPE:ARG[,OPTION=VALUE...]):"]
    for ttype in targets():
        lines += ["", "\b", *ttype.usage().splitlines()]
    return "\n".join(lines)


log = logging.getLogger("blocktrace.trace")


def install_traces(service: Service, specs: tuple[str, ...] | list[str]) -> list[TraceSpec]:
    """Parse ``--trace`` values and register a startup hook that starts them."""
    parsed = [parse_trace_spec(s) for s in specs]
    ids = [p.job_id for p in parsed if p.job_id]
    if len(ids) != len(set(ids)):
        raise UsageError("--trace: duplicate job-id")
    if not parsed:
        return parsed

    async def start_traces(svc: Service) -> None:
        default = svc.registry.default
        used = set(ids)
        n = 0
        for spec in parsed:
            export = spec.export or (default.name if default is not None else "")
            if export not in svc.registry:
                raise UsageError(f"--trace: no export named {export!r}")
            job_id = spec.job_id
            if not job_id:
                while f"trace{n}" in used:
                    n += 1
                job_id = f"trace{n}"
            used.add(job_id)
            trace = await svc.traces.start(job_id, export, spec.target, spec.options)
            log.info(
                "trace %s: %s -> %s (%s)",
                job_id,
                export,
                trace.target.name,
                ", ".join(f"{k}={v}" for k, v in spec.options.to_dict().items()),
            )

    service.startup_hooks.append(start_traces)
    return parsed


@click.command(epilog=targets_epilog())
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
    help="Trace an export from the start; TYPE:ARG and the target's options are listed "
    "below.  Trace options: sync=none|full, copy-mode=background|write-blocking, "
    "on-target-error=report|break, queue-size=64M, job-id=ID; repeatable.  "
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
