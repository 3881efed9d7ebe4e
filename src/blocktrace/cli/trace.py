"""``blocktrace trace start|stop|mark|list``: drive trace jobs of a running server over QMP.

Argument handling only.  ``start`` takes the same spelling as ``serve --trace``
(``[EXPORT=]TYPE:ARG[,option=value...]``) and turns it into one ``block-trace`` command;
``stop`` is ``block-job-cancel`` plus waiting for the job's ``BLOCK_JOB_COMPLETED`` (or
``CANCELLED``) event, so when it returns the target is complete and closed.  Output is for
people by default (a rich table for ``list``) and one JSON value with ``--json``.
"""

from __future__ import annotations

import json
from typing import Any

import click

from blocktrace.cli.qmp import command_failed, connection_options, open_client
from blocktrace.errors import BlocktraceError, UsageError
from blocktrace.qmp.client import CommandError, QMPClient
from blocktrace.stream.registry import targets
from blocktrace.trace.options import parse_trace_spec


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _run(client: QMPClient, command: str, arguments: dict[str, Any] | None = None) -> Any:
    try:
        return client.execute(command, arguments)
    except CommandError as exc:
        raise command_failed(exc) from None


def _emit(value: Any, as_json: bool, text: str) -> None:
    click.echo(json.dumps(value) if as_json else text)


@click.group()
def trace() -> None:
    """Start, stop, mark and list traces on a running server (QMP block jobs)."""


@trace.command()
@click.argument("spec", metavar="[EXPORT=]TYPE:ARG[,OPTION=VALUE...]")
@click.option("--job-id", default=None, help="Job id (default: job-id= in SPEC, else the export).")
@click.option(
    "--wait/--no-wait",
    default=True,
    show_default=True,
    help="Wait until the trace is ready (a sync=full copy has finished).",
)
@connection_options
def start(
    spec: str,
    job_id: str | None,
    wait: bool,
    socket_path: str | None,
    tcp: str | None,
    timeout: float,
    as_json: bool,
) -> None:
    """Start a trace on a running server (QMP block-trace).

    \b
    Example: disk=log:/var/tmp/disk.log,sync=full
    SPEC is spelled as for serve --trace:
      sync=none|full  copy-mode=background|write-blocking
      on-target-error=report|break  queue-size=SIZE  job-id=ID
      and the target's own options (see serve --help; log and introspect:
      force=on to replace an existing file).
    """
    parsed = parse_trace_spec(spec)
    # the target's schema turns the text values into QMP's JSON ones (sizes, on|off)
    target = targets().get(parsed.target["type"]).to_json(parsed.target)
    with open_client(socket_path, tcp, timeout) as client:
        export = parsed.export
        if not export:
            exports = [e["id"] for e in _run(client, "query-block-exports")]
            if len(exports) != 1:
                raise UsageError(
                    f"the server has {len(exports)} exports: write EXPORT={spec} to pick one"
                )
            export = exports[0]
        args: dict[str, Any] = {"device": export, "target": target, **parsed.options.to_dict()}
        job = job_id or parsed.job_id or export
        if job != export:
            args["job-id"] = job
        _run(client, "block-trace", args)
        ready = False
        if wait:
            ev = client.wait_event(
                lambda e: (
                    e.get("data", {}).get("device") == job
                    and e["event"]
                    in ("BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED")
                )
            )
            if ev["event"] != "BLOCK_JOB_READY":
                why = ev["data"].get("error", "ended before it was ready")
                raise BlocktraceError(f"trace {job} failed: {why}")
            ready = True
    opts = parsed.options.to_dict()
    opts["queue-size"] = _human_bytes(opts["queue-size"]).replace(".0 ", " ")
    desc = ", ".join(f"{k}={v}" for k, v in opts.items())
    _emit(
        {"job-id": job, "device": export, "ready": ready},
        as_json,
        f"trace {job} started: {export} -> {target['type']}:"
        f"{target.get('filename') or target.get('uri')} ({desc}){' ready' if ready else ''}",
    )


@trace.command()
@click.argument("job")
@click.option(
    "--wait/--no-wait",
    default=True,
    show_default=True,
    help="Wait until every queued record is delivered and the target closed.",
)
@connection_options
def stop(
    job: str, wait: bool, socket_path: str | None, tcp: str | None, timeout: float, as_json: bool
) -> None:
    """Stop trace JOB cleanly (block-job-cancel); fails if the trace had failed."""
    with open_client(socket_path, tcp, timeout) as client:
        _run(client, "block-job-cancel", {"device": job})
        if not wait:
            _emit({"job-id": job}, as_json, f"trace {job} stopping")
            return
        ev = client.wait_event(
            lambda e: (
                e["event"] in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED")
                and e.get("data", {}).get("device") == job
            )
        )
    data = ev["data"]
    if as_json:
        click.echo(json.dumps({"event": ev["event"], **data}))
    if data.get("error"):
        raise BlocktraceError(f"trace {job} failed: {data['error']}")
    if not as_json:
        how = "stopped" if ev["event"] == "BLOCK_JOB_COMPLETED" else "cancelled before ready"
        click.echo(f"trace {job} {how}: {_human_bytes(data['offset'])} delivered")


@trace.command()
@click.argument("job")
@click.argument("name")
@connection_options
def mark(
    job: str, name: str, socket_path: str | None, tcp: str | None, timeout: float, as_json: bool
) -> None:
    """Write mark NAME into trace JOB (returns once the target holds it)."""
    with open_client(socket_path, tcp, timeout) as client:
        value = _run(client, "block-trace-mark", {"job-id": job, "name": name})
    where = (
        f"at entry {value['entry']}"
        if "entry" in value
        else f"at stream position {value['position']}"
    )
    _emit(value, as_json, f"mark {name!r} written to {job} {where}")


@trace.command(name="list")
@connection_options
def list_(socket_path: str | None, tcp: str | None, timeout: float, as_json: bool) -> None:
    """List the running traces."""
    with open_client(socket_path, tcp, timeout) as client:
        jobs = _run(client, "query-block-jobs")
    if as_json:
        click.echo(json.dumps(jobs))
        return
    if not jobs:
        click.echo("no traces running")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None)
    for col in ("JOB", "EXPORT", "STATUS", "TARGET", "MODE", "ENTRIES", "BYTES", "QUEUED"):
        table.add_column(col, justify="right" if col in ("ENTRIES", "BYTES", "QUEUED") else "left")
    for j in jobs:
        tgt = j.get("target", {})
        where = tgt.get("filename") or tgt.get("uri") or tgt.get("name", "")
        status = j["status"] + (f" ({j['io-status']})" if j.get("io-status", "ok") != "ok" else "")
        table.add_row(
            j["device"],
            j.get("export", ""),
            status,
            f"{tgt.get('type', '?')}:{where}",
            f"{j.get('copy-mode', '')} sync={j.get('sync', '')}",
            str(j.get("entries", "")),
            _human_bytes(j.get("bytes", 0)),
            _human_bytes(j.get("queued-bytes", 0)),
        )
    Console(width=160).print(table)
