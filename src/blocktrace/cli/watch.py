"""``blocktrace watch BASE_IMAGE LOG``: file-level events from a recorded write stream.

Argument handling only; the work is :class:`blocktrace.ext4.watcher.Watcher`.  Events go to
stdout as JSON lines (``--json``, the default when stdout is not a terminal) or one readable
line each; a summary (records, transactions, pending-set counters) goes to stderr with
``--stats``.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict

import click

from blocktrace.errors import UsageError


@click.command("watch")
@click.argument("base_image", type=click.Path(dir_okay=False))
@click.argument("log", type=click.Path(dir_okay=False))
@click.option(
    "--json/--human",
    "as_json",
    default=None,
    help="JSON lines (default when stdout is not a terminal) or readable lines.",
)
@click.option("--stats", is_flag=True, help="Print engine counters to stderr at the end.")
@click.option(
    "--max-pending",
    type=click.IntRange(min=1),
    default=None,
    help="Unowned blocks remembered while waiting for their metadata.",
)
@click.option(
    "--max-pending-bytes",
    type=click.IntRange(min=0),
    default=None,
    help="Bytes of pending block contents kept (oldest dropped first).",
)
@click.option("--no-verify", is_flag=True, help="Do not verify blocktrace log checksums.")
@click.option(
    "--follow",
    "-f",
    is_flag=True,
    help="Keep reading as the log grows (a running trace) until its end mark or Ctrl-C.",
)
@click.option(
    "--events",
    "events_url",
    metavar="nats://HOST:PORT/SUBJECT",
    help="Also publish each event (JSON) to this NATS subject.",
)
def watch(
    base_image: str,
    log: str,
    as_json: bool | None,
    stats: bool,
    max_pending: int | None,
    max_pending_bytes: int | None,
    no_verify: bool,
    follow: bool,
    events_url: str | None,
) -> None:
    """Follow the ext4 file systems of BASE_IMAGE through the writes recorded in LOG.

    BASE_IMAGE is the raw image as it was when the recording started; LOG is a dm-log-writes
    log (blocktrace, Linux dm-log-writes or QEMU blklogwrites), or nats://HOST:PORT/SUBJECT
    for a trace published to JetStream.  The image is only read.
    """
    import os

    from blocktrace.ext4.watcher import Watcher
    from blocktrace.jetstream.conn import is_nats_url
    from blocktrace.logwrites.records import follow_log_records, log_records

    from_stream = is_nats_url(log)
    for path, what in ((base_image, "base image"), (log, "log")):
        if not os.path.isfile(path) and not ((follow or from_stream) and path == log):
            raise UsageError(f"{what} {path}: no such file")
    if as_json is None:
        as_json = not sys.stdout.isatty()
    kwargs = {}
    if max_pending is not None:
        kwargs["max_pending"] = max_pending
    if max_pending_bytes is not None:
        kwargs["max_pending_bytes"] = max_pending_bytes
    if from_stream or events_url:
        from blocktrace.cli.jetstream import run_watch

        if not from_stream:
            raise UsageError("--events needs a nats:// source for now (see docs/jetstream.md)")
        _tune_gc()
        counters = run_watch(
            base_image,
            log,
            as_json=as_json,
            follow=follow,
            events_url=events_url,
            watcher_kw=kwargs,
        )
        if stats:
            click.echo(json.dumps({n: asdict(s) for n, s in counters.items()}), err=True)
        return
    out = sys.stdout
    with Watcher(base_image, **kwargs) as watcher:
        _tune_gc()
        try:
            records = (follow_log_records if follow else log_records)(log, verify=not no_verify)
            for event in watcher.feed(records):
                out.write((event.to_json() if as_json else event.describe()) + "\n")
                if follow:
                    out.flush()
        except BrokenPipeError:
            sys.stderr.close()  # e.g. | head: stop quietly
            return
        finally:
            out.flush()
        if stats:
            counters = {name: asdict(s) for name, s in watcher.stats().items()}
            click.echo(json.dumps(counters), err=True)


def _tune_gc() -> None:
    """Keep Python's cyclic garbage collector off the inference hot path, in this process only
    (the library leaves interpreter-wide state alone; a live ``introspect`` target runs inside
    the server).  The model built by the crawl is long-lived and acyclic-by-design, yet every
    full collection re-scanned it: the collector was ~10% of ``watch`` on a metadata-heavy
    stream.  Freezing moves the crawled model out of the collector's generations, and a larger
    first-generation threshold makes collections rarer; cyclic garbage is still collected, so
    memory stays bounded by the engine's documented caps.
    """
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(100_000, 50, 1000)
