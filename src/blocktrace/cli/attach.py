"""``blocktrace attach`` / ``blocktrace detach``: trace a running QEMU's disk, no restart.

Argument handling only: :class:`~blocktrace.attach.session.AttachSession` does the work,
plugged into the same :class:`~blocktrace.service.Service` that ``serve`` runs (NBD socket,
``--trace`` specs, ``--qmp`` control socket), so ``trace list|mark|stop`` and
``query-block-jobs`` work on attached traces as on served ones.  See docs/attach.md.
"""

from __future__ import annotations

import logging
import time

import click

from blocktrace.cli.qmp import command_failed, connection_options, open_client
from blocktrace.errors import BlocktraceError, UsageError
from blocktrace.qmp.client import CommandError, QMPClient
from blocktrace.service import Service, ServiceConfig, run

DEFAULT_NBD_SOCKET = "./blocktrace-attach.sock"


@click.command()
@click.argument("disks", nargs=-1, required=True, metavar="DEVICE=IMAGE...")
@click.option(
    "--qemu",
    "qemu_socket",
    required=True,
    metavar="PATH",
    help="QMP socket of the running qemu-system-* or qemu-storage-daemon.",
)
@click.option(
    "--trace",
    "traces",
    multiple=True,
    required=True,
    metavar="[EXPORT=]TYPE:ARG[,OPT=VAL...]",
    help="As serve --trace (log:, replica:, nbd:, introspect:); EXPORT is the device's id. "
    "log/replica/nbd traces default to sync=full.  Repeatable.",
)
@click.option(
    "--socket",
    "socket_path",
    metavar="PATH",
    default=DEFAULT_NBD_SOCKET,
    show_default=True,
    help="NBD Unix socket QEMU connects to (mode 0600).",
)
@click.option("--qmp", "qmp_path", metavar="PATH", default=None, help="blocktrace's QMP socket.")
@click.option(
    "--reconnect-delay",
    type=click.IntRange(0, 3600),
    default=10,
    show_default=True,
    help="Seconds QEMU holds the guest's requests (filter: its log writes) if blocktrace "
    "dies, waiting for a restart.",
)
@click.option(
    "--mechanism",
    type=click.Choice(["pivot", "filter"]),
    default="pivot",
    show_default=True,
    help="pivot: live-migrate the disk onto blocktrace (any format, no pause).  filter: "
    "insert QEMU's blklogwrites logging into blocktrace (raw disks; the base is copied "
    "with the VM running).  See docs/attach.md.",
)
@click.option(
    "--resume",
    is_flag=True,
    help="An attach process on the same --socket died.  pivot: the disks still run on its "
    "IMAGEs: serve them again (QEMU reconnects), trace, and detach as usual.  filter: remove "
    "the blklogwrites it left, then attach afresh into new IMAGEs (a new trace, a new base).",
)
def attach(
    disks: tuple[str, ...],
    qemu_socket: str,
    traces: tuple[str, ...],
    socket_path: str,
    qmp_path: str | None,
    reconnect_delay: int,
    mechanism: str,
    resume: bool,
) -> None:
    """Trace the disks of a running QEMU until stopped (pivot mechanism).

    Each DEVICE (a -device id, qdev path or node name) is live-migrated into a new raw
    IMAGE that blocktrace serves (blockdev-mirror + block-job-complete, no guest pause), then
    traced.  SIGINT/SIGTERM, `blocktrace detach`, or stopping a disk's trace moves the disk
    back onto its own image and ends the trace.
    """
    from blocktrace.attach.monitor import AttachError
    from blocktrace.attach.session import AttachSession, parse_disk_arg

    logger = logging.getLogger("blocktrace")
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    session = AttachSession(
        qemu_socket,
        [parse_disk_arg(d) for d in disks],
        traces,
        nbd_socket=socket_path,
        reconnect_delay=reconnect_delay,
        resume=resume,
        mechanism="filter" if mechanism == "filter" else "pivot",
    )

    async def main() -> None:
        await session.prepare()
        service = Service(ServiceConfig(images=session.images, socket=socket_path))
        session.install(service)
        if qmp_path:
            from blocktrace.qmp.control import install as install_qmp

            install_qmp(service, unix=qmp_path)
        await service.run()

    run(main())
    if session.qemu_lost:
        raise AttachError("QEMU went away while attached; traces stopped, their data kept")
    if session.failed:
        raise AttachError("a log sink failed (see above); its disk was detached")


@click.command()
@click.argument("exports", nargs=-1, metavar="[EXPORT|DEVICE]...")
@connection_options
@click.option(
    "--qemu",
    "qemu_socket",
    metavar="PATH",
    default=None,
    help="No attach process is running (it was killed): remove the blklogwrites filter it "
    "left under each DEVICE given instead of EXPORTs, through QEMU's QMP socket PATH.",
)
def detach(
    exports: tuple[str, ...],
    socket_path: str | None,
    tcp: str | None,
    timeout: float,
    as_json: bool,
    qemu_socket: str | None,
) -> None:
    """Detach disks from a running `blocktrace attach` (its --qmp socket).

    With EXPORTs, stops their traces: each disk goes back onto its own image.  Without, the
    attach process detaches every disk and exits.  Returns when that is done.

    With --qemu QMP DEVICE...: the attach process (--mechanism filter) was killed; put each
    DEVICE back on its own file, as before the attach, the VM running on.
    """
    if qemu_socket is not None:
        _detach_stale(qemu_socket, exports, socket_path, tcp)
        return
    with open_client(socket_path, tcp, timeout) as client:
        try:
            if not exports:
                client.execute("quit")
                _wait_closed(client, timeout)
                click.echo("detached: every disk is back on its own image")
                return
            jobs = client.execute("query-block-jobs")
            chosen = [j["device"] for j in jobs if j.get("export") in exports]
            missing = set(exports) - {j.get("export") for j in jobs}
            if missing:
                raise BlocktraceError(f"no attached trace on {', '.join(sorted(missing))}")
            for job in chosen:
                client.execute("block-job-cancel", {"device": job})
            pending = set(chosen)
            while pending:
                ev = client.wait_event(
                    lambda e: e["event"] in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED")
                )
                pending.discard(ev.get("data", {}).get("device"))
        except CommandError as exc:
            raise command_failed(exc) from None
    click.echo(f"detaching {', '.join(exports)}")


def _wait_closed(client: QMPClient, timeout: float) -> None:
    """Wait for the attach process to close the QMP connection (it exits after detaching)."""
    deadline = time.monotonic() + max(timeout, 300)
    while time.monotonic() < deadline:
        try:
            client.wait_event(lambda e: False, timeout=1)
        except BlocktraceError as exc:
            if not str(exc).startswith("timed out"):
                return  # connection closed: the attach process is done
    raise BlocktraceError("timed out waiting for the attach process to detach")


def _detach_stale(
    qemu_socket: str, devices: tuple[str, ...], socket_path: str | None, tcp: str | None
) -> None:
    from blocktrace.attach.recover import detach_stale

    if socket_path is not None or tcp is not None:
        raise UsageError("detach --qemu talks to QEMU only: no --socket/--tcp")
    if not devices:
        raise UsageError("detach --qemu: name the DEVICEs to detach")
    for stale in run(detach_stale(qemu_socket, list(devices))):
        click.echo(f"detached {stale.disk.spec}: back on {stale.proto}; the old trace ends there")
