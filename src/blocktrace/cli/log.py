"""``blocktrace log info|list|find LOG``: inspect dm-log-writes logs (ours, QEMU's, the kernel's).

``info`` checks every counted entry (bounds, replay-log's validity rules, our checksums) and
describes the tail after the counted entries; ``list`` prints entries like ``replay-log -v``;
``find`` is ``replay-log --find`` (``ENTRY@POS``, exit 1 if nothing matches).
"""

from __future__ import annotations

from collections import Counter

import click

from blocktrace.cli.replay import make_options, selection_options, verbose_line
from blocktrace.errors import BlocktraceError
from blocktrace.logwrites.format import LogFlag
from blocktrace.logwrites.reader import LogReader
from blocktrace.logwrites.replay import find as find_entry


@click.group("log")
def log() -> None:
    """Inspect dm-log-writes logs; save one from JetStream."""


@log.command()
@click.argument("path", metavar="LOG", type=click.Path(dir_okay=False))
def info(path: str) -> None:
    """Summarize LOG and check every entry (checksums included)."""
    with LogReader(path) as reader:
        sup = reader.super
        kinds: Counter[str] = Counter()
        data_bytes = 0
        checksummed = 0
        marks: list[str] = []
        for entry in reader.entries():
            flags = entry.flags
            if entry.is_zeroes:
                kinds["zeroes"] += 1
            elif entry.is_discard:
                kinds["discards"] += 1
            elif entry.nr_sectors:
                kinds["writes"] += 1
                data_bytes += entry.length
            for flag in (LogFlag.FLUSH, LogFlag.FUA, LogFlag.MARK, LogFlag.METADATA):
                if flags & flag:
                    kinds[str(flag.name).lower()] += 1
            if entry.mark is not None:
                marks.append(entry.mark)
            checksummed += entry.checksummed
        tail = reader.tail()
        click.echo(f"log: {path}")
        click.echo(f"format: dm-log-writes version {sup.version}, sector size {sup.sector_size}")
        click.echo(f"entries: {sup.nr_entries}")
        for kind in ("writes", "zeroes", "discards", "flush", "fua", "mark", "metadata"):
            if kinds[kind]:
                click.echo(f"  {kind}: {kinds[kind]}")
        click.echo(f"data bytes: {data_bytes}")
        if sup.log_id is not None or checksummed:
            lid = f"{sup.log_id:#010x}" if sup.log_id is not None else "unknown"
            click.echo(
                f"checksums: {checksummed} of {sup.nr_entries} entries verified "
                f"(blocktrace extension, log id {lid})"
            )
        else:
            click.echo("checksums: none (not written by blocktrace)")
        if marks:
            shown = ", ".join(marks[:10]) + (", ..." if len(marks) > 10 else "")
            click.echo(f"marks: {shown}")
        if tail.state == "clean":
            click.echo(f"tail: clean (log ends at byte {tail.end_offset})")
        else:
            text = f"tail: {tail.state}"
            if tail.entries:
                how = "checksum-verified" if tail.verified else "unverified"
                text += f", {tail.entries} uncounted {how} entries (not replayed"
                text += " unless --salvage)" if tail.verified else ")"
            if tail.torn_offset is not None:
                text += f", torn data at byte {tail.torn_offset} ({tail.trailing_bytes} bytes)"
            click.echo(text)


@log.command("list")
@click.argument("path", metavar="LOG", type=click.Path(dir_okay=False))
@click.option("--start-entry", type=click.IntRange(min=0), default=0, help="First entry.")
@click.option("--limit", type=click.IntRange(min=0), default=0, help="At most N entries.")
@click.option("--salvage", is_flag=True, help="List the valid prefix of a corrupt log.")
def list_(path: str, start_entry: int, limit: int, salvage: bool) -> None:
    """List entries: INDEX@POS, target sector, size, flags, mark text."""
    with LogReader(path) as reader:
        for shown, entry in enumerate(reader.entries(start_entry, salvage=salvage), 1):
            line = verbose_line(entry, "entry")
            if entry.is_zeroes:
                line += " (zeroes)"
            if not entry.counted:
                line += " (uncounted)"
            click.echo(line)
            if limit and shown == limit:
                break
        if salvage and reader.salvage_error is not None:
            click.echo(f"blocktrace: warning: {reader.salvage_error}", err=True)


@log.command("find")
@click.argument("path", metavar="LOG", type=click.Path(dir_okay=False))
@selection_options
def find(
    path: str,
    limit: int,
    start_entry: int,
    start_mark: str | None,
    end_mark: str | None,
    next_flush: bool,
    next_fua: bool,
) -> None:
    """Print ENTRY@POS of the entry a replay with these options would stop at."""
    opts = make_options(limit, start_entry, start_mark, end_mark, next_flush, next_fua)
    with LogReader(path) as reader:
        entry = find_entry(reader, opts)
    if entry is None:
        raise BlocktraceError("couldn't find entry")
    click.echo(f"{entry.index}@{entry.pos_after_data}")


@log.command("save")
@click.argument("url", metavar="nats://HOST:PORT/SUBJECT")
@click.argument("path", metavar="FILE", type=click.Path(dir_okay=False))
@click.option("--sector-size", type=int, default=512, help="Log sector size (default 512).")
@click.option("--force", is_flag=True, help="Overwrite FILE if it exists.")
def save(url: str, path: str, sector_size: int, force: bool) -> None:
    """Write the trace published on a JetStream subject as a dm-log-writes log FILE."""
    from blocktrace.cli.jetstream import run_save

    run_save(url, path, sector_size=sector_size, force=force)
