"""Exports at runtime: ``block-export-add``, ``block-export-del``, ``query-block-exports``.

Modelled on QEMU's ``block/export/export.c``, with one simplification: an export is made
straight from an image file (``filename``) instead of a block node, and its NBD export name is
its ``id``.  QEMU's sentences are kept (``Block export id 'x' is already in use``, ``Export 'x'
is not found``, ``Export 'x' still in use``), and ``mode`` keeps QEMU's meaning: ``safe``
refuses while NBD clients are connected, ``hard`` disconnects them.

The rule for traces: an export with a trace job on it cannot be deleted in any mode; cancel
the job first.  Deleting it would end the trace without its ``BLOCK_JOB_*`` event, or leave a
job recording a device nobody can reach.  ``BLOCK_EXPORT_DELETED`` is sent once the export is
gone and its clients are disconnected.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from blocktrace.errors import BlocktraceError, StateError
from blocktrace.qmp import errors
from blocktrace.qmp.commands import Bool, CommandTable, Enum, Member, Str

if TYPE_CHECKING:
    from blocktrace.qmp.control import Control

BlockExportType = Enum("BlockExportType", ("nbd",))
BlockExportRemoveMode = Enum("BlockExportRemoveMode", ("safe", "hard"))


def export_info(ctx: Control, export: Any) -> dict[str, Any]:
    """``BlockExportInfo`` plus what a blocktrace user wants to see."""
    return {
        "id": export.name,
        "type": "nbd",
        "node-name": export.name,
        "shutting-down": False,
        "filename": export.filename,
        "writable": not export.read_only,
        "size": export.device.size,
        "connections": export.connections,
        "jobs": ctx.jobs.jobs_on(export.name),
    }


def register(table: CommandTable) -> None:
    @table.command(
        "block-export-add",
        Member("type", BlockExportType, optional=True, default="nbd"),
        Member("id", Str()),
        Member("filename", Str()),
        Member("writable", Bool(), optional=True, default=False),
        doc="Open a raw image and export it over NBD under the name ``id``.",
    )
    async def block_export_add(ctx: Control, args: dict[str, Any]) -> Any:
        name = args["id"]
        if not name:
            raise errors.generic("Parameter 'id' must not be empty")
        async with ctx.lock:
            if name in ctx.service.registry:
                raise errors.export_id_in_use(name)
            try:
                ctx.service.add_export(name, args["filename"], read_only=not args["writable"])
            except BlocktraceError as exc:
                raise errors.generic(str(exc)) from None
            except OSError as exc:
                raise errors.generic(
                    f"Could not open '{args['filename']}': {exc.strerror or exc}"
                ) from None
        return {}

    @table.command(
        "block-export-del",
        Member("id", Str()),
        Member("mode", BlockExportRemoveMode, optional=True, default="safe"),
        doc="Remove an export; refused while a trace job runs on it.",
    )
    async def block_export_del(ctx: Control, args: dict[str, Any]) -> Any:
        name = args["id"]
        async with ctx.lock:
            export = ctx.service.registry.get(name)
            if export is None:
                raise errors.export_not_found(name)
            jobs = ctx.jobs.jobs_on(name)
            if jobs:
                raise errors.generic(
                    f"Export '{name}' is in use by trace job '{jobs[0]}'; "
                    "stop it with block-job-cancel first"
                )
            if args["mode"] == "safe" and export.connections:
                raise errors.generic(f"Export '{name}' still in use")
            try:
                await ctx.service.remove_export(name, mode=args["mode"])
            except StateError:
                raise errors.generic(f"Export '{name}' still in use") from None
            except BlocktraceError as exc:
                raise errors.generic(str(exc)) from None
        ctx.emit("BLOCK_EXPORT_DELETED", {"id": name})
        return {}

    @table.command("query-block-exports", doc="List the exports.", returns="[BlockExportInfo]")
    async def query_block_exports(ctx: Control, args: dict[str, Any]) -> Any:
        return [export_info(ctx, e) for e in ctx.service.registry]
