"""``blocktrace qmp COMMAND [ARGS...]``: run one QMP command against a running server.

Argument handling only; :mod:`blocktrace.qmp.client` talks to the socket.  ARGS are either one
JSON object or ``KEY=VALUE`` pairs as in qmp-shell (VALUE is JSON when it parses, a string
otherwise; ``target.type=log`` nests).  Output is the ``return`` value, pretty-printed for
people or, with ``--json``, one compact JSON line for scripts.  A QMP error is one line on
stderr (``CLASS: desc``) and exit status 1.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any, TypeVar

import click

from blocktrace.errors import BlocktraceError, UsageError
from blocktrace.listen import parse_listen
from blocktrace.qmp.client import DEFAULT_TIMEOUT, CommandError, QMPClient

ENV_SOCKET = "BLOCKTRACE_QMP"
F = TypeVar("F", bound=Callable[..., Any])


def connection_options(fn: F) -> F:
    """``--socket``/``--tcp``/``--timeout``/``--json``, shared with ``blocktrace trace``."""
    fn = click.option(
        "--json", "as_json", is_flag=True, help="Print machine-readable JSON (one line)."
    )(fn)
    fn = click.option(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        show_default=True,
        help="Seconds to wait for the server.",
    )(fn)
    fn = click.option(
        "--tcp", "tcp", metavar="HOST:PORT", default=None, help="QMP over TCP instead."
    )(fn)
    fn = click.option(
        "-s",
        "--socket",
        "socket_path",
        metavar="PATH",
        default=None,
        help=f"The server's QMP Unix socket (serve --qmp PATH; default ${ENV_SOCKET}).",
    )(fn)
    return fn


def open_client(socket_path: str | None, tcp: str | None, timeout: float) -> QMPClient:
    if tcp is not None:
        if socket_path is not None:
            raise UsageError("give either --socket or --tcp, not both")
        return QMPClient.connect_to(parse_listen(tcp, "--tcp"), timeout=timeout)
    path = socket_path or os.environ.get(ENV_SOCKET)
    if not path:
        raise UsageError(f"no QMP socket: give --socket PATH (or set ${ENV_SOCKET})")
    return QMPClient.connect_to(path, timeout=timeout)


def command_failed(exc: CommandError) -> BlocktraceError:
    """A QMP error as the one line the CLI prints."""
    return BlocktraceError(f"{exc.error_class}: {exc.desc}")


def parse_arguments(args: tuple[str, ...]) -> dict[str, Any]:
    if len(args) == 1 and args[0].lstrip().startswith("{"):
        try:
            value = json.loads(args[0])
        except json.JSONDecodeError as exc:
            raise UsageError(f"arguments are not valid JSON: {exc}") from None
        if not isinstance(value, dict):
            raise UsageError("arguments must be a JSON object")
        return value
    out: dict[str, Any] = {}
    for arg in args:
        key, eq, raw = arg.partition("=")
        if not eq or not key:
            raise UsageError(f"expected KEY=VALUE or one JSON object, got {arg!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise UsageError(f"{key}: {p} is already set to a value")
            node = child
        node[leaf] = value
    return out


def print_value(value: Any, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(value))
        return
    if value == {}:
        return
    from rich.console import Console
    from rich.json import JSON

    Console().print(JSON.from_data(value))


@click.command()
@click.argument("command")
@click.argument("args", nargs=-1)
@connection_options
def qmp(
    command: str,
    args: tuple[str, ...],
    socket_path: str | None,
    tcp: str | None,
    timeout: float,
    as_json: bool,
) -> None:
    """Run one QMP COMMAND on a running ``blocktrace serve --qmp`` (or QEMU).

    \b
    Examples:
      blocktrace qmp query-block-jobs -s qmp.sock
      blocktrace qmp block-trace -s qmp.sock device=disk target.type=log target.filename=d.log
      blocktrace qmp block-export-add -s qmp.sock '{"id": "b", "filename": "b.img"}'
    """
    arguments = parse_arguments(args)
    with open_client(socket_path, tcp, timeout) as client:
        try:
            value = client.execute(command, arguments or None)
        except CommandError as exc:
            raise command_failed(exc) from None
    print_value(value, as_json)
