"""``blocktrace record [OPTIONS] -- CMD`` and ``blocktrace mark NAME``.

``record`` runs CMD on a traced scratch disk (:mod:`blocktrace.crashcheck.record`) and then
checks every crash point of the log like ``blocktrace crashcheck``.  ``mark`` is the tiny
helper for the workload: it writes a mark into the trace ``record`` started, found through the
environment ``record`` sets.  Exit 1 if the workload failed or any point failed.
"""

from __future__ import annotations

import os
import shlex
import sys

import click

from blocktrace.crashcheck.record import ENV_JOB, ENV_SOCKET, MKFS
from blocktrace.crashcheck.record import record as do_record
from blocktrace.errors import UsageError
from blocktrace.trace.options import parse_size


@click.command(context_settings={"ignore_unknown_options": False})
@click.option(
    "-o",
    "--output",
    "out",
    required=True,
    type=click.Path(file_okay=False),
    help="New (or empty) directory for base.img, disk.img and trace.log.",
)
@click.option("--fs", type=click.Choice(sorted(MKFS)), default="ext4", show_default=True)
@click.option("--size", default="64M", show_default=True, help="Scratch disk size.")
@click.option("--mkfs-options", default="", help="Extra mkfs arguments (shell words).")
@click.option("--mount-options", default="", help="Mount options for the workload's mount.")
@click.option("--points", default="flush", show_default=True, help="As crashcheck --points.")
@click.option("-j", "--jobs", type=click.IntRange(1, 64), default=1, show_default=True)
@click.option("--no-check", is_flag=True, help="Record only; do not run crashcheck.")
@click.option("--json", "as_json", is_flag=True, help="crashcheck's report as JSON.")
@click.argument("command", nargs=-1, required=True, metavar="-- CMD [ARG]...")
def record(
    out: str,
    fs: str,
    size: str,
    mkfs_options: str,
    mount_options: str,
    points: str,
    jobs: int,
    no_check: bool,
    as_json: bool,
    command: tuple[str, ...],
) -> None:
    """Make a scratch disk with FS, serve it traced, mount it (nbdfuse + loop), run CMD in
    it (cwd = the mount), unmount, then crashcheck the log.

    \b
    Example: blocktrace record -o run1 --fs ext4 -- fsstress -d . -n 200 -p 2
    Inside CMD, `blocktrace mark NAME` delimits phases in the log.
    """
    rec = do_record(
        out,
        list(command),
        fs=fs,
        size=parse_size(size),
        mkfs_options=shlex.split(mkfs_options),
        mount_options=mount_options,
    )
    if rec.workload_status != 0:
        click.echo(f"blocktrace: workload exited {rec.workload_status}", err=True)
    click.echo(f"recorded {rec.log} (base {rec.base})", err=True)
    failed = rec.workload_status != 0
    if not no_check:
        from blocktrace.cli.crashcheck import check_and_report

        result = check_and_report(
            rec.log, rec.base, points=points, fs=fs, jobs=jobs, as_json=as_json
        )
        failed = failed or bool(result.failures)
    if failed:
        sys.exit(1)


@click.command()
@click.argument("name")
def mark(name: str) -> None:
    """Write mark NAME into the trace of the `blocktrace record` this runs under."""
    from blocktrace.qmp.client import CommandError, QMPClient

    path, job = os.environ.get(ENV_SOCKET), os.environ.get(ENV_JOB)
    if not path or not job:
        raise UsageError(f"not inside `blocktrace record` (${ENV_SOCKET}/${ENV_JOB} unset)")
    with QMPClient.connect_to(path) as client:
        try:
            client.execute("block-trace-mark", {"job-id": job, "name": name})
        except CommandError as exc:
            raise UsageError(f"mark {name!r}: {exc}") from None
