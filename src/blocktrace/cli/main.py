"""The ``blocktrace`` command: a click group whose subcommands load lazily.

Each subcommand lives in its own module (``blocktrace.cli.<module>``) exposing a click command
or group named in :data:`COMMANDS`; loading lazily keeps ``blocktrace --help`` and the short
commands fast.  Every :class:`~blocktrace.errors.BlocktraceError` that reaches here is printed as
one line and turns into a non-zero exit; tracebacks only with ``--debug``.
"""

from __future__ import annotations

import importlib
import logging
import sys
from typing import Any

import click

from blocktrace import __version__
from blocktrace.errors import BlocktraceError, UsageError

#: command name -> (module under blocktrace.cli, attribute, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "attach": ("attach", "attach", "Trace a running QEMU's disk without a restart."),
    "detach": ("attach", "detach", "Detach disks from a running `blocktrace attach`."),
    "serve": ("serve", "serve", "Serve disk images over NBD (optionally traced, with QMP)."),
    "demo": ("demo", "demo", "Run the built-in demonstration end to end."),
    "log": ("log", "log", "Inspect dm-log-writes logs (info, list, find)."),
    "replay": ("replay", "replay", "Replay a dm-log-writes log onto an image (as replay-log)."),
    "verify": ("verify", "verify", "Compare two images; exit 0 if identical, 1 if not."),
    "watch": ("watch", "watch", "File-level events (ext4) from a base image and a write log."),
    "qmp": ("qmp", "qmp", "Run one QMP command on a running server (--socket PATH)."),
    "trace": ("trace", "trace", "Start, stop, mark and list traces on a running server."),
    "crashcheck": (
        "crashcheck",
        "crashcheck",
        "Check a file system at every crash point of a log.",
    ),
    "record": ("record", "record", "Run a workload on a traced scratch disk, then crashcheck it."),
    "mark": ("record", "mark", "Write a mark into the running `record` trace (from its workload)."),
}


class LazyGroup(click.Group):
    """A group that imports a subcommand's module only when it is used."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        entry = COMMANDS.get(cmd_name)
        if entry is None:
            return None
        module, attr, _ = entry
        command = getattr(importlib.import_module(f"blocktrace.cli.{module}"), attr)
        assert isinstance(command, click.Command)
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, COMMANDS[name][2]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="blocktrace")
@click.option("-v", "--verbose", count=True, help="More logging (-vv for debug).")
@click.option("--debug", is_flag=True, help="Debug logging and full tracebacks on errors.")
@click.pass_context
def cli(ctx: click.Context, verbose: int, debug: bool) -> None:
    """Serve virtual disks over NBD and record their write stream precisely."""
    level = logging.DEBUG if debug or verbose >= 2 else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


def main(argv: list[str] | None = None) -> Any:
    """Entry point: run the CLI, turning our errors into one line and an exit status."""
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        return cli.main(args=argv, prog_name="blocktrace", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("blocktrace: aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except BlocktraceError as exc:
        if debug:
            raise
        click.echo(f"blocktrace: {exc}", err=True)
        sys.exit(2 if isinstance(exc, UsageError) else 1)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    sys.exit(main())
