"""``blocktrace replay LOG IMAGE``: replay-log's selection options, blocktrace's checks.

Options and their inclusive/exclusive semantics are xfstests' ``replay-log``'s (see
:mod:`blocktrace.logwrites.replay`); ``--find`` prints ``ENTRY@POS`` like replay-log and needs
no IMAGE.  A corrupt or truncated log fails naming the entry and byte offset; ``--salvage``
replays the valid prefix instead (and says what it skipped).  A progress bar appears for long
replays when stderr is a terminal.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Literal

import click

from blocktrace.errors import BlocktraceError, UsageError
from blocktrace.logwrites.format import flags_str
from blocktrace.logwrites.reader import LogEntry, LogReader
from blocktrace.logwrites.replay import ReplayOptions, find
from blocktrace.logwrites.replay import replay as do_replay

#: Show a progress bar only for logs at least this big (and only on a terminal).
PROGRESS_MIN_BYTES = 64 * 1024 * 1024


@contextmanager
def progress_bar(total: int, description: str) -> Iterator[Callable[[int], None] | None]:
    """Yield an ``update(done)`` callback drawing a rich bar on stderr, or None when stderr
    is not a terminal or the job is small."""
    if total < PROGRESS_MIN_BYTES or not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as bar:
        task = bar.add_task(description, total=total)
        yield lambda done: bar.update(task, completed=done)


def selection_options(f: Callable[..., object]) -> Callable[..., object]:
    """The replay-log selection options shared by ``replay`` and ``log find``."""
    opts = [
        click.option(
            "--limit",
            type=click.IntRange(min=0),
            default=0,
            help="Stop after N entries from the start point (inclusive; 0 = all).",
        ),
        click.option(
            "--start-entry", type=click.IntRange(min=0), default=0, help="Start at 0-based entry N."
        ),
        click.option("--start-mark", metavar="MARK", help="Start after the first mark named MARK."),
        click.option(
            "--end-mark",
            metavar="MARK",
            help="Stop after the mark named MARK (inclusive; disables the "
            "--next-flush/--next-fua stops, as in replay-log).",
        ),
        click.option("--next-flush", is_flag=True, help="Stop after the next FLUSH entry."),
        click.option("--next-fua", is_flag=True, help="Stop after the next FUA entry."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def make_options(
    limit: int,
    start_entry: int,
    start_mark: str | None,
    end_mark: str | None,
    next_flush: bool,
    next_fua: bool,
    no_discard: bool = False,
    salvage: bool = False,
    on_bad_entry: Literal["stop", "skip"] = "stop",
    grow: bool = False,
) -> ReplayOptions:
    return ReplayOptions(
        limit=limit,
        start_entry=start_entry,
        start_mark=start_mark,
        end_mark=end_mark,
        next_flush=next_flush,
        next_fua=next_fua,
        no_discard=no_discard,
        salvage=salvage,
        on_bad_entry=on_bad_entry,
        grow=grow,
    )


def verbose_line(entry: LogEntry, verb: str = "replaying") -> str:
    """replay-log's ``-v`` line, plus the mark text."""
    line = (
        f"{verb} {entry.index}@{entry.pos_after_header}: sector {entry.sector}, "
        f"size {entry.length}, flags {entry.flags:#x}({flags_str(entry.flags)})"
    )
    if entry.mark is not None:
        line += f" mark {entry.mark}"
    return line


@click.command()
@click.argument("log", type=click.Path(dir_okay=False))
@click.argument("image", type=click.Path(dir_okay=False), required=False)
@selection_options
@click.option("--no-discard", is_flag=True, help="Ignore DISCARD entries.")
@click.option(
    "--find",
    "find_mode",
    is_flag=True,
    help="Print ENTRY@POS where the replay would stop; write nothing.",
)
@click.option(
    "--salvage",
    is_flag=True,
    help="On a corrupt or truncated log, replay the valid prefix (and checksum-"
    "verified uncounted entries) instead of failing.",
)
@click.option(
    "--on-bad-entry",
    type=click.Choice(["stop", "skip"]),
    default="stop",
    show_default=True,
    help="An entry whose range does not fit IMAGE: stop with an error naming it, or skip it "
    "(with a warning) and go on.",
)
@click.option(
    "--grow",
    is_flag=True,
    help="Let entries past the end extend IMAGE (a regular file); without it IMAGE never grows.",
)
@click.option("-v", "--verbose", is_flag=True, help="Print each replayed entry.")
def replay(
    log: str,
    image: str | None,
    limit: int,
    start_entry: int,
    start_mark: str | None,
    end_mark: str | None,
    next_flush: bool,
    next_fua: bool,
    no_discard: bool,
    find_mode: bool,
    salvage: bool,
    on_bad_entry: Literal["stop", "skip"],
    grow: bool,
    verbose: bool,
) -> None:
    """Replay the dm-log-writes LOG onto IMAGE (an existing file or block device)."""
    opts = make_options(
        limit,
        start_entry,
        start_mark,
        end_mark,
        next_flush,
        next_fua,
        no_discard,
        salvage,
        on_bad_entry,
        grow,
    )
    with LogReader(log) as reader:
        if find_mode:
            entry = find(reader, opts)
            if entry is None:
                raise BlocktraceError("couldn't find entry")
            click.echo(f"{entry.index}@{entry.pos_after_data}")
            return
        if image is None:
            raise UsageError("replay needs an IMAGE to write to (or --find)")
        with progress_bar(reader.size, "replaying") as update:

            def on_entry(entry: LogEntry) -> None:
                if verbose:
                    click.echo(verbose_line(entry))
                if update is not None:
                    update(entry.end_offset)

            result = do_replay(reader, image, opts, progress=on_entry)
    for bad in result.skipped:
        click.echo(f"blocktrace: warning: skipped {bad}", err=True)
    if result.skipped_count > len(result.skipped):
        more = result.skipped_count - len(result.skipped)
        click.echo(f"blocktrace: warning: skipped {more} more entries", err=True)
    if result.salvage_error is not None:
        click.echo(
            f"blocktrace: warning: {result.salvage_error}; replayed the "
            f"{result.entries} valid entries before it",
            err=True,
        )
    last = (
        f", stopped after entry {result.last.index} ({result.stopped_by})"
        if result.last is not None and result.stopped_by != "end"
        else ""
    )
    click.echo(
        f"replayed {result.entries} entries: {result.bytes_written} bytes written, "
        f"{result.bytes_zeroed} bytes zeroed"
        + (f", {result.skipped_count} skipped" if result.skipped_count else "")
        + last,
        err=True,
    )
