"""``blocktrace verify A B``: are two images identical?  Exit 0 if so, 1 if not.

A and B are paths, or URIs of a scheme :mod:`blocktrace.verify` knows (``file://``, NBD URIs)
or one added with :func:`blocktrace.verify.register_source`.
"""

from __future__ import annotations

import click

from blocktrace.cli.replay import progress_bar
from blocktrace.verify import DEFAULT_BLOCK_SIZE, MAX_REGIONS, compare, open_source

#: differing regions listed on the terminal (the result keeps more)
SHOW_REGIONS = 10


@click.command()
@click.argument("a")
@click.argument("b")
@click.option(
    "--block-size",
    type=click.IntRange(min=1),
    default=DEFAULT_BLOCK_SIZE,
    show_default=True,
    help="Unit in which differing blocks are counted.",
)
def verify(a: str, b: str, block_size: int) -> None:
    """Compare images A and B; report the first differing offset and differing blocks."""
    src_a = open_source(a)
    try:
        src_b = open_source(b)
        try:
            with progress_bar(max(src_a.size, src_b.size), "verifying") as update:
                result = compare(src_a, src_b, block_size=block_size, progress=update)
        finally:
            src_b.close()
    finally:
        src_a.close()
    if result.identical:
        click.echo(f"identical: {result.size_a} bytes")
        return
    if result.size_a != result.size_b:
        click.echo(f"sizes differ: {a} is {result.size_a} bytes, {b} is {result.size_b}")
    click.echo(
        f"differ: first difference at byte {result.first_difference}; "
        f"{result.differing_blocks} of {result.total_blocks} blocks of "
        f"{result.block_size} bytes differ"
    )
    shown = result.regions[:SHOW_REGIONS]
    more = len(result.regions) - len(shown)
    capped = "+" if len(result.regions) >= MAX_REGIONS else ""
    click.echo(f"differing regions ({len(result.regions)}{capped}):")
    for offset, length in shown:
        click.echo(f"  {offset}+{length}  [{offset:#x}, {offset + length:#x})")
    if more > 0:
        click.echo(f"  ... and {more} more")
    raise click.exceptions.Exit(1)
