"""QMP, QEMU's Machine Protocol, spoken by blocktrace so QEMU's tools drive it (docs/qmp.md).

Layers, bottom up (sans-IO below the line, asyncio above, as for NBD)::

    control.py        Control: the handlers' context (service, jobs, events); serve --qmp
    block_exports.py  block-export-add / -del, query-block-exports
    jobs.py           block-trace as a block job; TraceEvent -> JOB_STATUS_CHANGE, BLOCK_JOB_*
    server.py         asyncio: listeners, per-client reader/executor/writer, event fan-out
    client.py         a blocking client for the CLI
    ------------------------------------------------------------------------------------
    commands.py       command table, QAPI-like argument schema, QEMU's argument errors
    protocol.py       ServerConnection: greeting, envelope checks, negotiation, rendering
    framing.py        streaming JSON splitter with size and depth limits
    errors.py         error classes and QEMU 7.2's exact sentences
"""
