"""``blocktrace crashcheck LOG BASE``: does the file system recover at every crash point?

Argument handling and output only; :mod:`blocktrace.crashcheck` does the work.  Exit status 0
when every checked point passed, 1 when any failed (or a tool or the log failed: one line on
stderr), 2 on a usage error.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator

import click

from blocktrace.crashcheck.checkers import BUILTIN, make_checker
from blocktrace.crashcheck.points import PointSpec, select_points
from blocktrace.crashcheck.report import annotate_ext4, render, to_json
from blocktrace.crashcheck.runner import PointResult, RunConfig, RunResult, run


@contextlib.contextmanager
def progress_bar(total: int, enabled: bool) -> Iterator[Callable[[PointResult], None] | None]:
    """A rich bar with a time estimate on stderr, advanced once per checked point."""
    if not enabled or total == 0:
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        "ETA",
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as bar:
        task = bar.add_task("crash points", total=total)

        def update(result: PointResult) -> None:
            bar.advance(task)
            if not result.passed:
                bar.console.print(f"entry {result.point.index}: FAIL ({result.stage})")

        yield update


def check_and_report(
    log: str,
    base: str,
    *,
    points: str = "flush",
    entries: str | None = None,
    fs: str | None = None,
    check: str | None = None,
    jobs: int = 1,
    bisect: bool = False,
    timeout: float = 300.0,
    tmpdir: str | None = None,
    as_json: bool = False,
    progress: bool | None = None,
) -> RunResult:
    """Run a check and print its report (shared with ``blocktrace record``)."""
    checker = make_checker(fs, check, base)
    chosen = select_points(log, PointSpec.parse(points, entries))
    show = sys.stderr.isatty() if progress is None else progress
    with progress_bar(len(chosen), show and not bisect) as update:
        cfg = RunConfig(log, base, checker, jobs, timeout, tmpdir, bisect, update)
        result = run(cfg, chosen)
    note = annotate_ext4(result.results, base, log) if checker.name == "ext4" else None
    if as_json:
        click.echo(to_json(result, fs=checker.name, log=log, base=base, note=note))
    else:
        from rich.console import Console

        render(result, fs=checker.name, note=note, console=Console(width=160))
    return result


@click.command()
@click.argument("log", type=click.Path(dir_okay=False))
@click.argument("base", type=click.Path(dir_okay=False))
@click.option(
    "--points",
    default="flush",
    show_default=True,
    help="Crash points: flush, fua, mark, every-N, all (comma-separated).",
)
@click.option("--entries", metavar="FIRST:LAST", help="Only points in this entry window.")
@click.option(
    "--fs",
    type=click.Choice(["auto", *sorted(BUILTIN)]),
    default="auto",
    show_default=True,
    help="Built-in check (auto: detect from BASE).",
)
@click.option("--check", "check", metavar="CMD", help="Run CMD (sh -c) instead; exit 0 passes.")
@click.option("-j", "--jobs", type=click.IntRange(1, 64), default=1, show_default=True)
@click.option("--bisect", is_flag=True, help="Binary-search a first failing point.")
@click.option("--timeout", type=float, default=300.0, show_default=True, help="Per step, s.")
@click.option("--tmpdir", type=click.Path(file_okay=False), help="Where views live (private).")
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: on a tty).")
def crashcheck(
    log: str,
    base: str,
    points: str,
    entries: str | None,
    fs: str,
    check: str | None,
    jobs: int,
    bisect: bool,
    timeout: float,
    tmpdir: str | None,
    as_json: bool,
    progress: bool | None,
) -> None:
    """Replay LOG onto BASE once and check the file system at every crash point.

    Each point is checked on a copy-on-write view of the disk (BASE is only read), exported
    through blocktrace's NBD server, nbdfuse and a loop device: ext4 and XFS are mounted and
    unmounted (the kernel's own journal or log recovery), then checked read-only (e2fsck -fn,
    xfs_repair -n); FAT is checked with fsck.vfat -n.  --check CMD gets the view in
    $BLOCKTRACE_VIEW (a file), $BLOCKTRACE_DEVICE (a loop device) and $BLOCKTRACE_NBD_URI.
    Exit 1 if any point fails.
    """
    result = check_and_report(
        log,
        base,
        points=points,
        entries=entries,
        fs=fs,
        check=check,
        jobs=jobs,
        bisect=bisect,
        timeout=timeout,
        tmpdir=tmpdir,
        as_json=as_json,
        progress=progress,
    )
    if result.failures:
        sys.exit(1)
